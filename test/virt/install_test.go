package virt_test

import (
	"context"
	"net"
	"regexp"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/vmnic/vmnic/pkg/kubevirt"
	"github.com/vmnic/vmnic/test/guest"
	"github.com/vmnic/vmnic/test/need"
	"github.com/vmnic/vmnic/test/node"
	"github.com/vmnic/vmnic/test/ovs"
	"github.com/vmnic/vmnic/test/proc"
	"github.com/vmnic/vmnic/test/virt"
)

// env is the cluster every subtest of TestRealKubeVirt uses: two node
// containers, node-1 with the control plane, node-2 joining it, KubeVirt
// installed by its operator with vmnic's binding registered, and vmnic
// installed by helm from its image.
type env struct {
	a, b  *node.Node
	imgs  virt.Images
	guest *virt.GuestImage
	ovs   []*ovs.OVS // node-1's and node-2's
	// migrants are the VMs the Migration subtests move, in the order the
	// subtests made them.
	migrants []*migrant
}

// TestRealKubeVirt runs vmnic under the real KubeVirt: KubeVirt's own
// components decide and do everything about the VMs, vmnic wires their
// NICs.
func TestRealKubeVirt(t *testing.T) {
	e := newEnv(t)
	t.Run("Installed", e.installed)
	if t.Failed() {
		return
	}
	e.secondary(t)
	e.installVmnic(t)
	t.Run("Masquerade", subtest(e.masquerade))
	t.Run("Bridge", subtest(e.bridge))
	t.Run("Passt", subtest(e.passt))
	t.Run("StopStart", e.stopStart)
	t.Run("Migration", e.migration)
	t.Run("Examples", e.examples)
}

// subtest runs a part the benchmark shares as a subtest.
func subtest(f func(testing.TB)) func(*testing.T) { return func(t *testing.T) { f(t) } }

// newEnv builds the images, starts the two nodes and installs KubeVirt
// with vmnic's binding registered and the PasstBinding gate on.
func newEnv(tb testing.TB) *env {
	need.NoError(tb, node.CheckContainer())
	need.NoError(tb, guest.Check())
	ctx := tb.Context()
	e := &env{}
	var err error
	if e.imgs, err = virt.BuildImages(ctx); err != nil {
		tb.Fatal(err)
	}
	if e.guest, err = virt.BuildGuestImage(ctx); err != nil {
		tb.Fatal(err)
	}
	e.a = node.StartT(tb, node.Options{Container: true, Aggregation: true})
	e.b = node.StartT(tb, node.Options{Container: true, Join: e.a, Name: "node-2", IP: "192.168.200.11"})
	for _, n := range []*node.Node{e.a, e.b} {
		if err := n.ImportImage(e.guest.Archive); err != nil {
			tb.Fatal(err)
		}
	}
	kv := virt.DefaultCR()
	kv.Spec.Configuration.DeveloperConfiguration.FeatureGates = append(kv.Spec.Configuration.DeveloperConfiguration.FeatureGates, "PasstBinding")
	kv.Spec.Configuration.NetworkConfiguration = &kubevirtv1.NetworkConfiguration{Binding: map[string]kubevirtv1.InterfaceBindingPlugin{
		kubevirt.DefaultBinding: {DomainAttachmentType: kubevirtv1.Tap, Migration: &kubevirtv1.InterfaceBindingMigration{}},
	}}
	start := time.Now()
	if err := virt.Install(ctx, e.imgs, kv, 10*time.Minute, e.a, e.b); err != nil {
		tb.Fatal(err)
	}
	tb.Logf("KubeVirt Available %v after the install began", time.Since(start).Round(time.Millisecond))
	return e
}

// installVmnic installs vmnic by helm from its image, built here, and
// waits until its DaemonSet is ready on both nodes.
func (e *env) installVmnic(tb testing.TB) {
	ctx := tb.Context()
	img, err := node.BuildVmnicImage(ctx, tb.TempDir(), "v1")
	if err != nil {
		tb.Fatal(err)
	}
	// One release for both nodes: InstallVmnic imports the image into
	// node-1, node-2 needs it too.
	if err := e.b.ImportImage(img.Archive); err != nil {
		tb.Fatal(err)
	}
	if err := e.a.InstallVmnic(ctx, img); err != nil {
		tb.Fatal(err)
	}
	ds, err := e.a.WaitDaemonSet(ctx, 2*time.Minute)
	if err != nil {
		tb.Fatal(err)
	}
	if ds.Status.NumberReady != 2 {
		tb.Fatalf("vmnic's DaemonSet: %d of 2 nodes ready", ds.Status.NumberReady)
	}
}

// installed: the KubeVirt CR is Available at the version built here,
// virt-api and virt-controller run, virt-handler runs on each node from
// the image built here and marks its node schedulable for VMs.
func (e *env) installed(t *testing.T) {
	ctx := t.Context()
	kv, err := virt.Get(ctx, e.a, virt.Namespace, virt.CRName)
	if err != nil {
		t.Fatal(err)
	}
	if kv.Status.ObservedKubeVirtVersion != virt.Version || kv.Status.TargetKubeVirtRegistry != virt.Registry {
		t.Errorf("KubeVirt deployed %s from %s, want %s from %s", kv.Status.ObservedKubeVirtVersion, kv.Status.TargetKubeVirtRegistry, virt.Version, virt.Registry)
	}
	pods, err := e.a.Kube.CoreV1().Pods(virt.Namespace).List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	handlers := map[string]bool{}
	running := map[string]int{}
	for _, p := range pods.Items {
		component := p.Labels["kubevirt.io"]
		ready := len(p.Status.ContainerStatuses) > 0
		for _, cs := range p.Status.ContainerStatuses {
			if _, ok := e.imgs[cs.Image]; !ok {
				t.Errorf("pod %s runs %s, not an image built here", p.Name, cs.Image)
			}
			ready = ready && cs.Ready
		}
		if ready {
			running[component]++
			if component == "virt-handler" {
				handlers[p.Spec.NodeName] = true
			}
		}
	}
	for _, c := range []string{"virt-operator", "virt-api", "virt-controller", "virt-handler"} {
		if running[c] == 0 {
			t.Errorf("no ready %s pod:\n%s", c, virt.PodsReport(ctx, e.a))
		}
	}
	for _, n := range []*node.Node{e.a, e.b} {
		if !handlers[n.Name] {
			t.Errorf("no ready virt-handler on %s", n.Name)
		}
		no, err := e.a.Kube.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if no.Labels[node.SchedulableLabel] != "true" {
			t.Errorf("%s: virt-handler did not mark it schedulable: labels %v", n.Name, no.Labels)
		}
	}
}

// masquerade: a VMI on vmnic's binding in masquerade mode, with ports
// 8080 listed, on node-1. KubeVirt runs it; its guest takes 10.0.2.2 by
// DHCP from vmnic and reaches a pod behind Flannel on node-2; a pod on
// node-2 reaches the guest on the listed port, and not on 8081.
func (e *env) masquerade(t testing.TB) {
	ctx := t.Context()
	peer := node.PlainPod("peer")
	peer.Spec.NodeName = e.b.Name
	if _, err := e.a.Kube.CoreV1().Pods("default").Create(ctx, peer, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	p, err := e.b.WaitPodReady(ctx, "default", peer.Name, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	iface := kubevirtv1.Interface{
		Binding: &kubevirtv1.PluginBinding{Name: kubevirt.DefaultBinding},
		Ports:   []kubevirtv1.Port{{Port: 8080, Protocol: "TCP"}},
	}
	vmi := virt.VMI("masq", e.guest, iface, "vmnic.peers="+p.Status.PodIP+" vmnic.pulse="+p.Status.PodIP)
	virt.PreferNode(vmi, e.a.Name)
	running := e.run(t, vmi, e.a)
	m, err := virt.WaitConsole(ctx, e.a, running, regexp.MustCompile(`^ADDR4 eth0 ?(\S*)`), 3*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if m[1] != "10.0.2.2/24" {
		t.Errorf("guest address %q, want 10.0.2.2/24 from vmnic's DHCP", m[1])
	}
	if m, err = virt.WaitConsole(ctx, e.a, running, regexp.MustCompile(`^PEER-(OK|FAILED)`), 2*time.Minute); err != nil {
		t.Fatal(err)
	}
	if m[1] != "OK" {
		t.Errorf("the guest does not reach the pod behind Flannel on %s (%s)", e.b.Name, p.Status.PodIP)
	}
	launcher, err := virt.LauncherPod(ctx, e.a, running)
	if err != nil {
		t.Fatal(err)
	}
	netns, err := e.b.PodNetns("default", peer.Name)
	if err != nil {
		t.Fatal(err)
	}
	checkPorts(t, netns, launcher.Status.PodIP)
	if !t.Failed() {
		// Its pod IP changes when it migrates: the probe asks each
		// launcher pod of the VM.
		// vmnicd's gap is judged by the guest's pulse, with no probe of
		// its port while it moves (migrant.quietMove).
		e.migrants = append(e.migrants, &migrant{
			mode: "Masquerade", vmi: running, dial: proc.NetnsDialer(netns), pulseFrom: netns, quietMove: true,
			targets: func(ctx context.Context) []string { return launcherAddrs(ctx, e.a, running, "8080") },
		})
	}
}

// run creates the VMI, which prefers node on, waits until KubeVirt reports
// it Running, and checks that it runs on that node.
func (e *env) run(t testing.TB, vmi *kubevirtv1.VirtualMachineInstance, on *node.Node) *kubevirtv1.VirtualMachineInstance {
	t.Helper()
	ctx := t.Context()
	start := time.Now()
	created, err := e.a.CreateVMI(ctx, vmi)
	if err != nil {
		t.Fatal(err)
	}
	running, err := virt.WaitVMIRunning(ctx, e.a, created.Namespace, created.Name, 5*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("VMI %s Running %v after its creation, on %s", vmi.Name, time.Since(start).Round(time.Millisecond), running.Status.NodeName)
	if running.Status.NodeName != on.Name {
		t.Fatalf("VMI %s on %s, want %s (preferred)", vmi.Name, running.Status.NodeName, on.Name)
	}
	return running
}

// checkPorts asks the VM pod at ip for a page from the network namespace
// netns (a peer pod's): the listed port 8080 answers with the guest's
// page, the unlisted 8081 does not answer.
func checkPorts(t testing.TB, netns, ip string) {
	t.Helper()
	get := func(port string) (string, error) {
		return proc.HTTPGet(t.Context(), proc.NetnsDialer(netns), net.JoinHostPort(ip, port))
	}
	if got, err := get("8080"); err != nil || got != "guest 8080" {
		t.Errorf("from the peer pod, the VM pod %s:8080 answered %q, %v; want the guest's \"guest 8080\"", ip, got, err)
	}
	if got, err := get("8081"); err == nil {
		t.Errorf("from the peer pod, the VM pod %s:8081 answered %q: port 8081 is not listed", ip, got)
	}
}
