package kvoracle_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"github.com/vishvananda/netlink"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/vmnic/vmnic/pkg/kubevirt"
	"github.com/vmnic/vmnic/pkg/netconf"
	"github.com/vmnic/vmnic/test/kvoracle"
	"github.com/vmnic/vmnic/test/need"
)

// The first test may build the oracle: about 4 minutes with a cold Go
// build cache on 2 cores (test/deps.sh builds it beforehand), seconds warm.
const timeout = 8 * time.Minute

func testContext(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	t.Cleanup(cancel)
	return ctx
}

var vmnicBinding = map[string]kubevirtv1.InterfaceBindingPlugin{
	kubevirt.DefaultBinding: {
		DomainAttachmentType: kubevirtv1.Tap,
		Migration:            &kubevirtv1.InterfaceBindingMigration{},
	},
}

func kubeVirtCR() *kubevirtv1.KubeVirt {
	return &kubevirtv1.KubeVirt{
		ObjectMeta: metav1.ObjectMeta{Name: "kubevirt", Namespace: "kubevirt"},
		Spec: kubevirtv1.KubeVirtSpec{Configuration: kubevirtv1.KubeVirtConfiguration{
			NetworkConfiguration: &kubevirtv1.NetworkConfiguration{Binding: vmnicBinding},
		}},
	}
}

func vmnicIface(name, mac string) kubevirtv1.Interface {
	return kubevirtv1.Interface{
		Name:       name,
		MacAddress: mac,
		Binding:    &kubevirtv1.PluginBinding{Name: kubevirt.DefaultBinding},
	}
}

func podNet(name string) kubevirtv1.Network {
	return kubevirtv1.Network{Name: name, NetworkSource: kubevirtv1.NetworkSource{Pod: &kubevirtv1.PodNetwork{}}}
}

func multusNet(name, nad string, isDefault bool) kubevirtv1.Network {
	return kubevirtv1.Network{Name: name, NetworkSource: kubevirtv1.NetworkSource{
		Multus: &kubevirtv1.MultusNetwork{NetworkName: nad, Default: isDefault},
	}}
}

func newVMI(ifaces []kubevirtv1.Interface, nets ...kubevirtv1.Network) *kubevirtv1.VirtualMachineInstance {
	return &kubevirtv1.VirtualMachineInstance{
		TypeMeta:   metav1.TypeMeta{APIVersion: "kubevirt.io/v1", Kind: "VirtualMachineInstance"},
		ObjectMeta: metav1.ObjectMeta{Name: "vm1", Namespace: "default", UID: types.UID("5f1d8c3e-0000-4000-8000-00000000a001")},
		Spec: kubevirtv1.VirtualMachineInstanceSpec{
			Domain:   kubevirtv1.DomainSpec{Devices: kubevirtv1.Devices{Interfaces: ifaces}},
			Networks: nets,
		},
	}
}

func ptrTo[T any](v T) *T { return &v }

func sha11(s string) string {
	h := sha256.Sum256([]byte(s))
	return hex.EncodeToString(h[:])[:11]
}

// TestNames compares KubeVirt's device names with vmnic's own functions
// where vmnic claims the same thing.
func TestNames(t *testing.T) {
	ctx := testContext(t)
	cases := []struct {
		name string
		vmi  *kubevirtv1.VirtualMachineInstance
	}{
		{"pod network and two Multus networks", newVMI(
			[]kubevirtv1.Interface{vmnicIface("default", ""), vmnicIface("blue", ""), vmnicIface("red", "")},
			podNet("default"), multusNet("blue", "blue-nad", false), multusNet("red", "other/red-nad", false))},
		{"Multus default network and a secondary one", newVMI(
			[]kubevirtv1.Interface{vmnicIface("main", ""), vmnicIface("blue", "")},
			multusNet("main", "main-nad", true), multusNet("blue", "blue-nad", false))},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, err := kvoracle.Names(ctx, tc.vmi)
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != len(tc.vmi.Spec.Networks) {
				t.Fatalf("oracle answered for %d networks, want %d: %+v", len(got), len(tc.vmi.Spec.Networks), got)
			}
			ordinal := 0
			for i, n := range got {
				vmiNet := tc.vmi.Spec.Networks[i]
				t.Logf("KubeVirt: %+v", n)
				if n.Network != vmiNet.Name {
					t.Errorf("network %d: oracle names %q, want %q", i, n.Network, vmiNet.Name)
				}
				primary := kubevirt.IsPrimary(&vmiNet)
				if n.Secondary == primary {
					t.Errorf("network %q: KubeVirt secondary=%v, vmnic IsPrimary=%v", vmiNet.Name, n.Secondary, primary)
				}
				// What KubeVirt's names are, spelled out.
				wantHashed, wantOrdinal, wantTapHashed, wantTapOrdinal := "eth0", "eth0", "tap0", "tap0"
				if !primary {
					ordinal++
					wantHashed = "pod" + sha11(vmiNet.Name)
					wantOrdinal = "net" + strconv.Itoa(ordinal)
					wantTapHashed, wantTapOrdinal = "tap"+wantHashed[3:], "tap"+wantOrdinal[3:]
				}
				for _, c := range []struct{ what, got, want string }{
					{"hashed", n.Hashed, wantHashed},
					{"ordinal", n.Ordinal, wantOrdinal},
					{"tap (hashed)", n.TapHashed, wantTapHashed},
					{"tap (ordinal)", n.TapOrdinal, wantTapOrdinal},
				} {
					if c.got != c.want {
						t.Errorf("network %q: KubeVirt's %s name is %q, the test expected %q", vmiNet.Name, c.what, c.got, c.want)
					}
				}
				compareWithVmnic(t, vmiNet.Name, primary, n)
			}
		})
	}
}

// compareWithVmnic checks vmnic's pkg/kubevirt against KubeVirt's names.
func compareWithVmnic(t *testing.T, network string, primary bool, n kvoracle.NetworkNames) {
	t.Helper()
	if primary {
		// vmnic claims the primary network's pod interface is eth0 (without
		// a VMI status saying otherwise).
		if n.Hashed != kubevirt.PodNetworkInterface {
			t.Errorf("network %q: KubeVirt's pod interface %q, vmnic's PodNetworkInterface %q", network, n.Hashed, kubevirt.PodNetworkInterface)
		}
	} else if got := kubevirt.HashedIfName(network); got != n.Hashed {
		t.Errorf("network %q: KubeVirt's hashed name %q, vmnic's HashedIfName %q", network, n.Hashed, got)
	}
	for _, c := range []struct{ podIf, tap, bridge, nic string }{
		{n.Hashed, n.TapHashed, n.BridgeHashed, n.NicHashed},
		{n.Ordinal, n.TapOrdinal, n.BridgeOrdinal, n.NicOrdinal},
	} {
		if got := kubevirt.TapName(c.podIf, primary); got != c.tap {
			t.Logf("FINDING network %q, pod interface %q: KubeVirt's tap is %q, vmnic's TapName gives %q", network, c.podIf, c.tap, got)
			t.Fail()
		}
		if got := kubevirt.BridgeName(c.podIf); got != c.bridge {
			t.Errorf("network %q, pod interface %q: KubeVirt's bridge is %q, vmnic's BridgeName gives %q", network, c.podIf, c.bridge, got)
		}
		if got, err := kubevirt.NicName(c.podIf); err != nil || got != c.nic {
			t.Errorf("network %q, pod interface %q: KubeVirt's nic is %q, vmnic's NicName gives %q (%v)", network, c.podIf, c.nic, got, err)
		}
	}
}

// podLink is a link of a fake virt-launcher pod network namespace: a veth
// (this kernel has no dummy links) or a tap.
type podLink struct {
	name string
	mac  string
	mtu  int
	tap  bool
}

// podNetns creates a network namespace holding links and returns its
// path; links and namespace go away when the test ends.
func podNetns(t *testing.T, links ...podLink) string {
	t.Helper()
	need.Root(t)
	netns, err := testutils.NewNS()
	if err != nil {
		t.Fatalf("create network namespace: %v", err)
	}
	t.Cleanup(func() {
		err := netns.Do(func(ns.NetNS) error {
			for _, l := range links {
				if link, err := netlink.LinkByName(l.name); err == nil {
					if err := netlink.LinkDel(link); err != nil {
						return err
					}
				}
			}
			return nil
		})
		if err != nil {
			t.Errorf("delete links: %v", err)
		}
		netns.Close()
		if err := testutils.UnmountNS(netns); err != nil {
			t.Errorf("remove network namespace: %v", err)
		}
	})
	err = netns.Do(func(ns.NetNS) error {
		for i, l := range links {
			attrs := netlink.LinkAttrs{Name: l.name, MTU: l.mtu}
			if l.mac != "" {
				mac, err := net.ParseMAC(l.mac)
				if err != nil {
					return err
				}
				attrs.HardwareAddr = mac
			}
			var link netlink.Link = &netlink.Veth{LinkAttrs: attrs, PeerName: "peer" + string(rune('a'+i))}
			if l.tap {
				link = &netlink.Tuntap{LinkAttrs: attrs, Mode: netlink.TUNTAP_MODE_TAP, Flags: netlink.TUNTAP_NO_PI | netlink.TUNTAP_VNET_HDR}
			}
			if err := netlink.LinkAdd(link); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("create links: %v", err)
	}
	return netns.Path()
}

// TestDomain asks KubeVirt which domain interface virt-launcher defines on
// a pod network namespace as vmnic leaves it.
func TestDomain(t *testing.T) {
	ctx := testContext(t)
	const (
		podMAC  = "02:aa:bb:cc:dd:01"
		specMAC = "02:00:00:00:00:42"
	)
	hashed := kubevirt.HashedIfName("net1-network")
	multiqueue := newVMI([]kubevirtv1.Interface{vmnicIface("net1-network", "")}, multusNet("net1-network", "blue-nad", false))
	multiqueue.Spec.Domain.CPU = &kubevirtv1.CPU{Sockets: 1, Cores: 2, Threads: 2}
	multiqueue.Spec.Domain.Devices.NetworkInterfaceMultiQueue = ptrTo(true)
	cases := []struct {
		name  string
		links []podLink
		vmi   *kubevirtv1.VirtualMachineInstance
		want  kvoracle.DomainInterface
	}{{
		name:  "ordinal pod interface, no macAddress",
		links: []podLink{{name: "net1", mac: podMAC, mtu: 1400}, {name: "tap1", mtu: 1400, tap: true}},
		vmi:   newVMI([]kubevirtv1.Interface{vmnicIface("net1-network", "")}, multusNet("net1-network", "blue-nad", false)),
		want:  kvoracle.DomainInterface{Name: "net1-network", PodInterface: "net1", MAC: podMAC, Target: "tap1", MTU: 1400},
	}, {
		name:  "ordinal pod interface, macAddress",
		links: []podLink{{name: "net1", mac: podMAC, mtu: 1400}, {name: "tap1", mtu: 1400, tap: true}},
		vmi:   newVMI([]kubevirtv1.Interface{vmnicIface("net1-network", specMAC)}, multusNet("net1-network", "blue-nad", false)),
		want:  kvoracle.DomainInterface{Name: "net1-network", PodInterface: "net1", MAC: specMAC, Target: "tap1", MTU: 1400},
	}, {
		name: "hashed pod interface",
		links: []podLink{
			{name: hashed, mac: podMAC, mtu: 1400},
			{name: kubevirt.TapName(hashed, false), mtu: 1400, tap: true},
			// The ordinal name too: KubeVirt tries the hashed one first.
			{name: "net1", mtu: 1500},
		},
		vmi:  newVMI([]kubevirtv1.Interface{vmnicIface("net1-network", "")}, multusNet("net1-network", "blue-nad", false)),
		want: kvoracle.DomainInterface{Name: "net1-network", PodInterface: hashed, MAC: podMAC, Target: "tap" + hashed[3:], MTU: 1400},
	}, {
		name:  "pod network",
		links: []podLink{{name: "eth0", mac: podMAC, mtu: 1400}, {name: "tap0", mtu: 1400, tap: true}},
		vmi:   newVMI([]kubevirtv1.Interface{vmnicIface("default", "")}, podNet("default")),
		want:  kvoracle.DomainInterface{Name: "default", PodInterface: "eth0", MAC: podMAC, Target: "tap0", MTU: 1400},
	}, {
		// Without the tap KubeVirt hands QEMU the pod interface itself.
		name:  "no tap",
		links: []podLink{{name: "net1", mac: podMAC, mtu: 1400}},
		vmi:   newVMI([]kubevirtv1.Interface{vmnicIface("net1-network", "")}, multusNet("net1-network", "blue-nad", false)),
		want:  kvoracle.DomainInterface{Name: "net1-network", PodInterface: "net1", MAC: podMAC, Target: "net1", MTU: 1400},
	}, {
		name:  "multiqueue",
		links: []podLink{{name: "net1", mac: podMAC, mtu: 1400}, {name: "tap1", mtu: 1400, tap: true}},
		vmi:   multiqueue,
		// vmnic's VCPUs claims KubeVirt's queue count.
		want: kvoracle.DomainInterface{Name: "net1-network", PodInterface: "net1", MAC: podMAC, Target: "tap1", MTU: 1400, Queues: uint(kubevirt.VCPUs(multiqueue))},
	}}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			path := podNetns(t, tc.links...)
			got, err := kvoracle.Domain(ctx, kvoracle.DomainInput{Netns: path, VMI: tc.vmi, Bindings: vmnicBinding})
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != 1 {
				t.Fatalf("KubeVirt defines %d domain interfaces, want 1: %+v", len(got), got)
			}
			t.Logf("KubeVirt: %+v", got[0])
			want := tc.want
			want.Type, want.Model = "ethernet", "virtio-non-transitional"
			if got[0] != want {
				t.Errorf("KubeVirt's domain interface\n got %+v\nwant %+v", got[0], want)
			}
			// Where there is a tap, vmnic names it as KubeVirt looks it up.
			vmiNet := tc.vmi.Spec.Networks[0]
			if tc.want.Target != tc.want.PodInterface {
				if tap := kubevirt.TapName(got[0].PodInterface, kubevirt.IsPrimary(&vmiNet)); tap != got[0].Target {
					t.Logf("FINDING vmnic's TapName(%q) = %q, KubeVirt's target %q", got[0].PodInterface, tap, got[0].Target)
					t.Fail()
				}
			}
		})
	}

	// virt-launcher's tap spec generator logs a Critical (which panics)
	// when the pod interface is missing: the domain is never defined.
	t.Run("no pod interface", func(t *testing.T) {
		path := podNetns(t, podLink{name: "tap1", mtu: 1400, tap: true})
		vmi := newVMI([]kubevirtv1.Interface{vmnicIface("net1-network", "")}, multusNet("net1-network", "blue-nad", false))
		ifaces, err := kvoracle.Domain(ctx, kvoracle.DomainInput{Netns: path, VMI: vmi, Bindings: vmnicBinding})
		if err == nil {
			t.Fatalf("KubeVirt defined %+v without a pod interface; want virt-launcher to fail", ifaces)
		}
		t.Log(err)
	})

	t.Run("core masquerade is refused", func(t *testing.T) {
		path := podNetns(t, podLink{name: "eth0", mtu: 1500})
		vmi := newVMI([]kubevirtv1.Interface{{
			Name:                   "default",
			InterfaceBindingMethod: kubevirtv1.InterfaceBindingMethod{Masquerade: &kubevirtv1.InterfaceMasquerade{}},
		}}, podNet("default"))
		if _, err := kvoracle.Domain(ctx, kvoracle.DomainInput{Netns: path, VMI: vmi}); err == nil {
			t.Fatal("the oracle answered for a core masquerade interface; want an error")
		} else {
			t.Log(err)
		}
	})
}

const nadName = "blue-nad"

// launcherVMI is a VMI with binding vmnic on the pod network and one
// Multus network.
func launcherVMI() *kubevirtv1.VirtualMachineInstance {
	return newVMI([]kubevirtv1.Interface{vmnicIface("default", ""), vmnicIface("blue", "")},
		podNet("default"), multusNet("blue", nadName, false))
}

var nads = []kvoracle.NAD{{
	TypeMeta:   metav1.TypeMeta{APIVersion: "k8s.cni.cncf.io/v1", Kind: "NetworkAttachmentDefinition"},
	ObjectMeta: metav1.ObjectMeta{Name: nadName, Namespace: "default"},
	Spec:       kvoracle.NADSpec{Config: `{"cniVersion":"1.0.0","type":"bridge"}`},
}}

type multusSelection struct {
	Name      string `json:"name"`
	Namespace string `json:"namespace"`
	Interface string `json:"interface"`
}

// checkLauncherPod asserts what KubeVirt sets on any virt-launcher pod of
// vmi and what vmnic reads from it.
func checkLauncherPod(t *testing.T, pod *corev1.Pod, vmi *kubevirtv1.VirtualMachineInstance, wantIf string) {
	t.Helper()
	meta, _ := json.MarshalIndent(pod.ObjectMeta, "", "  ")
	t.Logf("KubeVirt's pod metadata: %s", meta)
	if got := pod.Labels[kubevirtv1.AppLabel]; got != "virt-launcher" {
		t.Errorf("label %s = %q, want virt-launcher", kubevirtv1.AppLabel, got)
	}
	if got := pod.Labels[kubevirtv1.CreatedByLabel]; got != string(vmi.UID) {
		t.Errorf("label %s = %q, want the VMI UID %q", kubevirtv1.CreatedByLabel, got, vmi.UID)
	}
	if pod.Name != "" || pod.GenerateName != netconf.LauncherPrefix+vmi.Name+"-" {
		t.Errorf("name %q, generateName %q: want the API server to name it %s%s-XXXXX", pod.Name, pod.GenerateName, netconf.LauncherPrefix, vmi.Name)
	}
	if pod.Namespace != vmi.Namespace {
		t.Errorf("namespace %q, want the VMI's %q", pod.Namespace, vmi.Namespace)
	}
	ref := metav1.GetControllerOf(pod)
	if ref == nil || ref.Kind != "VirtualMachineInstance" || ref.Name != vmi.Name || ref.UID != vmi.UID {
		t.Errorf("controller ownerReference %+v, want the VMI %s (%s)", ref, vmi.Name, vmi.UID)
	}
	var sel []multusSelection
	raw := pod.Annotations[kubevirt.MultusNetworksAnnotation]
	if err := json.Unmarshal([]byte(raw), &sel); err != nil {
		t.Fatalf("annotation %s = %q: %v", kubevirt.MultusNetworksAnnotation, raw, err)
	}
	want := []multusSelection{{Name: nadName, Namespace: "default", Interface: wantIf}}
	if len(sel) != 1 || sel[0] != want[0] {
		t.Errorf("annotation %s = %s, want %+v", kubevirt.MultusNetworksAnnotation, raw, want)
	}

	// What vmnic reads from the pod.
	if got := kubevirt.LauncherVMI(pod); got != vmi.Name {
		t.Errorf("vmnic's LauncherVMI = %q, want %q", got, vmi.Name)
	}
	for _, c := range []struct {
		ifName  string
		primary bool
	}{{kubevirt.PodNetworkInterface, true}, {wantIf, false}} {
		f, err := kubevirt.Resolve(pod, vmi, c.ifName, []string{kubevirt.DefaultBinding})
		if err != nil {
			t.Errorf("vmnic's Resolve(%s): %v", c.ifName, err)
			continue
		}
		if !f.Serve || f.Primary != c.primary || f.Binding != kubevirt.DefaultBinding {
			t.Errorf("vmnic's Resolve(%s) = %+v, want served, primary %v, binding %s", c.ifName, f, c.primary, kubevirt.DefaultBinding)
		}
	}
}

func TestLauncherPod(t *testing.T) {
	ctx := testContext(t)
	vmi := launcherVMI()
	pod, err := kvoracle.LauncherPod(ctx, kvoracle.LauncherInput{VMI: vmi, KubeVirt: kubeVirtCR(), NADs: nads})
	if err != nil {
		t.Fatal(err)
	}
	checkLauncherPod(t, pod, vmi, kubevirt.HashedIfName("blue"))
	if m := kubevirt.MigrationOf(pod); m != nil {
		t.Errorf("vmnic's MigrationOf = %+v on a launcher pod, want nil", m)
	}
}

// networkStatus is the k8s.v1.cni.cncf.io/network-status annotation Multus
// writes on a pod whose secondary interface is ifName.
func networkStatus(ifName string) string {
	return `[{"name":"kindnet","interface":"eth0","default":true},{"name":"default/` + nadName + `","interface":"` + ifName + `"}]`
}

func TestTargetPod(t *testing.T) {
	ctx := testContext(t)
	hashed := kubevirt.HashedIfName("blue")
	cases := []struct {
		name string
		// sourceIf is the source pod's secondary interface (its Multus
		// network-status), targetIf the target's.
		sourceIf, targetIf string
		// upgrade sets the PodSecondaryInterfaceNamingUpgrade feature gate
		// (beta; whether a release turns it on by default varies, so the
		// test sets it either way): on, KubeVirt gives an ordinal source's
		// target hashed names; off, it keeps the ordinal ones.
		upgrade bool
	}{
		{name: "hashed source", sourceIf: hashed, targetIf: hashed, upgrade: true},
		{name: "ordinal source, naming upgrade", sourceIf: "net1", targetIf: hashed, upgrade: true},
		{name: "ordinal source, naming upgrade disabled", sourceIf: "net1", targetIf: "net1"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			kv := kubeVirtCR()
			gate := []string{"PodSecondaryInterfaceNamingUpgrade"}
			kv.Spec.Configuration.DeveloperConfiguration = &kubevirtv1.DeveloperConfiguration{DisabledFeatureGates: gate}
			if tc.upgrade {
				kv.Spec.Configuration.DeveloperConfiguration = &kubevirtv1.DeveloperConfiguration{FeatureGates: gate}
			}
			vmi := launcherVMI()
			source, err := kvoracle.LauncherPod(ctx, kvoracle.LauncherInput{VMI: vmi, KubeVirt: kv, NADs: nads})
			if err != nil {
				t.Fatal(err)
			}
			source.Name = source.GenerateName + "abcde"
			source.UID = "5f1d8c3e-0000-4000-8000-00000000b001"
			source.Spec.NodeName = "node1"
			source.Status.Phase = corev1.PodRunning
			source.Annotations["k8s.v1.cni.cncf.io/network-status"] = networkStatus(tc.sourceIf)

			vmi.Status.Phase = kubevirtv1.Running
			vmi.Status.NodeName = "node1"
			vmi.Status.SelinuxContext = "system_u:system_r:container_t:s0:c12,c345"
			vmim := &kubevirtv1.VirtualMachineInstanceMigration{
				TypeMeta:   metav1.TypeMeta{APIVersion: "kubevirt.io/v1", Kind: "VirtualMachineInstanceMigration"},
				ObjectMeta: metav1.ObjectMeta{Name: "mig1", Namespace: vmi.Namespace, UID: "5f1d8c3e-0000-4000-8000-00000000c001"},
				Spec:       kubevirtv1.VirtualMachineInstanceMigrationSpec{VMIName: vmi.Name},
			}
			pod, err := kvoracle.TargetPod(ctx, kvoracle.TargetInput{VMI: vmi, VMIM: vmim, SourcePod: source, KubeVirt: kv, NADs: nads})
			if err != nil {
				t.Fatal(err)
			}
			checkLauncherPod(t, pod, vmi, tc.targetIf)
			if got := pod.Labels[kubevirtv1.MigrationJobLabel]; got != string(vmim.UID) {
				t.Errorf("label %s = %q, want the VMIM UID %q", kubevirtv1.MigrationJobLabel, got, vmim.UID)
			}
			if got := pod.Annotations[kubevirtv1.MigrationJobNameAnnotation]; got != vmim.Name {
				t.Errorf("annotation %s = %q, want the VMIM name %q", kubevirtv1.MigrationJobNameAnnotation, got, vmim.Name)
			}
			want := kubevirt.Migration{Job: vmim.Name, UID: string(vmim.UID)}
			if m := kubevirt.MigrationOf(pod); m == nil || *m != want {
				t.Errorf("vmnic's MigrationOf = %+v, want %+v", m, want)
			}
			if m := kubevirt.MigrationOf(source); m != nil {
				t.Errorf("vmnic's MigrationOf(source) = %+v, want nil", m)
			}
			if !strings.HasPrefix(pod.GenerateName, netconf.LauncherPrefix) {
				t.Errorf("generateName %q lacks vmnic's %q", pod.GenerateName, netconf.LauncherPrefix)
			}
		})
	}
}
