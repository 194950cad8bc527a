package daemon

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/vmnic/vmnic/pkg/api"
	"github.com/vmnic/vmnic/pkg/apis/v1alpha1"
	"github.com/vmnic/vmnic/pkg/proto"
	"github.com/vmnic/vmnic/pkg/spool"
	"github.com/vmnic/vmnic/pkg/state"
	"github.com/vmnic/vmnic/pkg/version"
)

var update = flag.Bool("update", false, "rewrite golden files")

func newTestDaemon(t *testing.T, o ObserveOptions) *Daemon {
	t.Helper()
	dir := t.TempDir()
	d, err := New(Options{
		Socket: filepath.Join(dir, "s.sock"), StateDir: filepath.Join(dir, "state"), SpoolDir: filepath.Join(dir, "spool"),
		Logger: slog.New(slog.DiscardHandler), Observe: o,
	})
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// testRecords: a wired masquerade VM NIC, a held bridge-mode migration
// target, a passt VM NIC, and a bridge ADD that never finished.
func putTestRecords(t *testing.T, d *Daemon) {
	t.Helper()
	created := time.Date(2026, 10, 1, 12, 0, 0, 0, time.UTC)
	recs := []*state.Record{
		{
			ContainerID: "c1", IfName: "eth0", Network: "podnet", Netns: "/run/netns/p1", Mode: "masquerade", CNIVersion: "1.0.0",
			Pod: state.Pod{Namespace: "default", Name: "virt-launcher-vm1-abcde", UID: "u1"}, VMName: "vm1", Created: created,
			Spec:   json.RawMessage(`{"netns":"/run/netns/p1","podIf":"eth0","bridge":"k6t-eth0","tap":"tap0","guestMAC":"02:00:00:12:34:56","ipv4":true,"ipv6":true}`),
			Result: json.RawMessage(`{"cniVersion":"1.0.0","interfaces":[{"name":"veth1"},{"name":"eth0","sandbox":"/run/netns/p1"},{"name":"k6t-eth0","sandbox":"/run/netns/p1"},{"name":"tap0","sandbox":"/run/netns/p1"}],"ips":[{"address":"198.18.0.5/24","interface":1},{"address":"fd00:198:18::5/64","interface":1}]}`),
		},
		{
			ContainerID: "c2", IfName: "pod31afc46bc04", Network: "ovs-vlan100", Netns: "/run/netns/p2", Mode: "bridge", CNIVersion: "1.0.0",
			Pod: state.Pod{Namespace: "vms", Name: "virt-launcher-vm2-target", UID: "u2"}, VMName: "vm2", Created: created,
			Migration: &state.Migration{Job: "vm2-mig", UID: "m1", Phase: "TargetReady"},
			Spec: json.RawMessage(`{"podIf":"pod31afc46bc04","hostIf":"vmn0123456789a","ovsBridge":"br1","vlan":100,"vm":true,"linuxBridge":"k6t-pod31afc46bc04",
				"tap":"tap31afc46bc04","guestMAC":"02:76:0a:64:00:64","held":true,"addresses":{"cniVersion":"1.0.0","ips":[{"address":"10.100.0.100/24","gateway":"10.100.0.1"}]}}`),
			Result: json.RawMessage(`{"cniVersion":"1.0.0"}`),
		},
		{
			ContainerID: "c4", IfName: "eth0", Network: "macvlan-passt", Netns: "/run/netns/p4", Mode: "passt", CNIVersion: "1.0.0",
			Pod: state.Pod{Namespace: "vms", Name: "virt-launcher-vm3-a"}, VMName: "vm3", Created: created,
			Spec:   json.RawMessage(`{"containerID":"c4","netns":"/run/netns/p4","podIf":"eth0","mac":"0a:58:0a:00:00:05","ips":["172.16.10.100"]}`),
			Result: json.RawMessage(`{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/run/netns/p4"}],"ips":[{"address":"172.16.10.100/24","interface":0}]}`),
		},
		{
			ContainerID: "c3", IfName: "net1", Network: "ovs-vlan100", Netns: "/run/netns/p3", Mode: "bridge", CNIVersion: "1.0.0",
			Pod: state.Pod{Namespace: "default", Name: "plain-pod"}, Created: created,
			Spec: json.RawMessage(`{"podIf":"net1","hostIf":"vmnffff","ovsBridge":"br1","trunks":[10,20,21,22]}`),
		},
	}
	for _, r := range recs {
		if err := d.store.Put(r); err != nil {
			t.Fatal(err)
		}
	}
}

func TestMetricsGolden(t *testing.T) {
	m := NewMetrics()
	d := newTestDaemon(t, ObserveOptions{Metrics: m})
	putTestRecords(t, d)
	d.ready.Store(true)
	if err := spool.Write(d.opts.SpoolDir, "podnet", &proto.Request{Command: "DEL", ContainerID: "c9", IfName: "eth0"}); err != nil {
		t.Fatal(err)
	}
	m.request("ADD", "masquerade", nil, 30*time.Millisecond)
	m.request("ADD", "masquerade", nil, 700*time.Millisecond)
	m.request("ADD", "bridge", types.NewError(types.ErrInvalidNetworkConfig, "bridge: required", ""), 2*time.Millisecond)
	m.request("ADD", "bridge", errors.New("boom"), 200*time.Second)
	m.request("DEL", "masquerade", nil, 4*time.Millisecond)
	m.request("FOO", "unknown", types.NewError(types.ErrInvalidEnvironmentVariables, "CNI_COMMAND", ""), time.Millisecond)
	m.GCRemoved(GCAttachment)
	m.GCRemoved(GCOVSPort)
	m.GCRemoved(GCOVSPort)
	m.MigrationHeld()
	m.MigrationSwitched()
	m.event("recorded")
	m.takeDHCP(map[string]dhcpSeen{"a": {srv: 1, last: dhcpCounts{v4Acks: 2, v6Replies: 1, ras: 7}}})
	m.SetCapabilities(v1alpha1.NodeNetworkCapabilityStatus{Conditions: []metav1.Condition{
		{Type: v1alpha1.ConditionMasqueradeReady, Status: metav1.ConditionTrue},
		{Type: v1alpha1.ConditionPasstIpvlanReady, Status: metav1.ConditionFalse},
		{Type: v1alpha1.ConditionBridgeOVSReady, Status: metav1.ConditionTrue},
		{Type: v1alpha1.ConditionPasstMacvlanReady, Status: metav1.ConditionFalse},
	}})

	var b bytes.Buffer
	d.WriteMetrics(&b)
	validateExposition(t, b.String())
	got := regexp.MustCompile(`(?m)^process_start_time_seconds \S+$`).ReplaceAllString(b.String(), "process_start_time_seconds START")
	got = regexp.MustCompile(`(?m)^vmnic_build_info\{version="(?:[^"\\]|\\.)*"\} 1$`).ReplaceAllString(got, `vmnic_build_info{version="VERSION"} 1`)
	golden := filepath.Join("testdata", "metrics.golden")
	if *update {
		if err := os.WriteFile(golden, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatalf("%v (run with -update to create it)", err)
	}
	if got != string(want) {
		t.Errorf("metrics differ from %s (-update rewrites it):\n%s", golden, got)
	}
}

// TestMetricsFromRequests: what Handle serves is counted by verb, mode
// and result; introspection and requests refused before ready are not.
func TestMetricsFromRequests(t *testing.T) {
	m := NewMetrics()
	d := newTestDaemon(t, ObserveOptions{Metrics: m})
	masq := json.RawMessage(`{"cniVersion":"1.1.0","name":"podnet","type":"vmnic","mode":"masquerade"}`)
	ctx := context.Background()
	if r := d.Handle(ctx, &proto.Request{Command: "STATUS", Config: masq}); r.Error == nil || r.Error.Code != types.ErrPluginNotAvailable {
		t.Fatalf("STATUS before ready = %+v, want code 50", r.Error)
	}
	if r := d.Handle(ctx, &proto.Request{Command: "ADD", Config: masq}); r.Error == nil || r.Error.Code != types.ErrTryAgainLater {
		t.Fatalf("ADD before ready = %+v, want code 11", r.Error)
	}
	d.ready.Store(true)
	reqs := []*proto.Request{
		{Command: "STATUS", Config: masq},
		{Command: "STATUS", Config: masq},
		// No prevResult: code 7.
		{Command: "ADD", ContainerID: "c1", IfName: "eth0", Netns: "/nonexistent", Config: masq},
		// Nothing to delete: success.
		{Command: "DEL", ContainerID: "c1", IfName: "eth0", Config: masq},
		// Bridge mode without its bridge: code 7.
		{Command: "ADD", ContainerID: "c2", IfName: "eth0", Netns: "/x", Config: json.RawMessage(`{"cniVersion":"1.0.0","name":"n","type":"vmnic","mode":"bridge"}`)},
		{Command: "ADD", ContainerID: "c2", IfName: "eth0", Netns: "/x", Config: json.RawMessage(`{"cniVersion":`)},
		{Command: api.CommandStatus},
		{Command: api.CommandAttachments},
	}
	for _, r := range reqs {
		d.Handle(ctx, r)
	}
	var b bytes.Buffer
	d.WriteMetrics(&b)
	out := b.String()
	validateExposition(t, out)
	// client_golang writes labels sorted by name; testutil compares text.
	want := `
# HELP vmnic_cni_requests_total CNI requests served by vmnicd, by verb, mode and result (ok or error).
# TYPE vmnic_cni_requests_total counter
vmnic_cni_requests_total{mode="bridge",result="error",verb="ADD"} 1
vmnic_cni_requests_total{mode="masquerade",result="error",verb="ADD"} 1
vmnic_cni_requests_total{mode="masquerade",result="ok",verb="DEL"} 1
vmnic_cni_requests_total{mode="masquerade",result="ok",verb="STATUS"} 2
vmnic_cni_requests_total{mode="unknown",result="error",verb="ADD"} 1
# HELP vmnic_cni_request_errors_total Failed CNI requests by verb, mode and CNI error code.
# TYPE vmnic_cni_request_errors_total counter
vmnic_cni_request_errors_total{code="6",mode="unknown",verb="ADD"} 1
vmnic_cni_request_errors_total{code="7",mode="bridge",verb="ADD"} 1
vmnic_cni_request_errors_total{code="7",mode="masquerade",verb="ADD"} 1
# HELP vmnic_ready 1 when vmnicd serves CNI requests, 0 while it starts or stops (requests then get CNI code 11).
# TYPE vmnic_ready gauge
vmnic_ready 1
`
	if err := testutil.GatherAndCompare(d.gatherer(), strings.NewReader(want), "vmnic_cni_requests_total", "vmnic_cni_request_errors_total", "vmnic_ready"); err != nil {
		t.Error(err)
	}
	if n := testutil.CollectAndCount(m.durations); n != 5 {
		t.Errorf("%d request duration series, want one per requests_total series (5)", n)
	}
	if strings.Contains(out, "VMNIC_") {
		t.Errorf("introspection requests counted:\n%s", out)
	}
	if got := m.requestCounts(); got["STATUS"]["ok"] != 2 || got["ADD"]["error"] != 3 || got["DEL"]["ok"] != 1 {
		t.Errorf("requestCounts = %v", got)
	}
}

// validateExposition checks the text format: every sample's family has
// HELP and TYPE first, names and labels are well-formed, values parse, no
// series repeats, and histograms are cumulative with +Inf = _count.
func validateExposition(t *testing.T, text string) {
	t.Helper()
	name := `[a-zA-Z_:][a-zA-Z0-9_:]*`
	sampleRe := regexp.MustCompile(`^(` + name + `)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*"(?:,|))*\})? (\S+)$`)
	typed := map[string]string{}
	helped := map[string]bool{}
	seen := map[string]bool{}
	buckets := map[string][]float64{}
	counts := map[string]float64{}
	sc := bufio.NewScanner(strings.NewReader(text))
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		if f, ok := strings.CutPrefix(line, "# HELP "); ok {
			helped[strings.Fields(f)[0]] = true
			continue
		}
		if f, ok := strings.CutPrefix(line, "# TYPE "); ok {
			parts := strings.Fields(f)
			if len(parts) != 2 || !regexp.MustCompile(`^(counter|gauge|histogram|summary|untyped)$`).MatchString(parts[1]) {
				t.Errorf("line %d: bad TYPE %q", n, line)
				continue
			}
			if _, dup := typed[parts[0]]; dup {
				t.Errorf("line %d: TYPE of %s repeated", n, parts[0])
			}
			typed[parts[0]] = parts[1]
			continue
		}
		m := sampleRe.FindStringSubmatch(line)
		if m == nil {
			t.Errorf("line %d: not a sample: %q", n, line)
			continue
		}
		family := m[1]
		for _, suf := range []string{"_bucket", "_sum", "_count"} {
			if base, ok := strings.CutSuffix(family, suf); ok && typed[base] == "histogram" {
				family = base
			}
		}
		if typed[family] == "" || !helped[family] {
			t.Errorf("line %d: %s without HELP/TYPE before it", n, family)
		}
		if seen[m[1]+m[2]] {
			t.Errorf("line %d: series %s%s repeated", n, m[1], m[2])
		}
		seen[m[1]+m[2]] = true
		v, err := strconv.ParseFloat(m[3], 64)
		if err != nil {
			t.Errorf("line %d: value %q: %v", n, m[3], err)
		}
		if typed[family] == "counter" && !strings.HasSuffix(family, "_total") {
			t.Errorf("line %d: counter %s does not end in _total", n, family)
		}
		series := regexp.MustCompile(`,?le="[^"]*"`).ReplaceAllString(m[2], "")
		switch {
		case strings.HasSuffix(m[1], "_bucket"):
			buckets[family+series] = append(buckets[family+series], v)
		case strings.HasSuffix(m[1], "_count") && typed[family] == "histogram":
			counts[family+series] = v
		}
	}
	for s, bs := range buckets {
		for i := 1; i < len(bs); i++ {
			if bs[i] < bs[i-1] {
				t.Errorf("%s: buckets not cumulative: %v", s, bs)
			}
		}
		if bs[len(bs)-1] != counts[s] {
			t.Errorf("%s: +Inf bucket %v != count %v", s, bs[len(bs)-1], counts[s])
		}
	}
}

// TestMetricsCounters: each counting method moves its own series, in the
// Metrics' own registry (never the process-wide default one), and the
// families kept under the lock appear with their first value.
func TestMetricsCounters(t *testing.T) {
	m := NewMetrics()
	if err := testutil.GatherAndCompare(m.reg, strings.NewReader(""), "vmnic_kube_events_total", "vmnic_capability_ready"); err != nil {
		t.Errorf("before any event or report: %v", err)
	}
	m.MigrationHeld()
	m.MigrationHeld()
	m.MigrationSwitched()
	m.MigrationFailed()
	m.GCRemoved(GCOVSPort)
	m.event("dropped")
	m.event("dropped")
	m.event("failed")
	m.SetCapabilities(v1alpha1.NodeNetworkCapabilityStatus{Conditions: []metav1.Condition{
		{Type: v1alpha1.ConditionMasqueradeReady, Status: metav1.ConditionTrue},
	}})
	for name, tc := range map[string]struct {
		c    prometheus.Collector
		want float64
	}{
		"holds":         {m.holds, 2},
		"switchovers":   {m.switches, 1},
		"failures":      {m.failures, 1},
		"gc ovs_port":   {m.gcRemoved.WithLabelValues(GCOVSPort), 1},
		"gc attachment": {m.gcRemoved.WithLabelValues(GCAttachment), 0},
	} {
		if got := testutil.ToFloat64(tc.c); got != tc.want {
			t.Errorf("%s = %v, want %v", name, got, tc.want)
		}
	}
	want := `
# HELP vmnic_kube_events_total Kubernetes Events about wiring failures, by result (recorded, dropped, failed).
# TYPE vmnic_kube_events_total counter
vmnic_kube_events_total{result="dropped"} 2
vmnic_kube_events_total{result="failed"} 1
# HELP vmnic_capability_ready 1 when the node's last capability probe found everything a mode needs (NodeNetworkCapability conditions).
# TYPE vmnic_capability_ready gauge
vmnic_capability_ready{mode="masquerade"} 1
`
	if err := testutil.GatherAndCompare(m.reg, strings.NewReader(want), "vmnic_kube_events_total", "vmnic_capability_ready"); err != nil {
		t.Error(err)
	}
	if n, err := testutil.GatherAndCount(prometheus.DefaultGatherer, "vmnic_migration_holds_total", "vmnic_kube_events_total"); err != nil || n != 0 {
		t.Errorf("default registry holds %d vmnic series (%v), want none", n, err)
	}
	// A new report replaces the last one as a whole.
	m.SetCapabilities(v1alpha1.NodeNetworkCapabilityStatus{Conditions: []metav1.Condition{
		{Type: v1alpha1.ConditionBridgeOVSReady, Status: metav1.ConditionFalse},
	}})
	if err := testutil.CollectAndCompare(metricsCollector{m}, strings.NewReader(`
# HELP vmnic_capability_ready 1 when the node's last capability probe found everything a mode needs (NodeNetworkCapability conditions).
# TYPE vmnic_capability_ready gauge
vmnic_capability_ready{mode="bridge-ovs"} 0
`), "vmnic_capability_ready"); err != nil {
		t.Error(err)
	}
}

// TestMetricsLint runs client_golang's linter (promlint: naming, units,
// help) over everything a scrape serves.
func TestMetricsLint(t *testing.T) {
	m := NewMetrics()
	d := newTestDaemon(t, ObserveOptions{Metrics: m})
	m.request("ADD", "masquerade", nil, time.Millisecond)
	m.request("ADD", "bridge", errors.New("boom"), time.Millisecond)
	m.event("recorded")
	m.SetCapabilities(v1alpha1.NodeNetworkCapabilityStatus{Conditions: []metav1.Condition{
		{Type: v1alpha1.ConditionMasqueradeReady, Status: metav1.ConditionTrue},
	}})
	problems, err := testutil.GatherAndLint(d.gatherer())
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("%s: %s", p.Metric, p.Text)
	}
}

// TestMetricsWithoutCounters: a daemon without Metrics still serves the
// gauges it reads from its state, and none of the counters.
func TestMetricsWithoutCounters(t *testing.T) {
	d := newTestDaemon(t, ObserveOptions{})
	putTestRecords(t, d)
	if err := testutil.CollectAndCompare(nodeCollector{d}, strings.NewReader(`
# HELP vmnic_attachments VM NICs (attachments) wired on this node, by mode.
# TYPE vmnic_attachments gauge
vmnic_attachments{mode="bridge"} 1
vmnic_attachments{mode="masquerade"} 1
vmnic_attachments{mode="passt"} 1
# HELP vmnic_ready 1 when vmnicd serves CNI requests, 0 while it starts or stops (requests then get CNI code 11).
# TYPE vmnic_ready gauge
vmnic_ready 0
# HELP vmnic_dhcp_naks_total DHCPv4 NAKs sent to guests asking for an address that is not theirs.
# TYPE vmnic_dhcp_naks_total counter
vmnic_dhcp_naks_total 0
`), "vmnic_attachments", "vmnic_ready", "vmnic_dhcp_naks_total"); err != nil {
		t.Error(err)
	}
	if n, err := testutil.GatherAndCount(d.gatherer(), "vmnic_cni_requests_total", "vmnic_gc_removed_total", "vmnic_migration_holds_total"); err != nil || n != 0 {
		t.Errorf("counters served without Metrics: %d series (%v)", n, err)
	}
	var b bytes.Buffer
	d.WriteMetrics(&b)
	validateExposition(t, b.String())
}

// TestDHCPTotalsServed: the DHCP counters a scrape serves are lifetime
// totals; a server that stops (DEL) leaves its counts behind.
func TestDHCPTotalsServed(t *testing.T) {
	m := NewMetrics()
	d := newTestDaemon(t, ObserveOptions{Metrics: m})
	srv := new(int)
	m.takeDHCP(map[string]dhcpSeen{"a": {srv, dhcpCounts{v4Acks: 3, v4Naks: 1, v6Replies: 2, ras: 5}}})
	want := `
# HELP vmnic_dhcp_leases_total Leases handed to guests: DHCPv4 ACKs and DHCPv6 Replies.
# TYPE vmnic_dhcp_leases_total counter
vmnic_dhcp_leases_total{family="v4"} 3
vmnic_dhcp_leases_total{family="v6"} 2
# HELP vmnic_dhcp_naks_total DHCPv4 NAKs sent to guests asking for an address that is not theirs.
# TYPE vmnic_dhcp_naks_total counter
vmnic_dhcp_naks_total 1
# HELP vmnic_router_advertisements_total IPv6 Router Advertisements sent to guests.
# TYPE vmnic_router_advertisements_total counter
vmnic_router_advertisements_total 5
`
	// No server runs in this daemon: the scrape retires "a" and keeps its
	// counts, and the next scrape serves the same totals.
	for i := range 2 {
		if err := testutil.CollectAndCompare(nodeCollector{d}, strings.NewReader(want),
			"vmnic_dhcp_leases_total", "vmnic_dhcp_naks_total", "vmnic_router_advertisements_total"); err != nil {
			t.Errorf("scrape %d: %v", i, err)
		}
	}
}

func TestTakeDHCP(t *testing.T) {
	m := NewMetrics()
	a1, a2, b1 := new(int), new(int), new(int)
	steps := []struct {
		now  map[string]dhcpSeen
		want uint64
	}{
		{map[string]dhcpSeen{"a": {a1, dhcpCounts{v4Acks: 1}}}, 1},
		{map[string]dhcpSeen{"a": {a1, dhcpCounts{v4Acks: 3}}, "b": {b1, dhcpCounts{v4Acks: 1}}}, 4},
		// a's server replaced (restart): its 3 are kept, the new one counts from 0.
		{map[string]dhcpSeen{"a": {a2, dhcpCounts{v4Acks: 1}}, "b": {b1, dhcpCounts{v4Acks: 2}}}, 6},
		// b stopped (DEL): its last 2 stay.
		{map[string]dhcpSeen{"a": {a2, dhcpCounts{v4Acks: 1}}}, 6},
		{map[string]dhcpSeen{}, 6},
	}
	for i, s := range steps {
		if got := m.takeDHCP(s.now).v4Acks; got != s.want {
			t.Errorf("step %d: total %d, want %d", i, got, s.want)
		}
	}
	var nilM *Metrics
	if got := nilM.updateDHCP(nil); got != (dhcpCounts{}) {
		t.Errorf("nil metrics counted %v", got)
	}
	nilM.MigrationHeld()
	nilM.GCRemoved(GCAttachment)
	nilM.request("ADD", "bridge", nil, time.Second)
}

func TestIntrospection(t *testing.T) {
	m := NewMetrics()
	d := newTestDaemon(t, ObserveOptions{Metrics: m, Node: "node-a", Cluster: true, MetricsAddr: "127.0.0.1:9961"})
	putTestRecords(t, d)
	ctx := context.Background()
	// Not ready: every request, introspection included, is "try again
	// later"; vmnicctl reports that as "starting".
	if r := d.Handle(ctx, &proto.Request{Command: api.CommandStatus}); r.Error == nil || r.Error.Code != types.ErrTryAgainLater {
		t.Fatalf("VMNIC_STATUS before ready = %+v, want code 11", r.Error)
	}
	d.ready.Store(true)
	m.request("ADD", "masquerade", nil, time.Millisecond)

	r := d.Handle(ctx, &proto.Request{Command: api.CommandStatus})
	if r.Error != nil {
		t.Fatal(r.Error)
	}
	var st api.Status
	if err := json.Unmarshal(r.Result, &st); err != nil {
		t.Fatal(err)
	}
	if !st.Ready || st.Version != version.Version || st.Node != "node-a" || st.Source != "cluster" || st.TotalAttachments() != 3 ||
		st.Attachments["masquerade"] != 1 || st.Attachments["bridge"] != 1 || st.Attachments["passt"] != 1 || st.Incomplete != 1 || st.MetricsAddr != "127.0.0.1:9961" ||
		st.Requests["ADD"]["ok"] != 1 || st.Started.IsZero() {
		t.Errorf("status = %+v", st)
	}

	r = d.Handle(ctx, &proto.Request{Command: api.CommandAttachments})
	if r.Error != nil {
		t.Fatal(r.Error)
	}
	var list api.Attachments
	if err := json.Unmarshal(r.Result, &list); err != nil {
		t.Fatal(err)
	}
	if len(list.Items) != 4 {
		t.Fatalf("attachments = %+v", list.Items)
	}
	plain, masq, vm2, passt := list.Items[0], list.Items[1], list.Items[2], list.Items[3]
	if passt.Mode != "passt" || passt.VM != "vm3" || passt.Tap != "" || passt.Bridge != "" || passt.OVS != nil ||
		strings.Join(passt.PodIPs, ",") != "172.16.10.100/24" || strings.Join(passt.GuestIPs, ",") != "172.16.10.100" {
		t.Errorf("passt attachment = %+v", passt)
	}
	if masq.Pod.Name != "virt-launcher-vm1-abcde" || masq.VM != "vm1" || masq.Tap != "tap0" || masq.Bridge != "k6t-eth0" ||
		masq.GuestMAC != "02:00:00:12:34:56" || !masq.Complete || masq.OVS != nil ||
		strings.Join(masq.PodIPs, ",") != "198.18.0.5/24,fd00:198:18::5/64" || strings.Join(masq.GuestIPs, ",") != "10.0.2.2,fd10:0:2::2" {
		t.Errorf("masquerade attachment = %+v", masq)
	}
	if plain.Pod.Name != "plain-pod" || plain.Complete || plain.Tap != "" || plain.OVS == nil || fmt.Sprint(plain.OVS.Trunks) != "[10 20 21 22]" {
		t.Errorf("incomplete bridge attachment = %+v", plain)
	}
	if vm2.OVS == nil || vm2.OVS.Bridge != "br1" || vm2.OVS.Port != "vmn0123456789a" || vm2.OVS.VLAN == nil || *vm2.OVS.VLAN != 100 ||
		vm2.Bridge != "k6t-pod31afc46bc04" || vm2.Tap != "tap31afc46bc04" || len(vm2.PodIPs) != 0 ||
		strings.Join(vm2.GuestIPs, ",") != "10.100.0.100/24" || !vm2.Held || vm2.Migration == nil || vm2.Migration.Phase != "TargetReady" {
		t.Errorf("bridge attachment = %+v", vm2)
	}
	if masq.DHCP.Running {
		t.Errorf("no DHCP server runs in this test: %+v", masq.DHCP)
	}

	r = d.Handle(ctx, &proto.Request{Command: "VMNIC_NOPE"})
	if r.Error == nil || r.Error.Code != types.ErrInvalidEnvironmentVariables {
		t.Errorf("unknown introspection command = %+v, want code 4", r.Error)
	}
}

func TestHTTPEndpoints(t *testing.T) {
	d := newTestDaemon(t, ObserveOptions{Metrics: NewMetrics()})
	h := d.MetricsHandler()
	get := func(path string) (int, string, string) {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest("GET", path, nil))
		return rec.Code, rec.Header().Get("Content-Type"), rec.Body.String()
	}
	if code, _, _ := get("/readyz"); code != 503 {
		t.Errorf("/readyz before ready = %d", code)
	}
	d.ready.Store(true)
	if code, _, _ := get("/readyz"); code != 200 {
		t.Errorf("/readyz when ready = %d", code)
	}
	if code, _, _ := get("/healthz"); code != 200 {
		t.Errorf("/healthz = %d", code)
	}
	code, ct, body := get("/metrics")
	if code != 200 || !strings.HasPrefix(ct, "text/plain; version=0.0.4; charset=utf-8") || !strings.Contains(body, "vmnic_ready 1\n") {
		t.Errorf("/metrics = %d %q:\n%s", code, ct, body)
	}
	if code, _, _ := get("/other"); code != 404 {
		t.Errorf("/other = %d", code)
	}
}
