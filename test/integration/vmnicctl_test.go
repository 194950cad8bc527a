package integration

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"github.com/insomniacslk/dhcp/dhcpv4/nclient4"
	"github.com/vishvananda/netlink"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/dynamic"

	"github.com/vmnic/vmnic/daemon"
	"github.com/vmnic/vmnic/pkg/api"
	"github.com/vmnic/vmnic/pkg/apis/v1alpha1"
	"github.com/vmnic/vmnic/pkg/ctl"
	"github.com/vmnic/vmnic/pkg/kubevirt"
	"github.com/vmnic/vmnic/test/cluster"
	"github.com/vmnic/vmnic/test/harness"
	"github.com/vmnic/vmnic/test/spiderpool"
)

// vmnicctlBinary is the vmnicctl that make build writes.
func vmnicctlBinary(t *testing.T) string {
	t.Helper()
	bin, err := harness.Built("vmnicctl")
	if err != nil {
		t.Fatal(err)
	}
	// The kubectl plugin's name is a link beside it, in a directory of
	// the test's own.
	return bin
}

// vmnicctl runs the binary (as name, for the kubectl plugin's name) and
// returns its exit code and stdout.
func vmnicctl(t *testing.T, name string, args ...string) (int, string) {
	t.Helper()
	bin := vmnicctlBinary(t)
	if name != "vmnicctl" {
		link := filepath.Join(t.TempDir(), name)
		if _, err := os.Lstat(link); err != nil {
			if err := os.Symlink(bin, link); err != nil {
				t.Fatal(err)
			}
		}
		bin = link
	}
	cmd := exec.Command(bin, args...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("run %s: %v", name, err)
	}
	t.Logf("%s %s -> %d\n%s%s", name, strings.Join(args, " "), code, out, stderr.String())
	return code, string(out)
}

// guestDHCP plays the guest: a veth with the guest's MAC, its peer a port
// of the pod's k6t-<if> bridge next to the tap, asks for a DHCPv4 lease
// from a fresh "guest" netns.
func guestDHCP(t *testing.T, p *harness.Pod, bridge string, mac net.HardwareAddr) *nclient4.Lease {
	t.Helper()
	guest, err := testutils.NewNS()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { harness.RemoveNetns(guest) })
	err = p.NS.Do(func(ns.NetNS) error {
		veth := &netlink.Veth{
			LinkAttrs: netlink.LinkAttrs{Name: "gst0"}, PeerName: "guest0",
			PeerHardwareAddr: mac, PeerNamespace: netlink.NsFd(int(guest.Fd())),
		}
		if err := netlink.LinkAdd(veth); err != nil {
			return fmt.Errorf("add guest veth: %w", err)
		}
		br, err := netlink.LinkByName(bridge)
		if err != nil {
			return err
		}
		l, err := netlink.LinkByName("gst0")
		if err != nil {
			return err
		}
		if err := netlink.LinkSetMaster(l, br); err != nil {
			return err
		}
		return netlink.LinkSetUp(l)
	})
	if err != nil {
		t.Fatal(err)
	}
	var lease *nclient4.Lease
	err = guest.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName("guest0")
		if err != nil {
			return err
		}
		if err := netlink.LinkSetUp(l); err != nil {
			return err
		}
		c, err := nclient4.New("guest0", nclient4.WithTimeout(2*time.Second), nclient4.WithRetry(5))
		if err != nil {
			return err
		}
		defer c.Close()
		lease, err = c.Request(context.Background())
		return err
	})
	if err != nil {
		t.Fatalf("guest DHCP: %v", err)
	}
	return lease
}

// occupyBridge creates an unmarked k6t-eth0 in the pod, so that vmnic's
// ADD fails in the daemon (code 7: the link is not vmnic's).
func occupyBridge(t *testing.T, p *harness.Pod) {
	t.Helper()
	err := p.NS.Do(func(ns.NetNS) error {
		return netlink.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "k6t-eth0"}})
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestVmnicctlAttachments: a wired masquerade VM NIC as vmnicctl shows it,
// before and after the guest took its lease; status; the binary as
// vmnicctl and as kubectl-vmnic.
func TestVmnicctlAttachments(t *testing.T) {
	ctx := ctxT(t)
	node, err := harness.NewNode(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(node.Close)
	d, err := node.StartDaemonWith(logger(t), func(c *daemon.Config) {
		c.Metrics, c.NodeName = daemon.NewMetrics(), "node-a"
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = d.Stop() })

	mac, _ := net.ParseMAC("02:00:00:12:34:56")
	l := list(t, node, harness.NetOptions{Vmnic: true, VM: map[string]any{"name": "vm1", "mac": mac.String()}})
	p := newPod(t, "virt-launcher-vm1-abcde")
	if _, err := node.Add(ctx, l, p); err != nil {
		t.Fatalf("ADD: %v", err)
	}

	got, err := ctl.Attachments(ctx, node.Socket())
	if err != nil {
		t.Fatal(err)
	}
	if len(got.Items) != 1 {
		t.Fatalf("attachments: %+v", got.Items)
	}
	a := got.Items[0]
	podIPs := strings.Join(a.PodIPs, ",")
	if a.Pod.Namespace != "default" || a.Pod.Name != p.Name || a.ContainerID != p.ContainerID || a.IfName != "eth0" || a.Mode != "masquerade" ||
		a.VM != "vm1" || a.Network != "podnet" || a.Tap != "tap0" || a.Bridge != "k6t-eth0" || a.GuestMAC != mac.String() || !a.Complete ||
		a.OVS != nil || a.Netns != p.NS.Path() || !strings.HasPrefix(podIPs, "198.18.0.") || !strings.Contains(podIPs, ",fd00:198:18::") ||
		strings.Join(a.GuestIPs, ",") != "10.0.2.2,fd10:0:2::2" || a.Migration != nil {
		t.Errorf("attachment = %+v", a)
	}
	if !a.DHCP.Running || a.DHCP.V4Lease != nil || ctl.LeaseState(a, time.Now()) != "no lease yet" {
		t.Errorf("before the guest asked: DHCP %+v, %q", a.DHCP, ctl.LeaseState(a, time.Now()))
	}

	lease := guestDHCP(t, p, "k6t-eth0", mac)
	if !lease.ACK.YourIPAddr.Equal(net.IPv4(10, 0, 2, 2)) {
		t.Fatalf("guest got %s", lease.ACK.YourIPAddr)
	}
	got, err = ctl.Attachments(ctx, node.Socket())
	if err != nil {
		t.Fatal(err)
	}
	a = got.Items[0]
	if l := a.DHCP.V4Lease; l == nil || l.IP != "10.0.2.2" || l.MAC != mac.String() || time.Since(l.Time) > time.Minute || a.DHCP.V4Acks != 1 {
		t.Errorf("after the guest's DHCP: %+v (lease %+v)", a.DHCP, a.DHCP.V4Lease)
	}
	if s := ctl.LeaseState(a, time.Now()); !strings.HasPrefix(s, "v4 10.0.2.2 ") {
		t.Errorf("lease state %q", s)
	}

	// The binary, for people.
	code, out := vmnicctl(t, "vmnicctl", "attachments", "--socket", node.Socket())
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if code != 0 || len(lines) != 2 {
		t.Fatalf("attachments: exit %d\n%s", code, out)
	}
	for _, w := range []string{"default/" + p.Name, "eth0", "masquerade", "vm1", "tap0", "k6t-eth0", a.PodIPs[0], "10.0.2.2,fd10:0:2::2", mac.String(), "v4 10.0.2.2 "} {
		if !strings.Contains(lines[1], w) {
			t.Errorf("attachments row lacks %q: %s", w, lines[1])
		}
	}
	code, out = vmnicctl(t, "vmnicctl", "status", "--socket", node.Socket())
	for _, w := range []string{"vmnicd:        ready", "node:          node-a, standalone", "attachments:   1 (masquerade 1)", "DHCP servers:  1 running", "pending DELs:  0 spooled", "requests:      ADD 1"} {
		if !strings.Contains(out, w) {
			t.Errorf("status lacks %q:\n%s", w, out)
		}
	}
	if code != 0 {
		t.Errorf("status exit %d", code)
	}
	// As a kubectl plugin, JSON.
	code, out = vmnicctl(t, "kubectl-vmnic", "attachments", "-o", "json", "--socket", node.Socket())
	var viaPlugin api.Attachments
	if err := json.Unmarshal([]byte(out), &viaPlugin); err != nil || code != 0 || len(viaPlugin.Items) != 1 || viaPlugin.Items[0].DHCP.V4Lease == nil {
		t.Errorf("kubectl-vmnic attachments -o json: exit %d, %v: %s", code, err, out)
	}

	if err := node.Del(ctx, l, p); err != nil {
		t.Fatal(err)
	}
	if got, err := ctl.Attachments(ctx, node.Socket()); err != nil || len(got.Items) != 0 {
		t.Errorf("after DEL: %+v, %v", got, err)
	}
	// A daemon that is gone: not reachable, exit 1.
	if err := d.Stop(); err != nil {
		t.Fatal(err)
	}
	if code, out := vmnicctl(t, "vmnicctl", "status", "--socket", node.Socket()); code != 1 || !strings.Contains(out, "not reachable") {
		t.Errorf("status without daemon: exit %d\n%s", code, out)
	}
}

// scrape fetches the metrics and returns the samples of the named
// families, by series.
func scrape(t *testing.T, url string, families ...string) map[string]string {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/plain; version=0.0.4") {
		t.Fatalf("scrape: %s %s", resp.Status, resp.Header.Get("Content-Type"))
	}
	out := map[string]string{}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "#") {
			continue
		}
		series, value, _ := strings.Cut(line, " ")
		name, _, _ := strings.Cut(series, "{")
		if slices.Contains(families, name) {
			out[series] = value
		}
	}
	return out
}

func sameSamples(t *testing.T, what string, got, want map[string]string) {
	t.Helper()
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s: %s = %q, want %s", what, k, got[k], v)
		}
	}
	for k, v := range got {
		if _, ok := want[k]; !ok {
			t.Errorf("%s: unexpected %s %s", what, k, v)
		}
	}
}

// TestVmnicctlMetrics scrapes the metrics endpoint over HTTP after a known
// run: two ADDs, one ADD that fails in the daemon, two DELs, a GC that
// removes the last attachment.
func TestVmnicctlMetrics(t *testing.T) {
	ctx := ctxT(t)
	node, err := harness.NewNode(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(node.Close)
	m := daemon.NewMetrics()
	// As vmnicd's main does: the GC's removal logs count.
	log := logger(t)
	d, err := node.StartDaemonWith(log, func(c *daemon.Config) { c.Metrics = m })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = d.Stop() })
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	sctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- d.ServeMetrics(sctx, ln) }()
	t.Cleanup(func() { cancel(); <-served })
	url := "http://" + ln.Addr().String() + "/metrics"

	l := list(t, node, harness.NetOptions{Vmnic: true})
	a, b, bad := newPod(t, "virt-launcher-a-1"), newPod(t, "virt-launcher-b-2"), newPod(t, "virt-launcher-c-3")
	for _, p := range []*harness.Pod{a, b} {
		if _, err := node.Add(ctx, l, p); err != nil {
			t.Fatalf("ADD %s: %v", p.Name, err)
		}
	}
	occupyBridge(t, bad)
	if _, err := node.Add(ctx, l, bad); err == nil || !strings.Contains(err.Error(), "is not vmnic's") {
		t.Fatalf("ADD with a foreign k6t-eth0 = %v, want a failure", err)
	}
	gauges := []string{"vmnic_attachments", "vmnic_dhcp_servers", "vmnic_ready"}
	sameSamples(t, "after the ADDs", scrape(t, url, gauges...), map[string]string{
		`vmnic_attachments{mode="masquerade"}`: "2", `vmnic_attachments{mode="bridge"}`: "0", `vmnic_attachments{mode="passt"}`: "0",
		"vmnic_dhcp_servers": "2", "vmnic_ready": "1",
	})

	for _, p := range []*harness.Pod{bad, a} {
		if err := node.Del(ctx, l, p); err != nil {
			t.Fatalf("DEL %s: %v", p.Name, err)
		}
	}
	// The runtime's GC DELs the attachments its cache knows itself; one
	// it has forgotten (b's) is vmnicd's GC to find.
	if err := os.RemoveAll(filepath.Join(node.Dir, "cni-cache")); err != nil {
		t.Fatal(err)
	}
	if err := node.GC(ctx, l, nil); err != nil {
		t.Fatalf("GC: %v", err)
	}

	counters := []string{"vmnic_cni_requests_total", "vmnic_cni_request_errors_total", "vmnic_gc_removed_total", "vmnic_cni_request_duration_seconds_count"}
	// Label names as client_golang writes them: sorted.
	sameSamples(t, "after the run", scrape(t, url, counters...), map[string]string{
		`vmnic_cni_requests_total{mode="masquerade",result="ok",verb="ADD"}`:                    "2",
		`vmnic_cni_requests_total{mode="masquerade",result="error",verb="ADD"}`:                 "1",
		`vmnic_cni_requests_total{mode="masquerade",result="ok",verb="DEL"}`:                    "2",
		`vmnic_cni_requests_total{mode="masquerade",result="ok",verb="GC"}`:                     "1",
		`vmnic_cni_request_errors_total{code="7",mode="masquerade",verb="ADD"}`:                 "1",
		`vmnic_cni_request_duration_seconds_count{mode="masquerade",result="ok",verb="ADD"}`:    "2",
		`vmnic_cni_request_duration_seconds_count{mode="masquerade",result="error",verb="ADD"}`: "1",
		`vmnic_cni_request_duration_seconds_count{mode="masquerade",result="ok",verb="DEL"}`:    "2",
		`vmnic_cni_request_duration_seconds_count{mode="masquerade",result="ok",verb="GC"}`:     "1",
		`vmnic_gc_removed_total{kind="attachment"}`:                                             "1",
		`vmnic_gc_removed_total{kind="ovs_port"}`:                                               "0",
	})
	sameSamples(t, "at the end", scrape(t, url, gauges...), map[string]string{
		`vmnic_attachments{mode="masquerade"}`: "0", `vmnic_attachments{mode="bridge"}`: "0", `vmnic_attachments{mode="passt"}`: "0",
		"vmnic_dhcp_servers": "0", "vmnic_ready": "1",
	})
	for _, path := range []string{"/healthz", "/readyz"} {
		resp, err := http.Get("http://" + ln.Addr().String() + path)
		if err != nil || resp.StatusCode != 200 {
			t.Errorf("%s: %v %v", path, resp, err)
		} else {
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
	}
}

// kubeVirtCRD is a minimal CRD for the KubeVirt CR (test/cluster's
// KubeVirt CRDs have the VM kinds only).
const kubeVirtCRD = `apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: kubevirts.kubevirt.io
spec:
  group: kubevirt.io
  names: {kind: KubeVirt, listKind: KubeVirtList, plural: kubevirts, singular: kubevirt}
  scope: Namespaced
  versions:
    - name: v1
      served: true
      storage: true
      subresources: {status: {}}
      schema:
        openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}
`

// generatedNAD is the NetworkAttachmentDefinition spiderpool-controller
// generates from deploy/examples/bridge-ovs/multus.yaml (no controller runs
// here).
const generatedNAD = `apiVersion: k8s.cni.cncf.io/v1
kind: NetworkAttachmentDefinition
metadata:
  name: ovs-vlan100
  namespace: default
  annotations: {k8s.v1.cni.cncf.io/resourceName: ovs.vmnic.io/br1}
spec:
  config: '{"cniVersion":"1.0.0","name":"ovs-vlan100","plugins":[{"type":"vmnic","mode":"bridge","bridge":"br1","vlan":100,"mtu":1500,"ipam":{"type":"spiderpool","default_ipv4_ippool":["vlan100-v4"]}}]}'
`

func doctorFailures(t *testing.T, r ctl.Reader) []string {
	t.Helper()
	rep, err := ctl.Doctor(context.Background(), r, ctl.DoctorOptions{Modes: []string{"bridge"}})
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, c := range rep.Failures() {
		if c.Fix == "" {
			t.Errorf("failed check %s has no fix", c.ID)
		}
		ids = append(ids, c.ID)
	}
	return ids
}

func applyFile(ctx context.Context, t *testing.T, c *cluster.Cluster, path string) {
	t.Helper()
	root, err := harness.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(root, path))
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Apply(ctx, b); err != nil {
		t.Fatalf("apply %s: %v", path, err)
	}
}

// publishNode writes node's NodeNetworkCapability as vmnicd would: OVS
// bridge br1, Spiderpool healthy, every mode but ipvlan ready.
func publishNode(ctx context.Context, t *testing.T, dyn dynamic.Interface, node string) {
	t.Helper()
	now := metav1.Now()
	c := func(typ string, ok bool, reason string) metav1.Condition {
		s := metav1.ConditionFalse
		if ok {
			s = metav1.ConditionTrue
		}
		return metav1.Condition{Type: typ, Status: s, Reason: reason, Message: reason, LastTransitionTime: now}
	}
	nnc := &v1alpha1.NodeNetworkCapability{
		TypeMeta:   metav1.TypeMeta{APIVersion: "vmnic.io/v1alpha1", Kind: "NodeNetworkCapability"},
		ObjectMeta: metav1.ObjectMeta{Name: node},
		Spec:       v1alpha1.NodeNetworkCapabilitySpec{NodeName: node},
	}
	obj, err := runtime.DefaultUnstructuredConverter.ToUnstructured(nnc)
	if err != nil {
		t.Fatal(err)
	}
	res := dyn.Resource(v1alpha1.NodeNetworkCapabilitiesResource)
	created, err := res.Create(ctx, &unstructured.Unstructured{Object: obj}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	nnc.Status = v1alpha1.NodeNetworkCapabilityStatus{
		Conditions: []metav1.Condition{
			c(v1alpha1.ConditionMasqueradeReady, true, "Ready"), c(v1alpha1.ConditionPasstMacvlanReady, true, "Ready"),
			c(v1alpha1.ConditionPasstIpvlanReady, false, "KernelFeatureMissing"), c(v1alpha1.ConditionBridgeOVSReady, true, "Ready"),
		},
		Kernel:     v1alpha1.KernelFeatures{NftablesNAT: true, Tun: true, Bridge: true, Macvlan: true, Veth: true},
		OVS:        v1alpha1.OVSStatus{Endpoint: "unix:/var/run/openvswitch/db.sock", Reachable: true, Applied: true, Version: "3.1.0", Bridges: []v1alpha1.OVSBridge{{Name: "br1", DatapathType: "system"}}},
		Spiderpool: v1alpha1.SpiderpoolStatus{CRDs: true, AgentSocket: true, Healthy: true, SocketPath: "/var/run/spidernet/spiderpool.sock"},
		ObservedAt: now,
	}
	st, err := runtime.DefaultUnstructuredConverter.ToUnstructured(&nnc.Status)
	if err != nil {
		t.Fatal(err)
	}
	created.Object["status"] = st
	if _, err := res.UpdateStatus(ctx, created, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// TestVmnicctlDoctor checks bridge mode's prerequisites against a real API
// server: everything missing, then the CRDs, then the objects of
// deploy/examples/bridge-ovs, the generated NAD and the node's capability,
// until doctor says ready.
func TestVmnicctlDoctor(t *testing.T) {
	ctx := ctxT(t)
	c := cluster.StartT(t)
	r, err := ctl.NewClusterReader(c.Config)
	if err != nil {
		t.Fatal(err)
	}

	want := []string{"multus-crd", "spiderpool-crds", "kubevirt-binding", "nodes", "networks"}
	if got := doctorFailures(t, r); strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("bare API server: failures %v, want %v", got, want)
	}
	code, out := vmnicctl(t, "vmnicctl", "doctor", "--kubeconfig", c.Kubeconfig, "--mode", "bridge")
	_, bridgeSection, _ := strings.Cut(out, "\nbridge: NOT READY\n")
	bridgeSection, _, _ = strings.Cut(bridgeSection, "\n\n")
	if code != 1 || strings.Count(bridgeSection, "FAIL ") != 5 || strings.Count(bridgeSection, "fix: ") != 5 ||
		!strings.Contains(out, "not ready: 5 required prerequisite(s) missing") || !strings.Contains(out, "masquerade: NOT READY (not asked for: not counted") {
		t.Errorf("doctor on a bare API server: exit %d\n%s", code, out)
	}

	// The CRDs: Spiderpool's and Multus' (from the Spiderpool module),
	// KubeVirt's, vmnic's.
	files, err := spiderpool.CRDFiles(ctx)
	if err != nil {
		t.Fatal(err)
	}
	root, err := harness.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	kvCRD := filepath.Join(t.TempDir(), "kubevirt-crd.yaml")
	if err := os.WriteFile(kvCRD, []byte(kubeVirtCRD), 0o644); err != nil {
		t.Fatal(err)
	}
	files = append(files, kvCRD, filepath.Join(root, "deploy", "crds", "vmnic.io_nodenetworkcapabilities.yaml"))
	if err := c.InstallCRDs(ctx, files...); err != nil {
		t.Fatal(err)
	}
	if err := c.InstallKubeVirtCRDs(ctx); err != nil {
		t.Fatal(err)
	}
	want = []string{"spiderpool-pools", "kubevirt-binding", "nodes", "networks"}
	if got := doctorFailures(t, r); strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("with the CRDs: failures %v, want %v", got, want)
	}

	// The example's pool, network and binding.
	applyFile(ctx, t, c, "deploy/examples/bridge-ovs/ippool.yaml")
	applyFile(ctx, t, c, "deploy/examples/bridge-ovs/multus.yaml")
	if err := c.CreateNamespace(ctx, "kubevirt"); err != nil {
		t.Fatal(err)
	}
	applyFile(ctx, t, c, "deploy/examples/bridge-ovs/kubevirt-binding.yaml")
	want = []string{"nodes", "network/default/ovs-vlan100"}
	if got := doctorFailures(t, r); strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("with the example's objects: failures %v, want %v", got, want)
	}

	// What spiderpool-controller and vmnicd would publish.
	if err := c.Apply(ctx, []byte(generatedNAD)); err != nil {
		t.Fatal(err)
	}
	publishNode(ctx, t, c.Dynamic, "node-a")
	if got := doctorFailures(t, r); len(got) != 0 {
		t.Errorf("everything in place: failures %v", got)
	}
	code, out = vmnicctl(t, "kubectl-vmnic", "doctor", "--kubeconfig", c.Kubeconfig)
	if code != 0 || !strings.Contains(out, "bridge: READY") || !strings.Contains(out, "ready: every prerequisite of masquerade, bridge exists") ||
		!strings.Contains(out, `OVS bridge "br1" of default/ovs-vlan100 on node-a`) || !strings.Contains(out, "vlan100-v4 (100 of 100 free)") {
		t.Errorf("doctor when ready: exit %d\n%s", code, out)
	}

	// capabilities reads the same object.
	code, out = vmnicctl(t, "vmnicctl", "capabilities", "node-a", "--kubeconfig", c.Kubeconfig)
	if code != 0 || !strings.Contains(out, "bridge-ovs     yes") || !strings.Contains(out, "bridges br1 (system)") {
		t.Errorf("capabilities node-a: exit %d\n%s", code, out)
	}
	code, out = vmnicctl(t, "vmnicctl", "capabilities", "--kubeconfig", c.Kubeconfig, "-o", "json")
	var nodes []v1alpha1.NodeNetworkCapability
	if err := json.Unmarshal([]byte(out), &nodes); err != nil || code != 0 || len(nodes) != 1 || nodes[0].Name != "node-a" {
		t.Errorf("capabilities -o json: exit %d, %v\n%s", code, err, out)
	}
}

// TestVmnicctlEvents: an ADD that fails in the daemon makes a Warning
// event on the pod and on its VMI, in the real API server.
func TestVmnicctlEvents(t *testing.T) {
	ctx, c, kube := kubeVirtCluster(t)
	vmi := createVMI(ctx, t, c, "vm-ev", kubevirt.DefaultBinding)
	podName := "virt-launcher-vm-ev-12345"
	createLauncherPod(ctx, t, kube, vmi, podName)

	node, err := harness.NewNode(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(node.Close)
	startClusterVmnicd(t, node, c, testNode)

	l := list(t, node, harness.NetOptions{Vmnic: true})
	p := newPod(t, podName)
	occupyBridge(t, p)
	start := time.Now()
	if _, err := node.Add(ctx, l, p); err == nil {
		t.Fatal("ADD with a foreign k6t-eth0 succeeded")
	}
	addTook := time.Since(start)
	t.Cleanup(func() { _ = node.Del(context.Background(), l, p) })

	var onPod, onVMI *corev1.Event
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) && (onPod == nil || onVMI == nil) {
		list, err := kube.CoreV1().Events("default").List(ctx, metav1.ListOptions{})
		if err != nil {
			t.Fatal(err)
		}
		for i := range list.Items {
			e := &list.Items[i]
			switch {
			case e.InvolvedObject.Kind == "Pod" && e.InvolvedObject.Name == podName:
				onPod = e
			case e.InvolvedObject.Kind == "VirtualMachineInstance" && e.InvolvedObject.Name == "vm-ev":
				onVMI = e
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	if onPod == nil || onVMI == nil {
		t.Fatalf("events: on pod %v, on VMI %v", onPod, onVMI)
	}
	if onPod.Type != corev1.EventTypeWarning || onPod.Reason != daemon.ReasonConfigInvalid || onPod.Source.Component != "vmnicd" ||
		!strings.Contains(onPod.Message, `link "k6t-eth0" already exists`) || !strings.Contains(onPod.Message, "on node "+testNode) ||
		!strings.Contains(onPod.Message, "(CNI error 7)") || onPod.InvolvedObject.UID == "" || onPod.Related == nil || onPod.Related.Name != "vm-ev" {
		t.Errorf("pod event = %+v", onPod)
	}
	if onVMI.InvolvedObject.UID != vmi.UID || onVMI.InvolvedObject.APIVersion != "kubevirt.io/v1" || !strings.Contains(onVMI.Message, "of pod "+podName) {
		t.Errorf("VMI event = %+v", onVMI)
	}
	// `kubectl describe pod` finds it by involvedObject.
	sel := "involvedObject.kind=Pod,involvedObject.name=" + podName
	if evs, err := kube.CoreV1().Events("default").List(ctx, metav1.ListOptions{FieldSelector: sel}); err != nil || len(evs.Items) != 1 {
		t.Errorf("events by field selector %s: %v %v", sel, evs, err)
	}
	t.Logf("failed ADD took %s; events recorded asynchronously", addTook.Round(time.Millisecond))
}
