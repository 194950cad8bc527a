package integration

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/kubernetes"
	kubevirtv1 "kubevirt.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"github.com/vmnic/vmnic/pkg/ctl"
	"github.com/vmnic/vmnic/pkg/kubevirt"
	"github.com/vmnic/vmnic/pkg/netconf"
	"github.com/vmnic/vmnic/test/cluster"
	"github.com/vmnic/vmnic/test/harness"
	"github.com/vmnic/vmnic/test/need"
	"github.com/vmnic/vmnic/test/spiderpool"
)

// spiderpoolSocket is where Spiderpool's IPAM plugin asks its agent when
// the netconf names no socket, as the controller's NADs do (Spiderpool
// v1.2.2 pkg/constant DefaultIPAMUnixSocketPath).
const spiderpoolSocket = "/var/run/spidernet/spiderpool.sock"

// webhookAddr is the address the API server reaches spiderpool-controller's
// webhook at, on the loopback link: an EndpointSlice takes no 127.0.0.0/8
// address.
const webhookAddr = "10.254.254.1"

// TestPasstIpvlanExample: deploy/examples/passt-ipvlan as shipped, the
// example this project's machines cannot run (no ipvlan, no 802.1q): the
// node VM runs it. The real spiderpool-controller, as its chart deploys it,
// turns the example's SpiderMultusConfig into the NetworkAttachmentDefinition
// "ipvlan-passt" (ifacer, which makes eth1.20; ipvlan with Spiderpool's
// IPAM; vmnic in passt mode). The NAD names neither vmnic's socket nor
// Spiderpool's, so vmnicd (the shipped binary) and Spiderpool's agent
// answer at their default paths. A VMI made from the example's VM
// template, and its launcher pod with the template's annotations (as
// virt-controller copies them), are wired through the NAD's plugin list
// as Multus runs it for the pod's default network: the pod's eth0 is an
// ipvlan on eth1.20 with an address of the example's pool, and vmnicd
// keeps the attachment; behind the
// pod's passt (forwarding the VM's ports), the guest takes that address by
// DHCP and reaches a host on VLAN 20 from it; the host reaches the VM pod
// on VLAN 20 and not on VLAN 30. DEL twice removes the pod's link and
// leaves ifacer's eth1.20; a new launcher pod of the VM gets the same
// address, Spiderpool's fixed IP of a KubeVirt VM.
//
// The guest is passt's socket protocol spoken by the test (passtGuest): a
// booted guest inside the node VM would run under QEMU's emulation.
func TestPasstIpvlanExample(t *testing.T) {
	needIpvlan(t)
	needVLAN(t)
	need.Binary(t, "passt")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	t.Cleanup(cancel)
	root, err := harness.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(root, "deploy", "examples", "passt-ipvlan")
	vm := exampleVM(t, filepath.Join(dir, "vm.yaml"))

	c := cluster.StartWithT(t, cluster.Options{Aggregation: true})
	if err := c.InstallKubeVirtCRDs(ctx); err != nil {
		t.Fatal(err)
	}
	kube, err := kubernetes.NewForConfig(c.Config)
	if err != nil {
		t.Fatal(err)
	}
	agent := spiderpool.StartAgentT(t, c, spiderpool.AgentOptions{NodeName: "node-a", PodName: "spiderpool-agent-node-a"})
	atDefaultPath(t, spiderpoolSocket, agent.Socket)
	addLoopbackAddr(t, webhookAddr)
	spiderpool.StartControllerT(t, c, spiderpool.ControllerOptions{Address: webhookAddr})

	node, _ := newNode(t, false)
	startClusterVmnicd(t, node, c, "node-a")
	atDefaultPath(t, filepath.Dir(netconf.DefaultSocket), filepath.Dir(node.Socket()))
	atDefaultPath(t, netconf.DefaultSpoolDir, node.SpoolDir())
	plugins, err := cluster.Binaries(ctx, spiderpool.PluginName, "ifacer")
	if err != nil {
		t.Fatal(err)
	}
	node.CNI = libcni.NewCNIConfigWithCacheDir([]string{node.BinDir, filepath.Dir(plugins[0]), filepath.Dir(plugins[1])}, filepath.Join(node.Dir, "cni-cache"), nil)

	// The underlay: the node's eth1 (the master the example names) is a
	// trunk into the LAN, whose host has .2 of the example's subnet on
	// VLAN 20 and .3 on VLAN 30.
	lan := newLAN(t)
	if err := node.NS.Do(func(ns.NetNS) error {
		return netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "eth1"}, PeerName: "trunk0", PeerNamespace: netlink.NsFd(int(lan.Fd()))})
	}); err != nil {
		t.Fatal(err)
	}
	setUp(t, node.NS, "eth1")
	addVLAN(t, lan, "trunk0", "trunk0.20", 20, "172.16.20.2/24")
	addVLAN(t, lan, "trunk0", "trunk0.30", 30, "172.16.20.3/24")

	applyFile(ctx, t, c, "deploy/examples/passt-ipvlan/ippool.yaml")
	applyFile(ctx, t, c, "deploy/examples/passt-ipvlan/multus.yaml")
	nad := spiderpool.WaitNAD(ctx, t, c, "default", "ipvlan-passt")
	config, _, _ := unstructured.NestedString(nad.Object, "spec", "config")
	list, err := libcni.ConfListFromBytes([]byte(config))
	if err != nil {
		t.Fatalf("the NAD spiderpool-controller made: %v\n%s", err, config)
	}
	var types []string
	for _, p := range list.Plugins {
		types = append(types, p.Network.Type)
	}
	if got := strings.Join(types, ","); got != "ifacer,ipvlan,vmnic" {
		t.Fatalf("the NAD's plugins are %s, want ifacer,ipvlan,vmnic:\n%s", got, config)
	}
	t.Logf("the NAD spiderpool-controller made of the example: %s", config)

	vmi := createExampleVMI(ctx, t, c, vm)
	ports := passtPorts(t, vm)
	pod := launcherOn(ctx, t, kube, vmi, "virt-launcher-vm-passt-ipvlan-a", "node-a", nil)
	if pod.IfName != "eth0" {
		t.Fatalf("the launcher pod's interface is %s, want eth0 (the default network)", pod.IfName)
	}
	ip := ip4(addRetry(ctx, t, node, list, pod))
	if n, err := strconv.Atoi(ip[strings.LastIndex(ip, ".")+1:]); !strings.HasPrefix(ip, "172.16.20.") || err != nil || n < 100 || n > 199 {
		t.Fatalf("the VM pod got %s, not an address of the example's pool (172.16.20.100-199)", ip)
	}
	sub, ok := linkByName(t, node.NS, "eth1.20").(*netlink.Vlan)
	if !ok || sub.VlanId != 20 || sub.ParentIndex != linkByName(t, node.NS, "eth1").Attrs().Index {
		t.Fatalf("eth1.20 is %+v, want ifacer's VLAN 20 of eth1", sub)
	}
	l := podLinks(t, pod)["eth0"]
	if l == nil || l.Type() != "ipvlan" || l.Attrs().ParentIndex != sub.Index {
		t.Fatalf("the pod's eth0 is %v, want an ipvlan on eth1.20 (index %d)", l, sub.Index)
	}

	// vmnic's part: the attachment vmnicd keeps for the live migration
	// (virt-handler, not vmnic, sets passt's sysctls under KubeVirt).
	atts, err := ctl.Attachments(ctx, netconf.DefaultSocket)
	if err != nil {
		t.Fatal(err)
	}
	if len(atts.Items) != 1 {
		t.Fatalf("vmnicd has %d attachments, want the VM pod's: %+v", len(atts.Items), atts.Items)
	}
	if a := atts.Items[0]; a.Mode != "passt" || a.Pod.Name != pod.Name || a.IfName != "eth0" || a.VM != vm.Name || a.Network != "ipvlan-passt" ||
		strings.Join(a.PodIPs, ",") != ip+"/24" || strings.Join(a.GuestIPs, ",") != ip || !a.Complete || a.Migration != nil {
		t.Errorf("vmnicd's attachment of the VM pod: %+v", a)
	}

	sock := sockIn(passtDir(t), pod.Name, "eth0")
	startPasstPorts(t, pod, sock, ports)
	g := dialPasstGuest(t, sock, net.HardwareAddr{0x02, 0x00, 0x00, 0x00, 0x20, 0x01})
	if got := g.dhcp(t); got.String() != ip {
		t.Fatalf("passt's DHCP gave the guest %s, want the pod's %s", got, ip)
	}
	listenUDP(t, lan, "172.16.20.2", 9000).expect(t, g, net.ParseIP("172.16.20.2"), 9000, "guest via VLAN 20", ip)
	checkVLANReach(t, lan, ip, "trunk0.20", "trunk0.30")
	t.Logf("the guest behind passt (ports %s) took %s by DHCP and reached 172.16.20.2 on VLAN 20", ports, ip)
	// The controller's NADs are CNI 0.3.1, which has no CHECK.
	for range 2 {
		if err := node.Del(ctx, list, pod); err != nil {
			t.Fatalf("DEL: %v", err)
		}
	}
	if names := strings.Join(mapKeys(podLinks(t, pod)), " "); names != "lo" {
		t.Errorf("after DEL the pod has links %s", names)
	}
	if atts, err := ctl.Attachments(ctx, netconf.DefaultSocket); err != nil || len(atts.Items) != 0 {
		t.Errorf("after DEL vmnicd has attachments %+v (%v)", atts, err)
	}
	linkByName(t, node.NS, "eth1.20") // ifacer's, not vmnic's: it stays
	if err := kube.CoreV1().Pods("default").Delete(ctx, pod.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}

	// The VM starts again: a new launcher pod, the VM's address.
	again := launcherOn(ctx, t, kube, vmi, "virt-launcher-vm-passt-ipvlan-b", "node-a", nil)
	if got := ip4(addRetryFor(ctx, t, node, list, again, 30*time.Second)); got != ip {
		t.Errorf("the VM's new launcher pod got %s, want the VM's %s", got, ip)
	} else {
		t.Logf("the VM's next launcher pod got the VM's %s again", ip)
	}
	if err := node.Del(ctx, list, again); err != nil {
		t.Fatalf("DEL: %v", err)
	}
}

// exampleVM reads a VirtualMachine manifest.
func exampleVM(t *testing.T, path string) *kubevirtv1.VirtualMachine {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	vm := &kubevirtv1.VirtualMachine{}
	if err := yaml.UnmarshalStrict(b, vm); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	if vm.Spec.Template == nil {
		t.Fatalf("%s: no template", path)
	}
	return vm
}

// createExampleVMI creates the VMI virt-controller makes of vm: its
// template's labels, annotations and spec, the VM's name.
func createExampleVMI(ctx context.Context, t *testing.T, c *cluster.Cluster, vm *kubevirtv1.VirtualMachine) *kubevirtv1.VirtualMachineInstance {
	t.Helper()
	kv, err := kubevirt.KubeVirtClient(c.Config)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := vm.Spec.Template
	vmi := &kubevirtv1.VirtualMachineInstance{
		TypeMeta: metav1.TypeMeta{APIVersion: "kubevirt.io/v1", Kind: "VirtualMachineInstance"},
		ObjectMeta: metav1.ObjectMeta{
			Name: vm.Name, Namespace: "default", Labels: tmpl.ObjectMeta.Labels, Annotations: tmpl.ObjectMeta.Annotations,
		},
		Spec: tmpl.Spec,
	}
	out := &kubevirtv1.VirtualMachineInstance{}
	if err := kv.Post().Namespace("default").Resource("virtualmachineinstances").Body(vmi).Do(ctx).Into(out); err != nil {
		t.Fatalf("create VMI %s: %v", vm.Name, err)
	}
	return out
}

// passtPorts is passt's -t spec for the TCP ports vm's passt interface
// lists, as KubeVirt has passt forward them.
func passtPorts(t *testing.T, vm *kubevirtv1.VirtualMachine) string {
	t.Helper()
	var ports []string
	for _, i := range vm.Spec.Template.Spec.Domain.Devices.Interfaces {
		if i.PasstBinding == nil {
			continue
		}
		for _, p := range i.Ports {
			if p.Protocol == "" || p.Protocol == "TCP" {
				ports = append(ports, strconv.Itoa(int(p.Port)))
			}
		}
	}
	if len(ports) == 0 {
		t.Fatalf("VM %s: no passt interface with TCP ports", vm.Name)
	}
	return strings.Join(ports, ",")
}

// atDefaultPath makes path a symbolic link to target until the test ends,
// for a daemon whose clients look for it at path. A path that is there
// already is another install's (a node running vmnic or Spiderpool): the
// test skips, or fails in the node VM, which has neither.
func atDefaultPath(t *testing.T, path, target string) {
	t.Helper()
	if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
		msg := fmt.Sprintf("%s is there (%v): this machine runs what the test starts at that path", path, err)
		if need.InNodeVM() {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	parent := filepath.Dir(path)
	var made []string
	for d := parent; ; d = filepath.Dir(d) {
		if _, err := os.Stat(d); err == nil {
			break
		}
		made = append(made, d)
	}
	if err := os.MkdirAll(parent, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(target, path); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = os.Remove(path)
		for _, d := range made {
			_ = os.Remove(d)
		}
	})
}

// addLoopbackAddr adds addr/32 to this namespace's lo until the test ends.
func addLoopbackAddr(t *testing.T, addr string) {
	t.Helper()
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	a, err := netlink.ParseAddr(addr + "/32")
	if err != nil {
		t.Fatal(err)
	}
	if err := netlink.AddrAdd(lo, a); err != nil {
		t.Fatalf("add %s to lo: %v", addr, err)
	}
	t.Cleanup(func() { _ = netlink.AddrDel(lo, a) })
}

func linkByName(t *testing.T, n ns.NetNS, name string) netlink.Link {
	t.Helper()
	var l netlink.Link
	if err := n.Do(func(ns.NetNS) error {
		var err error
		l, err = netlink.LinkByName(name)
		return err
	}); err != nil {
		t.Fatalf("link %s: %v", name, err)
	}
	return l
}
