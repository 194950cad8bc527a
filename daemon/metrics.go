package daemon

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"maps"
	"math"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/vmnic/vmnic/pkg/apis/v1alpha1"
	"github.com/vmnic/vmnic/pkg/dhcp"
	"github.com/vmnic/vmnic/pkg/netconf"
)

// DefaultMetricsAddr is where vmnicd serves Prometheus metrics: node-local
// by default, the DaemonSet runs on the host network.
const DefaultMetricsAddr = "127.0.0.1:9961"

// processStart is when this process started, for the uptime in
// VMNIC_STATUS and process_start_time_seconds.
var processStart = time.Now()

// requestBuckets are the upper bounds of the request latency histogram, in
// seconds: from a pass-through (milliseconds) to an ADD that waited for
// IPAM, OVS and the API server (the CRI's own deadline is 2-4 minutes).
var requestBuckets = []float64{0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120}

// Verbs and modes used as label values; anything else is "other" or
// "unknown", so a hostile or broken request cannot blow up the series.
var (
	metricVerbs = []string{"ADD", "DEL", "CHECK", "STATUS", "GC"}
	metricModes = []string{netconf.ModeMasquerade, netconf.ModeBridge, netconf.ModePasst}
)

// GC removal kinds.
const (
	GCAttachment = "attachment"
	GCOVSPort    = "ovs_port"
)

// Metrics are vmnicd's counters for Prometheus. Create them with
// NewMetrics and pass them in Options.Observe.Metrics; the gauges (attachments,
// DHCP servers, readiness) are read from the daemon at scrape time. Every
// method is safe on a nil *Metrics, which counts nothing.
type Metrics struct {
	mu        sync.Mutex
	requests  map[requestKey]*histogram
	errors    map[errorKey]uint64
	gcRemoved map[string]uint64
	events    map[string]uint64
	migration struct{ held, switched, failed uint64 }
	caps      map[string]bool
	dhcp      dhcpTotals
}

type requestKey struct{ verb, mode, result string }

type errorKey struct {
	verb, mode string
	code       uint
}

// NewMetrics returns zeroed metrics.
func NewMetrics() *Metrics {
	return &Metrics{
		requests:  map[requestKey]*histogram{},
		errors:    map[errorKey]uint64{},
		gcRemoved: map[string]uint64{GCAttachment: 0, GCOVSPort: 0},
		events:    map[string]uint64{},
		dhcp:      dhcpTotals{seen: map[string]dhcpSeen{}},
	}
}

// Metrics returns the daemon's metrics (nil when none were configured;
// their methods then do nothing).
func (d *Daemon) Metrics() *Metrics { return d.opts.Observe.Metrics }

// MigrationHeld counts a migration target wired and held silent.
func (m *Metrics) MigrationHeld() { m.add(func() { m.migration.held++ }) }

// MigrationSwitched counts a held target released at switchover.
func (m *Metrics) MigrationSwitched() { m.add(func() { m.migration.switched++ }) }

// MigrationFailed counts a migration that failed or was aborted while its
// target was held.
func (m *Metrics) MigrationFailed() { m.add(func() { m.migration.failed++ }) }

// GCRemoved counts one stale object removed by garbage collection: kind is
// GCAttachment or GCOVSPort.
func (m *Metrics) GCRemoved(kind string) { m.add(func() { m.gcRemoved[kind]++ }) }

// SetCapabilities records the node's last capability report: one
// vmnic_capability_ready gauge per mode.
func (m *Metrics) SetCapabilities(r v1alpha1.NodeNetworkCapabilityStatus) {
	caps := map[string]bool{}
	for _, c := range r.Conditions {
		if label, ok := v1alpha1.ModeLabels[c.Type]; ok {
			caps[strings.TrimPrefix(label, v1alpha1.GroupName+"/")] = c.Status == "True"
		}
	}
	m.add(func() { m.caps = caps })
}

func (m *Metrics) event(result string) { m.add(func() { m.events[result]++ }) }

func (m *Metrics) add(f func()) {
	if m == nil {
		return
	}
	m.mu.Lock()
	f()
	m.mu.Unlock()
}

// request counts one CNI request.
func (m *Metrics) request(verb, mode string, err error, elapsed time.Duration) {
	if !slices.Contains(metricVerbs, verb) {
		verb = "other"
	}
	result := "ok"
	var code uint
	if err != nil {
		result = "error"
		code = types.ErrInternal
		var te *types.Error
		if errors.As(err, &te) {
			code = te.Code
		}
	}
	m.add(func() {
		k := requestKey{verb, mode, result}
		h := m.requests[k]
		if h == nil {
			h = newHistogram(requestBuckets)
			m.requests[k] = h
		}
		h.observe(elapsed.Seconds())
		if err != nil {
			m.errors[errorKey{verb, mode, code}]++
		}
	})
}

// requestCounts returns verb → result → count.
func (m *Metrics) requestCounts() map[string]map[string]uint64 {
	if m == nil {
		return nil
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	out := map[string]map[string]uint64{}
	for k, h := range m.requests {
		if out[k.verb] == nil {
			out[k.verb] = map[string]uint64{}
		}
		out[k.verb][k.result] += h.count
	}
	return out
}

// histogram is a Prometheus histogram: per-bucket (not cumulative) counts,
// the sum and the count.
type histogram struct {
	bounds []float64
	counts []uint64
	sum    float64
	count  uint64
}

func newHistogram(bounds []float64) *histogram {
	return &histogram{bounds: bounds, counts: make([]uint64, len(bounds))}
}

func (h *histogram) observe(v float64) {
	h.sum += v
	h.count++
	for i, b := range h.bounds {
		if v <= b {
			h.counts[i]++
			return
		}
	}
}

// dhcpTotals turns the per-server counters, which start from zero with
// every server, into counters for the daemon's lifetime: a server no longer
// running (or replaced) leaves its last seen counts behind in retired. What
// a server counted after it was last seen and before it stopped is lost;
// the daemon looks after every request and every scrape, and guests take
// their leases right after ADD.
type dhcpTotals struct {
	seen    map[string]dhcpSeen
	retired dhcpCounts
}

// dhcpSeen is a server's counters as last seen; srv tells one server from
// the next of the same attachment.
type dhcpSeen struct {
	srv  any
	last dhcpCounts
}

type dhcpCounts struct{ v4Acks, v4Naks, v6Replies, ras uint64 }

func countsOf(s dhcp.Stats) dhcpCounts {
	return dhcpCounts{v4Acks: s.V4Acks, v4Naks: s.V4Naks, v6Replies: s.V6Replies, ras: s.RAsSent}
}

func (c dhcpCounts) plus(o dhcpCounts) dhcpCounts {
	return dhcpCounts{c.v4Acks + o.v4Acks, c.v4Naks + o.v4Naks, c.v6Replies + o.v6Replies, c.ras + o.ras}
}

// updateDHCP takes in the running servers' counters and returns the totals.
func (m *Metrics) updateDHCP(running map[string]*dhcp.Server) dhcpCounts {
	if m == nil {
		return dhcpCounts{}
	}
	now := make(map[string]dhcpSeen, len(running))
	for k, srv := range running {
		now[k] = dhcpSeen{srv: srv, last: countsOf(srv.Stats())}
	}
	return m.takeDHCP(now)
}

// takeDHCP replaces the servers seen by those running now and returns the
// lifetime totals.
func (m *Metrics) takeDHCP(now map[string]dhcpSeen) dhcpCounts {
	m.mu.Lock()
	defer m.mu.Unlock()
	t := &m.dhcp
	for k, s := range t.seen {
		if n, ok := now[k]; !ok || n.srv != s.srv {
			t.retired = t.retired.plus(s.last)
			delete(t.seen, k)
		}
	}
	total := t.retired
	for k, s := range now {
		t.seen[k] = s
		total = total.plus(s.last)
	}
	return total
}

// runningServers copies the registry's map of running servers.
func (s *Servers) runningServers() map[string]*dhcp.Server {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[string]*dhcp.Server, len(s.running))
	for k, v := range s.running {
		out[k] = v
	}
	return out
}

// nodeState is what the metrics read from the daemon at scrape time.
type nodeState struct {
	ready       bool
	attachments map[string]int
	incomplete  int
	held        int
	unreadable  int
	dhcpServers int
	pendingDELs int
	dhcp        dhcpCounts
}

func (d *Daemon) nodeState() nodeState {
	st := nodeState{ready: d.ready.Load(), attachments: map[string]int{}}
	for _, m := range metricModes {
		st.attachments[m] = 0
	}
	views, unreadable := d.attachmentViews()
	st.unreadable = unreadable
	for _, v := range views {
		switch {
		case !v.Complete:
			st.incomplete++
		default:
			st.attachments[v.Mode]++
		}
		if v.Held {
			st.held++
		}
	}
	running := d.servers.runningServers()
	st.dhcpServers = len(running)
	st.dhcp = d.Metrics().updateDHCP(running)
	st.pendingDELs = d.pendingDELs()
	return st
}

// WriteMetrics writes the metrics in the Prometheus text exposition format
// (version 0.0.4).
func (d *Daemon) WriteMetrics(w *bytes.Buffer) {
	st := d.nodeState()
	m := d.Metrics()
	e := &expo{w: w}

	e.family("vmnic_build_info", "gauge", "vmnicd's build; the value is 1.")
	e.sample("vmnic_build_info", labels{{"version", Version}}, 1)
	e.family("vmnic_ready", "gauge", "1 when vmnicd serves CNI requests, 0 while it starts or stops (requests then get CNI code 11).")
	e.sample("vmnic_ready", nil, boolValue(st.ready))
	e.family("process_start_time_seconds", "gauge", "Start time of the process since the Unix epoch in seconds.")
	e.sample("process_start_time_seconds", nil, float64(processStart.Unix()))

	e.family("vmnic_attachments", "gauge", "VM NICs (attachments) wired on this node, by mode.")
	for _, mode := range slices.Sorted(maps.Keys(st.attachments)) {
		e.sample("vmnic_attachments", labels{{"mode", mode}}, float64(st.attachments[mode]))
	}
	e.family("vmnic_attachments_incomplete", "gauge", "Attachments whose ADD never finished (a daemon killed half-way); DEL or GC removes them.")
	e.sample("vmnic_attachments_incomplete", nil, float64(st.incomplete))
	e.family("vmnic_attachment_records_unreadable", "gauge", "Attachment records that could not be read.")
	e.sample("vmnic_attachment_records_unreadable", nil, float64(st.unreadable))
	e.family("vmnic_migration_held_attachments", "gauge", "Migration targets currently held silent until their switchover.")
	e.sample("vmnic_migration_held_attachments", nil, float64(st.held))
	e.family("vmnic_spooled_dels", "gauge", "DELs the shim spooled while the daemon was away, not replayed yet.")
	e.sample("vmnic_spooled_dels", nil, float64(st.pendingDELs))
	e.family("vmnic_dhcp_servers", "gauge", "Attachments whose DHCP (and RA) servers run.")
	e.sample("vmnic_dhcp_servers", nil, float64(st.dhcpServers))

	e.family("vmnic_dhcp_leases_total", "counter", "Leases handed to guests: DHCPv4 ACKs and DHCPv6 Replies.")
	e.sample("vmnic_dhcp_leases_total", labels{{"family", "v4"}}, float64(st.dhcp.v4Acks))
	e.sample("vmnic_dhcp_leases_total", labels{{"family", "v6"}}, float64(st.dhcp.v6Replies))
	e.family("vmnic_dhcp_naks_total", "counter", "DHCPv4 NAKs sent to guests asking for an address that is not theirs.")
	e.sample("vmnic_dhcp_naks_total", nil, float64(st.dhcp.v4Naks))
	e.family("vmnic_router_advertisements_total", "counter", "IPv6 Router Advertisements sent to guests.")
	e.sample("vmnic_router_advertisements_total", nil, float64(st.dhcp.ras))

	if m == nil {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()

	keys := make([]requestKey, 0, len(m.requests))
	for k := range m.requests {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b requestKey) int {
		return strings.Compare(a.verb+"\x00"+a.mode+"\x00"+a.result, b.verb+"\x00"+b.mode+"\x00"+b.result)
	})
	e.family("vmnic_cni_requests_total", "counter", "CNI requests served by vmnicd, by verb, mode and result (ok or error).")
	for _, k := range keys {
		e.sample("vmnic_cni_requests_total", k.labels(), float64(m.requests[k].count))
	}
	e.family("vmnic_cni_request_duration_seconds", "histogram", "Time vmnicd took to serve a CNI request, by verb, mode and result.")
	for _, k := range keys {
		e.histogram("vmnic_cni_request_duration_seconds", k.labels(), m.requests[k])
	}
	ekeys := make([]errorKey, 0, len(m.errors))
	for k := range m.errors {
		ekeys = append(ekeys, k)
	}
	slices.SortFunc(ekeys, func(a, b errorKey) int {
		if c := strings.Compare(a.verb+"\x00"+a.mode, b.verb+"\x00"+b.mode); c != 0 {
			return c
		}
		return int(a.code) - int(b.code)
	})
	e.family("vmnic_cni_request_errors_total", "counter", "Failed CNI requests by verb, mode and CNI error code.")
	for _, k := range ekeys {
		e.sample("vmnic_cni_request_errors_total", labels{{"verb", k.verb}, {"mode", k.mode}, {"code", strconv.FormatUint(uint64(k.code), 10)}}, float64(m.errors[k]))
	}

	e.family("vmnic_gc_removed_total", "counter", "Stale objects removed by garbage collection (CNI GC, start and resync), by kind.")
	for _, kind := range slices.Sorted(maps.Keys(m.gcRemoved)) {
		e.sample("vmnic_gc_removed_total", labels{{"kind", kind}}, float64(m.gcRemoved[kind]))
	}
	e.family("vmnic_migration_holds_total", "counter", "Live-migration targets wired and held silent.")
	e.sample("vmnic_migration_holds_total", nil, float64(m.migration.held))
	e.family("vmnic_migration_switchovers_total", "counter", "Held migration targets released at switchover (addresses announced).")
	e.sample("vmnic_migration_switchovers_total", nil, float64(m.migration.switched))
	e.family("vmnic_migration_failures_total", "counter", "Migrations that failed or were aborted while their target was held.")
	e.sample("vmnic_migration_failures_total", nil, float64(m.migration.failed))

	if len(m.events) > 0 {
		e.family("vmnic_kube_events_total", "counter", "Kubernetes Events about wiring failures, by result (recorded, dropped, failed).")
		for _, r := range slices.Sorted(maps.Keys(m.events)) {
			e.sample("vmnic_kube_events_total", labels{{"result", r}}, float64(m.events[r]))
		}
	}
	if len(m.caps) > 0 {
		e.family("vmnic_capability_ready", "gauge", "1 when the node's last capability probe found everything a mode needs (NodeNetworkCapability conditions).")
		for _, mode := range slices.Sorted(maps.Keys(m.caps)) {
			e.sample("vmnic_capability_ready", labels{{"mode", mode}}, boolValue(m.caps[mode]))
		}
	}
}

func (k requestKey) labels() labels {
	return labels{{"verb", k.verb}, {"mode", k.mode}, {"result", k.result}}
}

func boolValue(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// expo writes the Prometheus text exposition format.
type expo struct{ w *bytes.Buffer }

type labels [][2]string

func (e *expo) family(name, typ, help string) {
	fmt.Fprintf(e.w, "# HELP %s %s\n# TYPE %s %s\n", name, escapeHelp(help), name, typ)
}

func (e *expo) sample(name string, ls labels, v float64) {
	e.w.WriteString(name)
	if len(ls) > 0 {
		e.w.WriteByte('{')
		for i, l := range ls {
			if i > 0 {
				e.w.WriteByte(',')
			}
			e.w.WriteString(l[0])
			e.w.WriteString(`="`)
			e.w.WriteString(escapeLabel(l[1]))
			e.w.WriteByte('"')
		}
		e.w.WriteByte('}')
	}
	e.w.WriteByte(' ')
	e.w.WriteString(formatValue(v))
	e.w.WriteByte('\n')
}

func (e *expo) histogram(name string, ls labels, h *histogram) {
	var cum uint64
	for i, b := range h.bounds {
		cum += h.counts[i]
		e.sample(name+"_bucket", append(slices.Clone(ls), [2]string{"le", formatValue(b)}), float64(cum))
	}
	e.sample(name+"_bucket", append(slices.Clone(ls), [2]string{"le", "+Inf"}), float64(h.count))
	e.sample(name+"_sum", ls, h.sum)
	e.sample(name+"_count", ls, float64(h.count))
}

var (
	helpEscaper  = strings.NewReplacer(`\`, `\\`, "\n", `\n`)
	labelEscaper = strings.NewReplacer(`\`, `\\`, "\n", `\n`, `"`, `\"`)
)

func escapeHelp(s string) string  { return helpEscaper.Replace(s) }
func escapeLabel(s string) string { return labelEscaper.Replace(s) }

func formatValue(v float64) string {
	switch {
	case math.IsInf(v, 1):
		return "+Inf"
	case math.IsInf(v, -1):
		return "-Inf"
	case math.IsNaN(v):
		return "NaN"
	case v == math.Trunc(v) && math.Abs(v) < 1e15:
		return strconv.FormatInt(int64(v), 10)
	}
	return strconv.FormatFloat(v, 'g', -1, 64)
}

// MetricsHandler serves /metrics (Prometheus text format), /healthz
// (200 while the CNI socket is this daemon's and answers, and attachment
// work is not wedged: health.go; 503 naming what is wrong) and /readyz
// (200 once the daemon serves CNI requests, 503 before).
func (d *Daemon) MetricsHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /metrics", func(w http.ResponseWriter, _ *http.Request) {
		var b bytes.Buffer
		d.WriteMetrics(&b)
		w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
		_, _ = w.Write(b.Bytes())
	})
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		if err := d.health(r.Context()); err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		if !d.ready.Load() {
			http.Error(w, "starting or stopping", http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ok\n"))
	})
	return mux
}

// ServeMetrics serves MetricsHandler on ln until ctx ends.
func (d *Daemon) ServeMetrics(ctx context.Context, ln net.Listener) error {
	srv := &http.Server{
		Handler:           d.MetricsHandler(),
		ReadHeaderTimeout: 10 * time.Second,
		WriteTimeout:      30 * time.Second,
	}
	stop := context.AfterFunc(ctx, func() {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	})
	defer stop()
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("serve metrics on %s: %w", ln.Addr(), err)
	}
	return nil
}
