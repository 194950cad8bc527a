package daemon

import (
	"bytes"
	"errors"
	"log/slog"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"

	"github.com/vmnic/vmnic/pkg/apis/v1alpha1"
	"github.com/vmnic/vmnic/pkg/dhcp"
	"github.com/vmnic/vmnic/pkg/kubevirt"
	"github.com/vmnic/vmnic/pkg/version"
)

// processStart is when this process started, for the uptime in
// VMNIC_STATUS and process_start_time_seconds.
var processStart = time.Now()

// requestBuckets are the upper bounds of the request latency histogram, in
// seconds: from a pass-through (milliseconds) to an ADD that waited for
// IPAM, OVS and the API server (the CRI's own deadline is 2-4 minutes).
var requestBuckets = []float64{0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120}

// Verbs used as label values, as the registered modes are; anything else
// is "other" or "unknown", so a hostile or broken request cannot blow up
// the series.
var metricVerbs = []string{"ADD", "DEL", "CHECK", "STATUS", "GC"}

// GC removal kinds.
const (
	GCAttachment = "attachment"
	GCOVSPort    = "ovs_port"
)

// Metrics are vmnicd's counters for Prometheus, in a registry of their own
// (never the process-wide default one: tests and embedders run several
// daemons in a process). Create them with NewMetrics and pass them in
// Options.Observe.Metrics; the gauges (attachments, DHCP servers,
// readiness) are read from the daemon at scrape time (nodeCollector).
// Every method is safe on a nil *Metrics, which counts nothing.
type Metrics struct {
	reg *prometheus.Registry

	requests  *prometheus.CounterVec
	durations *prometheus.HistogramVec
	errors    *prometheus.CounterVec
	gcRemoved *prometheus.CounterVec
	holds     prometheus.Counter
	switches  prometheus.Counter
	failures  prometheus.Counter
	gaps      *prometheus.HistogramVec
	apiCalls  *prometheus.CounterVec
	apiBytes  *prometheus.CounterVec

	// mu guards what metricsCollector reads at scrape time.
	mu sync.Mutex
	// events counts Kubernetes Events by result; a plain map because
	// events_test.go reads it directly.
	events map[string]uint64
	// caps is the last capability report, replaced as a whole.
	caps map[string]bool
	dhcp dhcpTotals
}

// Label names of the request families.
var (
	requestLabels = []string{"verb", "mode", "result"}
	errorLabels   = []string{"verb", "mode", "code"}
)

// NewMetrics returns zeroed metrics.
func NewMetrics() *Metrics {
	m := &Metrics{
		reg: prometheus.NewRegistry(),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vmnic_cni_requests_total",
			Help: "CNI requests served by vmnicd, by verb, mode and result (ok or error).",
		}, requestLabels),
		durations: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "vmnic_cni_request_duration_seconds",
			Help:    "Time vmnicd took to serve a CNI request, by verb, mode and result.",
			Buckets: requestBuckets,
		}, requestLabels),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vmnic_cni_request_errors_total",
			Help: "Failed CNI requests by verb, mode and CNI error code.",
		}, errorLabels),
		gcRemoved: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vmnic_gc_removed_total",
			Help: "Stale objects removed by garbage collection (CNI GC, start and resync), by kind.",
		}, []string{"kind"}),
		holds: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vmnic_migration_holds_total",
			Help: "Live-migration targets wired and held silent.",
		}),
		switches: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vmnic_migration_switchovers_total",
			Help: "Held migration targets released at switchover (addresses announced).",
		}),
		failures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vmnic_migration_failures_total",
			Help: "Migrations that failed or were aborted while their target was held.",
		}),
		gaps: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "vmnic_migration_network_gap_seconds",
			Help:    "Live migrations' network gap, measured on the target: from the last frame the VM's guest sent on the source node to the first it sent on this one, by mode.",
			Buckets: gapBuckets,
		}, []string{"mode"}),
		events: map[string]uint64{},
		dhcp:   dhcpTotals{seen: map[string]dhcpSeen{}},
	}
	// Both kinds are served from the start, at 0: a dashboard's rate()
	// needs the series before the first removal.
	m.gcRemoved.WithLabelValues(GCAttachment)
	m.gcRemoved.WithLabelValues(GCOVSPort)
	m.apiCalls = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "vmnic_kube_api_requests_total",
		Help: "Requests vmnicd sent to the Kubernetes API server, by verb (get, list, watch, create, update, patch, delete), resource and result (2xx, 4xx, 5xx, error).",
	}, []string{"verb", "resource", "code"})
	m.apiBytes = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "vmnic_kube_api_response_bytes_total",
		Help: "Bytes vmnicd read from the Kubernetes API server's answers (bodies, as sent: a watch's stream counts as it arrives), by verb and resource.",
	}, []string{"verb", "resource"})
	m.reg.MustRegister(m.requests, m.durations, m.errors, m.gcRemoved, m.holds, m.switches, m.failures, m.gaps, m.apiCalls, m.apiBytes, metricsCollector{m})
	return m
}

// Metrics returns the daemon's metrics (nil when none were configured;
// their methods then do nothing).
func (d *Daemon) Metrics() *Metrics { return d.opts.Observe.Metrics }

// MigrationHeld counts a migration target wired and held silent.
func (m *Metrics) MigrationHeld() {
	if m != nil {
		m.holds.Inc()
	}
}

// apiCall counts one request to the API server.
func (m *Metrics) apiCall(verb, resource, code string) {
	if m != nil {
		m.apiCalls.WithLabelValues(verb, resource, code).Inc()
	}
}

// apiRead counts bytes read from an answer of the API server.
func (m *Metrics) apiRead(verb, resource string) prometheus.Counter {
	if m == nil {
		return nil
	}
	return m.apiBytes.WithLabelValues(verb, resource)
}

// MigrationSwitched counts a held target released at switchover.
func (m *Metrics) MigrationSwitched() {
	if m != nil {
		m.switches.Inc()
	}
}

// gapBuckets span a migration's network gap: tens of milliseconds on a
// quiet switch to seconds when a target waits for the VMI's status.
var gapBuckets = []float64{0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30}

// MigrationGap observes one migration's network gap in a mode.
func (m *Metrics) MigrationGap(mode string, gap time.Duration) {
	if m != nil {
		m.gaps.WithLabelValues(mode).Observe(gap.Seconds())
	}
}

// MigrationFailed counts a migration that failed or was aborted while its
// target was held.
func (m *Metrics) MigrationFailed() {
	if m != nil {
		m.failures.Inc()
	}
}

// GCRemoved counts one stale object removed by garbage collection: kind is
// GCAttachment or GCOVSPort.
func (m *Metrics) GCRemoved(kind string) {
	if m != nil {
		m.gcRemoved.WithLabelValues(kind).Inc()
	}
}

// SetCapabilities records the node's last capability report: one
// vmnic_capability_ready gauge per mode.
func (m *Metrics) SetCapabilities(r v1alpha1.NodeNetworkCapabilityStatus) {
	if m == nil {
		return
	}
	caps := map[string]bool{}
	for _, c := range r.Conditions {
		if label, ok := v1alpha1.ModeLabels[c.Type]; ok {
			caps[strings.TrimPrefix(label, v1alpha1.GroupName+"/")] = c.Status == "True"
		}
	}
	m.mu.Lock()
	m.caps = caps
	m.mu.Unlock()
}

func (m *Metrics) event(result string) {
	if m == nil {
		return
	}
	m.mu.Lock()
	m.events[result]++
	m.mu.Unlock()
}

// request counts one CNI request.
func (m *Metrics) request(verb, mode string, err error, elapsed time.Duration) {
	if m == nil {
		return
	}
	if !slices.Contains(metricVerbs, verb) {
		verb = "other"
	}
	result := "ok"
	if err != nil {
		result = "error"
		code := types.ErrInternal
		var te *types.Error
		if errors.As(err, &te) {
			code = te.Code
		}
		m.errors.WithLabelValues(verb, mode, strconv.FormatUint(uint64(code), 10)).Inc()
	}
	m.requests.WithLabelValues(verb, mode, result).Inc()
	m.durations.WithLabelValues(verb, mode, result).Observe(elapsed.Seconds())
}

// requestCounts returns verb → result → count, read back from
// vmnic_cni_requests_total.
func (m *Metrics) requestCounts() map[string]map[string]uint64 {
	if m == nil {
		return nil
	}
	ch := make(chan prometheus.Metric)
	go func() {
		m.requests.Collect(ch)
		close(ch)
	}()
	out := map[string]map[string]uint64{}
	for metric := range ch {
		var s dto.Metric
		if metric.Write(&s) != nil {
			continue
		}
		var verb, result string
		for _, l := range s.GetLabel() {
			switch l.GetName() {
			case "verb":
				verb = l.GetValue()
			case "result":
				result = l.GetValue()
			}
		}
		if out[verb] == nil {
			out[verb] = map[string]uint64{}
		}
		out[verb][result] += uint64(s.GetCounter().GetValue())
	}
	return out
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
	watches     []kubevirt.WatchHealth
}

func (d *Daemon) nodeState() nodeState {
	st := nodeState{ready: d.ready.Load(), attachments: map[string]int{}}
	for _, m := range d.modeNames {
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
	st.watches = d.watches()
	return st
}

// The families collected at scrape time, by nodeCollector and
// metricsCollector.
var (
	buildInfoDesc   = prometheus.NewDesc("vmnic_build_info", "vmnicd's build; the value is 1.", []string{"version"}, nil)
	readyDesc       = prometheus.NewDesc("vmnic_ready", "1 when vmnicd serves CNI requests, 0 while it starts or stops (requests then get CNI code 11).", nil, nil)
	startTimeDesc   = prometheus.NewDesc("process_start_time_seconds", "Start time of the process since the Unix epoch in seconds.", nil, nil)
	attachmentsDesc = prometheus.NewDesc("vmnic_attachments", "VM NICs (attachments) wired on this node, by mode.", []string{"mode"}, nil)
	incompleteDesc  = prometheus.NewDesc("vmnic_attachments_incomplete", "Attachments whose ADD never finished (a daemon killed half-way); DEL or GC removes them.", nil, nil)
	unreadableDesc  = prometheus.NewDesc("vmnic_attachment_records_unreadable", "Attachment records that could not be read.", nil, nil)
	heldDesc        = prometheus.NewDesc("vmnic_migration_held_attachments", "Migration targets currently held silent until their switchover.", nil, nil)
	spooledDesc     = prometheus.NewDesc("vmnic_spooled_dels", "DELs the shim spooled while the daemon was away, not replayed yet.", nil, nil)
	dhcpServersDesc = prometheus.NewDesc("vmnic_dhcp_servers", "Attachments whose DHCP (and RA) servers run.", nil, nil)
	leasesDesc      = prometheus.NewDesc("vmnic_dhcp_leases_total", "Leases handed to guests: DHCPv4 ACKs and DHCPv6 Replies.", []string{"family"}, nil)
	naksDesc        = prometheus.NewDesc("vmnic_dhcp_naks_total", "DHCPv4 NAKs sent to guests asking for an address that is not theirs.", nil, nil)
	rasDesc         = prometheus.NewDesc("vmnic_router_advertisements_total", "IPv6 Router Advertisements sent to guests.", nil, nil)
	eventsDesc      = prometheus.NewDesc("vmnic_kube_events_total", "Kubernetes Events about wiring failures, by result (recorded, dropped, failed).", []string{"result"}, nil)
	capabilityDesc  = prometheus.NewDesc("vmnic_capability_ready", "1 when the node's last capability probe found everything a mode needs (NodeNetworkCapability conditions).", []string{"mode"}, nil)
	informerLabels  = []string{"resource", "selector"}
	syncedDesc      = prometheus.NewDesc("vmnic_informer_synced", "1 once the informer of an API resource (pods on this node, the VMIs on this node, the VMIs migrating to it: the selector says which) has synced its cache.", informerLabels, nil)
	watchUpDesc     = prometheus.NewDesc("vmnic_informer_watch_up", "1 while a watch on the API resource is open.", informerLabels, nil)
	watchDownDesc   = prometheus.NewDesc("vmnic_informer_watch_down_seconds", "How long no watch on the API resource has been open (0 while one is); /readyz fails past --watch-down-threshold.", informerLabels, nil)
	lastEventDesc   = prometheus.NewDesc("vmnic_informer_last_event_age_seconds", "Age of the last thing the API server sent on the resource: a list, a new watch, an event or a bookmark (about every minute on a quiet watch).", informerLabels, nil)
	informerEvents  = prometheus.NewDesc("vmnic_informer_objects_received_total", "Objects the API server sent the informer: the items of its lists and the events of its watches (not bookmarks). Scoped to the node, it grows with the node's own VMs, not with the cluster.", informerLabels, nil)
)

// nodeCollector reads the daemon's state once per scrape: readiness, the
// attachments on record, the DHCP servers and their lifetime totals.
type nodeCollector struct{ d *Daemon }

func (nodeCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{
		buildInfoDesc, readyDesc, startTimeDesc, attachmentsDesc, incompleteDesc, unreadableDesc,
		heldDesc, spooledDesc, dhcpServersDesc, leasesDesc, naksDesc, rasDesc,
		syncedDesc, watchUpDesc, watchDownDesc, lastEventDesc, informerEvents,
	} {
		ch <- d
	}
}

func (c nodeCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.d.nodeState()
	gauge := func(d *prometheus.Desc, v float64, lvs ...string) {
		constMetric(ch, d, prometheus.GaugeValue, v, lvs...)
	}
	counter := func(d *prometheus.Desc, v uint64, lvs ...string) {
		constMetric(ch, d, prometheus.CounterValue, float64(v), lvs...)
	}
	gauge(buildInfoDesc, 1, version.Version)
	gauge(readyDesc, boolValue(st.ready))
	gauge(startTimeDesc, float64(processStart.Unix()))
	for mode, n := range st.attachments {
		gauge(attachmentsDesc, float64(n), mode)
	}
	gauge(incompleteDesc, float64(st.incomplete))
	gauge(unreadableDesc, float64(st.unreadable))
	gauge(heldDesc, float64(st.held))
	gauge(spooledDesc, float64(st.pendingDELs))
	gauge(dhcpServersDesc, float64(st.dhcpServers))
	counter(leasesDesc, st.dhcp.v4Acks, "v4")
	counter(leasesDesc, st.dhcp.v6Replies, "v6")
	counter(naksDesc, st.dhcp.v4Naks)
	counter(rasDesc, st.dhcp.ras)
	now := time.Now()
	for _, w := range st.watches {
		gauge(syncedDesc, boolValue(w.Synced), w.Resource, w.Selector)
		gauge(watchUpDesc, boolValue(w.Watching), w.Resource, w.Selector)
		gauge(watchDownDesc, w.Down(now).Seconds(), w.Resource, w.Selector)
		if !w.LastEvent.IsZero() {
			gauge(lastEventDesc, now.Sub(w.LastEvent).Seconds(), w.Resource, w.Selector)
		}
		counter(informerEvents, w.Events, w.Resource, w.Selector)
	}
}

// metricsCollector serves what Metrics keep under their lock rather than
// in client_golang's types: events by result and the last capability
// report. Neither family is served before its first value.
type metricsCollector struct{ m *Metrics }

func (metricsCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- eventsDesc
	ch <- capabilityDesc
}

func (c metricsCollector) Collect(ch chan<- prometheus.Metric) {
	c.m.mu.Lock()
	defer c.m.mu.Unlock()
	for result, n := range c.m.events {
		constMetric(ch, eventsDesc, prometheus.CounterValue, float64(n), result)
	}
	for mode, ok := range c.m.caps {
		constMetric(ch, capabilityDesc, prometheus.GaugeValue, boolValue(ok), mode)
	}
}

// constMetric sends one sample; a label value client_golang refuses (not
// UTF-8) fails that sample in the scrape, not the whole daemon.
func constMetric(ch chan<- prometheus.Metric, d *prometheus.Desc, t prometheus.ValueType, v float64, lvs ...string) {
	m, err := prometheus.NewConstMetric(d, t, v, lvs...)
	if err != nil {
		m = prometheus.NewInvalidMetric(d, err)
	}
	ch <- m
}

func boolValue(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// gatherer is what a scrape reads: the daemon's state, collected at
// scrape time, and the registry of its Metrics, if any.
func (d *Daemon) gatherer() prometheus.Gatherer {
	node := prometheus.NewRegistry()
	node.MustRegister(nodeCollector{d})
	if m := d.Metrics(); m != nil {
		return prometheus.Gatherers{node, m.reg}
	}
	return node
}

// metricsHandler serves /metrics: the text format, or whatever else the
// scraper's Accept header asks for and client_golang speaks.
func (d *Daemon) metricsHandler() http.Handler {
	return promhttp.HandlerFor(d.gatherer(), promhttp.HandlerOpts{
		ErrorLog:      slog.NewLogLogger(d.log.Handler(), slog.LevelError),
		ErrorHandling: promhttp.ContinueOnError,
	})
}

// WriteMetrics writes the metrics in the Prometheus text exposition format
// (version 0.0.4).
func (d *Daemon) WriteMetrics(w *bytes.Buffer) {
	mfs, err := d.gatherer().Gather()
	if err != nil {
		// What could be gathered is still written, as /metrics serves it.
		d.log.Error("gather metrics", "err", err)
	}
	enc := expfmt.NewEncoder(w, expfmt.NewFormat(expfmt.TypeTextPlain))
	for _, mf := range mfs {
		if err := enc.Encode(mf); err != nil {
			d.log.Error("encode metrics", "family", mf.GetName(), "err", err)
		}
	}
}
