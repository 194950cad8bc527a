package kubevirt

import (
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kubevirtv1 "kubevirt.io/api/core/v1"
)

func launcherPod(networksAnnotation string) *corev1.Pod {
	yes := true
	p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{
		Name: "virt-launcher-vm1-abcde", Namespace: "ns1",
		Labels:          map[string]string{"kubevirt.io": "virt-launcher"},
		OwnerReferences: []metav1.OwnerReference{{Kind: "VirtualMachineInstance", Name: "vm1", Controller: &yes}},
	}}
	if networksAnnotation != "" {
		p.Annotations = map[string]string{MultusNetworksAnnotation: networksAnnotation}
	}
	return p
}

func testVMI() *kubevirtv1.VirtualMachineInstance {
	mq := true
	vmi := &kubevirtv1.VirtualMachineInstance{ObjectMeta: metav1.ObjectMeta{Name: "vm1", Namespace: "ns1"}}
	vmi.Spec.Networks = []kubevirtv1.Network{
		{Name: "default", NetworkSource: kubevirtv1.NetworkSource{Pod: &kubevirtv1.PodNetwork{}}},
		{Name: "blue", NetworkSource: kubevirtv1.NetworkSource{Multus: &kubevirtv1.MultusNetwork{NetworkName: "blue-nad"}}},
		{Name: "red", NetworkSource: kubevirtv1.NetworkSource{Multus: &kubevirtv1.MultusNetwork{NetworkName: "other/red-nad"}}},
	}
	vmi.Spec.Domain.Devices.Interfaces = []kubevirtv1.Interface{
		{
			Name: "default", Binding: &kubevirtv1.PluginBinding{Name: "vmnic"}, MacAddress: "02:00:00:00:00:01",
			Ports: []kubevirtv1.Port{{Name: "http", Port: 80}, {Port: 53, Protocol: "UDP"}},
		},
		{Name: "blue", InterfaceBindingMethod: kubevirtv1.InterfaceBindingMethod{Bridge: &kubevirtv1.InterfaceBridge{}}},
		{Name: "red", Binding: &kubevirtv1.PluginBinding{Name: "vmnic"}},
	}
	vmi.Spec.Domain.Devices.NetworkInterfaceMultiQueue = &mq
	vmi.Spec.Domain.CPU = &kubevirtv1.CPU{Sockets: 2, Cores: 2}
	return vmi
}

func TestResolve(t *testing.T) {
	cases := []struct {
		name    string
		ann     string
		ifName  string
		mutate  func(*kubevirtv1.VirtualMachineInstance)
		serve   bool
		binding string
		queues  int
		err     bool
	}{
		{name: "pod network with vmnic binding", ifName: "eth0", serve: true, binding: "vmnic", queues: 4},
		{
			name: "core masquerade passes through", ifName: "eth0", binding: "core:masquerade", queues: 4,
			mutate: func(v *kubevirtv1.VirtualMachineInstance) {
				v.Spec.Domain.Devices.Interfaces[0].Binding = nil
				v.Spec.Domain.Devices.Interfaces[0].Masquerade = &kubevirtv1.InterfaceMasquerade{}
			},
		},
		{
			name: "no multiqueue", ifName: "eth0", serve: true, binding: "vmnic",
			mutate: func(v *kubevirtv1.VirtualMachineInstance) { v.Spec.Domain.Devices.NetworkInterfaceMultiQueue = nil },
		},
		{name: "hashed name, core bridge", ifName: HashedIfName("blue"), binding: "core:bridge", queues: 4},
		{name: "hashed name, vmnic", ifName: HashedIfName("red"), serve: true, binding: "vmnic", queues: 4},
		{name: "legacy ordinal", ifName: "net2", serve: true, binding: "vmnic", queues: 4},
		{
			name: "annotation wins", ifName: "net7", serve: true, binding: "vmnic", queues: 4,
			ann: `[{"name":"blue-nad","interface":"net9"},{"name":"red-nad","namespace":"other","interface":"net7"}]`,
		},
		{name: "unknown interface", ifName: "net5", err: true},
		{
			name: "multus default network is eth0", ifName: "eth0", serve: true, binding: "vmnic", queues: 4,
			mutate: func(v *kubevirtv1.VirtualMachineInstance) {
				v.Spec.Networks[0].Pod = nil
				v.Spec.Networks[0].Multus = &kubevirtv1.MultusNetwork{NetworkName: "cilium", Default: true}
			},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			vmi := testVMI()
			if tc.mutate != nil {
				tc.mutate(vmi)
			}
			f, err := Resolve(launcherPod(tc.ann), vmi, tc.ifName, []string{"vmnic"})
			if tc.err {
				if err == nil {
					t.Fatalf("Resolve = %+v, want error", f)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if f.Serve != tc.serve || f.Binding != tc.binding || f.Queues != tc.queues || f.VMName != "vm1" {
				t.Errorf("facts = %+v, want serve %t binding %s queues %d", f, tc.serve, tc.binding, tc.queues)
			}
		})
	}
	f, _ := Resolve(launcherPod(""), testVMI(), "eth0", []string{"vmnic"})
	if f.MAC != "02:00:00:00:00:01" || len(f.Ports) != 2 || f.Ports[0].Port != 80 || f.Ports[1].ProtocolName() != "udp" {
		t.Errorf("MAC/ports = %q %+v", f.MAC, f.Ports)
	}
}

func TestLauncherVMI(t *testing.T) {
	if got := LauncherVMI(launcherPod("")); got != "vm1" {
		t.Errorf("LauncherVMI = %q", got)
	}
	p := launcherPod("")
	p.Labels = nil
	if LauncherVMI(p) != "" {
		t.Error("pod without the virt-launcher label taken for a launcher")
	}
	p = launcherPod("")
	p.OwnerReferences[0].Controller = nil
	if LauncherVMI(p) != "" {
		t.Error("non-controller ownerRef accepted")
	}
}

func TestHashedIfName(t *testing.T) {
	// sha256("blue") = 16477688c0e00699c6cfa4497a3612d7e83c532062b64b250fed8908128ed548
	if got := HashedIfName("blue"); got != "pod16477688c0e" {
		t.Errorf("HashedIfName(blue) = %q", got)
	}
}

func TestMigrationOf(t *testing.T) {
	p := launcherPod("")
	if MigrationOf(p) != nil {
		t.Error("a source pod taken for a migration target")
	}
	p.Labels["kubevirt.io/migrationJobUID"] = "u-1"
	p.Annotations = map[string]string{"kubevirt.io/migrationJobName": "mig-1"}
	if m := MigrationOf(p); m == nil || m.Job != "mig-1" || m.UID != "u-1" {
		t.Errorf("MigrationOf = %+v", m)
	}
}
