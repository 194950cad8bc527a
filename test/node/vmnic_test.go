package node_test

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/vmnic/vmnic/pkg/kubevirt"
	"github.com/vmnic/vmnic/pkg/nft"
	"github.com/vmnic/vmnic/test/guest"
	"github.com/vmnic/vmnic/test/kvoracle"
	"github.com/vmnic/vmnic/test/need"
	"github.com/vmnic/vmnic/test/node"
)

var nncResource = schema.GroupVersionResource{Group: "vmnic.io", Version: "v1alpha1", Resource: "nodenetworkcapabilities"}

// vmnicBindings registers vmnic's binding in the KubeVirt CR as the
// README says: a tap attachment with migration.
var vmnicBindings = map[string]kubevirtv1.InterfaceBindingPlugin{
	kubevirt.DefaultBinding: {DomainAttachmentType: kubevirtv1.Tap, Migration: &kubevirtv1.InterfaceBindingMigration{}},
}

func kubeVirtCR() *kubevirtv1.KubeVirt {
	kv := &kubevirtv1.KubeVirt{}
	kv.Spec.Configuration.NetworkConfiguration = &kubevirtv1.NetworkConfiguration{Binding: vmnicBindings}
	return kv
}

// TestVmnicOnNode puts vmnic on the real node as users do and proves its
// promises there, in order on one node:
//
//   - install: helm install of the chart with the image the Dockerfile
//     builds; the DaemonSet pod becomes Ready, its init step installs the
//     image's shim and chains vmnic into Flannel's conflist (containerd picks
//     it up without a restart), vmnicd publishes the Node's
//     NodeNetworkCapability;
//   - ordinary pod: a plain pod started with vmnic chained has the same
//     netns as one started before vmnic was installed, and no vmnic table;
//   - VM pod: a VMI and its virt-launcher pod as KubeVirt's controller makes
//     them; kubelet and containerd run Flannel, then vmnic; the pod IP
//     kubelet reports is Flannel's; a real guest booted as KubeVirt's tap
//     binding boots it takes 10.0.2.2 by DHCP and reaches a pod behind
//     Flannel.
func TestVmnicOnNode(t *testing.T) {
	need.NoError(t, node.Check())
	need.NoError(t, guest.Check())
	ctx := t.Context()
	n := node.StartT(t, node.Options{})
	t.Logf("node Ready after %v (control plane %v)", n.Timings["ready"].Round(time.Millisecond), n.Timings["cluster"].Round(time.Millisecond))
	if err := n.Cluster.InstallKubeVirtCRDs(ctx); err != nil {
		t.Fatal(err)
	}
	if err := n.LabelSchedulable(ctx); err != nil {
		t.Fatal(err)
	}
	imgDir := t.TempDir()
	img, err := node.BuildVmnicImage(ctx, imgDir, "v1")
	if err != nil {
		t.Fatal(err)
	}
	// A plain pod before vmnic is there: the reference netns.
	before := startPlainPod(ctx, t, n, "plain-before")
	primary, err := os.ReadFile(n.ConflistPath())
	if err != nil {
		t.Fatal(err)
	}

	// The API server's own count of the watches on what vmnicd watches,
	// before vmnicd is there (kubelet and the controllers watch pods too).
	baseWatches, err := n.Cluster.WatchCounts(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var vmnicdReady time.Time
	t.Run("install", func(t *testing.T) {
		start := time.Now()
		if err := n.InstallVmnic(ctx, img); err != nil {
			t.Fatal(err)
		}
		if _, err := n.WaitDaemonSet(ctx, 2*time.Minute); err != nil {
			t.Fatal(err)
		}
		vmnicdReady = time.Now()
		t.Logf("helm install to DaemonSet Ready: %v", time.Since(start).Round(time.Millisecond))
		shim, err := os.ReadFile(filepath.Join(n.CNIBinDir, "vmnic"))
		if err != nil {
			t.Fatalf("shim not installed: %v", err)
		}
		want, err := os.ReadFile(filepath.Join(imgDir, "image-v1", "bin", "vmnic"))
		if err != nil {
			t.Fatal(err)
		}
		if sha256.Sum256(shim) != sha256.Sum256(want) {
			t.Errorf("the shim in the CNI bin dir is not the image's")
		}
		types, err := n.ConflistPlugins()
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(types, []string{"flannel", "portmap", "vmnic"}) {
			t.Errorf("conflist plugins %v, want flannel, portmap, vmnic", types)
		}
		waitFor(ctx, t, time.Minute, "NodeNetworkCapability "+n.Name, func() (bool, string) {
			if _, err := n.Cluster.Dynamic.Resource(nncResource).Get(ctx, n.Name, metav1.GetOptions{}); err != nil {
				return false, err.Error()
			}
			return true, ""
		})
	})
	if t.Failed() {
		return
	}

	var plain *corev1.Pod
	t.Run("ordinary pod", func(t *testing.T) {
		plain = startPlainPod(ctx, t, n, "plain-after")
		a, b := netnsShape(t, n, before), netnsShape(t, n, plain)
		if a != b {
			t.Errorf("a plain pod's netns with vmnic chained differs from one without:\nwithout:\n%s\nwith:\n%s", a, b)
		}
		path, err := n.PodNetns(plain.Namespace, plain.Name)
		if err != nil {
			t.Fatal(err)
		}
		tables, err := node.InNetns(path, "nft", "list", "tables")
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(tables, nft.TableName) {
			t.Errorf("vmnic made nftables in a plain pod: %s", tables)
		}
	})
	if plain == nil {
		return
	}

	var vm1 *corev1.Pod
	var vm1Tap, vm1MAC string
	t.Run("VM pod", func(t *testing.T) {
		created, pod := createVMPod(ctx, t, n, "vm1")
		start := time.Now()
		pod, err = n.WaitPodReady(ctx, pod.Namespace, pod.Name, 2*time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("VM pod %s Ready after %v, IP %s", pod.Name, time.Since(start).Round(time.Millisecond), pod.Status.PodIP)
		script := fmt.Sprintf(`
udhcpc -i eth0 -q -f -n -t 10 -T 2 -O hostname || echo DHCP4-FAILED
echo "ADDR4 $(ip -4 -o addr show dev eth0 | awk '{print $4}' | head -1)"
echo "ROUTE4 $(ip -4 route show default | head -1)"
ping -c 3 -W 3 %s >/dev/null 2>&1 && echo PEER-OK || echo PEER-FAILED
`, plain.Status.PodIP)
		vm := bootVM(ctx, t, n, created, pod, script)
		vm1, vm1Tap, vm1MAC = pod, vm.tap, vm.mac
		g := vm.guest
		defer g.Kill()
		if _, err := g.WaitFor(ctx, regexp.MustCompile(`PEER-(OK|FAILED)`)); err != nil {
			t.Fatalf("guest: %v\n%s", err, g.Output())
		}
		out := g.Output()
		if !strings.Contains(out, "ADDR4 10.0.2.2/24") {
			t.Errorf("the guest did not take 10.0.2.2 by DHCP:\n%s", out)
		}
		if !strings.Contains(out, "PEER-OK") {
			t.Errorf("the guest did not reach the pod %s behind Flannel:\n%s", plain.Status.PodIP, out)
		}
	})
	if t.Failed() {
		return
	}

	t.Run("rollout under load", func(t *testing.T) {
		testRolloutUnderLoad(ctx, t, n, vm1, vm1Tap, vm1MAC)
	})
	if t.Failed() {
		return
	}

	t.Run("vmnicd away", func(t *testing.T) {
		// A rollout of an image that cannot start: the running vmnicd
		// goes, its successor never comes.
		watch := n.WatchReady(ctx)
		chart, err := node.Chart()
		if err != nil {
			t.Fatal(err)
		}
		if _, err := n.Helm(ctx, "upgrade", node.Release, chart, "--namespace", node.Namespace, "--reuse-values", "--set", "image.tag=absent"); err != nil {
			t.Fatal(err)
		}
		waitFor(ctx, t, time.Minute, "vmnicd gone", func() (bool, string) {
			pods, err := n.Kube.CoreV1().Pods(node.Namespace).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=vmnic"})
			if err != nil {
				return false, err.Error()
			}
			for _, p := range pods.Items {
				if p.Spec.Containers[0].Image != "vmnic:absent" {
					return false, "old pod " + p.Name + " still there"
				}
			}
			return len(pods.Items) == 1, fmt.Sprintf("%d pods", len(pods.Items))
		})
		// Ordinary pods keep starting.
		away := startPlainPod(ctx, t, n, "plain-away")
		// A VM pod waits: its sandbox's ADD fails with "try again later"
		// and kubelet retries.
		_, vm := createVMPod(ctx, t, n, "vm2")
		time.Sleep(15 * time.Second)
		if p, err := n.Kube.CoreV1().Pods("default").Get(ctx, vm.Name, metav1.GetOptions{}); err != nil {
			t.Fatal(err)
		} else if p.Status.PodIP != "" || p.Status.Phase == corev1.PodRunning {
			t.Errorf("VM pod %s started without vmnicd: phase %s, IP %s", p.Name, p.Status.Phase, p.Status.PodIP)
		}
		if !n.Events("default", vm.Name, "FailedCreatePodSandBox") {
			t.Errorf("no FailedCreatePodSandBox event on %s: kubelet should be retrying its sandbox", vm.Name)
		}
		// vmnicd comes back: the VM pod starts.
		if err := n.UpgradeVmnic(ctx, img); err != nil {
			t.Fatal(err)
		}
		if _, err := n.WaitDaemonSet(ctx, 2*time.Minute); err != nil {
			t.Fatal(err)
		}
		back := time.Now()
		if _, err := n.WaitPodReady(ctx, "default", vm.Name, 3*time.Minute); err != nil {
			t.Fatal(err)
		}
		t.Logf("VM pod Ready %v after vmnicd came back", time.Since(back).Round(time.Millisecond))
		if worst := watch.Stop(); worst > 0 {
			t.Errorf("the Node was not Ready for %v while vmnicd was away", worst)
		}
		// Nothing leaks from the failed sandboxes: a netns and a host-local
		// address per running pod-network sandbox, no more.
		assertNoLeaks(t, n)
		_ = away
	})
	if t.Failed() {
		return
	}

	// The DaemonSet's vmnicd (the image's binary) keeps its watches open
	// after Ready: 30 s on at least, by the API server's count.
	var withWatches map[string]int
	t.Run("watches", func(t *testing.T) {
		time.Sleep(time.Until(vmnicdReady.Add(30 * time.Second)))
		if withWatches, err = n.Cluster.WatchCounts(ctx); err != nil {
			t.Fatal(err)
		}
		// Its three: the node's pods, the VMIs on the node and those
		// migrating to it.
		for r, want := range map[string]int{"pods": 1, "virtualmachineinstances": 2} {
			if withWatches[r] < baseWatches[r]+want {
				t.Errorf("%s after vmnicd was Ready: the API server counts %d watches on %s, %d before vmnicd; vmnicd opens %d", time.Since(vmnicdReady).Round(time.Second), withWatches[r], r, baseWatches[r], want)
			}
		}
		// None other: it reads its DaemonSet, it does not watch it.
		if withWatches["daemonsets"] > baseWatches["daemonsets"] {
			t.Errorf("vmnicd watches daemonsets: the API server counts %d watches, %d before vmnicd", withWatches["daemonsets"], baseWatches["daemonsets"])
		}
		t.Logf("%s after Ready: watches %v (before vmnicd %v)", time.Since(vmnicdReady).Round(time.Second), withWatches, baseWatches)
	})

	t.Run("uninstall", func(t *testing.T) {
		if _, err := n.Helm(ctx, "uninstall", node.Release, "--namespace", node.Namespace, "--wait", "--timeout", "2m"); err != nil {
			t.Fatal(err)
		}
		waitFor(ctx, t, time.Minute, "vmnicd pods gone", func() (bool, string) {
			pods, err := n.Kube.CoreV1().Pods(node.Namespace).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=vmnic"})
			if err != nil {
				return false, err.Error()
			}
			return len(pods.Items) == 0, fmt.Sprintf("%d pods", len(pods.Items))
		})
		// The node's CNI is what it was before the install, byte for byte.
		waitFor(ctx, t, 30*time.Second, "conflist unchained", func() (bool, string) {
			now, err := os.ReadFile(n.ConflistPath())
			if err != nil {
				return false, err.Error()
			}
			return string(now) == string(primary), string(now)
		})
		if _, err := os.Stat(filepath.Join(n.CNIBinDir, "vmnic")); !os.IsNotExist(err) {
			t.Errorf("the shim is still in the CNI bin dir after helm uninstall (%v)", err)
		}
		// Running pods keep running, new ones start.
		for _, name := range []string{plain.Name, before.Name} {
			if _, err := n.WaitPodReady(ctx, "default", name, 5*time.Second); err != nil {
				t.Error(err)
			}
		}
		startPlainPod(ctx, t, n, "plain-uninstalled")
		if worst := n.WatchReady(ctx); worst.Stop() > 0 {
			t.Error("the Node is not Ready after the uninstall")
		}
		// The VMI watches were vmnicd's: they went with it.
		if withWatches != nil {
			gone, err := n.Cluster.WatchCounts(ctx)
			if err != nil {
				t.Fatal(err)
			}
			for _, r := range []string{"virtualmachineinstances"} {
				if gone[r] >= withWatches[r] {
					t.Errorf("after the uninstall the API server still counts %d watches on %s (%d with vmnicd)", gone[r], r, withWatches[r])
				}
			}
		}
	})
}

// vmGuest is a VM pod's guest, booted as KubeVirt's tap binding boots it.
type vmGuest struct {
	netns, tap, mac string
	guest           *guest.Guest
}

// bootVM checks that the running VM pod of vmi has vmnic's masquerade
// wiring and the pod IP the primary gave it (kubelet's report is eth0's
// address), then boots a real guest running script on the tap and MAC
// KubeVirt's own code gives the domain in that netns. The caller kills the
// guest.
func bootVM(ctx context.Context, t *testing.T, n *node.Node, vmi *kubevirtv1.VirtualMachineInstance, pod *corev1.Pod, script string) *vmGuest {
	t.Helper()
	path, err := n.PodNetns(pod.Namespace, pod.Name)
	if err != nil {
		t.Fatal(err)
	}
	eth0, err := node.InNetns(path, "ip", "-4", "-o", "addr", "show", "dev", "eth0")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(pod.Status.PodIP, "10.244.") || !strings.Contains(eth0, " "+pod.Status.PodIP+"/") {
		t.Errorf("kubelet reports pod IP %s; want the primary's address on eth0: %s", pod.Status.PodIP, eth0)
	}
	tables, err := node.InNetns(path, "nft", "list", "tables")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(tables, "ip "+nft.TableName) {
		t.Errorf("no vmnic NAT table in the VM pod: %q", tables)
	}
	ifaces, err := kvoracle.Domain(ctx, kvoracle.DomainInput{Netns: path, VMI: vmi, Bindings: vmnicBindings})
	if err != nil {
		t.Fatalf("KubeVirt's domain interfaces: %v", err)
	}
	if len(ifaces) != 1 || ifaces[0].Target == "" {
		t.Fatalf("KubeVirt's domain interfaces %+v: want one on a tap", ifaces)
	}
	di := ifaces[0]
	t.Logf("KubeVirt's domain interface: pod interface %s, tap %s, MAC %s, MTU %d", di.PodInterface, di.Target, di.MAC, di.MTU)
	img, err := guest.Build(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	var logf func(string)
	if testing.Verbose() {
		logf = func(s string) { t.Log("guest: " + s) }
	}
	g, err := guest.Start(ctx, img, guest.Options{NetnsPath: path, Tap: di.Target, MAC: di.MAC, Script: script, Timeout: 10 * time.Minute, Log: logf})
	if err != nil {
		t.Fatal(err)
	}
	return &vmGuest{netns: path, tap: di.Target, mac: di.MAC, guest: g}
}

// assertNoLeaks checks that the node holds a pod netns and a host-local
// address for each running pod-network sandbox and nothing more.
func assertNoLeaks(t *testing.T, n *node.Node) {
	t.Helper()
	ready, err := n.Crictl("pods", "-q", "--state", "ready")
	if err != nil {
		t.Fatal(err)
	}
	sandboxes := 0
	for _, id := range strings.Fields(ready) {
		out, err := n.Crictl("inspectp", "-o", "go-template", "--template", "{{.status.linux.namespaces.options.network}}", id)
		if err != nil {
			t.Fatal(err)
		}
		if strings.TrimSpace(out) == "POD" {
			sandboxes++
		}
	}
	netns, _ := os.ReadDir(n.NetnsDir)
	ips, _ := filepath.Glob(filepath.Join(n.Dir, "flannel", "ipam", "*", "10.244.*"))
	if len(netns) != sandboxes || len(ips) != sandboxes {
		t.Errorf("%d running pod-network sandboxes, but %d netns in %s and %d host-local addresses %v", sandboxes, len(netns), n.NetnsDir, len(ips), ips)
	}
}

// createVMPod stores a VMI whose pod network interface is bound to vmnic
// and creates the virt-launcher pod KubeVirt's controller makes for it.
func createVMPod(ctx context.Context, t testing.TB, n *node.Node, name string) (*kubevirtv1.VirtualMachineInstance, *corev1.Pod) {
	t.Helper()
	created, launcher, err := launcherFor(ctx, n, vmnicVMI(name))
	if err != nil {
		t.Fatal(err)
	}
	pod, err := n.Kube.CoreV1().Pods("default").Create(ctx, launcher, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return created, pod
}

// launcherFor stores vmi and returns it as stored, with the virt-launcher
// pod KubeVirt's controller makes for it (with nads, the Multus networks it
// names), not created yet.
func launcherFor(ctx context.Context, n *node.Node, vmi *kubevirtv1.VirtualMachineInstance, nads ...kvoracle.NAD) (*kubevirtv1.VirtualMachineInstance, *corev1.Pod, error) {
	created, err := n.CreateVMI(ctx, vmi)
	if err != nil {
		return nil, nil, err
	}
	pod, err := node.LauncherPod(ctx, created, kubeVirtCR(), nads...)
	if err != nil {
		return nil, nil, err
	}
	return created, pod, nil
}

// vmnicVMI is a VMI in namespace default whose pod network interface is
// bound to vmnic.
func vmnicVMI(name string) *kubevirtv1.VirtualMachineInstance {
	vmi := &kubevirtv1.VirtualMachineInstance{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default"}}
	vmi.Spec.Networks = []kubevirtv1.Network{{Name: "default", NetworkSource: kubevirtv1.NetworkSource{Pod: &kubevirtv1.PodNetwork{}}}}
	vmi.Spec.Domain.Devices.Interfaces = []kubevirtv1.Interface{{Name: "default", Binding: &kubevirtv1.PluginBinding{Name: kubevirt.DefaultBinding}}}
	return vmi
}

// startPlainPod starts a pod of the pause image and waits for it.
func startPlainPod(ctx context.Context, t *testing.T, n *node.Node, name string) *corev1.Pod {
	t.Helper()
	if _, err := n.Kube.CoreV1().Pods("default").Create(ctx, node.PlainPod(name), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	p, err := n.WaitPodReady(ctx, "default", name, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// netnsShape is what a pod's netns looks like with its addresses, MACs and
// indexes left out: links (name, kind, MTU, flags), address families and
// prefix lengths, routes (destination kind, gateway kind, device), the
// nftables tables and the sysctls a chained plugin might touch.
func netnsShape(t *testing.T, n *node.Node, pod *corev1.Pod) string {
	t.Helper()
	path, err := n.PodNetns(pod.Namespace, pod.Name)
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	links, err := node.InNetns(path, "ip", "-j", "-d", "addr", "show")
	if err != nil {
		t.Fatal(err)
	}
	var ls []struct {
		IfName   string   `json:"ifname"`
		MTU      int      `json:"mtu"`
		Flags    []string `json:"flags"`
		LinkInfo *struct {
			Kind string `json:"info_kind"`
		} `json:"linkinfo"`
		Addrs []struct {
			Family    string `json:"family"`
			PrefixLen int    `json:"prefixlen"`
			Scope     string `json:"scope"`
		} `json:"addr_info"`
	}
	if err := json.Unmarshal([]byte(links), &ls); err != nil {
		t.Fatal(err)
	}
	for _, l := range ls {
		kind := ""
		if l.LinkInfo != nil {
			kind = l.LinkInfo.Kind
		}
		fmt.Fprintf(&b, "link %s %s mtu %d %v\n", l.IfName, kind, l.MTU, l.Flags)
		for _, a := range l.Addrs {
			fmt.Fprintf(&b, "  addr %s /%d %s\n", a.Family, a.PrefixLen, a.Scope)
		}
	}
	for _, fam := range []string{"-4", "-6"} {
		routes, err := node.InNetns(path, "ip", "-j", fam, "route", "show", "table", "all")
		if err != nil {
			t.Fatal(err)
		}
		var rs []struct {
			Dst     string `json:"dst"`
			Gateway string `json:"gateway"`
			Dev     string `json:"dev"`
			Type    string `json:"type"`
			Table   string `json:"table"`
		}
		if err := json.Unmarshal([]byte(routes), &rs); err != nil {
			t.Fatal(err)
		}
		var lines []string
		for _, r := range rs {
			dst := r.Dst
			switch {
			case dst == "default", dst == "fe80::/64", dst == "::1", dst == "ff00::/8", strings.HasPrefix(dst, "127."):
			case strings.HasPrefix(dst, "fe80::"):
				dst = "<link-local>"
			default:
				dst = "<addr>"
			}
			lines = append(lines, fmt.Sprintf("route %s %s gw=%t dev %s table %s", fam, dst, r.Gateway != "", r.Dev, r.Table))
		}
		slices.Sort(lines)
		lines = slices.Compact(lines)
		b.WriteString(strings.Join(lines, "\n") + "\n")
	}
	tables, err := node.InNetns(path, "nft", "list", "tables")
	if err != nil {
		t.Fatal(err)
	}
	b.WriteString("nft " + strings.TrimSpace(tables) + "\n")
	for _, k := range []string{"net/ipv4/ip_forward", "net/ipv4/conf/eth0/proxy_arp", "net/ipv6/conf/eth0/accept_ra"} {
		v, err := node.InNetns(path, "cat", "/proc/sys/"+k)
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(&b, "sysctl %s = %s\n", k, strings.TrimSpace(v))
	}
	return b.String()
}

func waitFor(ctx context.Context, t *testing.T, timeout time.Duration, what string, f func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ok, why := f()
		if ok {
			return
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			t.Fatalf("%s: not after %v: %s", what, timeout, why)
		}
		time.Sleep(200 * time.Millisecond)
	}
}
