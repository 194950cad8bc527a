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
	"strings"
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
// helm as users install it:
//
//   - install: vmnicd chains itself into the primary's conflist, which
//     then is the example's but for the node's name and the kubeconfig's
//     directory;
//   - ordinary pod: its netns is what it is without vmnic;
//   - VM pod: masquerade wiring on the primary's pod IP; the guest takes
//     10.0.2.2 by DHCP and reaches a pod and a Service's ClusterIP;
//   - NetworkPolicy: the primary's policy for the VM pod holds for the
//     guest: ingress from a pod it allows reaches the guest, from one it
//     does not the guest is not reached; egress the guest sends to a pod
//     the policy does not allow is dropped;
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
	opts := node.Options{Container: true, Primary: pc.primary}
	if pc.ciliumValues != "" {
		opts.CiliumValues = []string{filepath.Join(exampleDir, pc.ciliumValues)}
	}
	n := node.StartT(t, opts)
	t.Logf("%s node Ready after %v", pc.primary, n.Timings["ready"].Round(time.Millisecond))
	if err := n.Cluster.InstallKubeVirtCRDs(ctx); err != nil {
		t.Fatal(err)
	}
	if err := n.LabelSchedulable(ctx); err != nil {
		t.Fatal(err)
	}
	img, err := node.BuildVmnicImage(ctx, t.TempDir(), "v1")
	if err != nil {
		t.Fatal(err)
	}
	conflist := n.ConflistPath()
	primary, err := os.ReadFile(conflist)
	if err != nil {
		t.Fatal(err)
	}
	// Two pods the policies tell apart, and a Service in front of the
	// first; "allowed" serves HTTP on 8080 in its netns.
	allowed := startLabelledPod(ctx, t, n, "allowed", map[string]string{"role": "allowed"})
	denied := startLabelledPod(ctx, t, n, "denied", map[string]string{"role": "denied"})
	if !strings.HasPrefix(allowed.Status.PodIP, "10.244.") {
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

	var vm *vmGuest
	var vmPod *corev1.Pod
	whole := t
	t.Run("VM pod", func(t *testing.T) {
		created, pod := createVMPod(ctx, t, n, "vm1")
		if vmPod, err = n.WaitPodReady(ctx, pod.Namespace, pod.Name, 2*time.Minute); err != nil {
			t.Fatal(err)
		}
		script := fmt.Sprintf(`
udhcpc -i eth0 -q -f -n -t 10 -T 2 -O hostname || echo DHCP4-FAILED
echo "ADDR4 $(ip -4 -o addr show dev eth0 | awk '{print $4}' | head -1)"
mkdir -p /tmp/www && echo "guest 8080" > /tmp/www/index.html
busybox httpd -p 8080 -h /tmp/www
r=0
while true; do
	r=$((r+1))
	a=FAILED; ping -c 1 -W 1 %[1]s >/dev/null 2>&1 && a=OK
	d=FAILED; ping -c 1 -W 1 %[2]s >/dev/null 2>&1 && d=OK
	s=FAILED; printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 2 %[3]s 80 2>/dev/null | grep -q "^pod allowed" && s=OK
	echo "ROUND $r allowed=$a denied=$d service=$s"
	sleep 0.5
done
`, allowed.Status.PodIP, denied.Status.PodIP, svc.Spec.ClusterIP)
		vm = bootVM(ctx, t, n, created, vmPod, script)
		// It runs on through the policies and the uninstall.
		whole.Cleanup(vm.guest.Kill)
		if _, err := vm.guest.WaitFor(ctx, regexp.MustCompile(`^ADDR4 10\.0\.2\.2/24`)); err != nil {
			t.Fatalf("the guest did not take 10.0.2.2 by DHCP: %v", err)
		}
		waitRound(ctx, t, vm.guest, "OK", "OK", "OK", time.Minute)
	})
	if t.Failed() || vm == nil {
		return
	}

	t.Run("NetworkPolicy", func(t *testing.T) {
		sel := metav1.LabelSelector{MatchLabels: map[string]string{"kubevirt.io/created-by": vmPod.Labels["kubevirt.io/created-by"]}}
		fromAllowed := []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"role": "allowed"}}}}
		// Before any policy both pods reach the guest.
		for _, p := range []*corev1.Pod{allowed, denied} {
			if got := getFrom(t, n, p, vmPod.Status.PodIP); got != "guest 8080" {
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
			got := getFrom(t, n, denied, vmPod.Status.PodIP)
			return got == "", fmt.Sprintf("pod denied still gets %q from the guest", got)
		})
		if got := getFrom(t, n, allowed, vmPod.Status.PodIP); got != "guest 8080" {
			t.Errorf("under the ingress policy, pod allowed gets %q from the guest; want \"guest 8080\"", got)
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
		waitRound(ctx, t, vm.guest, "OK", "FAILED", `\w+`, 30*time.Second)
		if err := n.Kube.NetworkingV1().NetworkPolicies("default").Delete(ctx, egress.Name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		waitRound(ctx, t, vm.guest, "OK", "OK", "OK", 30*time.Second)
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
		waitRound(ctx, t, vm.guest, "OK", "OK", "OK", 30*time.Second)
		if got := getFrom(t, n, allowed, vmPod.Status.PodIP); got != "guest 8080" {
			t.Errorf("after the uninstall, pod allowed gets %q from the guest", got)
		}
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

// getFrom fetches http://ip:8080/ from the pod's network namespace and
// returns the page, or "" when nothing answered within 3 s.
func getFrom(t *testing.T, n *node.Node, from *corev1.Pod, ip string) string {
	t.Helper()
	netns, err := n.PodNetns(from.Namespace, from.Name)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Second)
	defer cancel()
	page, err := proc.HTTPGet(ctx, proc.NetnsDialer(netns), net.JoinHostPort(ip, "8080"))
	if err != nil {
		return ""
	}
	return page
}

// waitRound waits for a round of the guest's probes (each round it pings
// the pods allowed and denied and fetches the Service's page) with these
// outcomes (regular expressions).
func waitRound(ctx context.Context, t testing.TB, g *guest.Guest, allowed, denied, service string, timeout time.Duration) {
	t.Helper()
	want := regexp.MustCompile(fmt.Sprintf(`^ROUND \d+ allowed=%s denied=%s service=%s`, allowed, denied, service))
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if _, err := g.WaitFor(ctx, want); err != nil {
		t.Fatalf("no round of the guest's probes with allowed=%s denied=%s service=%s: %v", allowed, denied, service, err)
	}
}
