package node_test

import (
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/vmnic/vmnic/test/need"
	"github.com/vmnic/vmnic/test/node"
)

// TestTwoNodeContainers starts the two-node cluster real KubeVirt runs on:
// two node containers on one LAN, the second joining the first's control
// plane. Each is its own machine to what runs on it: PID 1 of its PID
// namespace is its init, its kubelet's root directory is at
// /var/lib/kubelet, with a device-plugin socket of its own, it has no
// /dev/kvm, and the machine's /var/lib/kubelet is not touched. A pod on each
// node reaches the other across Flannel's VXLAN.
func TestTwoNodeContainers(t *testing.T) {
	need.NoError(t, node.CheckContainer())
	ctx := t.Context()
	a := node.StartT(t, node.Options{Container: true})
	b := node.StartT(t, node.Options{Container: true, Join: a, Name: "node-2", IP: "192.168.200.11"})
	t.Logf("node-1 Ready after %v, node-2 after %v", a.Timings["ready"].Round(time.Millisecond), b.Timings["ready"].Round(time.Millisecond))

	sockets := map[string]string{}
	for _, n := range []*node.Node{a, b} {
		exe, err := n.InContainer("readlink", "/proc/1/exe")
		if err != nil {
			t.Fatal(err)
		}
		if !strings.HasSuffix(strings.TrimSpace(exe), "/pause") {
			t.Errorf("%s: PID 1 runs %q, not the node's init", n.Name, exe)
		}
		// The node's kubelet is a process of its PID namespace.
		if out, err := n.InContainer("sh", "-c", "grep -l kubelet /proc/[0-9]*/comm"); err != nil || out == "" {
			t.Errorf("%s: no kubelet among the node's processes: %v", n.Name, err)
		}
		ino, err := n.InContainer("stat", "-c", "%d:%i", "/var/lib/kubelet/device-plugins/kubelet.sock")
		if err != nil {
			t.Fatalf("%s: kubelet's device-plugin socket: %v", n.Name, err)
		}
		sockets[n.Name] = strings.TrimSpace(ino)
		if _, err := n.InContainer("test", "-e", "/dev/kvm"); err == nil {
			t.Errorf("%s: /dev/kvm is in the node's /dev", n.Name)
		}
	}
	if sockets[a.Name] == sockets[b.Name] {
		t.Errorf("both nodes share one device-plugin socket (%s)", sockets[a.Name])
	}

	ips := map[string]string{}
	for _, n := range []*node.Node{a, b} {
		pod := node.PlainPod("pod-on-" + n.Name)
		pod.Spec.NodeName = n.Name
		if _, err := a.Kube.CoreV1().Pods("default").Create(ctx, pod, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		p, err := n.WaitPodReady(ctx, "default", pod.Name, time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		ips[n.Name] = p.Status.PodIP
	}
	t.Logf("pod IPs: %v", ips)
	for _, pair := range [][2]*node.Node{{a, b}, {b, a}} {
		from, to := pair[0], pair[1]
		netns, err := from.PodNetns("default", "pod-on-"+from.Name)
		if err != nil {
			t.Fatal(err)
		}
		if out, err := node.InNetns(netns, "ping", "-c", "1", "-W", "5", ips[to.Name]); err != nil {
			t.Errorf("pod on %s does not reach the pod on %s (%s): %v %s", from.Name, to.Name, ips[to.Name], err, out)
		}
	}
}
