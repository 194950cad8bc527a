package node_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/vmnic/vmnic/pkg/kubevirt"
	"github.com/vmnic/vmnic/pkg/nft"
	"github.com/vmnic/vmnic/test/cluster"
	"github.com/vmnic/vmnic/test/guest"
	"github.com/vmnic/vmnic/test/kvoracle"
	"github.com/vmnic/vmnic/test/need"
	"github.com/vmnic/vmnic/test/node"
	"github.com/vmnic/vmnic/test/ovs"
	"github.com/vmnic/vmnic/test/spiderpool"
)

// TestMultusOnNode puts Multus thick in front of Flannel and vmnic, as a
// node with secondary networks runs: multus-daemon in its DaemonSet,
// multus-shim in the bin dir, its generated 00-multus.conf first in the
// conf dir (the one containerd uses). vmnic, installed after it, chains
// into Flannel's conflist and never into Multus' own; a plain pod and a VM
// pod go through Multus to the cluster network, where vmnic wires the VM
// pod; Multus' network-status annotation carries Flannel's address.
func TestMultusOnNode(t *testing.T) {
	need.NoError(t, node.Check())
	ctx := t.Context()
	n := node.StartT(t, node.Options{})
	if err := n.Cluster.InstallKubeVirtCRDs(ctx); err != nil {
		t.Fatal(err)
	}
	if err := n.LabelSchedulable(ctx); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := n.InstallMultus(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("Multus thick ready after %v", time.Since(start).Round(time.Millisecond))
	img, err := node.BuildVmnicImage(ctx, t.TempDir(), "v1")
	if err != nil {
		t.Fatal(err)
	}
	if err := n.InstallVmnic(ctx, img); err != nil {
		t.Fatal(err)
	}
	if _, err := n.WaitDaemonSet(ctx, 2*time.Minute); err != nil {
		t.Fatal(err)
	}
	types, err := n.ConflistPlugins()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(types, []string{"flannel", "portmap", "vmnic"}) {
		t.Errorf("Flannel's conflist plugins %v, want flannel, portmap, vmnic", types)
	}
	mc, err := os.ReadFile(filepath.Join(n.CNIConfDir, node.MultusConf))
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%s: %s", node.MultusConf, mc)
	var multus struct {
		Type    string            `json:"type"`
		Plugins []json.RawMessage `json:"plugins"`
	}
	if err := json.Unmarshal(mc, &multus); err != nil {
		t.Fatal(err)
	}
	if multus.Type != "multus-shim" || multus.Plugins != nil || strings.Contains(string(mc), `"vmnic"`) {
		t.Errorf("vmnic touched Multus' config: %s", mc)
	}
	if _, err := os.Stat(filepath.Join(n.CNIConfDir, node.MultusConf+".vmnic-orig")); err == nil {
		t.Errorf("vmnic converted Multus' config")
	}

	plain := startPlainPod(ctx, t, n, "plain")
	if !strings.HasPrefix(plain.Status.PodIP, "10.244.") {
		t.Errorf("plain pod IP %s, want Flannel's", plain.Status.PodIP)
	}
	_, vm := createVMPod(ctx, t, n, "vm1")
	pod, err := n.WaitPodReady(ctx, vm.Namespace, vm.Name, 2*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	path, err := n.PodNetns(pod.Namespace, pod.Name)
	if err != nil {
		t.Fatal(err)
	}
	tables, err := node.InNetns(path, "nft", "list", "tables")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(tables, "ip "+nft.TableName) {
		t.Errorf("no vmnic NAT table in the VM pod behind Multus: %q", tables)
	}
	status := pod.Annotations["k8s.v1.cni.cncf.io/network-status"]
	if !strings.Contains(status, pod.Status.PodIP) || !strings.Contains(status, `"default": true`) && !strings.Contains(status, `"default":true`) {
		t.Errorf("Multus' network-status %s lacks the default network with the pod IP %s", status, pod.Status.PodIP)
	}
	if t.Failed() {
		return
	}

	t.Run("bridge NAD with Spiderpool", func(t *testing.T) {
		testBridgeNAD(ctx, t, n)
	})
}

// testBridgeNAD adds a bridge-mode NetworkAttachmentDefinition (OVS,
// userspace datapath, in the node's namespace) with Spiderpool's IPAM (the
// agent against this API server, in the node's namespace) and a VM pod
// with the networks annotation KubeVirt writes: Multus calls vmnic for
// pod<hash>, its network-status carries the pool's IP and the MAC, and a
// guest booted as KubeVirt boots it takes that IP by DHCP. Two pools: the
// NAD's default pool ("use default IP pool" on) and the one the pod's
// ipam.spidernet.io/ippools annotation names for the interface (off); and a
// VM with a second NIC of the same mode on a second NAD.
func testBridgeNAD(ctx context.Context, t *testing.T, n *node.Node) {
	nodeNS, err := ns.GetNS(n.NetNS)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = nodeNS.Close() }()
	o, err := ovs.Start(n.OVSRunDir(), ovs.WithNetNS(nodeNS))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = o.Stop() })
	if _, err := o.Vsctl("add-br", "br1", "--", "set", "bridge", "br1", "datapath_type=netdev"); err != nil {
		t.Fatal(err)
	}
	plugin, err := cluster.Binaries(ctx, "spiderpool")
	if err != nil {
		t.Fatal(err)
	}
	if err := n.AddCNIPlugin(plugin[0]); err != nil {
		t.Fatal(err)
	}
	agent, err := spiderpool.StartAgent(ctx, n.Cluster, n.SpiderpoolSocketDir(), spiderpool.AgentOptions{
		Launcher: n.Launcher(), NodeName: n.Name, Namespace: "kube-system", PodName: "spiderpool-agent-" + n.Name,
		MultusClusterNetwork: "kube-system/multus-cni-network",
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(agent.Stop)
	apply := func(m string) {
		t.Helper()
		if err := n.Cluster.Apply(ctx, []byte(m)); err != nil {
			t.Fatal(err)
		}
	}
	pools := []struct{ name, ips string }{
		{"blue-default", "198.51.100.10-198.51.100.19"},
		{"blue-picked", "198.51.100.20-198.51.100.29"},
		{"green-default", "198.51.100.30-198.51.100.39"},
	}
	for _, p := range pools {
		apply(fmt.Sprintf(`apiVersion: spiderpool.spidernet.io/v2beta1
kind: SpiderIPPool
metadata: {name: %s}
spec: {ipVersion: 4, subnet: 198.51.100.0/24, ips: [%q]}
`, p.name, p.ips))
	}
	// Two NADs of the same mode on the same bridge, each with its default
	// pool (what a SpiderMultusConfig's ippools become in the NAD it
	// generates; spiderpool-controller does not run here).
	nads := map[string]kvoracle.NAD{}
	for _, name := range []string{"blue", "green"} {
		conf, err := json.Marshal(map[string]any{
			"cniVersion": "1.0.0", "name": name,
			"plugins": []any{map[string]any{
				"type": "vmnic", "mode": "bridge", "bridge": "br1",
				"socket": filepath.Join(n.VmnicRunDir(), "vmnic.sock"), "spoolDir": filepath.Join(n.VmnicStateDir(), "spool"),
				"ipam": agent.IPAMConfig(name + "-default"),
			}},
		})
		if err != nil {
			t.Fatal(err)
		}
		nad := kvoracle.NAD{
			TypeMeta:   metav1.TypeMeta{APIVersion: "k8s.cni.cncf.io/v1", Kind: "NetworkAttachmentDefinition"},
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default"},
			Spec:       kvoracle.NADSpec{Config: string(conf)},
		}
		b, err := json.Marshal(nad)
		if err != nil {
			t.Fatal(err)
		}
		apply(string(b))
		nads[name] = nad
	}
	gimg, err := guest.Build(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	type nic struct {
		nad, prefix string
		pick        string // the pool the ippools annotation names ("": the NAD's default)
	}
	for _, c := range []struct {
		name string
		nics []nic
	}{
		{name: "default pool", nics: []nic{{nad: "blue", prefix: "198.51.100.1"}}},
		{name: "annotated pool", nics: []nic{{nad: "blue", prefix: "198.51.100.2", pick: "blue-picked"}}},
		{name: "two nics", nics: []nic{{nad: "blue", prefix: "198.51.100.1"}, {nad: "green", prefix: "198.51.100.3"}}},
	} {
		t.Run(c.name, func(t *testing.T) {
			vmi := vmnicVMI("vm-" + strings.ReplaceAll(c.name, " ", "-"))
			var used []kvoracle.NAD
			var picks []string
			for _, x := range c.nics {
				vmi.Spec.Networks = append(vmi.Spec.Networks, kubevirtv1.Network{Name: x.nad, NetworkSource: kubevirtv1.NetworkSource{Multus: &kubevirtv1.MultusNetwork{NetworkName: x.nad}}})
				vmi.Spec.Domain.Devices.Interfaces = append(vmi.Spec.Domain.Devices.Interfaces, kubevirtv1.Interface{Name: x.nad, Binding: &kubevirtv1.PluginBinding{Name: kubevirt.DefaultBinding}})
				used = append(used, nads[x.nad])
				if x.pick != "" {
					picks = append(picks, fmt.Sprintf(`{"interface":%q,"ipv4":[%q]}`, kubevirt.HashedIfName(x.nad), x.pick))
				}
			}
			created, launcher, err := launcherFor(ctx, n, vmi, used...)
			if err != nil {
				t.Fatal(err)
			}
			if len(picks) > 0 {
				// The product's switch off: the user's pool for the NIC.
				launcher.Annotations["ipam.spidernet.io/ippools"] = "[" + strings.Join(picks, ",") + "]"
			}
			pod, err := n.Kube.CoreV1().Pods("default").Create(ctx, launcher, metav1.CreateOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if pod, err = n.WaitPodReady(ctx, pod.Namespace, pod.Name, 3*time.Minute); err != nil {
				t.Fatal(err)
			}
			var status []struct {
				Name      string   `json:"name"`
				Interface string   `json:"interface"`
				IPs       []string `json:"ips"`
				MAC       string   `json:"mac"`
			}
			raw := pod.Annotations["k8s.v1.cni.cncf.io/network-status"]
			if err := json.Unmarshal([]byte(raw), &status); err != nil {
				t.Fatalf("network-status %q: %v", raw, err)
			}
			ips, macs := make([]string, len(c.nics)), make([]string, len(c.nics))
			for i, x := range c.nics {
				podIf := kubevirt.HashedIfName(x.nad)
				for _, s := range status {
					if s.Name == "default/"+x.nad && s.Interface == podIf && len(s.IPs) == 1 {
						ips[i], macs[i] = s.IPs[0], s.MAC
					}
				}
				if !strings.HasPrefix(ips[i], x.prefix) || macs[i] == "" {
					t.Fatalf("network-status %s: want default/%s on %s with an address %s* and a MAC", raw, x.nad, podIf, x.prefix)
				}
				t.Logf("Multus reports %s on %s, MAC %s", ips[i], podIf, macs[i])
			}
			path, err := n.PodNetns(pod.Namespace, pod.Name)
			if err != nil {
				t.Fatal(err)
			}
			ifaces, err := kvoracle.Domain(ctx, kvoracle.DomainInput{Netns: path, VMI: created, Bindings: vmnicBindings})
			if err != nil {
				t.Fatalf("KubeVirt's domain interfaces: %v", err)
			}
			if len(ifaces) != 1+len(c.nics) {
				t.Fatalf("KubeVirt's domain interfaces %+v: want eth0 and %d more", ifaces, len(c.nics))
			}
			var more []guest.NIC
			script := ""
			for i, x := range c.nics {
				di := ifaces[1+i]
				if di.PodInterface != kubevirt.HashedIfName(x.nad) || di.MAC != macs[i] {
					t.Errorf("KubeVirt's domain interface %+v: want pod interface %s with MAC %s (Multus')", di, kubevirt.HashedIfName(x.nad), macs[i])
				}
				more = append(more, guest.NIC{Tap: di.Target, MAC: di.MAC})
				script += fmt.Sprintf(`udhcpc -i eth%[1]d -q -f -n -t 15 -T 2 || echo DHCP-FAILED
echo "ADDR%[1]d $(ip -4 -o addr show dev eth%[1]d | awk '{print $4}' | head -1)"
`, i+1)
			}
			script += "echo GUEST-DONE\n"
			var logf func(string)
			if testing.Verbose() {
				logf = func(s string) { t.Log("guest: " + s) }
			}
			g, err := guest.Start(ctx, gimg, guest.Options{
				NetnsPath: path, Tap: ifaces[0].Target, MAC: ifaces[0].MAC, More: more,
				Script: script, Timeout: 4 * time.Minute, Log: logf,
			})
			if err != nil {
				t.Fatal(err)
			}
			defer g.Kill()
			if _, err := g.WaitFor(ctx, regexp.MustCompile(`GUEST-DONE`)); err != nil {
				t.Fatalf("guest: %v\n%s", err, g.Output())
			}
			for i, ip := range ips {
				if want := fmt.Sprintf("ADDR%d %s/24", i+1, ip); !strings.Contains(g.Output(), want) {
					t.Errorf("the guest's eth%d did not take %s/24 by DHCP:\n%s", i+1, ip, g.Output())
				}
			}
			g.Kill()
			if err := n.DeletePod(ctx, pod.Namespace, pod.Name, time.Minute); err != nil {
				t.Fatal(err)
			}
		})
	}
}
