package integration

import (
	"context"
	"fmt"
	"net"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/vmnic/vmnic/pkg/kubevirt"
	"github.com/vmnic/vmnic/plugins/bridge"
	"github.com/vmnic/vmnic/test/cluster"
	"github.com/vmnic/vmnic/test/guest"
	"github.com/vmnic/vmnic/test/harness"
	"github.com/vmnic/vmnic/test/need"
	"github.com/vmnic/vmnic/test/spiderpool"
)

// createBridgeVMI creates a VMI with KubeVirt's masquerade on the pod
// network and a vmnic-bound interface on the Multus network "vlan100" (the
// pod's net1), without a MAC: the guest MAC follows the IP.
func createBridgeVMI(ctx context.Context, t *testing.T, c *cluster.Cluster, name string) *kubevirtv1.VirtualMachineInstance {
	t.Helper()
	kv, err := kubevirt.KubeVirtClient(c.Config)
	if err != nil {
		t.Fatal(err)
	}
	vmi := &kubevirtv1.VirtualMachineInstance{
		TypeMeta:   metav1.TypeMeta{APIVersion: "kubevirt.io/v1", Kind: "VirtualMachineInstance"},
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default"},
	}
	vmi.Spec.Networks = []kubevirtv1.Network{
		{Name: "default", NetworkSource: kubevirtv1.NetworkSource{Pod: &kubevirtv1.PodNetwork{}}},
		{Name: "vlan100", NetworkSource: kubevirtv1.NetworkSource{Multus: &kubevirtv1.MultusNetwork{NetworkName: "vlan100"}}},
	}
	vmi.Spec.Domain.Devices.Interfaces = []kubevirtv1.Interface{
		{Name: "default", InterfaceBindingMethod: kubevirtv1.InterfaceBindingMethod{Masquerade: &kubevirtv1.InterfaceMasquerade{}}},
		{Name: "vlan100", Binding: &kubevirtv1.PluginBinding{Name: kubevirt.DefaultBinding}},
	}
	out := &kubevirtv1.VirtualMachineInstance{}
	if err := kv.Post().Namespace("default").Resource("virtualmachineinstances").Body(vmi).Do(ctx).Into(out); err != nil {
		t.Fatalf("create VMI %s: %v", name, err)
	}
	return out
}

// launcher creates the virt-launcher pod object of vmi and the sandbox
// standing for it.
func launcher(ctx context.Context, t *testing.T, kube kubernetes.Interface, vmi *kubevirtv1.VirtualMachineInstance, name string) *harness.Pod {
	t.Helper()
	yes := true
	obj, err := kube.CoreV1().Pods("default").Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Name: name, Namespace: "default",
			Labels: map[string]string{"kubevirt.io": "virt-launcher", "kubevirt.io/created-by": string(vmi.UID)},
			Annotations: map[string]string{
				"kubevirt.io/domain": vmi.Name,
				// What virt-controller writes for the VMI's Multus network.
				"k8s.v1.cni.cncf.io/networks": `[{"interface":"net1","name":"vlan100","namespace":"default"}]`,
			},
			OwnerReferences: []metav1.OwnerReference{{
				APIVersion: "kubevirt.io/v1", Kind: "VirtualMachineInstance", Name: vmi.Name, UID: vmi.UID, Controller: &yes,
			}},
		},
		Spec: corev1.PodSpec{NodeName: testNode, Containers: []corev1.Container{{Name: "compute", Image: "virt-launcher"}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create pod %s: %v", name, err)
	}
	scheduleVMI(ctx, t, kube, vmi.Name, testNode)
	p := newPod(t, name)
	p.IfName, p.UID = "net1", string(obj.UID)
	return p
}

// applyPool creates an IPv4 SpiderIPPool (ipVersion set: without
// spiderpool-controller's webhook nothing defaults it); gateway may be "".
func applyPool(ctx context.Context, t *testing.T, c *cluster.Cluster, name, subnet, ips, gateway string) {
	t.Helper()
	gw := ""
	if gateway != "" {
		gw = "\n  gateway: " + gateway
	}
	version := 4
	if strings.Contains(subnet, ":") {
		version = 6
	}
	manifest := fmt.Sprintf(`
apiVersion: spiderpool.spidernet.io/v2beta1
kind: SpiderIPPool
metadata:
  name: %s
spec:
  ipVersion: %d
  subnet: %s
  ips: [%q]%s
`, name, version, subnet, ips, gw)
	if err := c.Apply(ctx, []byte(manifest)); err != nil {
		t.Fatal(err)
	}
}

// addRetry runs ADD as kubelet would, again while Spiderpool's agent has
// not seen a just-created SpiderEndpoint or pod in its cache yet.
func addRetry(ctx context.Context, t *testing.T, n *harness.Node, l *libcni.NetworkConfigList, p *harness.Pod) *current.Result {
	t.Helper()
	return addRetryFor(ctx, t, n, l, p, 10*time.Second)
}

// addRetryFor is addRetry for up to d: after an API server restart the
// agent's informers come back only after client-go's backoff (up to a
// minute).
func addRetryFor(ctx context.Context, t *testing.T, n *harness.Node, l *libcni.NetworkConfigList, p *harness.Pod, d time.Duration) *current.Result {
	t.Helper()
	var err error
	for range int(d / (500 * time.Millisecond)) {
		var res types.Result
		res, err = n.Add(ctx, l, p)
		if err == nil {
			r, cerr := current.NewResultFromResult(res)
			if cerr != nil {
				t.Fatal(cerr)
			}
			return r
		}
		if !strings.Contains(err.Error(), "already exists") && !strings.Contains(err.Error(), "not found") {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	t.Fatalf("ADD %s: %v", p.Name, err)
	return nil
}

// TestBridgeSpiderpoolVMs: with the real API server and Spiderpool agent,
// two VMs on OVS VLAN 100 take their fixed IPs from a SpiderIPPool, by DHCP
// from vmnic inside real guests, and ping each other; a new pod for the
// same VMI gets the same IP and the same guest MAC.
func TestBridgeSpiderpoolVMs(t *testing.T) {
	need.NoError(t, guest.Check())
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	t.Cleanup(cancel)
	img, err := guest.Build(t.TempDir())
	if err != nil {
		t.Fatalf("guest image: %v", err)
	}
	c := cluster.StartT(t)
	if err := c.InstallKubeVirtCRDs(ctx); err != nil {
		t.Fatal(err)
	}
	agent := spiderpool.StartAgentT(t, c, spiderpool.AgentOptions{NodeName: testNode})
	pluginDir, err := spiderpool.PluginPath()
	if err != nil {
		t.Fatal(err)
	}
	applyPool(ctx, t, c, "vlan100-v4", "10.100.0.0/24", "10.100.0.20-10.100.0.40", "10.100.0.1")
	kube, err := kubernetes.NewForConfig(c.Config)
	if err != nil {
		t.Fatal(err)
	}
	vmA, vmB := createBridgeVMI(ctx, t, c, "vm-a"), createBridgeVMI(ctx, t, c, "vm-b")
	podA, podB := launcher(ctx, t, kube, vmA, "virt-launcher-vm-a-1"), launcher(ctx, t, kube, vmB, "virt-launcher-vm-b-1")

	n := newOVSNodeCluster(t, c, testNode)
	n.cniVersion = "1.0.0" // Spiderpool's IPAM plugin speaks up to 1.0.0
	n.CNI = libcni.NewCNIConfigWithCacheDir([]string{n.BinDir, pluginDir}, filepath.Join(n.Dir, "cni-cache"), nil)
	l := n.bridgeList(t, "vlan100", map[string]any{"vlan": 100}, agent.IPAMConfig("vlan100-v4"))

	rA, rB := addRetry(ctx, t, n.Node, l, podA), addRetry(ctx, t, n.Node, l, podB)
	ipA, ipB := ip4(rA), ip4(rB)
	macA, macB := rA.Interfaces[1].Mac, rB.Interfaces[1].Mac
	t.Logf("vm-a %s %s, vm-b %s %s", ipA, macA, ipB, macB)
	for _, c := range []struct{ ip, mac string }{{ipA, macA}, {ipB, macB}} {
		if !strings.HasPrefix(c.ip, "10.100.0.") || c.mac != bridge.GuestMACFor(net.ParseIP(c.ip)).String() {
			t.Errorf("VM NIC %s %s: want a pool address and the MAC of the rule", c.ip, c.mac)
		}
	}

	var logf func(string)
	if testing.Verbose() {
		logf = func(s string) { t.Log("guest: " + s) }
	}
	// Each guest boots as KubeVirt's tap binding boots it for the VMI (no
	// macAddress): its domain MAC must be the rule's, which DHCP answers.
	boot := func(p *harness.Pod, vmi *kubevirtv1.VirtualMachineInstance, mac, script string) *guest.Guest {
		di := kubevirtNICs(ctx, t, p, vmi)
		if len(di) != 1 || di[0].MAC != mac || di[0].Target != "tap1" {
			t.Fatalf("KubeVirt's domain interfaces of %s: %+v, want tap1 with MAC %s", p.Name, di, mac)
		}
		g, err := guest.Start(ctx, img, guest.Options{NetnsPath: p.NS.Path(), Tap: di[0].Target, MAC: di[0].MAC, Script: script, Timeout: 3 * time.Minute, Log: logf})
		if err != nil {
			t.Fatalf("boot guest: %v", err)
		}
		t.Cleanup(g.Kill)
		return g
	}
	const dhcp = `ip link set eth0 up
udhcpc -i eth0 -q -f -n -t 15 -T 2 || echo DHCP4-FAILED
echo "ADDR4 $(ip -4 -o addr show dev eth0 | awk '{print $4}' | head -1)"
`
	gB := boot(podB, vmB, macB, dhcp+"echo READY\nsleep 150\n")
	gA := boot(podA, vmA, macA, dhcp+fmt.Sprintf(`i=0; until ping -c 1 -W 1 %s >/dev/null 2>&1 || [ $i -ge 30 ]; do i=$((i+1)); done
ping -c 3 -W 2 %s >/dev/null 2>&1 && echo PING-OK || echo PING-FAILED
`, ipB, ipB))
	for _, c := range []struct {
		g    *guest.Guest
		want string
	}{{gA, ipA}, {gB, ipB}} {
		m, err := c.g.WaitFor(ctx, regexp.MustCompile(`^ADDR4 (.*)$`))
		if err != nil || m[1] != c.want+"/24" {
			t.Fatalf("guest address %v (%v), want %s/24\n%s", m, err, c.want, c.g.Output())
		}
	}
	if m, err := gA.WaitFor(ctx, regexp.MustCompile(`^PING-(OK|FAILED)$`)); err != nil || m[1] != "OK" {
		t.Errorf("vm-a cannot ping vm-b (%s): %v %v", ipB, m, err)
	}
	gA.Kill()

	// vm-a's pod goes (terminating, then DEL) and a new pod of the same
	// VMI comes: Spiderpool gives it the VMI's address, vmnic the same MAC.
	if err := kube.CoreV1().Pods("default").Delete(ctx, podA.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := n.Del(ctx, l, podA); err != nil {
		t.Fatalf("DEL vm-a: %v", err)
	}
	podA2 := launcher(ctx, t, kube, vmA, "virt-launcher-vm-a-2")
	rA2 := addRetry(ctx, t, n.Node, l, podA2)
	if ip4(rA2) != ipA || rA2.Interfaces[1].Mac != macA {
		t.Errorf("new pod of vm-a: %s %s, want the same %s %s", ip4(rA2), rA2.Interfaces[1].Mac, ipA, macA)
	}
	for _, p := range []*harness.Pod{podA2, podB} {
		if err := n.Del(ctx, l, p); err != nil {
			t.Fatalf("DEL %s: %v", p.Name, err)
		}
	}
}
