package node_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/vmnic/vmnic/test/cluster"
	"github.com/vmnic/vmnic/test/guest"
	"github.com/vmnic/vmnic/test/need"
	"github.com/vmnic/vmnic/test/node"
	"github.com/vmnic/vmnic/test/proc"
	"github.com/vmnic/vmnic/test/virt"
)

// TestVmnicOnCalico runs the primary scenario (testPrimary) on Calico
// v3.31: Felix's nftables dataplane, VXLAN, calico-ipam, with kube-proxy in
// nftables mode, as Calico's calico-vxlan manifest installs it.
func TestVmnicOnCalico(t *testing.T) {
	testPrimary(t, primaryCase{
		primary: node.Calico, example: "masquerade-calico",
		exampleConflist: "10-calico.conflist.json",
	})
}

// TestVmnicOnCilium runs the primary scenario (testPrimary) on Cilium
// v1.20: the agent as its chart configures it (VXLAN, IPAM from the Node's
// podCIDR, BPF programs compiled on the node), with the chart values of
// deploy/examples/masquerade-cilium and kube-proxy in nftables mode.
func TestVmnicOnCilium(t *testing.T) {
	testPrimary(t, primaryCase{
		primary: node.Cilium, example: "masquerade-cilium",
		exampleConflist: "05-cilium.conflist.json",
		ciliumValues:    "cilium-values.yaml",
	})
}

// primaryCase is a primary CNI and its example in deploy/examples.
type primaryCase struct {
	primary node.Primary
	// example is the directory in deploy/examples; exampleConflist its
	// conflist with vmnic chained.
	example, exampleConflist string
	// ciliumValues is the example's values file for Cilium's chart.
	ciliumValues string
}

// testPrimary puts vmnic on a node whose primary CNI is pc's, installed by
// helm as users install it, beside the real KubeVirt, and applies pc's
// example (deploy/examples) as shipped:
//
//   - install: vmnicd chains itself into the primary's conflist, which
//     then is the example's but for the node's name and the kubeconfig's
//     directory;
//   - ordinary pod: its netns is what it is without vmnic;
//   - the example's VM: kubevirt-binding.yaml and vm.yaml applied
//     unchanged; KubeVirt starts it, its pod IP is the primary's, vmnic
//     wires masquerade; the guest (booted from the containerDisk the
//     example names, here virt.ExampleGuestScript's) takes 10.0.2.2 by
//     DHCP, with a receive queue per vCPU when the example asks for a
//     multiqueue NIC, and reaches a pod and a Service's ClusterIP;
//   - NetworkPolicy on the VM's labels: ingress from a pod it allows
//     reaches the guest, from one it does not the guest is not reached;
//     egress the guest sends to a pod the policy does not allow is
//     dropped;
//   - uninstall: the primary's conflist is what it was, byte for byte; the
//     VM keeps its network and new pods start.
func testPrimary(t *testing.T, pc primaryCase) {
	need.NoError(t, node.CheckContainer())
	need.NoError(t, guest.Check())
	ctx := t.Context()
	root, err := cluster.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	exampleDir := filepath.Join(root, "deploy", "examples", pc.example)
	vmSpec, err := virt.ExampleVM(filepath.Join(exampleDir, "vm.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	imgs, err := virt.BuildImages(ctx)
	if err != nil {
		t.Fatal(err)
	}
	disk, err := virt.BuildDiskImage(ctx, vmSpec.Spec.Template.Spec.Volumes[0].ContainerDisk.Image, virt.ExampleGuestScript)
	if err != nil {
		t.Fatal(err)
	}
	opts := node.Options{Container: true, Primary: pc.primary, Aggregation: true}
	if pc.ciliumValues != "" {
		opts.CiliumValues = []string{filepath.Join(exampleDir, pc.ciliumValues)}
	}
	n := node.StartT(t, opts)
	t.Logf("%s node Ready after %v", pc.primary, n.Timings["ready"].Round(time.Millisecond))
	if err := n.ImportImage(disk.Archive); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := virt.Install(ctx, imgs, virt.DefaultCR(), 10*time.Minute, n); err != nil {
		t.Fatal(err)
	}
	t.Logf("KubeVirt Available %v after the install began", time.Since(start).Round(time.Millisecond))
	img, err := node.BuildVmnicImage(ctx, t.TempDir(), "v1")
	if err != nil {
		t.Fatal(err)
	}
	conflist := n.ConflistPath()
	primary, err := os.ReadFile(conflist)
	if err != nil {
		t.Fatal(err)
	}
	_, podCIDR, err := net.ParseCIDR(node.ClusterCIDR)
	if err != nil {
		t.Fatal(err)
	}
	// Two pods the policies tell apart, and a Service in front of the
	// first; "allowed" serves HTTP on 8080 in its netns.
	allowed := startLabelledPod(ctx, t, n, "allowed", map[string]string{"role": "allowed"})
	denied := startLabelledPod(ctx, t, n, "denied", map[string]string{"role": "denied"})
	if !podCIDR.Contains(net.ParseIP(allowed.Status.PodIP)) {
		t.Fatalf("pod IP %s: not from the primary's range %s", allowed.Status.PodIP, node.ClusterCIDR)
	}
	allowedNetns, err := n.PodNetns(allowed.Namespace, allowed.Name)
	if err != nil {
		t.Fatal(err)
	}
	serveHTTP(t, n, allowedNetns, 8080, "pod allowed")
	svc, err := n.Kube.CoreV1().Services("default").Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web"},
		Spec: corev1.ServiceSpec{
			Selector: map[string]string{"role": "allowed"},
			Ports:    []corev1.ServicePort{{Port: 80, TargetPort: intstr.FromInt32(8080), Protocol: corev1.ProtocolTCP}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}

	t.Run("install", func(t *testing.T) {
		if err := n.InstallVmnic(ctx, img); err != nil {
			t.Fatal(err)
		}
		if _, err := n.WaitDaemonSet(ctx, 2*time.Minute); err != nil {
			t.Fatal(err)
		}
		got, err := os.ReadFile(conflist)
		if err != nil {
			t.Fatal(err)
		}
		want, err := os.ReadFile(filepath.Join(exampleDir, pc.exampleConflist))
		if err != nil {
			t.Fatal(err)
		}
		if diff := conflistDiff(t, got, want); diff != "" {
			t.Errorf("%s's conflist with vmnic chained differs from the example: %s\ngot:\n%s", pc.primary, diff, got)
		}
	})
	if t.Failed() {
		return
	}

	t.Run("ordinary pod", func(t *testing.T) {
		plain := startPlainPod(ctx, t, n, "plain-after")
		// The kernel adds the local route of eth0's link-local address
		// once its duplicate address detection ends, shortly after the
		// pod starts.
		without := netnsShape(t, n, denied)
		waitFor(ctx, t, 10*time.Second, "a plain pod's netns as without vmnic", func() (bool, string) {
			with := netnsShape(t, n, plain)
			return with == without, fmt.Sprintf("it differs from one without vmnic:\nwithout:\n%s\nwith:\n%s", without, with)
		})
	})

	// The guest, asked from the allowed pod (which every policy here lets
	// in): its page, and what it reaches.
	var vmIP string
	ask := func(t *testing.T, path string) string {
		return getFrom(t, n, allowed, net.JoinHostPort(vmIP, "80")+path)
	}
	probes := func(t *testing.T, timeout time.Duration, wantAllowed, wantDenied, wantService string) {
		t.Helper()
		waitFor(ctx, t, timeout, fmt.Sprintf("the guest's probes: allowed %s, denied %s, Service %q", wantAllowed, wantDenied, wantService), func() (bool, string) {
			a, d := ask(t, "/cgi-bin/ping?"+allowed.Status.PodIP), ask(t, "/cgi-bin/ping?"+denied.Status.PodIP)
			s := ask(t, "/cgi-bin/get?"+net.JoinHostPort(svc.Spec.ClusterIP, "80"))
			return a == wantAllowed && d == wantDenied && (wantService == "" || s == wantService),
				fmt.Sprintf("allowed %q, denied %q, Service %q", a, d, s)
		})
	}
	t.Run("VM", func(t *testing.T) {
		for _, f := range []string{"kubevirt-binding.yaml", "vm.yaml"} {
			data, err := os.ReadFile(filepath.Join(exampleDir, f))
			if err != nil {
				t.Fatal(err)
			}
			if err := n.Cluster.Apply(ctx, data); err != nil {
				t.Fatalf("apply %s: %v", f, err)
			}
		}
		start := time.Now()
		vmi, err := virt.WaitVMIRunning(ctx, n, "default", vmSpec.Name, 5*time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("VMI %s Running %v after the VM was applied", vmi.Name, time.Since(start).Round(time.Millisecond))
		launcher, err := virt.LauncherPod(ctx, n, vmi)
		if err != nil {
			t.Fatal(err)
		}
		vmIP = launcher.Status.PodIP
		if !podCIDR.Contains(net.ParseIP(vmIP)) {
			t.Fatalf("VM pod IP %s: not from the primary's range %s", vmIP, node.ClusterCIDR)
		}
		m, err := virt.WaitConsole(ctx, n, vmi, regexp.MustCompile(`^ADDR4 eth0 ?(\S*)`), 3*time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		if m[1] != "10.0.2.2/24" {
			t.Fatalf("guest address %q, want 10.0.2.2/24 from vmnic's DHCP", m[1])
		}
		queues := 1
		if d := vmSpec.Spec.Template.Spec.Domain; d.Devices.NetworkInterfaceMultiQueue != nil && *d.Devices.NetworkInterfaceMultiQueue {
			queues = int(d.CPU.Cores)
		}
		if m, err = virt.WaitConsole(ctx, n, vmi, regexp.MustCompile(`^QUEUES eth0 (\d+)`), time.Minute); err != nil {
			t.Fatal(err)
		}
		if m[1] != fmt.Sprint(queues) {
			t.Errorf("the guest's NIC has %s receive queues, want %d", m[1], queues)
		}
		if _, err = virt.WaitConsole(ctx, n, vmi, regexp.MustCompile(`^SERVING`), time.Minute); err != nil {
			t.Fatal(err)
		}
		probes(t, time.Minute, "OK", "OK", "pod allowed")
	})
	if t.Failed() || vmIP == "" {
		return
	}

	t.Run("NetworkPolicy", func(t *testing.T) {
		sel := metav1.LabelSelector{MatchLabels: vmSpec.Spec.Template.ObjectMeta.Labels}
		fromAllowed := []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"role": "allowed"}}}}
		// Before any policy both pods reach the guest.
		for _, p := range []*corev1.Pod{allowed, denied} {
			if got := getFrom(t, n, p, net.JoinHostPort(vmIP, "80")); got != "guest 80" {
				t.Fatalf("without a policy, pod %s gets %q from the guest", p.Name, got)
			}
		}
		ingress := &networkingv1.NetworkPolicy{
			ObjectMeta: metav1.ObjectMeta{Name: "vm-ingress"},
			Spec: networkingv1.NetworkPolicySpec{
				PodSelector: sel,
				PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress},
				Ingress:     []networkingv1.NetworkPolicyIngressRule{{From: fromAllowed}},
			},
		}
		if _, err := n.Kube.NetworkingV1().NetworkPolicies("default").Create(ctx, ingress, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		waitFor(ctx, t, 30*time.Second, "the ingress policy enforced", func() (bool, string) {
			got := getFrom(t, n, denied, net.JoinHostPort(vmIP, "80"))
			return got == "", fmt.Sprintf("pod denied still gets %q from the guest", got)
		})
		if got := ask(t, ""); got != "guest 80" {
			t.Errorf("under the ingress policy, pod allowed gets %q from the guest; want \"guest 80\"", got)
		}
		egress := &networkingv1.NetworkPolicy{
			ObjectMeta: metav1.ObjectMeta{Name: "vm-egress"},
			Spec: networkingv1.NetworkPolicySpec{
				PodSelector: sel,
				PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeEgress},
				Egress:      []networkingv1.NetworkPolicyEgressRule{{To: fromAllowed}},
			},
		}
		if _, err := n.Kube.NetworkingV1().NetworkPolicies("default").Create(ctx, egress, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		// Whether the Service, whose backend is the allowed pod, passes
		// depends on where the primary applies policy, before or after
		// kube-proxy's DNAT: not checked.
		probes(t, 30*time.Second, "OK", "FAILED", "")
		if err := n.Kube.NetworkingV1().NetworkPolicies("default").Delete(ctx, egress.Name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		probes(t, 30*time.Second, "OK", "OK", "pod allowed")
	})

	t.Run("uninstall", func(t *testing.T) {
		if _, err := n.Helm(ctx, "uninstall", node.Release, "--namespace", node.Namespace, "--wait", "--timeout", "2m"); err != nil {
			t.Fatal(err)
		}
		waitFor(ctx, t, time.Minute, "the primary's conflist as before the install", func() (bool, string) {
			now, err := os.ReadFile(conflist)
			if err != nil {
				return false, err.Error()
			}
			return string(now) == string(primary), string(now)
		})
		// The VM keeps its network: the guest still reaches the pods and
		// the Service, and the allowed pod still reaches the guest.
		probes(t, 30*time.Second, "OK", "OK", "pod allowed")
		startPlainPod(ctx, t, n, "plain-uninstalled")
	})
}

// conflistDiff compares the chained conflist on the node with the
// example's, but for what Calico's installer fills in per node (the node's
// name, the kubeconfig's directory), and says how they differ, or "".
func conflistDiff(t *testing.T, got, want []byte) string {
	t.Helper()
	var g, w map[string]any
	if err := json.Unmarshal(got, &g); err != nil {
		return "node's conflist: " + err.Error()
	}
	if err := json.Unmarshal(want, &w); err != nil {
		return "example: " + err.Error()
	}
	gp, _ := g["plugins"].([]any)
	wp, _ := w["plugins"].([]any)
	if len(gp) > 0 && len(wp) > 0 {
		gc, _ := gp[0].(map[string]any)
		wc, _ := wp[0].(map[string]any)
		if gc != nil && wc != nil {
			if _, ok := gc["nodename"]; ok {
				gc["nodename"] = wc["nodename"]
			}
			if gk, ok := gc["kubernetes"].(map[string]any); ok {
				if wk, ok := wc["kubernetes"].(map[string]any); ok {
					gk["kubeconfig"] = wk["kubeconfig"]
				}
			}
		}
	}
	if reflect.DeepEqual(g, w) {
		return ""
	}
	gb, _ := json.Marshal(g)
	wb, _ := json.Marshal(w)
	return fmt.Sprintf("\n node:    %s\n example: %s", gb, wb)
}

// startLabelledPod starts a pod of the pause image with labels and waits
// for it.
func startLabelledPod(ctx context.Context, t *testing.T, n *node.Node, name string, labels map[string]string) *corev1.Pod {
	t.Helper()
	p := node.PlainPod(name)
	p.Labels = labels
	if _, err := n.Kube.CoreV1().Pods("default").Create(ctx, p, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	ready, err := n.WaitPodReady(ctx, "default", name, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	return ready
}

// serveHTTP serves body on port in the network namespace netns (a pod's)
// with busybox httpd until the test ends.
func serveHTTP(t *testing.T, n *node.Node, netns string, port int, body string) {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "index.html"), []byte(body+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("nsenter", "--net="+netns, "--", "busybox", "httpd", "-f", "-p", fmt.Sprint(port), "-h", dir)
	p, err := proc.StartCmd(n.Launcher(), cmd)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Kill)
}

// getFrom fetches http://addr (host:port, or host:port/path) from the
// pod's network namespace and returns the page, or "" when nothing
// answered within 5 s.
func getFrom(t *testing.T, n *node.Node, from *corev1.Pod, addr string) string {
	t.Helper()
	netns, err := n.PodNetns(from.Namespace, from.Name)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	page, err := proc.HTTPGet(ctx, proc.NetnsDialer(netns), addr)
	if err != nil {
		return ""
	}
	return page
}
