package virt_test

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/vmnic/vmnic/pkg/kubevirt"
	"github.com/vmnic/vmnic/test/cluster"
	"github.com/vmnic/vmnic/test/node"
	"github.com/vmnic/vmnic/test/proc"
	"github.com/vmnic/vmnic/test/spiderpool"
	"github.com/vmnic/vmnic/test/virt"
)

// exampleProbes are the addresses node-2 takes on br1's VLANs to reach the
// examples' guests: an OVS internal port per VLAN, its address the pool's
// gateway (bridge-ovs) or the subnet's first (multi-nic).
var exampleProbes = []struct {
	port string
	vlan int
	addr string
}{
	{"ex100", 100, "10.100.0.1/24"},
	{"ex110", 110, "10.110.0.1/24"},
	{"ex120", 120, "10.120.0.1/24"},
}

// exampleUnderlay is each node's address on passt-macvlan's underlay
// (node-2's the example pool's gateway): a macvlan's pod cannot reach its
// own node's parent link, so the VM is reached from the other node.
var exampleUnderlay = map[string]string{"node-1": "172.16.10.2", "node-2": "172.16.10.1"}

// examples applies the examples of deploy/examples that run on Flannel
// with Multus and OVS as shipped (`kubectl apply -f DIR`: every file, in
// lexical order) and checks each VM KubeVirt runs from them:
//
//   - masquerade-flannel: the guest takes 10.0.2.2 by DHCP, a pod on
//     node-2 reaches it through the VM pod's address and it reaches that
//     pod;
//   - bridge-ovs: the real spiderpool-controller (as its chart deploys
//     it) makes the NetworkAttachmentDefinition of its SpiderMultusConfig;
//     the guest takes the address Multus reports, from the example's pool,
//     by DHCP on br1's VLAN 100, where node-2 reaches it (and it node-2),
//     over the bridges' uplink when it runs on node-1;
//   - multi-nic: masquerade on eth0 and a NIC on each of VLANs 110 and
//     120, each with the address of the pool the VM's
//     ipam.spidernet.io/ippools annotation names for its hashed pod
//     interface, reached from node-2 on its VLAN;
//   - passt-macvlan: the controller makes the NAD of its
//     SpiderMultusConfig (macvlan on eth1, vmnic in passt mode); the VM
//     pod's default network is that underlay, its guest takes the pod's
//     address by DHCP from passt, and the other node on the underlay
//     reaches it (and it that node).
//
// The guest is the containerDisk the examples name, built here
// (virt.BuildDiskImage).
func (e *env) examples(t *testing.T) {
	ctx := t.Context()
	root, err := cluster.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	dirs := []string{"masquerade-flannel", "bridge-ovs", "multi-nic", "passt-macvlan"}
	vms := map[string]*kubevirtv1.VirtualMachine{}
	var disk *virt.DiskImage
	for _, dir := range dirs {
		vm, err := virt.ExampleVM(filepath.Join(root, "deploy", "examples", dir, "vm.yaml"))
		if err != nil {
			t.Fatal(err)
		}
		vms[dir] = vm
		ref := vm.Spec.Template.Spec.Volumes[0].ContainerDisk.Image
		if disk == nil {
			if disk, err = virt.BuildDiskImage(ctx, ref, virt.ExampleGuestScript); err != nil {
				t.Fatal(err)
			}
		} else if ref != disk.Ref {
			t.Fatalf("%s's VM boots %s, the others %s", dir, ref, disk.Ref)
		}
	}
	for _, n := range []*node.Node{e.a, e.b} {
		if err := n.ImportImage(disk.Archive); err != nil {
			t.Fatal(err)
		}
	}
	spiderpool.StartControllerT(t, e.a.Cluster, spiderpool.ControllerOptions{
		Launcher: e.a.Launcher(), Address: e.a.IP, Dial: proc.NetnsDialer(e.a.NetNS), CNIConfDir: e.a.CNIConfDir,
	})
	// passt-macvlan's underlay: a cable between the nodes named as the
	// example names the macvlan's master, each node on it.
	if err := node.Link(e.a, e.b, "eth1"); err != nil {
		t.Fatal(err)
	}
	for _, n := range []*node.Node{e.a, e.b} {
		if _, err := n.InNode("ip", "addr", "add", exampleUnderlay[n.Name]+"/24", "dev", "eth1"); err != nil {
			t.Fatal(err)
		}
	}
	for _, p := range exampleProbes {
		if out, err := e.ovs[1].Vsctl("add-port", "br1", p.port, fmt.Sprintf("tag=%d", p.vlan), "--", "set", "interface", p.port, "type=internal"); err != nil {
			t.Fatalf("%v: %s", err, out)
		}
		for _, args := range [][]string{{"addr", "add", p.addr, "dev", p.port}, {"link", "set", p.port, "up"}} {
			if _, err := e.b.InNode("ip", args...); err != nil {
				t.Fatal(err)
			}
		}
	}
	peer := node.PlainPod("ex-peer")
	peer.Spec.NodeName = e.b.Name
	if _, err := e.a.Kube.CoreV1().Pods("default").Create(ctx, peer, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if peer, err = e.b.WaitPodReady(ctx, "default", peer.Name, time.Minute); err != nil {
		t.Fatal(err)
	}
	peerNetns, err := e.b.PodNetns("default", peer.Name)
	if err != nil {
		t.Fatal(err)
	}
	for _, dir := range dirs {
		files, err := filepath.Glob(filepath.Join(root, "deploy", "examples", dir, "*.yaml"))
		if err != nil {
			t.Fatal(err)
		}
		sort.Strings(files)
		for _, f := range files {
			data, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			if err := e.a.Cluster.Apply(ctx, data); err != nil {
				t.Fatalf("apply %s/%s: %v", dir, filepath.Base(f), err)
			}
		}
	}

	// guest is a running example VM: its launcher pod and serial console.
	type guest struct {
		vmi     *kubevirtv1.VirtualMachineInstance
		pod     *corev1.Pod
		console string
	}
	// run waits for the example's VM and for its guest to serve.
	run := func(t *testing.T, dir string) *guest {
		start := time.Now()
		vmi, err := virt.WaitVMIRunning(ctx, e.a, "default", vms[dir].Name, 5*time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("VMI %s Running on %s %v after the examples were applied", vmi.Name, vmi.Status.NodeName, time.Since(start).Round(time.Millisecond))
		pod, err := virt.LauncherPod(ctx, e.a, vmi)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := virt.WaitConsole(ctx, e.a, vmi, regexp.MustCompile(`^SERVING`), 3*time.Minute); err != nil {
			t.Fatal(err)
		}
		console, err := virt.Console(ctx, e.a, vmi)
		if err != nil {
			t.Fatal(err)
		}
		return &guest{vmi: vmi, pod: pod, console: console}
	}
	// addr is the guest's address on dev, from its console.
	addr := func(t *testing.T, g *guest, dev string) string {
		m := regexp.MustCompile(`(?m)^ADDR4 ` + dev + ` ?(\S*)$`).FindStringSubmatch(g.console)
		if m == nil {
			t.Fatalf("%s: no ADDR4 line for %s on the console:\n%s", g.vmi.Name, dev, g.console)
		}
		return m[1]
	}
	// get asks the guest at ip for path from the network namespace netns.
	get := func(t *testing.T, netns, ip, path string) string {
		page, err := proc.HTTPGet(ctx, proc.NetnsDialer(netns), net.JoinHostPort(ip, "80")+path)
		if err != nil {
			return err.Error()
		}
		return page
	}
	// secondary checks a NIC on a Multus network: Multus reports an address
	// of pool for it on its hashed pod interface, the guest's dev has it,
	// and node-2 reaches the guest there (and the guest node-2's probe
	// address on the VLAN, probe).
	secondary := func(t *testing.T, g *guest, network, nad, pool, dev, probe string) {
		status, err := virt.NetworkStatus(g.pod)
		if err != nil {
			t.Fatal(err)
		}
		podIf := kubevirt.HashedIfName(network)
		var ip string
		for _, s := range status {
			if s.Name == "default/"+nad && s.Interface == podIf && len(s.IPs) == 1 {
				ip = s.IPs[0]
			}
		}
		_, subnet, _ := net.ParseCIDR(probe)
		if ip == "" || !subnet.Contains(net.ParseIP(ip)) {
			t.Fatalf("%s: Multus' network-status %+v has no address in %s for default/%s on %s", g.vmi.Name, status, subnet, nad, podIf)
		}
		if got := addr(t, g, dev); got != ip+"/24" {
			t.Errorf("%s: the guest's %s took %q by DHCP, want %s/24 (pool %s)", g.vmi.Name, dev, got, ip, pool)
		}
		if got := get(t, e.b.NetNS, ip, ""); got != "guest 80" {
			t.Errorf("%s: from node-2 on %s, the guest at %s answered %q", g.vmi.Name, nad, ip, got)
		}
		probeIP, _, _ := strings.Cut(probe, "/")
		if got := get(t, e.b.NetNS, ip, "/cgi-bin/ping?"+probeIP); got != "OK" {
			t.Errorf("%s: the guest does not reach node-2 at %s on %s: %q", g.vmi.Name, probeIP, nad, got)
		}
	}
	// masquerade checks eth0 in vmnic's masquerade mode on Flannel.
	masquerade := func(t *testing.T, g *guest) {
		if got := addr(t, g, "eth0"); got != "10.0.2.2/24" {
			t.Errorf("%s: the guest's eth0 took %q by DHCP, want 10.0.2.2/24 from vmnic", g.vmi.Name, got)
		}
		if got := get(t, peerNetns, g.pod.Status.PodIP, ""); got != "guest 80" {
			t.Errorf("%s: from a pod on node-2, the VM pod %s answered %q", g.vmi.Name, g.pod.Status.PodIP, got)
		}
		if got := get(t, peerNetns, g.pod.Status.PodIP, "/cgi-bin/ping?"+peer.Status.PodIP); got != "OK" {
			t.Errorf("%s: the guest does not reach the pod on node-2 (%s): %q", g.vmi.Name, peer.Status.PodIP, got)
		}
	}

	t.Run("masquerade-flannel", func(t *testing.T) {
		masquerade(t, run(t, "masquerade-flannel"))
	})
	t.Run("bridge-ovs", func(t *testing.T) {
		g := run(t, "bridge-ovs")
		secondary(t, g, "vlan100", "ovs-vlan100", "vlan100-v4", "eth0", exampleProbes[0].addr)
	})
	t.Run("passt-macvlan", func(t *testing.T) {
		g := run(t, "passt-macvlan")
		ip := g.pod.Status.PodIP
		_, underlay, _ := net.ParseCIDR(exampleUnderlay["node-2"] + "/24")
		if !underlay.Contains(net.ParseIP(ip)) {
			t.Fatalf("the VM pod's IP %s is not on the underlay %s", ip, underlay)
		}
		if got := addr(t, g, "eth0"); got != ip+"/24" {
			t.Errorf("%s: the guest's eth0 took %q by DHCP, want the pod's %s/24 from passt", g.vmi.Name, got, ip)
		}
		other := e.a
		if g.vmi.Status.NodeName == e.a.Name {
			other = e.b
		}
		if got := get(t, other.NetNS, ip, ""); got != "guest 80" {
			t.Errorf("%s: from %s on the underlay, the VM pod %s answered %q", g.vmi.Name, other.Name, ip, got)
		}
		if got := get(t, other.NetNS, ip, "/cgi-bin/ping?"+exampleUnderlay[other.Name]); got != "OK" {
			t.Errorf("%s: the guest does not reach %s at %s: %q", g.vmi.Name, other.Name, exampleUnderlay[other.Name], got)
		}
	})
	t.Run("multi-nic", func(t *testing.T) {
		g := run(t, "multi-nic")
		masquerade(t, g)
		secondary(t, g, "vlan110", "ovs-vlan110", "vlan110-v4", "eth1", exampleProbes[1].addr)
		secondary(t, g, "vlan120", "ovs-vlan120", "vlan120-v4", "eth2", exampleProbes[2].addr)
	})
}
