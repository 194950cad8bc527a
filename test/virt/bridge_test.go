package virt_test

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/vmnic/vmnic/pkg/kubevirt"
	"github.com/vmnic/vmnic/test/cluster"
	"github.com/vmnic/vmnic/test/node"
	"github.com/vmnic/vmnic/test/ovs"
	"github.com/vmnic/vmnic/test/spiderpool"
	"github.com/vmnic/vmnic/test/virt"
)

// The secondary networks: two Multus networks in vmnic's bridge mode, each
// on an OVS bridge of its own on every node, the nodes' bridges joined by
// a veth pair (the network's uplink), with a Spiderpool pool each.
var secondaries = []struct {
	nad, bridge, subnet, ips string
}{
	{"blue", "br1", "198.51.100.0/24", "198.51.100.10-198.51.100.29"},
	{"green", "br2", "203.0.113.0/24", "203.0.113.10-203.0.113.29"},
}

// spiderpoolSocket is the agent's socket where a node names it: Spiderpool's
// default, the chart's spiderpool.socketDir (a node container binds its
// SpiderpoolSocketDir there).
const spiderpoolSocket = "/var/run/spidernet/spiderpool.sock"

// secondary gives both nodes what the bridge and passt modes need, as a
// platform team runs them: OVS with the bridges and their uplinks, a
// Spiderpool agent with its IPAM plugin, the macvlan plugin and its parent,
// Multus thick, the pools and the NetworkAttachmentDefinitions.
// It runs before vmnic's install, as Multus must: vmnicd chains into the
// primary CNI's conflist, the one Multus delegates to.
func (e *env) secondary(t testing.TB) {
	ctx := t.Context()
	plugins, err := cluster.Binaries(ctx, spiderpool.PluginName, "macvlan")
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range []*node.Node{e.a, e.b} {
		nodeNS, err := ns.GetNS(n.NetNS)
		if err != nil {
			t.Fatal(err)
		}
		o, err := ovs.Start(n.OVSRunDir(), ovs.WithNetNS(nodeNS))
		_ = nodeNS.Close()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if t.Failed() {
				t.Logf("OVS on %s:\n%s", n.Name, o.Logs(20))
			}
			_ = o.Stop()
		})
		for _, s := range secondaries {
			if err := o.AddBridge(s.bridge); err != nil {
				t.Fatal(err)
			}
		}
		e.ovs = append(e.ovs, o)
		for _, p := range plugins {
			if err := n.AddCNIPlugin(p); err != nil {
				t.Fatal(err)
			}
		}
		agent, err := spiderpool.StartAgent(ctx, n.Cluster, n.SpiderpoolSocketDir(), spiderpool.AgentOptions{
			Launcher: n.Launcher(), NodeName: n.Name, Namespace: "kube-system", PodName: "spiderpool-agent-" + n.Name,
			MultusClusterNetwork: "kube-system/multus-cni-network", KubeVirtInstalled: true,
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if t.Failed() {
				t.Logf("spiderpool-agent on %s:\n%s", n.Name, agent.LogTail(30))
			}
			agent.Stop()
		})
	}
	// Each network's uplink: a veth pair from node-1's namespace to
	// node-2's, a port of the network's bridge on each side.
	for i, s := range secondaries {
		up := fmt.Sprintf("up-%s", s.nad)
		if err := node.Link(e.a, e.b, up); err != nil {
			t.Fatal(err)
		}
		for j, n := range []*node.Node{e.a, e.b} {
			if out, err := e.ovs[j].Vsctl("add-port", secondaries[i].bridge, up); err != nil {
				t.Fatalf("%s: add %s to %s: %v: %s", n.Name, up, s.bridge, err, out)
			}
		}
	}
	// The passt underlay's cable: each node's macvlan parent.
	if err := node.Link(e.a, e.b, passtUplink); err != nil {
		t.Fatal(err)
	}
	if err := e.a.InstallMultus(ctx, e.b); err != nil {
		t.Fatal(err)
	}
	for _, s := range secondaries {
		e.network(t, s.nad, s.subnet, s.ips, "", map[string]any{"type": "vmnic", "mode": "bridge", "bridge": s.bridge})
	}
	// The passt network: macvlan with Spiderpool's IPAM, vmnic chained
	// after it in passt mode, written without Spiderpool's coordinator
	// (the Examples subtest runs deploy/examples/passt-macvlan's, which
	// spiderpool-controller makes with it). passt takes the guest's
	// default gateway from the pod's default route: the pool has one.
	e.network(t, passtNAD, passtSubnet, passtIPs, passtGateway,
		map[string]any{"type": "macvlan", "master": passtUplink, "mode": "bridge"},
		map[string]any{"type": "vmnic", "mode": "passt"})
}

// network applies a Spiderpool pool (with the gateway, if any) and a
// NetworkAttachmentDefinition of the same name: plugins with Spiderpool's
// IPAM on the first, which takes its addresses from the pool.
func (e *env) network(t testing.TB, name, subnet, ips, gateway string, plugins ...map[string]any) {
	plugins[0]["ipam"] = map[string]any{
		"type":                  spiderpool.PluginName,
		"ipam_unix_socket_path": spiderpoolSocket,
		"log_file_path":         filepath.Join(filepath.Dir(spiderpoolSocket), "ipam-plugin.log"),
		"default_ipv4_ippool":   []string{name},
	}
	conf, err := json.Marshal(map[string]any{"cniVersion": "1.0.0", "name": name, "plugins": plugins})
	if err != nil {
		t.Fatal(err)
	}
	gw := ""
	if gateway != "" {
		gw = ", gateway: " + gateway
	}
	manifest := fmt.Sprintf(`apiVersion: spiderpool.spidernet.io/v2beta1
kind: SpiderIPPool
metadata: {name: %s}
spec: {ipVersion: 4, subnet: %s, ips: [%q]%s}
---
apiVersion: k8s.cni.cncf.io/v1
kind: NetworkAttachmentDefinition
metadata: {name: %s, namespace: default}
spec: {config: %q}
`, name, subnet, ips, gw, name, conf)
	if err := e.a.Cluster.Apply(t.Context(), []byte(manifest)); err != nil {
		t.Fatal(err)
	}
}

// bridgeVMI is a VMI preferring node n, with vmnic's masquerade on the pod network
// and a NIC on each secondary network in vmnic's bridge mode; the first
// (blue) has the MAC mac, the second none.
func (e *env) bridgeVMI(name string, n *node.Node, mac, kernelArgs string) *kubevirtv1.VirtualMachineInstance {
	vmi := virt.VMI(name, e.guest, kubevirtv1.Interface{Binding: &kubevirtv1.PluginBinding{Name: kubevirt.DefaultBinding}}, kernelArgs)
	virt.PreferNode(vmi, n.Name)
	for i, s := range secondaries {
		vmi.Spec.Networks = append(vmi.Spec.Networks, kubevirtv1.Network{Name: s.nad, NetworkSource: kubevirtv1.NetworkSource{Multus: &kubevirtv1.MultusNetwork{NetworkName: s.nad}}})
		iface := kubevirtv1.Interface{Name: s.nad, Binding: &kubevirtv1.PluginBinding{Name: kubevirt.DefaultBinding}}
		if i == 0 {
			iface.MacAddress = mac
		}
		vmi.Spec.Domain.Devices.Interfaces = append(vmi.Spec.Domain.Devices.Interfaces, iface)
	}
	return vmi
}

// nic is one secondary NIC of a running VM, as Multus, KubeVirt and the
// guest report it.
type nic struct {
	ip, mac string
}

// bridgeNICs starts vmi on node on, waits for it to run and for its guest to take an
// address on each NIC, and checks that Multus' network-status, the VMI's
// status and the guest agree on each secondary NIC's IP and MAC, and that
// a NIC with a macAddress has it. It returns the NICs in the order of
// secondaries.
func (e *env) bridgeNICs(t testing.TB, vmi *kubevirtv1.VirtualMachineInstance, on *node.Node) (*kubevirtv1.VirtualMachineInstance, []nic) {
	ctx := t.Context()
	running := e.run(t, vmi, on)
	launcher, err := virt.LauncherPod(ctx, e.a, running)
	if err != nil {
		t.Fatal(err)
	}
	status, err := virt.NetworkStatus(launcher)
	if err != nil {
		t.Fatal(err)
	}
	// The guest numbers its NICs in the VMI's order: eth0 on the pod
	// network, then one per secondary network.
	last := fmt.Sprintf("eth%d", len(secondaries))
	if _, err := virt.WaitConsole(ctx, e.a, running, regexp.MustCompile(`^MAC `+last+` `), 3*time.Minute); err != nil {
		t.Fatal(err)
	}
	console, err := virt.Console(ctx, e.a, running)
	if err != nil {
		t.Fatal(err)
	}
	// KubeVirt fills the status' interfaces as virt-handler learns them.
	if running, err = virt.GetVMI(ctx, e.a, running.Namespace, running.Name); err != nil {
		t.Fatal(err)
	}
	var nics []nic
	for i, s := range secondaries {
		podIf := kubevirt.HashedIfName(s.nad)
		var got *virt.NetworkStatusEntry
		for j := range status {
			if status[j].Name == "default/"+s.nad && status[j].Interface == podIf {
				got = &status[j]
			}
		}
		if got == nil || len(got.IPs) != 1 || got.MAC == "" {
			t.Fatalf("%s: Multus' network-status %+v has no default/%s on %s with one IP and a MAC", vmi.Name, status, s.nad, podIf)
		}
		n := nic{ip: got.IPs[0], mac: strings.ToLower(got.MAC)}
		nics = append(nics, n)
		t.Logf("%s: Multus reports %s on %s, MAC %s", vmi.Name, n.ip, podIf, n.mac)
		if want := strings.ToLower(vmi.Spec.Domain.Devices.Interfaces[1+i].MacAddress); want != "" && n.mac != want {
			t.Errorf("%s: network-status MAC %s on %s, want the VMI's macAddress %s", vmi.Name, n.mac, s.nad, want)
		}
		dev := fmt.Sprintf("eth%d", 1+i)
		if want := fmt.Sprintf("ADDR4 %s %s/24", dev, n.ip); !strings.Contains(console, want+"\n") {
			t.Errorf("%s: the guest's %s did not take %s/24 by DHCP (want %q):\n%s", vmi.Name, dev, n.ip, want, console)
		}
		if want := fmt.Sprintf("MAC %s %s", dev, n.mac); !strings.Contains(console, want+"\n") {
			t.Errorf("%s: the guest's %s has not the MAC %s:\n%s", vmi.Name, dev, n.mac, console)
		}
		var vi *kubevirtv1.VirtualMachineInstanceNetworkInterface
		for j := range running.Status.Interfaces {
			if running.Status.Interfaces[j].Name == s.nad {
				vi = &running.Status.Interfaces[j]
			}
		}
		if vi == nil {
			t.Errorf("%s: the VMI's status lists no interface %s: %+v", vmi.Name, s.nad, running.Status.Interfaces)
			continue
		}
		t.Logf("%s: the VMI's status for %s: %+v", vmi.Name, s.nad, *vi)
		if strings.ToLower(vi.MAC) != n.mac {
			t.Errorf("%s: the VMI's status gives %s the MAC %s, Multus %s", vmi.Name, s.nad, vi.MAC, n.mac)
		}
		if vi.PodInterfaceName != podIf {
			t.Errorf("%s: the VMI's status gives %s the pod interface %s, want %s", vmi.Name, s.nad, vi.PodInterfaceName, podIf)
		}
		// KubeVirt learns a guest's IPs from its guest agent, which
		// this guest has not: the status lists none, or Multus' one.
		for _, ip := range vi.IPs {
			if ip != n.ip {
				t.Errorf("%s: the VMI's status gives %s the IPs %v, Multus %s", vmi.Name, s.nad, vi.IPs, n.ip)
			}
		}
	}
	return running, nics
}

// bridge: two VMs, one on each node, each with two NICs in vmnic's bridge
// mode on OVS with Spiderpool's IPAM, the first NIC with a macAddress and
// the second without. IPs and MACs agree between Multus, the VMI's status
// and the guest, and the guest on node-1 reaches the guest on node-2 over
// each NIC.
func (e *env) bridge(t testing.TB) {
	_, b := e.bridgeNICs(t, e.bridgeVMI("br-b", e.b, "02:00:00:00:0b:01", ""), e.b)
	if t.Failed() {
		return
	}
	peers := make([]string, len(b))
	for i, n := range b {
		peers[i] = n.ip
	}
	vmi, a := e.bridgeNICs(t, e.bridgeVMI("br-a", e.a, "02:00:00:00:0a:01", "vmnic.peers="+strings.Join(peers, ",")), e.a)
	for _, ip := range peers {
		m, err := virt.WaitConsole(t.Context(), e.a, vmi, regexp.MustCompile(`^PEER-(OK|FAILED) `+regexp.QuoteMeta(ip)+`$`), 2*time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		if m[1] != "OK" {
			t.Errorf("the guest on %s does not reach the guest on %s at %s", e.a.Name, e.b.Name, ip)
		}
	}
	if t.Failed() {
		return
	}
	// The probe of its migrations pings from node-2's side of the blue
	// network: an OVS internal port there with an address of its own.
	if out, err := e.ovs[1].Vsctl("add-port", secondaries[0].bridge, "probe", "--", "set", "interface", "probe", "type=internal"); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	for _, args := range [][]string{{"addr", "add", bridgeProbeIP + "/24", "dev", "probe"}, {"link", "set", "probe", "up"}} {
		if _, err := e.b.InNode("ip", args...); err != nil {
			t.Fatal(err)
		}
	}
	if out, err := e.b.InNode("ping", "-c", "2", "-W", "2", a[0].ip); err != nil {
		t.Fatalf("from node-2's probe port, the guest on %s (%s) does not answer: %v\n%s", e.a.Name, a[0].ip, err, out)
	}
	e.migrants = append(e.migrants, &migrant{mode: "Bridge", vmi: vmi, pingFrom: e.b.NetNS, pingIP: a[0].ip, gapNetwork: secondaries[0].nad})
}

// bridgeProbeIP is the address of the probe's port on the blue network.
const bridgeProbeIP = "198.51.100.250"
