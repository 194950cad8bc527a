package capabilities

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"

	"github.com/vmnic/vmnic/pkg/apis/v1alpha1"
	"github.com/vmnic/vmnic/pkg/ovsdb"
)

// Test doubles.

type fakeKernel v1alpha1.KernelFeatures

func (f fakeKernel) ProbeKernel(context.Context) v1alpha1.KernelFeatures {
	return *(*v1alpha1.KernelFeatures)(&f).DeepCopy()
}

// allKernel is a kernel with everything; noIpvlan is this testbed's.
var (
	allKernel = fakeKernel{NftablesNAT: true, Tun: true, Bridge: true, Macvlan: true, Ipvlan: true, Veth: true}
	noIpvlan  = fakeKernel{
		NftablesNAT: true, Tun: true, Bridge: true, Macvlan: true, Veth: true,
		Errors: map[string]string{"ipvlan": "operation not supported"},
	}
)

type fakeOVS struct {
	mu     sync.Mutex
	status ovsdb.Status
	err    error
}

func (f *fakeOVS) Endpoint() string { return "unix:/fake/db.sock" }

func (f *fakeOVS) Status(context.Context) (ovsdb.Status, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.status, f.err
}

func (f *fakeOVS) set(s ovsdb.Status, err error) {
	f.mu.Lock()
	f.status, f.err = s, err
	f.mu.Unlock()
}

func ovsWith(bridges ...string) ovsdb.Status {
	s := ovsdb.Status{Connected: true, OVSVersion: "3.1.0", Applied: true, DatapathTypes: []string{"netdev", "system"}}
	for _, b := range bridges {
		s.Bridges = append(s.Bridges, ovsdb.BridgeStatus{Name: b, DatapathType: "netdev"})
	}
	return s
}

type fakeDiscovery struct {
	resources []string
	err       error
}

func (f fakeDiscovery) ServerResourcesForGroupVersion(gv string) (*metav1.APIResourceList, error) {
	if f.err != nil {
		return nil, f.err
	}
	l := &metav1.APIResourceList{GroupVersion: gv}
	for _, r := range f.resources {
		l.APIResources = append(l.APIResources, metav1.APIResource{Name: r})
	}
	return l, nil
}

type fakeLinks []netlink.Link

func (f fakeLinks) LinkList() ([]netlink.Link, error) { return f, nil }

func attrs(name string, mtu int, state netlink.LinkOperState) netlink.LinkAttrs {
	a := netlink.NewLinkAttrs()
	a.Name, a.MTU, a.OperState = name, mtu, state
	return a
}

// agent serves Spiderpool's health endpoint on a unix socket in a temp dir.
type agent struct {
	Socket string
	srv    *http.Server
	mu     sync.Mutex
	code   int
}

func startAgent(t *testing.T) *agent {
	t.Helper()
	// Short path: t.TempDir paths can exceed sun_path.
	dir, err := os.MkdirTemp("", "spa")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	a := &agent{Socket: filepath.Join(dir, "spiderpool.sock"), code: http.StatusOK}
	l, err := net.Listen("unix", a.Socket)
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/ipam/healthy", func(w http.ResponseWriter, _ *http.Request) {
		a.mu.Lock()
		defer a.mu.Unlock()
		w.WriteHeader(a.code)
	})
	a.srv = &http.Server{Handler: mux, ReadHeaderTimeout: time.Second}
	go func() { _ = a.srv.Serve(l) }()
	t.Cleanup(a.stop)
	return a
}

func (a *agent) setCode(c int) { a.mu.Lock(); a.code = c; a.mu.Unlock() }
func (a *agent) stop()         { _ = a.srv.Close() }

func quiet() *slog.Logger { return slog.New(slog.DiscardHandler) }

func cond(r Report, typ string) metav1.Condition {
	for _, c := range r.Conditions {
		if c.Type == typ {
			return c
		}
	}
	return metav1.Condition{}
}

func TestConditions(t *testing.T) {
	spReady := v1alpha1.SpiderpoolStatus{CRDs: true, AgentSocket: true, Healthy: true}
	reachable := v1alpha1.OVSStatus{Reachable: true, Applied: true, Version: "3.1.0", Bridges: []v1alpha1.OVSBridge{{Name: "br1", DatapathType: "netdev"}}}
	type want struct {
		status  metav1.ConditionStatus
		reason  string
		message []string // substrings
	}
	for _, tc := range []struct {
		name   string
		report Report
		want   map[string]want
	}{{
		name:   "everything",
		report: Report{Kernel: v1alpha1.KernelFeatures(allKernel), OVS: reachable, Spiderpool: spReady},
		want: map[string]want{
			v1alpha1.ConditionMasqueradeReady:   {metav1.ConditionTrue, v1alpha1.ReasonReady, nil},
			v1alpha1.ConditionPasstMacvlanReady: {metav1.ConditionTrue, v1alpha1.ReasonReady, nil},
			v1alpha1.ConditionPasstIpvlanReady:  {metav1.ConditionTrue, v1alpha1.ReasonReady, nil},
			v1alpha1.ConditionBridgeOVSReady:    {metav1.ConditionTrue, v1alpha1.ReasonReady, []string{"OVS 3.1.0 has bridge br1"}},
		},
	}, {
		name: "testbed without spiderpool or ovs",
		report: Report{
			Kernel: v1alpha1.KernelFeatures(noIpvlan),
			OVS:    v1alpha1.OVSStatus{Error: "no OVSDB endpoint configured"},
			Spiderpool: v1alpha1.SpiderpoolStatus{
				CRDsError: "no API server configured", AgentError: "agent socket /x does not exist",
			},
		},
		want: map[string]want{
			v1alpha1.ConditionMasqueradeReady: {metav1.ConditionTrue, v1alpha1.ReasonReady, nil},
			v1alpha1.ConditionPasstMacvlanReady: {metav1.ConditionFalse, v1alpha1.ReasonSpiderpoolCRDsMissing, []string{
				"Spiderpool CRDs are not served: no API server configured",
				"Spiderpool agent is not available: agent socket /x does not exist",
			}},
			v1alpha1.ConditionPasstIpvlanReady: {metav1.ConditionFalse, v1alpha1.ReasonKernelFeatureMissing, []string{
				"ipvlan links cannot be created: operation not supported; Spiderpool CRDs",
			}},
			v1alpha1.ConditionBridgeOVSReady: {metav1.ConditionFalse, v1alpha1.ReasonOVSUnavailable, []string{
				"OVS database is not reachable: no OVSDB endpoint configured", "Spiderpool agent",
			}},
		},
	}, {
		name: "no tun, nat, agent unhealthy, ovs lagging without bridges",
		report: Report{
			Kernel: v1alpha1.KernelFeatures{
				Bridge: true, Macvlan: true, Ipvlan: true, Veth: true,
				Errors: map[string]string{"tun": "open /dev/net/tun: no such file or directory", "nftablesNAT": "x"},
			},
			OVS:        v1alpha1.OVSStatus{Reachable: true},
			Spiderpool: v1alpha1.SpiderpoolStatus{CRDs: true, AgentSocket: true, AgentError: "500"},
		},
		want: map[string]want{
			v1alpha1.ConditionMasqueradeReady: {metav1.ConditionFalse, v1alpha1.ReasonKernelFeatureMissing, []string{
				"tun/tap devices cannot be created: open /dev/net/tun: no such file or directory; nftables NAT (masquerade) cannot be set up: x",
			}},
			v1alpha1.ConditionPasstMacvlanReady: {metav1.ConditionFalse, v1alpha1.ReasonSpiderpoolAgentUnavailable, []string{"agent is not available: 500"}},
			v1alpha1.ConditionPasstIpvlanReady:  {metav1.ConditionFalse, v1alpha1.ReasonSpiderpoolAgentUnavailable, nil},
			v1alpha1.ConditionBridgeOVSReady: {metav1.ConditionFalse, v1alpha1.ReasonOVSNotApplied, []string{
				"ovs-vswitchd has not applied", "OVS has no bridge", "agent is not available",
			}},
		},
	}, {
		name:   "ovs without bridges",
		report: Report{Kernel: v1alpha1.KernelFeatures(allKernel), OVS: v1alpha1.OVSStatus{Reachable: true, Applied: true}, Spiderpool: spReady},
		want: map[string]want{
			v1alpha1.ConditionBridgeOVSReady: {metav1.ConditionFalse, v1alpha1.ReasonNoOVSBridge, []string{"OVS has no bridge"}},
		},
	}} {
		t.Run(tc.name, func(t *testing.T) {
			now := metav1.Now()
			conds := Conditions(tc.report, now)
			if len(conds) != 4 {
				t.Fatalf("got %d conditions, want 4", len(conds))
			}
			r := Report{Conditions: conds}
			for typ, w := range tc.want {
				c := cond(r, typ)
				if c.Status != w.status || c.Reason != w.reason {
					t.Errorf("%s = %s/%s (%q), want %s/%s", typ, c.Status, c.Reason, c.Message, w.status, w.reason)
				}
				for _, m := range w.message {
					if !strings.Contains(c.Message, m) {
						t.Errorf("%s message %q lacks %q", typ, c.Message, m)
					}
				}
				if c.LastTransitionTime != now || c.Message == "" {
					t.Errorf("%s: time %v message %q", typ, c.LastTransitionTime, c.Message)
				}
			}
		})
	}
}

func TestSame(t *testing.T) {
	a := finish(Report{Kernel: v1alpha1.KernelFeatures(allKernel)}, time.Unix(1000, 0))
	b := finish(Report{Kernel: v1alpha1.KernelFeatures(allKernel)}, time.Unix(2000, 0))
	if !Same(a, b) {
		t.Fatal("reports differing only in time are not Same")
	}
	b.NICs = []v1alpha1.NIC{}
	if !Same(a, b) {
		t.Fatal("nil and empty NICs are not Same")
	}
	b.NICs = []v1alpha1.NIC{{Name: "eth0"}}
	if Same(a, b) {
		t.Fatal("different NICs are Same")
	}
}

func TestProbeNICs(t *testing.T) {
	lo := attrs("lo", 65536, netlink.OperUnknown)
	lo.Flags = net.FlagLoopback | net.FlagUp
	podVeth := attrs("cali123", 1450, netlink.OperUp)
	podVeth.NetNsID = 3
	links := fakeLinks{
		&netlink.Device{LinkAttrs: lo},
		&netlink.Device{LinkAttrs: attrs("eth1", 9000, netlink.OperDown)},
		&netlink.Device{LinkAttrs: attrs("eth0", 1500, netlink.OperUp)},
		&netlink.Veth{LinkAttrs: podVeth},
		&netlink.Veth{LinkAttrs: attrs("uplink0", 1500, netlink.OperUp)},
		&netlink.Bridge{LinkAttrs: attrs("cni0", 1500, netlink.OperUp)},
		&netlink.Bond{LinkAttrs: attrs("bond0", 1500, netlink.OperUp)},
		&netlink.Vlan{LinkAttrs: attrs("bond0.100", 1500, netlink.OperLowerLayerDown)},
		&netlink.Tuntap{LinkAttrs: attrs("tap0", 1500, netlink.OperUp)},
	}
	got := probeNICs(links, quiet())
	want := []v1alpha1.NIC{
		{Name: "bond0", Type: "bond", MTU: 1500, OperState: "up"},
		{Name: "bond0.100", Type: "vlan", MTU: 1500, OperState: "lower-layer-down"},
		{Name: "eth0", Type: "device", MTU: 1500, OperState: "up"},
		{Name: "eth1", Type: "device", MTU: 9000, OperState: "down"},
		{Name: "uplink0", Type: "veth", MTU: 1500, OperState: "up"},
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("NICs\n got %v\nwant %v", got, want)
	}
}

func TestPrimaryCNI(t *testing.T) {
	for _, tc := range []struct {
		name  string
		files map[string]string
		want  string
	}{
		{"empty", nil, ""},
		{"conflist", map[string]string{"10-calico.conflist": `{"name":"k8s-pod-network","plugins":[{"type":"calico"},{"type":"portmap"},{"type":"vmnic"}]}`}, "calico"},
		{"conf", map[string]string{"10-flannel.conf": `{"name":"cbr0","type":"flannel"}`}, "flannel"},
		{"multus first", map[string]string{
			"00-multus.conf":      `{"name":"multus-cni-network","type":"multus","delegates":[]}`,
			"05-cilium.conflist":  `{"name":"cilium","plugins":[{"type":"cilium-cni"}]}`,
			"99-other.conflist":   `{"name":"x","plugins":[{"type":"bridge"}]}`,
			"README":              "not a config",
			"01-vmnic-only.json":  `{"name":"v","plugins":[{"type":"vmnic"}]}`,
			"02-ignored.conf.bak": `{`,
		}, "cilium-cni"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			for name, data := range tc.files {
				if err := os.WriteFile(filepath.Join(dir, name), []byte(data), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			got, err := primaryCNI(dir)
			if err != nil || got != tc.want {
				t.Fatalf("primaryCNI = %q, %v; want %q", got, err, tc.want)
			}
		})
	}
	if got := probePrimaryCNI(filepath.Join(t.TempDir(), "missing"), quiet()); got != "" {
		t.Fatalf("missing dir: %q", got)
	}
	dir := t.TempDir()
	_ = os.WriteFile(filepath.Join(dir, "10-bad.conflist"), []byte("{"), 0o600)
	if _, err := primaryCNI(dir); err == nil || !strings.Contains(err.Error(), "10-bad.conflist") {
		t.Fatalf("bad config: %v", err)
	}
}

func TestSpiderpoolCRDs(t *testing.T) {
	notFound := apierrors.NewNotFound(schema.GroupResource{Group: "spiderpool.spidernet.io"}, "v2beta1")
	for _, tc := range []struct {
		name string
		d    Discovery
		want string // "" = served
	}{
		{"no api server", nil, "no API server configured"},
		{"group not served", fakeDiscovery{err: notFound}, "API server does not serve spiderpool.spidernet.io/v2beta1"},
		{"other error", fakeDiscovery{err: errors.New("connection refused")}, "discover spiderpool.spidernet.io/v2beta1: connection refused"},
		{"no ippools", fakeDiscovery{resources: []string{"spiderendpoints"}}, "serves no spiderippools"},
		{"served", fakeDiscovery{resources: []string{"spiderendpoints", "spiderippools"}}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := spiderpoolCRDs(tc.d)
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("unexpected error %v", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Fatalf("error %v, want %q", err, tc.want)
			}
		})
	}
}

func TestSpiderpoolAgent(t *testing.T) {
	ctx := t.Context()
	a := startAgent(t)
	if sock, ok, msg := probeAgent(ctx, a.Socket, time.Second); !sock || !ok || msg != "" {
		t.Fatalf("healthy agent: socket %v healthy %v %q", sock, ok, msg)
	}
	a.setCode(http.StatusInternalServerError)
	if sock, ok, msg := probeAgent(ctx, a.Socket, time.Second); !sock || ok || !strings.Contains(msg, "500 Internal Server Error") {
		t.Fatalf("failing agent: socket %v healthy %v %q", sock, ok, msg)
	}
	a.stop()
	if sock, ok, msg := probeAgent(ctx, a.Socket, time.Second); sock || ok || !strings.Contains(msg, "does not exist") {
		t.Fatalf("stopped agent: socket %v healthy %v %q", sock, ok, msg)
	}

	// A socket file nobody listens on: a crashed agent.
	dir, _ := os.MkdirTemp("", "spa")
	defer os.RemoveAll(dir)
	stale := filepath.Join(dir, "s.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: stale, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	_ = l.Close()
	if sock, ok, msg := probeAgent(ctx, stale, time.Second); !sock || ok || !strings.Contains(msg, "connection refused") {
		t.Fatalf("stale socket: socket %v healthy %v %q", sock, ok, msg)
	}
	if _, _, msg := probeAgent(ctx, dir, time.Second); !strings.Contains(msg, "is not a socket") {
		t.Fatalf("directory: %q", msg)
	}
}

func TestProbeOVSStatus(t *testing.T) {
	ctx := t.Context()
	if s := probeOVS(ctx, nil, time.Second); s.Reachable || s.Error != "no OVSDB endpoint configured" {
		t.Fatalf("nil: %+v", s)
	}
	if s := probeOVS(ctx, NewOVS("", nil), time.Second); s.Reachable || s.Error == "" {
		t.Fatalf("NewOVS(\"\"): %+v", s)
	}
	f := &fakeOVS{}
	f.set(ovsdb.Status{}, errors.New("boom"))
	if s := probeOVS(ctx, f, time.Second); s.Reachable || s.Error != "boom" || s.Endpoint != f.Endpoint() {
		t.Fatalf("error: %+v", s)
	}
	st := ovsWith("br2", "br1")
	st.Bridges[0].DatapathType = ""
	f.set(st, nil)
	s := probeOVS(ctx, f, time.Second)
	want := []v1alpha1.OVSBridge{{Name: "br1", DatapathType: "netdev"}, {Name: "br2", DatapathType: "system"}}
	if !s.Reachable || !s.Applied || s.Version != "3.1.0" || fmt.Sprint(s.Bridges) != fmt.Sprint(want) {
		t.Fatalf("bridges: %+v", s)
	}
	st.Connected = false
	f.set(st, nil)
	if s := probeOVS(ctx, f, time.Second); s.Reachable || !strings.Contains(s.Error, "connection lost") {
		t.Fatalf("disconnected: %+v", s)
	}
}

func TestBridgeResourcesAndOps(t *testing.T) {
	r := Report{OVS: v1alpha1.OVSStatus{Reachable: true, Bridges: []v1alpha1.OVSBridge{
		{Name: "br1"}, {Name: "br-ex"}, {Name: "bad/name"}, {Name: strings.Repeat("x", 70)},
	}}}
	want, skipped := BridgeResources(r)
	if len(want) != 2 || len(skipped) != 2 {
		t.Fatalf("resources %v skipped %v", want, skipped)
	}
	q := resource.MustParse("1k")
	capacity := corev1.ResourceList{
		corev1.ResourceCPU:                      resource.MustParse("2"),
		"ovs.vmnic.io/br1":                      resource.MustParse("1k"),
		"ovs.vmnic.io/gone":                     q,
		"ovs-cni.network.kubevirt.io/br-gone":   q, // someone else's
		corev1.ResourceName("example.com/gpus"): resource.MustParse("4"),
	}
	ops, _ := json.Marshal(resourceOps(capacity, want))
	wantOps := `[{"op":"remove","path":"/status/capacity/ovs.vmnic.io~1gone"},{"op":"add","path":"/status/capacity/ovs.vmnic.io~1br-ex","value":"1k"}]`
	if string(ops) != wantOps {
		t.Fatalf("ops\n got %s\nwant %s", ops, wantOps)
	}
	ops, _ = json.Marshal(resourceOps(nil, want))
	if !strings.HasPrefix(string(ops), `[{"op":"add","path":"/status/capacity","value":{}},`) {
		t.Fatalf("nil capacity: %s", ops)
	}
	if ops := resourceOps(nil, nil); len(ops) != 0 {
		t.Fatalf("nothing to do: %v", ops)
	}
	r.OVS.Reachable = false
	if want, _ := BridgeResources(r); len(want) != 0 {
		t.Fatalf("unreachable OVS: %v", want)
	}
}

func TestMergeStatus(t *testing.T) {
	t1, t2 := time.Unix(1000, 0), time.Unix(2000, 0)
	cur := finish(Report{Kernel: v1alpha1.KernelFeatures(allKernel)}, t1)
	next := finish(Report{Kernel: v1alpha1.KernelFeatures(allKernel)}, t2)
	m := mergeStatus(cur, next, 1)
	if !equalStatus(cur, clearGen(m)) {
		t.Fatalf("unchanged report changed the status:\n%+v\n%+v", cur, m)
	}
	next = finish(Report{Kernel: v1alpha1.KernelFeatures(noIpvlan)}, t2)
	m = mergeStatus(cur, next, 3)
	if !m.ObservedAt.Time.Equal(t2) {
		t.Fatalf("observedAt %v", m.ObservedAt)
	}
	masq, ipvlan := cond(m, v1alpha1.ConditionMasqueradeReady), cond(m, v1alpha1.ConditionPasstIpvlanReady)
	if !masq.LastTransitionTime.Time.Equal(t1) || masq.ObservedGeneration != 3 {
		t.Fatalf("unchanged condition: %+v", masq)
	}
	if ipvlan.LastTransitionTime.Time.Equal(t1) {
		// ipvlan's status is False both times (no Spiderpool), so it keeps t1 too.
		return
	}
	t.Fatalf("ipvlan condition lost its transition time: %+v", ipvlan)
}

func clearGen(r Report) Report {
	for i := range r.Conditions {
		r.Conditions[i].ObservedGeneration = 0
	}
	return r
}

// recorder is a Sink that keeps what it is given.
type recorder struct {
	mu      sync.Mutex
	reports []Report
	fail    error
	got     chan Report
}

func newRecorder() *recorder { return &recorder{got: make(chan Report, 100)} }

func (s *recorder) Publish(_ context.Context, r Report) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.reports = append(s.reports, r)
	s.got <- r
	return s.fail
}

func (s *recorder) setFail(err error) { s.mu.Lock(); s.fail = err; s.mu.Unlock() }

func (s *recorder) count() int { s.mu.Lock(); defer s.mu.Unlock(); return len(s.reports) }

func (s *recorder) wait(t *testing.T, what string, ok func(Report) bool) Report {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		select {
		case r := <-s.got:
			if ok(r) {
				return r
			}
		case <-timeout:
			t.Fatalf("no published report with %s", what)
		}
	}
}

// linkEvents is a LinkWatcher driven by the test.
type linkEvents chan struct{}

func (l linkEvents) Watch(context.Context) (<-chan struct{}, error) { return l, nil }

func hasBridge(name string) func(Report) bool {
	return func(r Report) bool {
		for _, b := range r.OVS.Bridges {
			if b.Name == name {
				return true
			}
		}
		return false
	}
}

func TestRunner(t *testing.T) {
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	ovs := &fakeOVS{}
	ovs.set(ovsWith("br1"), nil)
	kernel := &countingKernel{k: noIpvlan}
	a := startAgent(t)
	links := fakeLinks{&netlink.Device{LinkAttrs: attrs("eth0", 1500, netlink.OperUp)}}
	var linksMu sync.Mutex
	linkList := lister(func() ([]netlink.Link, error) { linksMu.Lock(); defer linksMu.Unlock(); return links, nil })
	events := make(linkEvents, 1)
	sink := newRecorder()
	runner := NewRunner(RunOptions{
		Probe: ProbeOptions{
			Kernel:           kernel,
			OVS:              ovs,
			Discovery:        fakeDiscovery{resources: []string{SpiderpoolIPPools}},
			SpiderpoolSocket: a.Socket,
			Links:            linkList,
			Log:              quiet(),
		},
		Sink:     sink,
		Links:    events,
		Poll:     20 * time.Millisecond,
		Debounce: 10 * time.Millisecond,
		Resync:   time.Hour,
	})
	if _, ok := runner.Last(); ok {
		t.Fatal("a report before the first probe")
	}
	done := make(chan error, 1)
	go func() { done <- runner.Run(ctx) }()

	first := sink.wait(t, "br1", hasBridge("br1"))
	if !Ready(first, v1alpha1.ConditionBridgeOVSReady) || !Ready(first, v1alpha1.ConditionPasstMacvlanReady) || Ready(first, v1alpha1.ConditionPasstIpvlanReady) {
		t.Fatalf("first report: %+v", first.Conditions)
	}
	if last, ok := runner.Last(); !ok || !Same(last, first) {
		t.Fatalf("Last = %v %+v", ok, last)
	}

	// Polls that find nothing new publish nothing.
	time.Sleep(200 * time.Millisecond)
	if n := sink.count(); n != 1 {
		t.Fatalf("%d publishes without a change", n)
	}

	// OVS: a bridge appears, seen by the poll.
	ovs.set(ovsWith("br1", "br2"), nil)
	sink.wait(t, "br2", hasBridge("br2"))

	// A link event: NICs are re-read.
	linksMu.Lock()
	links = append(links, &netlink.Bond{LinkAttrs: attrs("bond0", 9000, netlink.OperUp)})
	linksMu.Unlock()
	events <- struct{}{}
	sink.wait(t, "bond0", func(r Report) bool { return len(r.NICs) == 2 })

	// The agent goes away: seen by the poll.
	a.stop()
	r := sink.wait(t, "agent down", func(r Report) bool { return !r.Spiderpool.Healthy })
	if c := cond(r, v1alpha1.ConditionPasstMacvlanReady); c.Status != metav1.ConditionFalse || c.Reason != v1alpha1.ReasonSpiderpoolAgentUnavailable {
		t.Fatalf("macvlan after agent loss: %+v", c)
	}

	// A failed publish is retried until it goes through.
	sink.setFail(errors.New("api server away"))
	ovs.set(ovsWith(), nil)
	sink.wait(t, "no bridges", func(r Report) bool { return len(r.OVS.Bridges) == 0 })
	sink.setFail(nil)
	before := sink.count()
	sink.wait(t, "the retry", func(r Report) bool { return len(r.OVS.Bridges) == 0 })
	if sink.count() <= before {
		t.Fatal("no retry")
	}

	// Trigger: a full probe; the kernel prober is asked again.
	kernel.set(allKernel)
	runner.Trigger()
	sink.wait(t, "ipvlan after the trigger", func(r Report) bool { return r.Kernel.Ipvlan })
	if n := kernel.count(); n != 2 {
		t.Errorf("kernel probed %d times, want 2 (start, trigger)", n)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run: %v", err)
	}
}

// countingKernel is a KernelProber that counts its probes.
type countingKernel struct {
	mu sync.Mutex
	k  fakeKernel
	n  int
}

func (c *countingKernel) ProbeKernel(ctx context.Context) v1alpha1.KernelFeatures {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.n++
	return c.k.ProbeKernel(ctx)
}

func (c *countingKernel) set(k fakeKernel) { c.mu.Lock(); c.k = k; c.mu.Unlock() }

func (c *countingKernel) count() int { c.mu.Lock(); defer c.mu.Unlock(); return c.n }

type lister func() ([]netlink.Link, error)

func (l lister) LinkList() ([]netlink.Link, error) { return l() }
