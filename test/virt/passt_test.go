package virt_test

import (
	"context"
	"net"
	"regexp"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/vmnic/vmnic/test/node"
	"github.com/vmnic/vmnic/test/proc"
	"github.com/vmnic/vmnic/test/virt"
)

// The passt network: a macvlan underlay on a cable between the nodes
// (passtUplink, each node's macvlan parent), Spiderpool's pool on it. Its
// subnet and names are none of deploy/examples' (passt-macvlan, which the
// Examples subtest applies beside it on a cable of its own, eth1).
const (
	passtNAD     = "passt-underlay"
	passtUplink  = "up-macvlan"
	passtSubnet  = "172.16.30.0/24"
	passtIPs     = "172.16.30.100-172.16.30.199"
	passtGateway = "172.16.30.1"
	passtPrefix  = "172.16.30."
)

// defaultNetwork is Multus' annotation that replaces a pod's cluster
// network; KubeVirt copies a VMI's annotations to its launcher pod.
const defaultNetwork = "v1.multus-cni.io/default-network"

// passt: a VMI on KubeVirt's core passt binding (passtBinding, the
// PasstBinding gate) whose pod network is the macvlan underlay with vmnic
// chained in passt mode, on node-1. Its guest takes the pod's underlay
// address by DHCP from passt and reaches a pod on the underlay on node-2,
// which reaches the guest on the listed port 8080 and not on 8081.
func (e *env) passt(t testing.TB) {
	ctx := t.Context()
	p := e.underlayPod(t, "passt-peer", e.b)
	iface := kubevirtv1.Interface{
		InterfaceBindingMethod: kubevirtv1.InterfaceBindingMethod{PasstBinding: &kubevirtv1.InterfacePasstBinding{}},
		// 9000: the guest's echo service, for the migration's TCP
		// connection.
		Ports: []kubevirtv1.Port{{Port: 8080, Protocol: "TCP"}, {Port: 9000, Protocol: "TCP"}},
	}
	vmi := virt.VMI("passt", e.guest, iface, "vmnic.peers="+p.Status.PodIP+" vmnic.pulse="+p.Status.PodIP)
	vmi.Annotations = map[string]string{defaultNetwork: "default/" + passtNAD}
	virt.PreferNode(vmi, e.a.Name)
	running := e.run(t, vmi, e.a)
	launcher, err := virt.LauncherPod(ctx, e.a, running)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(launcher.Status.PodIP, passtPrefix) {
		t.Fatalf("the launcher pod's IP %s is not on the underlay %s", launcher.Status.PodIP, passtSubnet)
	}
	m, err := virt.WaitConsole(ctx, e.a, running, regexp.MustCompile(`^ADDR4 eth0 ?(\S*)`), 3*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if want := launcher.Status.PodIP + "/24"; m[1] != want {
		t.Errorf("guest address %q, want the pod's %s from passt's DHCP", m[1], want)
	}
	if m, err = virt.WaitConsole(ctx, e.a, running, regexp.MustCompile(`^PEER-(OK|FAILED)`), 2*time.Minute); err != nil {
		t.Fatal(err)
	}
	if m[1] != "OK" {
		t.Errorf("the guest does not reach the pod on the underlay on %s (%s)", e.b.Name, p.Status.PodIP)
	}
	netns, err := e.b.PodNetns("default", p.Name)
	if err != nil {
		t.Fatal(err)
	}
	checkPorts(t, netns, launcher.Status.PodIP)
	if !t.Failed() {
		addr := net.JoinHostPort(launcher.Status.PodIP, "8080")
		e.migrants = append(e.migrants, &migrant{
			mode: "Passt", vmi: running, dial: proc.NetnsDialer(netns), keepsPodIP: true, pulseFrom: netns,
			echo:    net.JoinHostPort(launcher.Status.PodIP, "9000"),
			targets: func(context.Context) []string { return []string{addr} },
		})
	}
}

// underlayPod starts a pod whose pod network is the passt underlay, on
// node on (any node when nil), and returns it once it is ready with an
// address of the underlay.
func (e *env) underlayPod(t testing.TB, name string, on *node.Node) *corev1.Pod {
	t.Helper()
	pod := node.PlainPod(name)
	pod.Annotations = map[string]string{defaultNetwork: "default/" + passtNAD}
	if on != nil {
		pod.Spec.NodeName = on.Name
	}
	if _, err := e.a.Kube.CoreV1().Pods("default").Create(t.Context(), pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	p, err := e.a.WaitPodReady(t.Context(), "default", name, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(p.Status.PodIP, passtPrefix) {
		t.Fatalf("pod %s's IP %s is not on the underlay %s", name, p.Status.PodIP, passtSubnet)
	}
	return p
}
