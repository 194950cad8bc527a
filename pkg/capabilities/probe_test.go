package capabilities

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/vmnic/vmnic/pkg/apis/v1alpha1"
	"github.com/vmnic/vmnic/test/need"
	"github.com/vmnic/vmnic/test/ovs"
)

func hostLinkNames(t *testing.T) []string {
	t.Helper()
	links, err := netlinksafe.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, l := range links {
		names = append(names, l.Attrs().Name)
	}
	slices.Sort(names)
	return names
}

// TestProbeThisMachine runs the real probe. On the project's machines
// (kernel without ipvlan, no OVS configured, no Spiderpool) it must say:
// masquerade yes, macvlan yes, ipvlan no with the kernel's own error, OVS
// and Spiderpool unavailable with their reasons.
func TestProbeThisMachine(t *testing.T) {
	need.Root(t)
	hostBefore := hostLinkNames(t)
	start := time.Now()
	r := Probe(t.Context(), ProbeOptions{SpiderpoolSocket: "/nonexistent/spiderpool.sock", Log: quiet()})
	t.Logf("probe took %v; kernel %+v", time.Since(start), r.Kernel)

	k := r.Kernel
	if !k.Veth || !k.Bridge || !k.Macvlan || !k.Tun || !k.NftablesNAT {
		t.Errorf("kernel features missing: %+v", k)
	}
	if c := cond(r, v1alpha1.ConditionMasqueradeReady); c.Status != metav1.ConditionTrue || c.Reason != v1alpha1.ReasonReady {
		t.Errorf("MasqueradeReady = %+v", c)
	}
	ipvlan := cond(r, v1alpha1.ConditionPasstIpvlanReady)
	if k.Ipvlan {
		// Kernels with ipvlan: the feature is reported, the mode still
		// lacks Spiderpool.
		t.Logf("this kernel has ipvlan")
		if ipvlan.Reason != v1alpha1.ReasonSpiderpoolCRDsMissing {
			t.Errorf("PasstIpvlanReady = %+v", ipvlan)
		}
	} else {
		reason := k.Errors["ipvlan"]
		t.Logf("ipvlan missing, the kernel says: %q", reason)
		if reason == "" {
			t.Error("ipvlan missing without the kernel's error")
		}
		want := "ipvlan links cannot be created: " + reason
		if ipvlan.Status != metav1.ConditionFalse || ipvlan.Reason != v1alpha1.ReasonKernelFeatureMissing ||
			!strings.HasPrefix(ipvlan.Message, want) {
			t.Errorf("PasstIpvlanReady = %+v, want reason %s and message starting %q",
				ipvlan, v1alpha1.ReasonKernelFeatureMissing, want)
		}
	}
	for feature := range k.Errors {
		if kernelHas(k, feature) {
			t.Errorf("feature %s both present and failing: %+v", feature, k)
		}
	}

	bridge := cond(r, v1alpha1.ConditionBridgeOVSReady)
	if bridge.Status != metav1.ConditionFalse || bridge.Reason != v1alpha1.ReasonOVSUnavailable ||
		!strings.Contains(bridge.Message, "no OVSDB endpoint configured") {
		t.Errorf("BridgeOVSReady = %+v", bridge)
	}
	macvlan := cond(r, v1alpha1.ConditionPasstMacvlanReady)
	if macvlan.Status != metav1.ConditionFalse || macvlan.Reason != v1alpha1.ReasonSpiderpoolCRDsMissing ||
		!strings.Contains(macvlan.Message, "Spiderpool CRDs are not served: no API server configured") ||
		!strings.Contains(macvlan.Message, "Spiderpool agent is not available: agent socket /nonexistent/spiderpool.sock does not exist") {
		t.Errorf("PasstMacvlanReady = %+v", macvlan)
	}
	if r.Spiderpool.CRDs || r.Spiderpool.AgentSocket || r.Spiderpool.Healthy {
		t.Errorf("spiderpool: %+v", r.Spiderpool)
	}
	if len(r.NICs) == 0 {
		t.Error("no NICs found in the host namespace")
	}
	for _, n := range r.NICs {
		if n.Name == "lo" || n.MTU == 0 || n.OperState == "" {
			t.Errorf("NIC %+v", n)
		}
	}
	// The probe's links lived in their own namespace. (Other tests may
	// change the host's links meanwhile; the probe's names are unique.)
	for _, name := range hostLinkNames(t) {
		if strings.HasPrefix(name, "probe") && !slices.Contains(hostBefore, name) {
			t.Errorf("probe link %q left in the host namespace", name)
		}
	}
}

// TestProbeCancelled: a probe whose context is gone reports the features
// as failing rather than hanging or panicking.
func TestProbeCancelled(t *testing.T) {
	need.Root(t)
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	k := NetNSKernelProber{}.ProbeKernel(ctx)
	// Either the probe won the race or it was given up; in both cases
	// every feature is there or says why not.
	for _, f := range kernelFeatureNames {
		if !kernelHas(k, f) && k.Errors[f] == "" {
			t.Errorf("feature %s missing without a reason: %+v", f, k)
		}
	}
	t.Logf("cancelled probe: %+v", k)
}

// newNS is a bind-mounted network namespace removed at cleanup.
func newNS(t testing.TB) ns.NetNS {
	t.Helper()
	n, err := testutils.NewNS()
	if err != nil {
		t.Fatalf("new netns: %v", err)
	}
	t.Cleanup(func() {
		_ = n.Close()
		_ = testutils.UnmountNS(n)
	})
	return n
}

// startOVS runs a private switch whose ovs-vswitchd (and so the bridges'
// netdev taps) lives in a namespace of its own, away from other tests'.
func startOVS(t *testing.T) *ovs.OVS {
	t.Helper()
	need.Root(t)
	return ovs.StartT(t, ovs.WithNetNS(newNS(t)))
}

func addBridge(t *testing.T, o *ovs.OVS, name string) {
	t.Helper()
	if _, err := o.Vsctl("add-br", name, "--", "set", "bridge", name, "datapath_type=netdev"); err != nil {
		t.Fatal(err)
	}
}

func TestProbeOVS(t *testing.T) {
	need.Root(t)
	ctx := t.Context()

	// Configured, but nothing listens.
	gone := NewOVS("unix:/nonexistent/db.sock", quiet())
	defer gone.Close()
	r := Probe(ctx, ProbeOptions{OVS: gone, Kernel: allKernel, Log: quiet()})
	if c := cond(r, v1alpha1.ConditionBridgeOVSReady); c.Reason != v1alpha1.ReasonOVSUnavailable || !strings.Contains(c.Message, "/nonexistent/db.sock") {
		t.Errorf("unreachable OVS: %+v", c)
	}

	o := startOVS(t)
	client := NewOVS(o.DB(), quiet())
	defer client.Close()
	r = Probe(ctx, ProbeOptions{OVS: client, Kernel: allKernel, Log: quiet()})
	if !r.OVS.Reachable || !r.OVS.Applied || r.OVS.Version == "" || len(r.OVS.Bridges) != 0 {
		t.Fatalf("fresh OVS: %+v", r.OVS)
	}
	if c := cond(r, v1alpha1.ConditionBridgeOVSReady); c.Reason != v1alpha1.ReasonNoOVSBridge {
		t.Errorf("no bridge: %+v", c)
	}

	addBridge(t, o, "br1")
	// ovs-vsctl returns once ovs-vswitchd applied the bridge; the probe's
	// client sees that when its database monitor delivers the update,
	// which a loaded machine delays.
	want := []v1alpha1.OVSBridge{{Name: "br1", DatapathType: "netdev"}}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		r = Probe(ctx, ProbeOptions{OVS: client, Kernel: allKernel, Log: quiet()})
		if r.OVS.Applied && slices.Equal(r.OVS.Bridges, want) || time.Now().After(deadline) {
			break
		}
	}
	if !r.OVS.Reachable || !r.OVS.Applied || !slices.Equal(r.OVS.Bridges, want) || !slices.Contains(r.OVS.DatapathTypes, "netdev") {
		t.Fatalf("OVS with br1: %+v", r.OVS)
	}
	t.Logf("OVS %s, datapaths %v, bridges %v", r.OVS.Version, r.OVS.DatapathTypes, r.OVS.Bridges)
	// OVS is fine; Spiderpool is what the bridge mode still lacks.
	if c := cond(r, v1alpha1.ConditionBridgeOVSReady); c.Status != metav1.ConditionFalse || c.Reason != v1alpha1.ReasonSpiderpoolCRDsMissing ||
		strings.Contains(c.Message, "OVS") {
		t.Errorf("bridge mode with OVS but no Spiderpool: %+v", c)
	}

	// The database dies: unreachable, reported as such.
	if err := o.KillDB(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		r = Probe(ctx, ProbeOptions{OVS: client, Kernel: allKernel, Timeout: time.Second, Log: quiet()})
		if !r.OVS.Reachable {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("OVS still reachable after ovsdb-server died: %+v", r.OVS)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if c := cond(r, v1alpha1.ConditionBridgeOVSReady); c.Reason != v1alpha1.ReasonOVSUnavailable {
		t.Errorf("dead ovsdb-server: %+v", c)
	}
	t.Logf("dead ovsdb-server: %s", r.OVS.Error)
}
