package integration

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/vmnic/vmnic/daemon"
	"github.com/vmnic/vmnic/pkg/kubevirt"
	"github.com/vmnic/vmnic/pkg/ovsdb"
	"github.com/vmnic/vmnic/pkg/podnet"
	"github.com/vmnic/vmnic/pkg/state"
	"github.com/vmnic/vmnic/plugins/bridge"
	"github.com/vmnic/vmnic/test/cluster"
	"github.com/vmnic/vmnic/test/guest"
	"github.com/vmnic/vmnic/test/harness"
	"github.com/vmnic/vmnic/test/need"
	"github.com/vmnic/vmnic/test/ovs"
)

// ovsNode is a sandbox node with a userspace-datapath OVS switch (bridge
// br1) and vmnicd, both in the node netns.
type ovsNode struct {
	*harness.Node
	sw     *ovs.OVS
	d      *harness.Daemon
	adjust func(*daemon.Config)
	// vmnicdFlags, when set, run the vmnicd binary with these flags (and
	// the node's OVSDB and network namespace) instead of an in-process
	// daemon: a vmnicd that watches an API server (clusterFlags).
	vmnicdFlags []string
	p           *harness.DaemonProcess
	// cniVersion of the networks bridgeList builds; default 1.1.0.
	cniVersion string
}

func newOVSNode(t testing.TB) *ovsNode {
	t.Helper()
	return newOVSNodeWith(t, nil)
}

// newOVSNodeWith is newOVSNode with a hook on the daemon's configuration.
func newOVSNodeWith(t testing.TB, adjust func(*daemon.Config)) *ovsNode {
	t.Helper()
	n := newOVSNodeBare(t)
	n.adjust = adjust
	n.start(t)
	return n
}

// newOVSNodeCluster is newOVSNode with the vmnicd binary watching c's API
// server as node.
func newOVSNodeCluster(t testing.TB, c *cluster.Cluster, node string) *ovsNode {
	t.Helper()
	n := newOVSNodeBare(t)
	n.vmnicdFlags = clusterFlags(c, node)
	n.start(t)
	return n
}

// newOVSNodeBare is the node and its switch without a daemon (tests that
// run vmnicd as a process start it themselves).
func newOVSNodeBare(t testing.TB) *ovsNode {
	t.Helper()
	node, _ := newNode(t, false)
	sw := ovs.StartT(t, ovs.WithNetNS(node.NS))
	if err := sw.AddBridge("br1"); err != nil {
		t.Fatalf("add-br: %v", err)
	}
	return &ovsNode{Node: node, sw: sw}
}

func (n *ovsNode) start(t testing.TB) {
	t.Helper()
	if n.vmnicdFlags != nil {
		n.DaemonInHostNetns = true
		p, err := n.StartVmnicd(append([]string{"--ovsdb", n.sw.DB(), "--host-netns", n.NS.Path()}, n.vmnicdFlags...)...)
		if err != nil {
			t.Fatalf("vmnicd: %v", err)
		}
		n.p = p
		t.Cleanup(func() { _ = p.Stop() })
		return
	}
	d, err := n.StartDaemonWith(logger(t), func(o *daemon.Config) {
		o.OVSDB = n.sw.DB()
		o.HostNetns = n.NS.Path()
		if n.adjust != nil {
			n.adjust(o)
		}
	})
	if err != nil {
		t.Fatalf("daemon: %v", err)
	}
	n.d = d
	t.Cleanup(func() { _ = d.Stop() })
}

// stop stops the node's vmnicd, as SIGTERM does.
func (n *ovsNode) stop() error {
	if n.p != nil {
		return n.p.Stop()
	}
	return n.d.Stop()
}

func (n *ovsNode) vsctl(t testing.TB, args ...string) string {
	t.Helper()
	out, err := n.sw.Vsctl(args...)
	if err != nil {
		t.Fatalf("ovs-vsctl %v: %v\n%s", args, err, out)
	}
	return strings.TrimSpace(out)
}

// ipamDir is where host-local keeps the node's allocations.
func (n *ovsNode) ipamDir() string { return filepath.Join(n.Dir, "ipam") }

// hostLocal is a host-local IPAM block on 10.100.0.0/24 handing out
// first-last.
func (n *ovsNode) hostLocal(first, last string) map[string]any {
	ipam := n.hostLocalOn("10.100.0.0/24", "10.100.0.1", first, last)
	ipam["routes"] = []any{map[string]any{"dst": "0.0.0.0/0"}, map[string]any{"dst": "192.0.2.0/24", "gw": "10.100.0.254"}}
	return ipam
}

// hostLocalOn is a host-local IPAM block on subnet handing out first-last.
func (n *ovsNode) hostLocalOn(subnet, gw, first, last string) map[string]any {
	return map[string]any{
		"type": "host-local", "dataDir": n.ipamDir(),
		"ranges": []any{[]any{map[string]any{
			"subnet": subnet, "gateway": gw, "rangeStart": first, "rangeEnd": last,
		}}},
	}
}

// bridgeList is a network whose main plugin is vmnic in bridge mode.
func (n *ovsNode) bridgeList(t testing.TB, name string, keys map[string]any, ipam map[string]any) *libcni.NetworkConfigList {
	t.Helper()
	plugin := map[string]any{
		"type": "vmnic", "mode": "bridge", "bridge": "br1",
		"socket": n.Socket(), "spoolDir": n.SpoolDir(),
	}
	if ipam != nil {
		plugin["ipam"] = ipam
	}
	for k, v := range keys {
		plugin[k] = v
	}
	version := n.cniVersion
	if version == "" {
		version = "1.1.0"
	}
	return confList(t, version, name, plugin)
}

// addPod runs ADD for a pod on the network and returns its result.
func (n *ovsNode) addPod(t testing.TB, l *libcni.NetworkConfigList, name string) (*harness.Pod, *current.Result) {
	t.Helper()
	p := newPod(t, name)
	p.IfName = "net1"
	res, err := n.Add(ctxT(t), l, p)
	if err != nil {
		t.Fatalf("ADD %s on %s: %v", name, l.Name, err)
	}
	r, err := current.NewResultFromResult(res)
	if err != nil {
		t.Fatal(err)
	}
	return p, r
}

func portOf(p *harness.Pod) string { return bridge.HostIfName(p.ContainerID, p.IfName) }

// vmnicPorts lists the OVS ports carrying vmnic's owner mark.
func (n *ovsNode) vmnicPorts(t testing.TB) []string {
	t.Helper()
	out := n.vsctl(t, "--format=csv", "--no-headings", "--columns=name", "find", "port", "external_ids:vmnic.io/owner=vmnic")
	if out == "" {
		return nil
	}
	return strings.Fields(strings.ReplaceAll(out, `"`, ""))
}

// allocated lists host-local's allocation files of a network.
func (n *ovsNode) allocated(t testing.TB, network string) []string {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join(n.ipamDir(), network))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	var ips []string
	for _, e := range ents {
		if strings.Count(e.Name(), ".") == 3 {
			ips = append(ips, e.Name())
		}
	}
	return ips
}

func nodeLink(t testing.TB, n *ovsNode, name string) netlink.Link {
	t.Helper()
	var l netlink.Link
	_ = n.NS.Do(func(ns.NetNS) error {
		l, _ = netlinksafe.LinkByName(name)
		return nil
	})
	return l
}

// assertResultMACs: every interface of a CNI result carries the MAC its
// link has in the kernel (Multus copies the result into the pod's
// network-status, which KubeVirt and users read).
func assertResultMACs(t testing.TB, p *harness.Pod, r *current.Result) {
	t.Helper()
	links := podLinks(t, p)
	for _, ifc := range r.Interfaces {
		if ifc.Sandbox == "" {
			continue
		}
		l := links[ifc.Name]
		if l == nil {
			t.Errorf("result names %s, which is not in the pod", ifc.Name)
			continue
		}
		if got := l.Attrs().HardwareAddr.String(); ifc.Mac != got {
			t.Errorf("result gives %s MAC %q; the kernel says %s", ifc.Name, ifc.Mac, got)
		}
	}
}

// tcpFrom connects from pod from to a listener in pod to at ip and echoes
// a line through it.
func tcpFrom(from, to *harness.Pod, ip string) error {
	var ln net.Listener
	if err := to.NS.Do(func(ns.NetNS) error {
		var err error
		ln, err = net.Listen("tcp4", net.JoinHostPort(ip, "0"))
		return err
	}); err != nil {
		return err
	}
	defer func() { _ = ln.Close() }()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer func() { _ = c.Close() }()
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		_, _ = io.Copy(c, c)
	}()
	var c net.Conn
	if err := from.NS.Do(func(ns.NetNS) error {
		var err error
		c, err = (&net.Dialer{Timeout: 3 * time.Second}).Dial("tcp4", ln.Addr().String())
		return err
	}); err != nil {
		return err
	}
	defer func() { _ = c.Close() }()
	_ = c.SetDeadline(time.Now().Add(3 * time.Second))
	const line = "vmnic bridge port\n"
	if _, err := io.WriteString(c, line); err != nil {
		return err
	}
	buf := make([]byte, len(line))
	if _, err := io.ReadFull(c, buf); err != nil {
		return fmt.Errorf("echo: %w", err)
	}
	return nil
}

func pingFrom(p *harness.Pod, ip string) error {
	out, err := exec.Command("nsenter", "--net="+p.NS.Path(), "ping", "-c", "2", "-i", "0.2", "-W", "1", ip).CombinedOutput()
	if err != nil {
		return errors.New(strings.TrimSpace(string(out)))
	}
	return nil
}

// ip6Of is the result's first IPv6 address, or "".
func ip6Of(r *current.Result) string {
	for _, ipc := range r.IPs {
		if ipc.Address.IP.To4() == nil {
			return ipc.Address.IP.String()
		}
	}
	return ""
}

func ip4(r *current.Result) string {
	for _, ipc := range r.IPs {
		if ipc.Address.IP.To4() != nil {
			return ipc.Address.IP.String()
		}
	}
	return ""
}

// TestBridgePlainPods: pods that are no VMs get a plain OVS port with their
// address, like ovs-cni: tag and MTU land in OVSDB and on the links, the
// same VLAN connects, another VLAN does not, CHECK sees drift, DEL is
// idempotent and works after the netns is gone, and releases the address.
func TestBridgePlainPods(t *testing.T) {
	n := newOVSNode(t)
	ctx := ctxT(t)
	vlan100 := n.bridgeList(t, "vlan100", map[string]any{"vlan": 100, "mtu": 1400}, n.hostLocal("10.100.0.10", "10.100.0.50"))
	vlan200 := n.bridgeList(t, "vlan200", map[string]any{"vlan": 200}, n.hostLocal("10.100.0.100", "10.100.0.150"))
	a1, r1 := n.addPod(t, vlan100, "web-a1")
	a2, r2 := n.addPod(t, vlan100, "web-a2")
	b1, rb := n.addPod(t, vlan200, "web-b1")

	for _, c := range []struct {
		p   *harness.Pod
		tag string
	}{{a1, "100"}, {a2, "100"}, {b1, "200"}} {
		port := portOf(c.p)
		if got := n.vsctl(t, "get", "port", port, "tag"); got != c.tag {
			t.Errorf("port %s tag %s, want %s", port, got, c.tag)
		}
		ids := n.vsctl(t, "get", "port", port, "external_ids")
		for _, w := range []string{`"vmnic.io/owner"=vmnic`, `"vmnic.io/pod-name"=` + c.p.Name, `"vmnic.io/iface"=net1`, `"vmnic.io/netns"="` + c.p.NS.Path() + `"`} {
			if !strings.Contains(ids, w) {
				t.Errorf("port %s external_ids %s lack %s", port, ids, w)
			}
		}
	}
	if got := n.vsctl(t, "get", "interface", portOf(a1), "mtu_request"); got != "1400" {
		t.Errorf("mtu_request %s, want 1400", got)
	}
	if l := nodeLink(t, n, portOf(a1)); l == nil || l.Attrs().MTU != 1400 || !strings.HasPrefix(l.Attrs().Alias, "vmnic:") {
		t.Errorf("node end of a1: %+v, want MTU 1400 and the owner mark", l)
	}
	if l := podLinks(t, a1)["net1"]; l == nil || l.Attrs().MTU != 1400 {
		t.Errorf("pod end of a1: %v, want MTU 1400", l)
	}
	if len(r1.Interfaces) != 2 || r1.Interfaces[1].Name != "net1" || r1.Interfaces[1].Mac == "" || len(r1.IPs) != 1 {
		t.Errorf("result: %+v", r1)
	}

	if err := pingFrom(a1, ip4(r2)); err != nil {
		t.Errorf("same VLAN: a1 cannot reach a2 (%s): %v", ip4(r2), err)
	}
	// TCP too: on the userspace datapath it needs the checksums the
	// kernel leaves to the receiver filled in, and vmnic turns the pod
	// end's transmit checksumming off for it (on the kernel's it stays).
	if err := tcpFrom(a1, a2, ip4(r2)); err != nil {
		t.Errorf("same VLAN: TCP from a1 to a2 (%s): %v", ip4(r2), err)
	}
	datapath, err := ovs.Datapath()
	if err != nil {
		t.Fatal(err)
	}
	if on, err := podnet.TxChecksum(a1.NS.Path(), "net1"); err != nil || on != (datapath != ovsdb.DatapathNetdev) {
		t.Errorf("pod end of a1 on the %s datapath: tx-checksumming %t (%v)", datapath, on, err)
	}
	if err := pingFrom(a1, ip4(rb)); err == nil {
		t.Errorf("VLAN 100 reached VLAN 200 (%s)", ip4(rb))
	}

	if err := n.Check(ctx, vlan100, a1); err != nil {
		t.Errorf("CHECK of a wired port: %v", err)
	}
	n.vsctl(t, "set", "port", portOf(a1), "tag=300")
	if err := n.Check(ctx, vlan100, a1); err == nil || !strings.Contains(err.Error(), "tag 300, want 100") {
		t.Errorf("CHECK after retagging the port: %v, want the tag named", err)
	}

	for i := range 2 {
		if err := n.Del(ctx, vlan100, a2); err != nil {
			t.Fatalf("DEL #%d of a2: %v", i+1, err)
		}
	}
	a1.Close()
	if err := n.Del(ctx, vlan100, a1); err != nil {
		t.Fatalf("DEL after the netns is gone: %v", err)
	}
	if err := n.Del(ctx, vlan200, b1); err != nil {
		t.Fatal(err)
	}
	if ports := n.vmnicPorts(t); len(ports) != 0 {
		t.Errorf("ports left after DEL: %v", ports)
	}
	for _, p := range []*harness.Pod{a1, a2, b1} {
		if l := nodeLink(t, n, portOf(p)); l != nil {
			t.Errorf("node veth %s left", l.Attrs().Name)
		}
	}
	if ips := append(n.allocated(t, "vlan100"), n.allocated(t, "vlan200")...); len(ips) != 0 {
		t.Errorf("addresses still allocated: %v", ips)
	}
	recs, _, _ := stateList(t, n.Node)
	if len(recs) != 0 {
		t.Errorf("records left: %d", len(recs))
	}
}

func stateList(t testing.TB, n *harness.Node) ([]*state.Record, []string, error) {
	t.Helper()
	st, err := state.Open(filepath.Join(n.StateDir(), "attachments"))
	if err != nil {
		t.Fatal(err)
	}
	return st.List()
}

// TestBridgeTrunk: trunk ids and ranges become the port's trunks.
func TestBridgeTrunk(t *testing.T) {
	n := newOVSNode(t)
	l := n.bridgeList(t, "trunk", map[string]any{"trunk": []any{map[string]any{"id": 10}, map[string]any{"minID": 20, "maxID": 22}}}, n.hostLocal("10.100.0.10", "10.100.0.50"))
	p, _ := n.addPod(t, l, "router-1")
	if got := n.vsctl(t, "get", "port", portOf(p), "trunks"); got != "[10, 20, 21, 22]" {
		t.Errorf("trunks %s, want [10, 20, 21, 22]", got)
	}
	if got := n.vsctl(t, "get", "port", portOf(p), "tag"); got != "[]" {
		t.Errorf("trunk port has tag %s", got)
	}
	if err := n.Check(ctxT(t), l, p); err != nil {
		t.Errorf("CHECK: %v", err)
	}
	if err := n.Del(ctxT(t), l, p); err != nil {
		t.Fatal(err)
	}
}

// TestBridgeBadInput: each bad config fails with its code and a message
// naming the field, and leaves no port, link, address or record.
func TestBridgeBadInput(t *testing.T) {
	n := newOVSNode(t)
	ok := n.hostLocal("10.100.0.10", "10.100.0.50")
	cases := []struct {
		name  string
		keys  map[string]any
		ipam  map[string]any
		code  uint
		field string
	}{
		{"unknown bridge", map[string]any{"bridge": "nobr", "vlan": 100}, ok, types.ErrInvalidNetworkConfig, `bridge: OVS bridge "nobr"`},
		{"vlan out of range", map[string]any{"vlan": 4096}, ok, types.ErrInvalidNetworkConfig, "vlan: 4096"},
		{"trunk overlap", map[string]any{"trunk": []any{map[string]any{"minID": 10, "maxID": 20}, map[string]any{"id": 15}}}, ok, types.ErrInvalidNetworkConfig, "trunk[1]"},
		{"missing ipam", map[string]any{"vlan": 100}, nil, types.ErrInvalidNetworkConfig, "ipam"},
		{"unknown ipam plugin", map[string]any{"vlan": 100}, map[string]any{"type": "no-such-ipam"}, types.ErrInvalidNetworkConfig, "ipam.type"},
		{"ipam exhausted", map[string]any{"vlan": 100}, n.hostLocal("10.100.0.60", "10.100.0.59"), 0, "ipam"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			l := n.bridgeList(t, "bad", c.keys, c.ipam)
			p := newPod(t, "bad-pod")
			p.IfName = "net1"
			_, err := n.Add(ctxT(t), l, p)
			var te *types.Error
			if !errors.As(err, &te) {
				t.Fatalf("ADD: %v, want a CNI error", err)
			}
			if c.code != 0 && te.Code != c.code {
				t.Errorf("code %d, want %d (%s)", te.Code, c.code, te.Msg)
			}
			if !strings.Contains(te.Msg, c.field) {
				t.Errorf("message %q does not name %q", te.Msg, c.field)
			}
			if ports := n.vmnicPorts(t); len(ports) != 0 {
				t.Errorf("ports left: %v", ports)
			}
			if links := podLinks(t, p); len(links) != 1 {
				t.Errorf("pod links left: %v", keys(links))
			}
			if l := nodeLink(t, n, portOf(p)); l != nil {
				t.Errorf("node veth %s left", l.Attrs().Name)
			}
			if ips := n.allocated(t, "bad"); len(ips) != 0 {
				t.Errorf("addresses left allocated: %v", ips)
			}
			if recs, _, _ := stateList(t, n.Node); len(recs) != 0 {
				t.Errorf("records left: %d", len(recs))
			}
		})
	}
}

// TestBridgeGC: ports vmnic owns whose attachment is gone are removed by
// the CNI GC verb (addresses released) and at daemon start; a foreign port
// and live attachments stay.
func TestBridgeGC(t *testing.T) {
	n := newOVSNode(t)
	ctx := ctxT(t)
	l := n.bridgeList(t, "gcnet", map[string]any{"vlan": 100}, n.hostLocal("10.100.0.10", "10.100.0.50"))
	n.vsctl(t, "add-port", "br1", "foreign0", "--", "set", "interface", "foreign0", "type=internal",
		"--", "set", "port", "foreign0", "external_ids:owner=someone-else")
	g1, _ := n.addPod(t, l, "gc-1")
	g2, _ := n.addPod(t, l, "gc-2")
	g3, _ := n.addPod(t, l, "gc-3")

	// g1's record is lost and its pod gone: only the port's marks remain.
	forget := func(p *harness.Pod) {
		st, err := state.Open(filepath.Join(n.StateDir(), "attachments"))
		if err != nil {
			t.Fatal(err)
		}
		if err := st.Delete(state.Key(p.ContainerID, p.IfName)); err != nil {
			t.Fatal(err)
		}
		p.Close()
	}
	forget(g1)
	valid := []types.GCAttachment{{ContainerID: g2.ContainerID, IfName: "net1"}, {ContainerID: g3.ContainerID, IfName: "net1"}}
	if err := n.GC(ctx, l, valid); err != nil {
		t.Fatalf("GC: %v", err)
	}
	ports := n.vmnicPorts(t)
	if contains(ports, portOf(g1)) || !contains(ports, portOf(g2)) || !contains(ports, portOf(g3)) {
		t.Errorf("after GC vmnic ports are %v; want g2's and g3's only", ports)
	}
	if got := len(n.allocated(t, "gcnet")); got != 2 {
		t.Errorf("%d addresses allocated after GC, want 2 (g1's released)", got)
	}

	// g2 goes the same way while the daemon is down; its start cleans up.
	if err := n.stop(); err != nil {
		t.Fatal(err)
	}
	forget(g2)
	n.start(t)
	// The start's GC runs once the daemon is ready, beside the requests.
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if ports = n.vmnicPorts(t); !contains(ports, portOf(g2)) {
			break
		}
	}
	if contains(ports, portOf(g2)) || !contains(ports, portOf(g3)) {
		t.Errorf("after restart vmnic ports are %v; want g3's only", ports)
	}
	if out := n.vsctl(t, "list-ports", "br1"); !strings.Contains(out, "foreign0") {
		t.Errorf("foreign port removed: %s", out)
	}
	if err := n.Del(ctx, l, g3); err != nil {
		t.Fatal(err)
	}
}

// TestBridgeVMGuest boots a real guest behind a bridge-mode VM NIC: the
// guest takes the IPAM address by DHCP from vmnic (gateway, classless
// routes, DNS, MTU, host name), reaches a plain pod on the same VLAN, and the
// pod side of the NIC holds no address and no IPv6 of its own.
func TestBridgeVMGuest(t *testing.T) {
	need.NoError(t, guest.Check())
	ctx := ctxT(t)
	img, err := guest.Build(t.TempDir())
	if err != nil {
		t.Fatalf("guest image: %v", err)
	}
	n := newOVSNode(t)
	conf := map[string]any{
		"vlan": 100, "mtu": 1400,
		"dns":  map[string]any{"nameservers": []string{"10.100.0.53"}, "search": []string{"vlan100.example"}},
		"args": map[string]any{"cni": map[string]any{"vmnic": map[string]any{"name": "vm1"}}},
	}
	l := n.bridgeList(t, "vlan100", conf, n.hostLocal("10.100.0.10", "10.100.0.50"))
	peer, rp := n.addPod(t, l, "peer-1")
	vm, rv := n.addPod(t, l, "virt-launcher-vm1-x1")
	guestIP := net.ParseIP(ip4(rv))
	wantMAC := bridge.GuestMACFor(guestIP).String()
	if got := rv.Interfaces[1].Mac; rv.Interfaces[1].Name != "net1" || got != wantMAC {
		t.Errorf("result's net1 has MAC %s, want %s (the rule for %s)", got, wantMAC, guestIP)
	}

	links := podLinks(t, vm)
	br, ok := links["k6t-net1"].(*netlink.Bridge)
	if !ok {
		t.Fatalf("k6t-net1 missing: %v", keys(links))
	}
	tap, ok := links["tap1"].(*netlink.Tuntap)
	if !ok || tap.MasterIndex != br.Index || tap.Owner != 107 {
		t.Errorf("tap1: %+v, want a port of k6t-net1 owned by 107", links["tap1"])
	}
	// The veth's pod end is the port, as net1-nic; net1 itself holds the
	// guest's MAC and the MTU for KubeVirt to read, and carries nothing.
	port := links["net1-nic"]
	if port == nil || port.Attrs().MasterIndex != br.Index || port.Attrs().HardwareAddr.String() == wantMAC {
		t.Errorf("net1-nic: %+v, want a port of k6t-net1 with a MAC other than the guest's", port)
	}
	ph := links["net1"]
	if ph == nil || ph.Type() != "bridge" || ph.Attrs().HardwareAddr.String() != wantMAC || ph.Attrs().MTU != 1400 ||
		ph.Attrs().MasterIndex != 0 || ph.Attrs().Flags&net.FlagUp != 0 {
		t.Errorf("net1: %+v, want a down, port-less placeholder with the guest's MAC %s and MTU 1400", ph, wantMAC)
	}
	assertResultMACs(t, vm, rv)
	for _, name := range []string{"net1", "net1-nic"} {
		if v := sysctlIn(t, vm, "net.ipv6.conf."+name+".disable_ipv6"); v != "1" {
			t.Errorf("IPv6 on %s: disable_ipv6=%s", name, v)
		}
	}
	var podAddrs []netlink.Addr
	_ = vm.NS.Do(func(ns.NetNS) error {
		for _, l := range []netlink.Link{port, ph} {
			a, _ := netlink.AddrList(l, netlink.FAMILY_ALL)
			podAddrs = append(podAddrs, a...)
		}
		return nil
	})
	if len(podAddrs) != 0 {
		t.Errorf("net1 or net1-nic holds addresses %v", podAddrs)
	}
	if out, err := exec.Command("nsenter", "--net="+vm.NS.Path(), "nft", "list", "table", "bridge", "vmnic_net1").CombinedOutput(); err != nil || !strings.Contains(string(out), `oifname "net1-nic" drop`) {
		t.Errorf("guard table: %v\n%s", err, out)
	}
	if err := n.Check(ctx, l, vm); err != nil {
		t.Errorf("CHECK: %v", err)
	}

	script := fmt.Sprintf(`
udhcpc -i eth0 -q -f -n -t 10 -T 2 -O staticroutes -O mtu -O hostname || echo DHCP4-FAILED
echo "ADDR4 $(ip -4 -o addr show dev eth0 | awk '{print $4}' | head -1)"
ping -c 3 -W 2 %s >/dev/null 2>&1 && echo PING-OK || echo PING-FAILED
echo WAITING
sleep 60
`, ip4(rp))
	var logf func(string)
	if testing.Verbose() {
		logf = func(s string) { t.Log("guest: " + s) }
	}
	// Booted as KubeVirt's tap binding boots it, with no macAddress on
	// the VMI: the MAC of the pod interface, which is the guest's.
	di := kubevirtNICs(ctx, t, vm, testVMI("vm1", 1, vmiNIC{network: "vlan100", nad: "vlan100"}))
	if len(di) != 1 || di[0].MAC != wantMAC || di[0].Target != "tap1" || di[0].MTU != 1400 {
		t.Fatalf("KubeVirt's domain interfaces %+v: want tap1 with the guest's MAC %s and MTU 1400", di, wantMAC)
	}
	g, err := guest.Start(ctx, img, guest.Options{NetnsPath: vm.NS.Path(), Tap: di[0].Target, MAC: di[0].MAC, Script: script, Timeout: 3 * time.Minute, Log: logf})
	if err != nil {
		t.Fatalf("boot guest: %v", err)
	}
	defer g.Kill()
	m, err := g.WaitFor(ctx, regexp.MustCompile(`^(DHCP4 bound.*|DHCP4-FAILED)$`))
	if err != nil {
		t.Fatalf("guest DHCP: %v\n%s", err, g.Output())
	}
	lease := m[1]
	for _, w := range []string{"ip=" + guestIP.String(), "mask=24", "router=10.100.0.1", "mtu=1400", "dns=10.100.0.53", "hostname=vm1", "search=vlan100.example", "staticroutes=192.0.2.0/24,10.100.0.254,0.0.0.0/0,10.100.0.1"} {
		if !strings.Contains(lease, w) {
			t.Errorf("lease %q lacks %s", lease, w)
		}
	}
	if m, err = g.WaitFor(ctx, regexp.MustCompile(`^ADDR4 (.*)$`)); err != nil || m[1] != guestIP.String()+"/24" {
		t.Errorf("guest address %v (%v), want %s/24", m, err, guestIP)
	}
	if m, err = g.WaitFor(ctx, regexp.MustCompile(`^PING-(OK|FAILED)$`)); err != nil || m[1] != "OK" {
		t.Errorf("guest ping of the peer pod %s on VLAN 100: %v %v", ip4(rp), m, err)
	}
	if _, err := g.WaitFor(ctx, regexp.MustCompile(`^WAITING$`)); err != nil {
		t.Fatal(err)
	}
	if err := pingFrom(peer, guestIP.String()); err != nil {
		t.Errorf("peer pod cannot reach the guest: %v", err)
	}
	g.Kill()

	if err := n.Del(ctx, l, vm); err != nil {
		t.Fatal(err)
	}
	if left := podLinks(t, vm); len(left) != 1 {
		t.Errorf("links left in the VM pod after DEL: %v", keys(left))
	}
	if out, err := exec.Command("nsenter", "--net="+vm.NS.Path(), "nft", "list", "tables").CombinedOutput(); err != nil || strings.Contains(string(out), "vmnic") {
		t.Errorf("tables left after DEL: %v %s", err, out)
	}
	if err := n.Del(ctx, l, peer); err != nil {
		t.Fatal(err)
	}
}

// TestBridgeMultiNIC: a VM pod with the masquerade pod network and two OVS
// networks gets three independent NICs; a real guest with three NICs takes
// each address by DHCP and reaches each network through the right NIC;
// DEL of one NIC leaves the others wired.
func TestBridgeMultiNIC(t *testing.T) {
	need.NoError(t, guest.Check())
	ctx := ctxT(t)
	img, err := guest.Build(t.TempDir())
	if err != nil {
		t.Fatalf("guest image: %v", err)
	}
	n := newOVSNode(t)
	const mac0 = "02:00:00:00:aa:01"
	podNet := list(t, n.Node, harness.NetOptions{Vmnic: true, Subnet6: "-", VM: map[string]any{"name": "mn", "mac": mac0}})
	blue := n.bridgeList(t, "blue", map[string]any{"vlan": 100}, n.hostLocalOn("10.100.0.0/24", "10.100.0.1", "10.100.0.10", "10.100.0.50"))
	green := n.bridgeList(t, "green", map[string]any{"vlan": 200}, n.hostLocalOn("10.200.0.0/24", "10.200.0.1", "10.200.0.10", "10.200.0.50"))
	_, rBlue := n.addPod(t, blue, "blue-peer")
	_, rGreen := n.addPod(t, green, "green-peer")

	vm := newPod(t, "virt-launcher-mn-x9")
	if _, err := n.Add(ctx, podNet, vm); err != nil {
		t.Fatalf("ADD eth0: %v", err)
	}
	var nics []*current.Result
	for i, l := range []*libcni.NetworkConfigList{blue, green} {
		vm.IfName = fmt.Sprintf("net%d", i+1)
		res, err := n.Add(ctx, l, vm)
		if err != nil {
			t.Fatalf("ADD %s: %v", vm.IfName, err)
		}
		r, _ := current.NewResultFromResult(res)
		nics = append(nics, r)
	}
	links := podLinks(t, vm)
	for _, name := range []string{"k6t-eth0", "tap0", "k6t-net1", "tap1", "net1", "net1-nic", "k6t-net2", "tap2", "net2", "net2-nic"} {
		if links[name] == nil {
			t.Errorf("%s missing in the VM pod (links: %v)", name, keys(links))
		}
	}
	di := kubevirtNICs(ctx, t, vm, testVMI("mn", 1,
		vmiNIC{network: "default", mac: mac0}, vmiNIC{network: "blue", nad: "blue"}, vmiNIC{network: "green", nad: "green"}))
	if len(di) != 3 || di[0].MAC != mac0 || di[1].MAC != nics[0].Interfaces[1].Mac || di[2].MAC != nics[1].Interfaces[1].Mac {
		t.Fatalf("KubeVirt's domain interfaces %+v: want eth0 with %s and net1, net2 with the MACs of their results", di, mac0)
	}
	first, more := bootNICs(di)
	script := fmt.Sprintf(`
ip link set eth1 up; ip link set eth2 up
udhcpc -i eth1 -q -f -n -t 10 -T 2 -O mtu || echo DHCP4-FAILED
udhcpc -i eth2 -q -f -n -t 10 -T 2 -O mtu || echo DHCP4-FAILED
# eth0 last: its default route (the pod network) replaces the others'.
udhcpc -i eth0 -q -f -n -t 10 -T 2 || echo DHCP4-FAILED
for i in eth0 eth1 eth2; do echo "ADDR $i $(ip -4 -o addr show dev $i | awk '{print $4}' | head -1)"; done
ping -c 2 -W 2 198.18.0.1 >/dev/null 2>&1 && echo PING0-OK || echo PING0-FAILED
ping -c 2 -W 2 %[1]s >/dev/null 2>&1 && echo PING1-OK || echo PING1-FAILED
ping -c 2 -W 2 %[2]s >/dev/null 2>&1 && echo PING2-OK || echo PING2-FAILED
echo "NEIGH1 $(ip neigh show dev eth1 | awk '{print $1}' | tr '\n' ' ')"
echo "NEIGH2 $(ip neigh show dev eth2 | awk '{print $1}' | tr '\n' ' ')"
`, ip4(rBlue), ip4(rGreen))
	var logf func(string)
	if testing.Verbose() {
		logf = func(s string) { t.Log("guest: " + s) }
	}
	g, err := guest.Start(ctx, img, guest.Options{
		NetnsPath: vm.NS.Path(), Tap: first.Tap, MAC: first.MAC, Queues: first.Queues,
		More: more, Script: script, Timeout: 3 * time.Minute, Log: logf,
	})
	if err != nil {
		t.Fatalf("boot guest: %v", err)
	}
	defer g.Kill()
	want := map[string]string{"eth0": "10.0.2.2/24", "eth1": ip4(nics[0]) + "/24", "eth2": ip4(nics[1]) + "/24"}
	for range 3 {
		m, err := g.WaitFor(ctx, regexp.MustCompile(`^ADDR (eth\d) (.*)$`))
		if err != nil {
			t.Fatalf("guest: %v\n%s", err, g.Output())
		}
		if want[m[1]] != m[2] {
			t.Errorf("guest %s has %q, want %s", m[1], m[2], want[m[1]])
		}
	}
	for i, what := range []string{"the node through masquerade", "the blue peer on VLAN 100", "the green peer on VLAN 200"} {
		m, err := g.WaitFor(ctx, regexp.MustCompile(fmt.Sprintf(`^PING%d-(OK|FAILED)$`, i)))
		if err != nil || m[1] != "OK" {
			t.Errorf("guest cannot reach %s: %v %v", what, m, err)
		}
	}
	for i, peer := range []string{ip4(rBlue), ip4(rGreen)} {
		m, err := g.WaitFor(ctx, regexp.MustCompile(fmt.Sprintf(`^NEIGH%d (.*)$`, i+1)))
		if err != nil || !strings.Contains(m[1], peer) {
			t.Errorf("eth%d neighbours %v, want %s there (the right NIC): %v", i+1, m, peer, err)
		}
	}
	g.Kill()

	// DEL of net1 leaves eth0 and net2 as they are.
	vm.IfName = "net1"
	if err := n.Del(ctx, blue, vm); err != nil {
		t.Fatal(err)
	}
	links = podLinks(t, vm)
	for _, name := range []string{"k6t-net1", "tap1", "net1", "net1-nic"} {
		if links[name] != nil {
			t.Errorf("%s left after DEL of net1", name)
		}
	}
	vm.IfName = "net2"
	if err := n.Check(ctx, green, vm); err != nil {
		t.Errorf("net2 after DEL of net1: %v", err)
	}
	vm.IfName = "eth0"
	if err := n.Check(ctx, podNet, vm); err != nil {
		t.Errorf("eth0 after DEL of net1: %v", err)
	}
	for _, c := range []struct {
		l     *libcni.NetworkConfigList
		iface string
	}{{green, "net2"}, {podNet, "eth0"}} {
		vm.IfName = c.iface
		if err := n.Del(ctx, c.l, vm); err != nil {
			t.Fatal(err)
		}
	}
}

// TestBridgeKubeVirtNames boots real guests as KubeVirt's tap binding boots
// them on bridge-mode NICs under each pod interface name KubeVirt gives:
// eth0 (the VMI's pod network, tap0), net1 (a Multus network, ordinal
// name) and pod<hash> (another, hashed name), once with macAddress on
// every VMI interface and once with none. The tap, MAC and MTU each guest
// NIC gets are what KubeVirt's own code derives from the pod netns; the
// guest takes each NIC's address by DHCP, reaches a peer on each VLAN
// through the right NIC, and each peer reaches it back.
func TestBridgeKubeVirtNames(t *testing.T) {
	need.NoError(t, guest.Check())
	img, err := guest.Build(t.TempDir())
	if err != nil {
		t.Fatalf("guest image: %v", err)
	}
	n := newOVSNode(t)
	green := kubevirt.HashedIfName("green")
	type nicCase struct {
		podIf, network, nad string
		vlan                int
		subnet              string // /24 prefix, e.g. "10.101.0"
	}
	nics := []nicCase{
		{"eth0", "default", "", 101, "10.101.0"},
		{"net1", "blue", "blue", 102, "10.102.0"},
		{green, "green", "green", 103, "10.103.0"},
	}
	lists := map[string]*libcni.NetworkConfigList{}
	peers := map[string]string{}
	peerPods := map[string]*harness.Pod{}
	for _, c := range nics {
		l := n.bridgeList(t, fmt.Sprintf("vlan%d", c.vlan), map[string]any{"vlan": c.vlan},
			n.hostLocalOn(c.subnet+".0/24", c.subnet+".1", c.subnet+".10", c.subnet+".50"))
		lists[c.podIf] = l
		pp, rp := n.addPod(t, l, fmt.Sprintf("peer-%d", c.vlan))
		peers[c.podIf], peerPods[c.podIf] = ip4(rp), pp
	}
	for _, withMAC := range []bool{true, false} {
		name := "macAddress"
		if !withMAC {
			name = "no-macAddress"
		}
		t.Run(name, func(t *testing.T) {
			ctx := ctxT(t)
			vm := newPod(t, "virt-launcher-names-"+name)
			var vmiNICs []vmiNIC
			want := map[string]string{} // pod interface -> its address
			for i, c := range nics {
				mac := ""
				if withMAC {
					mac = fmt.Sprintf("02:00:00:00:bb:%02x", i+1)
				}
				vmiNICs = append(vmiNICs, vmiNIC{network: c.network, nad: c.nad, mac: mac})
				l := lists[c.podIf]
				if mac != "" {
					// The standalone daemon's VM facts: the VMI's MAC.
					l = n.bridgeList(t, fmt.Sprintf("vlan%d", c.vlan), map[string]any{
						"vlan": c.vlan,
						"args": map[string]any{"cni": map[string]any{"vmnic": map[string]any{"mac": mac}}},
					},
						n.hostLocalOn(c.subnet+".0/24", c.subnet+".1", c.subnet+".10", c.subnet+".50"))
				}
				vm.IfName = c.podIf
				res, err := n.Add(ctx, l, vm)
				if err != nil {
					t.Fatalf("ADD %s: %v", c.podIf, err)
				}
				r, _ := current.NewResultFromResult(res)
				assertResultMACs(t, vm, r)
				want[c.podIf] = ip4(r)
				t.Cleanup(func() {
					vm.IfName = c.podIf
					_ = n.Del(context.Background(), l, vm)
				})
			}
			di := kubevirtNICs(ctx, t, vm, testVMI("names", 1, vmiNICs...))
			if len(di) != len(nics) {
				t.Fatalf("KubeVirt's domain interfaces %+v, want %d", di, len(nics))
			}
			wantTaps := []string{"tap0", "tap1", "tap" + green[3:]}
			for i, c := range nics {
				if di[i].PodInterface != c.podIf || di[i].Target != wantTaps[i] || di[i].MTU == 0 {
					t.Errorf("KubeVirt's domain interface %d: %+v, want pod interface %s on %s", i, di[i], c.podIf, wantTaps[i])
				}
				if withMAC && di[i].MAC != vmiNICs[i].mac {
					t.Errorf("%s: KubeVirt gives MAC %s, want the VMI's %s", c.podIf, di[i].MAC, vmiNICs[i].mac)
				}
				if !withMAC && di[i].MAC != bridge.GuestMACFor(net.ParseIP(want[c.podIf])).String() {
					t.Errorf("%s: KubeVirt gives MAC %s, want vmnic's rule for %s", c.podIf, di[i].MAC, want[c.podIf])
				}
			}
			first, more := bootNICs(di)
			script := `ip link set eth1 up; ip link set eth2 up
for i in eth1 eth2 eth0; do udhcpc -i $i -q -f -n -t 10 -T 2 || echo "DHCP4-FAILED $i"; done
for i in eth0 eth1 eth2; do echo "ADDR $i $(ip -4 -o addr show dev $i | awk '{print $4}' | head -1)"; done
`
			for i, c := range nics {
				script += fmt.Sprintf("ping -c 2 -W 2 -I eth%d %s >/dev/null 2>&1 && echo PING%d-OK || echo PING%d-FAILED\n", i, peers[c.podIf], i, i)
			}
			script += "echo WAITING\nsleep 60\n"
			var logf func(string)
			if testing.Verbose() {
				logf = func(s string) { t.Log("guest: " + s) }
			}
			g, err := guest.Start(ctx, img, guest.Options{
				NetnsPath: vm.NS.Path(), Tap: first.Tap, MAC: first.MAC, Queues: first.Queues,
				More: more, Script: script, Timeout: 3 * time.Minute, Log: logf,
			})
			if err != nil {
				t.Fatalf("boot guest: %v", err)
			}
			defer g.Kill()
			for range nics {
				m, err := g.WaitFor(ctx, regexp.MustCompile(`^ADDR (eth\d) (.*)$`))
				if err != nil {
					t.Fatalf("guest: %v\n%s", err, g.Output())
				}
				i := int(m[1][3] - '0')
				if w := want[nics[i].podIf] + "/24"; m[2] != w {
					t.Errorf("guest %s (on %s) has %q, want %s", m[1], nics[i].podIf, m[2], w)
				}
			}
			for i, c := range nics {
				m, err := g.WaitFor(ctx, regexp.MustCompile(fmt.Sprintf(`^PING%d-(OK|FAILED)$`, i)))
				if err != nil || m[1] != "OK" {
					t.Errorf("guest cannot reach the VLAN %d peer through %s: %v %v", c.vlan, c.podIf, m, err)
				}
			}
			if _, err := g.WaitFor(ctx, regexp.MustCompile(`^WAITING$`)); err != nil {
				t.Fatal(err)
			}
			for _, c := range nics {
				if err := pingFrom(peerPods[c.podIf], want[c.podIf]); err != nil {
					t.Errorf("the VLAN %d peer cannot reach the guest's %s: %v", c.vlan, c.podIf, err)
				}
			}
		})
	}
}
