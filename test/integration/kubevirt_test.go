package integration

import (
	"context"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/vmnic/vmnic/pkg/kubevirt"
	"github.com/vmnic/vmnic/test/guest"
	"github.com/vmnic/vmnic/test/harness"
	"github.com/vmnic/vmnic/test/kvoracle"
)

// What KubeVirt decides about a NIC vmnic wired is asked of KubeVirt's own
// code (test/kvoracle): the tap, MAC, MTU and queues of the domain
// interface its tap binding derives from the pod netns. Every guest a test
// boots on a vmnic NIC boots with those.

// vmnicBindings is the binding registration of the KubeVirt CR
// (spec.configuration.network.binding), as the README gives it.
var vmnicBindings = map[string]kubevirtv1.InterfaceBindingPlugin{
	kubevirt.DefaultBinding: {DomainAttachmentType: kubevirtv1.Tap, Migration: &kubevirtv1.InterfaceBindingMigration{}},
}

// vmiNIC is one network of a test VMI and its interface, bound to vmnic.
type vmiNIC struct {
	network string // VMI network (and interface) name
	// nad is the Multus network; "" is the pod network.
	nad string
	mac string // the interface's macAddress, or ""
}

// testVMI is a VMI (not stored anywhere) whose interfaces all use the vmnic
// binding; vcpus > 1 turns networkInterfaceMultiqueue on.
func testVMI(name string, vcpus uint32, nics ...vmiNIC) *kubevirtv1.VirtualMachineInstance {
	vmi := &kubevirtv1.VirtualMachineInstance{
		TypeMeta:   metav1.TypeMeta{APIVersion: "kubevirt.io/v1", Kind: "VirtualMachineInstance"},
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default", UID: "00000000-0000-4000-8000-0000000000aa"},
	}
	vmi.Spec.Domain.CPU = &kubevirtv1.CPU{Cores: vcpus}
	if vcpus > 1 {
		yes := true
		vmi.Spec.Domain.Devices.NetworkInterfaceMultiQueue = &yes
	}
	for _, n := range nics {
		src := kubevirtv1.NetworkSource{Pod: &kubevirtv1.PodNetwork{}}
		if n.nad != "" {
			src = kubevirtv1.NetworkSource{Multus: &kubevirtv1.MultusNetwork{NetworkName: n.nad}}
		}
		vmi.Spec.Networks = append(vmi.Spec.Networks, kubevirtv1.Network{Name: n.network, NetworkSource: src})
		vmi.Spec.Domain.Devices.Interfaces = append(vmi.Spec.Domain.Devices.Interfaces, kubevirtv1.Interface{
			Name: n.network, MacAddress: n.mac, Binding: &kubevirtv1.PluginBinding{Name: kubevirt.DefaultBinding},
		})
	}
	return vmi
}

// kubevirtNICs asks KubeVirt's code what domain interfaces virt-launcher
// defines for vmi's tap-bound NICs from the pod's netns, in the VMI's
// interface order. Interfaces of KubeVirt's core bindings (masquerade,
// bridge: not vmnic's) are left out of the question, with their networks.
func kubevirtNICs(ctx context.Context, t testing.TB, p *harness.Pod, vmi *kubevirtv1.VirtualMachineInstance) []kvoracle.DomainInterface {
	t.Helper()
	q := vmi.DeepCopy()
	q.Spec.Domain.Devices.Interfaces = nil
	q.Spec.Networks = nil
	for _, iface := range vmi.Spec.Domain.Devices.Interfaces {
		if iface.Masquerade != nil || iface.Bridge != nil {
			continue
		}
		q.Spec.Domain.Devices.Interfaces = append(q.Spec.Domain.Devices.Interfaces, iface)
		for _, n := range vmi.Spec.Networks {
			if n.Name == iface.Name {
				q.Spec.Networks = append(q.Spec.Networks, n)
			}
		}
	}
	ifaces, err := kvoracle.Domain(ctx, kvoracle.DomainInput{Netns: p.NS.Path(), VMI: q, Bindings: vmnicBindings})
	if err != nil {
		t.Fatalf("ask KubeVirt for the domain interfaces of %s: %v", p.Name, err)
	}
	for _, di := range ifaces {
		t.Logf("KubeVirt's domain interface for %s: pod interface %s, target %s, MAC %s, MTU %d, queues %d", di.Name, di.PodInterface, di.Target, di.MAC, di.MTU, di.Queues)
		if di.Type == "ethernet" && (di.Target == "" || di.MAC == "") {
			t.Fatalf("KubeVirt's domain interface %s has no target or MAC: %+v", di.Name, di)
		}
	}
	return ifaces
}

// bootNICs turns KubeVirt's domain interfaces into the guest's NICs: the
// first one and the rest, in order.
func bootNICs(ifaces []kvoracle.DomainInterface) (first harness.GuestNIC, more []guest.NIC) {
	for i, di := range ifaces {
		if i == 0 {
			first = harness.GuestNIC{Tap: di.Target, MAC: di.MAC, Queues: int(di.Queues)}
			continue
		}
		more = append(more, guest.NIC{Tap: di.Target, MAC: di.MAC})
	}
	return first, more
}
