package integration

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"github.com/vishvananda/netlink"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/vmnic/vmnic/pkg/capabilities"
	"github.com/vmnic/vmnic/pkg/nft"
	"github.com/vmnic/vmnic/test/harness"
	"github.com/vmnic/vmnic/test/need"
	"github.com/vmnic/vmnic/test/spiderpool"
)

// The mode table's ipvlan row (several NICs, fixed IP, live migration) and
// passt over a macvlan whose master is an 802.1q sub-interface. This
// project's machines have neither ipvlan nor 8021q: the tests skip there,
// naming the feature, and CI runs them inside the node VM (test/nodevm).

func needIpvlan(t *testing.T) {
	t.Helper()
	k := capabilities.Probe(ctxT(t), capabilities.ProbeOptions{}).Kernel
	need.KernelFeature(t, k.Ipvlan, "ipvlan")
}

// needVLAN creates an 802.1q link on a veth in a throwaway namespace.
func needVLAN(t *testing.T) {
	t.Helper()
	n, err := testutils.NewNS()
	if err != nil {
		t.Fatal(err)
	}
	defer harness.RemoveNetns(n)
	err = n.Do(func(ns.NetNS) error {
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "vp0"}, PeerName: "vp1"}); err != nil {
			return err
		}
		p, err := netlink.LinkByName("vp0")
		if err != nil {
			return err
		}
		return netlink.LinkAdd(&netlink.Vlan{LinkAttrs: netlink.LinkAttrs{Name: "vp0.100", ParentIndex: p.Attrs().Index}, VlanId: 100})
	})
	need.KernelFeature(t, err == nil, fmt.Sprintf("802.1q VLAN links (%v)", err))
}

// newLAN is the underlay's host: a network namespace of its own, where
// joinLAN plugs node links into Linux bridges.
func newLAN(t *testing.T) ns.NetNS {
	t.Helper()
	lan, err := testutils.NewNS()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { harness.RemoveNetns(lan) })
	return lan
}

var lanPorts int

// joinLAN gives node a link named link (up), the end of a veth whose other
// end is a port of bridge br in lan; br is made on first use, with cidr
// (the underlay host's address, the pods' gateway).
func joinLAN(t *testing.T, lan ns.NetNS, br, cidr string, node *harness.Node, link string) {
	t.Helper()
	lanPorts++
	port := fmt.Sprintf("port%d", lanPorts)
	err := lan.Do(func(ns.NetNS) error {
		b, err := netlink.LinkByName(br)
		if err != nil {
			if err := netlink.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: br}}); err != nil {
				return err
			}
			if b, err = netlink.LinkByName(br); err != nil {
				return err
			}
			a, err := netlink.ParseAddr(cidr)
			if err != nil {
				return err
			}
			if err := netlink.AddrAdd(b, a); err != nil {
				return err
			}
			if err := netlink.LinkSetUp(b); err != nil {
				return err
			}
		}
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: port, MasterIndex: b.Attrs().Index}, PeerName: link, PeerNamespace: netlink.NsFd(int(node.NS.Fd()))}); err != nil {
			return err
		}
		p, err := netlink.LinkByName(port)
		if err != nil {
			return err
		}
		return netlink.LinkSetUp(p)
	})
	if err != nil {
		t.Fatalf("LAN %s: %v", br, err)
	}
	setUp(t, node.NS, link)
}

func setUp(t *testing.T, n ns.NetNS, link string) {
	t.Helper()
	if err := n.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName(link)
		if err != nil {
			return err
		}
		return netlink.LinkSetUp(l)
	}); err != nil {
		t.Fatalf("%s up: %v", link, err)
	}
}

// listenUDP opens a UDP socket on ip:port inside n (it stays there).
func listenUDP(t *testing.T, n ns.NetNS, ip string, port int) *udpListener {
	t.Helper()
	var c *net.UDPConn
	err := n.Do(func(ns.NetNS) error {
		var err error
		c, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.ParseIP(ip), Port: port})
		return err
	})
	if err != nil {
		t.Fatalf("listen on %s:%d: %v", ip, port, err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return &udpListener{c: c}
}

// passtNetOn is network name: plugin (macvlan or ipvlan) on master with
// ipam, then vmnic in passt mode.
func passtNetOn(t *testing.T, node *harness.Node, name, plugin, master string, ipam map[string]any) *libcni.NetworkConfigList {
	t.Helper()
	under := underlayPlugin(plugin, ipam)
	under["master"] = master
	return confList(t, "1.1.0", name, under, map[string]any{"type": "vmnic", "mode": "passt", "socket": node.Socket(), "spoolDir": node.SpoolDir()})
}

// hostLocal24 hands out prefix.10 to prefix.50 of prefix.0/24, with a
// default route through prefix.1 of the given priority (passt serves an
// interface only with a default route on it; a pod's second NIC needs
// another priority than its first).
func hostLocal24(node *harness.Node, prefix string, priority int) map[string]any {
	return map[string]any{
		"type": "host-local", "dataDir": filepath.Join(node.Dir, "ipam"),
		"ranges": []any{[]any{map[string]any{"subnet": prefix + ".0/24", "rangeStart": prefix + ".10", "rangeEnd": prefix + ".50", "gateway": prefix + ".1"}}},
		"routes": []any{map[string]any{"dst": "0.0.0.0/0", "priority": priority}},
	}
}

// leased lists the addresses host-local holds for network name.
func leased(t *testing.T, node *harness.Node, name string) []string {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join(node.Dir, "ipam", name))
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	var ips []string
	for _, e := range ents {
		if net.ParseIP(e.Name()) != nil {
			ips = append(ips, e.Name())
		}
	}
	return ips
}

func addResult(ctx context.Context, t *testing.T, node *harness.Node, l *libcni.NetworkConfigList, p *harness.Pod) *current.Result {
	t.Helper()
	res, err := node.Add(ctx, l, p)
	if err != nil {
		t.Fatalf("ADD %s %s on %s: %v", p.Name, p.IfName, l.Name, err)
	}
	r, err := current.NewResultFromResult(res)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func linkMAC(t *testing.T, n ns.NetNS, link string) string {
	t.Helper()
	var mac string
	if err := n.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName(link)
		if err == nil {
			mac = l.Attrs().HardwareAddr.String()
		}
		return err
	}); err != nil {
		t.Fatalf("link %s: %v", link, err)
	}
	return mac
}

// TestPasstIpvlanTwoNICs: a VM pod with two ipvlan NICs, eth0 on master
// uplink0 and net1 on uplink1, each on its own underlay, vmnic chained on
// both. Behind each NIC a passt serves the guest's side (what KubeVirt's
// binding runs per interface), and the guest, speaking passt's socket
// protocol, takes the NIC's address by DHCP and sends a datagram to the
// host on that NIC's underlay, which must arrive from the NIC's address. CHECK, DEL
// twice, and nothing is left: no pod link, no lease.
func TestPasstIpvlanTwoNICs(t *testing.T) {
	needIpvlan(t)
	need.Binary(t, "passt")
	node, _ := newNode(t, true)
	lan := newLAN(t)
	// The underlay's hosts are .2: passt maps its guest's traffic to the
	// gateway address (.1) to the pod's own namespace.
	joinLAN(t, lan, "lan0", "10.50.0.2/24", node, "uplink0")
	joinLAN(t, lan, "lan1", "10.60.0.2/24", node, "uplink1")
	ctx := ctxT(t)
	nics := []struct {
		ifName, master, net, prefix string
	}{
		{"eth0", "uplink0", "under0", "10.50.0"},
		{"net1", "uplink1", "under1", "10.60.0"},
	}
	dir := passtDir(t)
	vm := newPod(t, "virt-launcher-two-x")
	var lists []*libcni.NetworkConfigList
	for i, nic := range nics {
		l := passtNetOn(t, node, nic.net, "ipvlan", nic.master, hostLocal24(node, nic.prefix, 100*i))
		lists = append(lists, l)
		vm.IfName = nic.ifName
		ip := ip4(addResult(ctx, t, node, l, vm))
		link := podLinks(t, vm)[nic.ifName]
		if link == nil || link.Type() != "ipvlan" {
			t.Fatalf("%s: pod link %v, want an ipvlan", nic.ifName, link)
		}
		// An ipvlan shares its master's MAC: the NICs differ by master.
		if got, want := link.Attrs().HardwareAddr.String(), linkMAC(t, node.NS, nic.master); got != want {
			t.Errorf("%s has MAC %s, want its master %s's %s", nic.ifName, got, nic.master, want)
		}
		sock := sockIn(dir, vm.Name, nic.ifName)
		startPasstPorts(t, vm, sock, strconv.Itoa(8080+i))
		g := dialPasstGuest(t, sock, net.HardwareAddr{0x02, 0x00, 0x00, 0x00, 0x00, byte(i + 1)})
		if got := g.dhcp(t); got.String() != ip {
			t.Fatalf("%s: passt's DHCP gave the guest %s, want the NIC's %s", nic.ifName, got, ip)
		}
		host := nic.prefix + ".2"
		listenUDP(t, lan, host, 9000).expect(t, g, net.ParseIP(host), 9000, "guest via "+nic.ifName, ip)
		t.Logf("%s (%s, master %s): the guest behind passt took %s by DHCP and reached %s", nic.ifName, nic.net, nic.master, ip, host)
	}
	for i, nic := range nics {
		vm.IfName = nic.ifName
		if err := node.Check(ctx, lists[i], vm); err != nil {
			t.Errorf("CHECK %s: %v", nic.ifName, err)
		}
	}
	for i, nic := range nics {
		vm.IfName = nic.ifName
		for range 2 {
			if err := node.Del(ctx, lists[i], vm); err != nil {
				t.Fatalf("DEL %s: %v", nic.ifName, err)
			}
		}
		if ips := leased(t, node, nic.net); len(ips) != 0 {
			t.Errorf("after DEL %s still leases %v", nic.net, ips)
		}
	}
	for name := range podLinks(t, vm) {
		if name != "lo" {
			t.Errorf("after DEL the pod still has %s", name)
		}
	}
	for _, m := range []string{"uplink0", "uplink1"} {
		linkMAC(t, node.NS, m) // the masters stay
	}
}

// TestPasstIpvlanMigrationHold: passt's migration hold and release on
// ipvlan, between two sandbox nodes (network namespaces, each with its own
// vmnicd and Spiderpool agent, against one API server), each node with its
// own master uplink0 on one LAN. Two nodes, not two pods on one node: an
// ipvlan has its master's MAC, so a source and a target on one master are
// one MAC to the underlay, and only different masters (as on two real
// nodes) show whom the underlay sends to. The target gets the VM's IP from
// Spiderpool and is held: the LAN keeps resolving the IP to the source's
// master. At the switchover the hold goes, the LAN's neighbour entry moves
// to the target's master, and the source is held from then on.
func TestPasstIpvlanMigrationHold(t *testing.T) {
	needIpvlan(t)
	bed, pluginDir := newClusterBed(t, 6*time.Minute)
	ctx, c, kube := bed.ctx, bed.c, bed.kube
	lan := newLAN(t)
	var nodes []*harness.Node
	var lists []*libcni.NetworkConfigList
	for _, name := range []string{"node-a", "node-b"} {
		agent := spiderpool.StartAgentT(t, c, spiderpool.AgentOptions{NodeName: name, PodName: "spiderpool-agent-" + name})
		node, _ := newNode(t, false)
		startClusterVmnicd(t, node, c, name)
		node.CNI = libcni.NewCNIConfigWithCacheDir([]string{node.BinDir, pluginDir}, filepath.Join(node.Dir, "cni-cache"), nil)
		joinLAN(t, lan, "lan0", "10.50.0.1/24", node, "uplink0")
		nodes = append(nodes, node)
		lists = append(lists, underlayList(t, node, "ipvlan", "1.0.0", agent.IPAMConfig("under-v4"), nil))
	}
	a, b := nodes[0], nodes[1]
	applyPool(ctx, t, c, "under-v4", "10.50.0.0/24", "10.50.0.20-10.50.0.40", "10.50.0.1")
	ping := func(ip string, count int) error {
		out, err := exec.Command("nsenter", "--net="+lan.Path(), "ping", "-c", fmt.Sprint(count), "-i", "0.3", "-W", "2", ip).CombinedOutput()
		if err != nil {
			return fmt.Errorf("%w\n%s", err, out)
		}
		return nil
	}

	vmi := createPasstVMI(ctx, t, c, "vm-iv")
	src := launcherOn(ctx, t, kube, vmi, "virt-launcher-vm-iv-src", "node-a", nil)
	ip := ip4(addRetry(ctx, t, a, lists[0], src))
	srcMAC, aMAC := podLinks(t, src)["eth0"].Attrs().HardwareAddr.String(), linkMAC(t, a.NS, "uplink0")
	if srcMAC != aMAC {
		t.Fatalf("the source's ipvlan has MAC %s, want node-a's uplink0 %s", srcMAC, aMAC)
	}
	if err := ping(ip, 1); err != nil {
		t.Fatalf("the LAN cannot reach the source %s: %v", ip, err)
	}
	if got := neighMAC(t, lan, ip); got != srcMAC {
		t.Fatalf("the LAN resolved %s to %q, want the source's %s", ip, got, srcMAC)
	}

	m := bed.createVMIM(t, "mig-iv", vmi.Name)
	dst := launcherOn(ctx, t, kube, vmi, "virt-launcher-vm-iv-dst", "node-b", m)
	if got := ip4(addRetry(ctx, t, b, lists[1], dst)); got != ip {
		t.Fatalf("the target got %s, want the VM's %s", got, ip)
	}
	dstMAC := podLinks(t, dst)["eth0"].Attrs().HardwareAddr.String()
	if dstMAC != linkMAC(t, b.NS, "uplink0") || dstMAC == srcMAC {
		t.Fatalf("the target's ipvlan has MAC %s, want node-b's uplink0 (the source: %s)", dstMAC, srcMAC)
	}
	if held, err := nft.Held(dst.NS.Path(), "eth0"); err != nil || !held {
		t.Fatalf("the migration target is not held: %v %v", held, err)
	}
	// The LAN asks for the IP again: only the source may answer.
	_ = lan.Do(func(ns.NetNS) error {
		l, _ := netlink.LinkByName("lan0")
		return netlink.NeighDel(&netlink.Neigh{LinkIndex: l.Attrs().Index, IP: net.ParseIP(ip)})
	})
	for range 3 {
		_ = ping(ip, 1)
		if got := neighMAC(t, lan, ip); got != srcMAC {
			t.Fatalf("while the target is held the LAN resolved %s to %q, want the source's %s (target %s)", ip, got, srcMAC, dstMAC)
		}
	}
	if err := b.Check(ctx, lists[1], dst); err != nil {
		t.Errorf("CHECK of the held target: %v", err)
	}

	// KubeVirt moves the VMIM to Running while the VM's memory moves (for
	// seconds at least); from then on the source contests no claim, and
	// the next is the target's switchover.
	bed.step(t, m, vmi, src, dst, "Running")
	time.Sleep(1100 * time.Millisecond) // also past the LAN's neighbour locktime
	switched := time.Now()
	bed.finish(t, m, vmi, src, dst, false)
	took := awaitNeigh(t, lan, ip, dstMAC, switched)
	t.Logf("switchover: the LAN's neighbour entry moved to node-b's master %s after the VMIM turned Succeeded", took.Round(time.Millisecond))
	if held, err := nft.Held(dst.NS.Path(), "eth0"); err != nil || held {
		t.Errorf("after the switchover the target is held: %v %v", held, err)
	}
	var srcHeld bool
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline) && !srcHeld; time.Sleep(20 * time.Millisecond) {
		srcHeld, _ = nft.Held(src.NS.Path(), "eth0")
	}
	if !srcHeld {
		t.Error("after the switchover the source is not silenced")
	}
	if err := ping(ip, 3); err != nil {
		t.Errorf("the LAN cannot reach the target: %v", err)
	}
	if err := b.Check(ctx, lists[1], dst); err != nil {
		t.Errorf("CHECK of the released target: %v", err)
	}
	if err := kube.CoreV1().Pods("default").Delete(ctx, src.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := a.Del(ctx, lists[0], src); err != nil {
		t.Fatalf("DEL of the source: %v", err)
	}
	if err := b.Del(ctx, lists[1], dst); err != nil {
		t.Fatalf("DEL of the target: %v", err)
	}
}

// TestPasstMacvlanOnVLAN: passt over a macvlan whose master is an 802.1q
// sub-interface, uplink0.100, a common underlay. The LAN sees the node's
// uplink0 as a trunk: its host has an address on VLAN 100 (trunk0.100)
// and another of the same subnet on VLAN 200. The guest behind passt
// takes the pod's address and reaches the host on VLAN 100; the VM pod answers on
// VLAN 100 and not on 200. DEL leaves the sub-interface, which vmnic did
// not make.
func TestPasstMacvlanOnVLAN(t *testing.T) {
	needVLAN(t)
	need.Binary(t, "passt")
	node, _ := newNode(t, true)
	lan := newLAN(t)
	if err := node.NS.Do(func(ns.NetNS) error {
		return netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "uplink0"}, PeerName: "trunk0", PeerNamespace: netlink.NsFd(int(lan.Fd()))})
	}); err != nil {
		t.Fatal(err)
	}
	addVLAN(t, node.NS, "uplink0", "uplink0.100", 100, "")
	// The LAN's host is .2 (passt maps its guest's traffic to the gateway,
	// .1, to the pod itself), and .3 on VLAN 200.
	addVLAN(t, lan, "trunk0", "trunk0.100", 100, "10.50.0.2/24")
	addVLAN(t, lan, "trunk0", "trunk0.200", 200, "10.50.0.3/24")

	ctx := ctxT(t)
	l := passtNetOn(t, node, "vlan100", "macvlan", "uplink0.100", hostLocal24(node, "10.50.0", 0))
	vm := newPod(t, "virt-launcher-vlan-x")
	ip := ip4(addResult(ctx, t, node, l, vm))
	pl := podLinks(t, vm)["eth0"]
	if pl == nil || pl.Type() != "macvlan" {
		t.Fatalf("pod link %v, want a macvlan", pl)
	}
	dir := passtDir(t)
	sock := sockIn(dir, vm.Name, "eth0")
	startPasst(t, vm, sock)
	g := dialPasstGuest(t, sock, net.HardwareAddr{0x02, 0x00, 0x00, 0x00, 0x01, 0x00})
	if got := g.dhcp(t); got.String() != ip {
		t.Fatalf("passt's DHCP gave the guest %s, want the pod's %s", got, ip)
	}
	listenUDP(t, lan, "10.50.0.2", 9000).expect(t, g, net.ParseIP("10.50.0.2"), 9000, "guest via VLAN 100", ip)
	checkVLANReach(t, lan, ip, "trunk0.100", "trunk0.200")
	if err := node.Check(ctx, l, vm); err != nil {
		t.Errorf("CHECK: %v", err)
	}
	for range 2 {
		if err := node.Del(ctx, l, vm); err != nil {
			t.Fatalf("DEL: %v", err)
		}
	}
	if ips := leased(t, node, "vlan100"); len(ips) != 0 {
		t.Errorf("after DEL host-local still leases %v", ips)
	}
	if names := strings.Join(mapKeys(podLinks(t, vm)), " "); names != "lo" {
		t.Errorf("after DEL the pod has links %s", names)
	}
	linkMAC(t, node.NS, "uplink0.100") // the sub-interface stays
}

// checkVLANReach pings ip from lan's VLAN link on (it must answer) and
// from its VLAN link off (it must not).
func checkVLANReach(t *testing.T, lan ns.NetNS, ip, on, off string) {
	t.Helper()
	ping := func(dev string) error {
		return exec.Command("nsenter", "--net="+lan.Path(), "ping", "-c", "1", "-W", "2", "-I", dev, ip).Run()
	}
	if err := ping(on); err != nil {
		t.Errorf("the LAN cannot reach the VM pod %s on %s: %v", ip, on, err)
	}
	if err := ping(off); err == nil {
		t.Errorf("the VM pod %s answered on %s", ip, off)
	}
}

// addVLAN makes name, VLAN id on parent (set up) in n, up, with the
// address cidr unless it is empty.
func addVLAN(t *testing.T, n ns.NetNS, parent, name string, id int, cidr string) {
	t.Helper()
	if err := n.Do(func(ns.NetNS) error {
		p, err := netlink.LinkByName(parent)
		if err != nil {
			return err
		}
		if err := netlink.LinkSetUp(p); err != nil {
			return err
		}
		if err := netlink.LinkAdd(&netlink.Vlan{LinkAttrs: netlink.LinkAttrs{Name: name, ParentIndex: p.Attrs().Index}, VlanId: id}); err != nil {
			return err
		}
		l, err := netlink.LinkByName(name)
		if err != nil {
			return err
		}
		if cidr != "" {
			if err := addrsNoDAD(l, cidr); err != nil {
				return err
			}
		}
		return netlink.LinkSetUp(l)
	}); err != nil {
		t.Fatalf("VLAN %s: %v", name, err)
	}
}

func mapKeys[V any](m map[string]V) []string {
	var ks []string
	for k := range m {
		ks = append(ks, k)
	}
	return ks
}
