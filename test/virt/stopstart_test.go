package virt_test

import (
	"regexp"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/vmnic/vmnic/test/virt"
)

var vmResource = schema.GroupVersionResource{Group: "kubevirt.io", Version: "v1", Resource: "virtualmachines"}

// stopStart: a VirtualMachine on the passt network, whose pod IP is the
// VM's (from Spiderpool), is stopped and started through its runStrategy,
// as `virtctl stop` and `virtctl start` do. KubeVirt makes a new VMI and a
// new launcher pod, which takes the same IP (Spiderpool keeps a VM's
// address while the VM exists, and gives a pod started meanwhile another),
// and the guest takes it again by DHCP.
func (e *env) stopStart(t *testing.T) {
	ctx := t.Context()
	// With no ports listed, libvirt runs passt with --tcp-ports all
	// --udp-ports all, one socket per port: more than this machine's
	// open-file limit allows (root here cannot raise its hard limit).
	iface := kubevirtv1.Interface{
		InterfaceBindingMethod: kubevirtv1.InterfaceBindingMethod{PasstBinding: &kubevirtv1.InterfacePasstBinding{}},
		Ports:                  []kubevirtv1.Port{{Port: 8080, Protocol: "TCP"}},
	}
	vmi := virt.VMI("vm-stop-start", e.guest, iface, "")
	virt.PreferNode(vmi, e.b.Name)
	always, halted := kubevirtv1.RunStrategyAlways, kubevirtv1.RunStrategyHalted
	vm := &kubevirtv1.VirtualMachine{
		TypeMeta:   metav1.TypeMeta{APIVersion: "kubevirt.io/v1", Kind: "VirtualMachine"},
		ObjectMeta: metav1.ObjectMeta{Name: vmi.Name, Namespace: vmi.Namespace},
		Spec: kubevirtv1.VirtualMachineSpec{RunStrategy: &always, Template: &kubevirtv1.VirtualMachineInstanceTemplateSpec{
			ObjectMeta: metav1.ObjectMeta{Annotations: map[string]string{defaultNetwork: "default/" + passtNAD}},
			Spec:       vmi.Spec,
		}},
	}
	obj, err := runtime.DefaultUnstructuredConverter.ToUnstructured(vm)
	if err != nil {
		t.Fatal(err)
	}
	vms := e.a.Cluster.Dynamic.Resource(vmResource).Namespace(vm.Namespace)
	if _, err := vms.Create(ctx, &unstructured.Unstructured{Object: obj}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	// ip waits for the VM's VMI to run and its guest to take an address,
	// and returns the launcher pod's IP and the VMI's UID.
	ip := func() (string, types.UID) {
		t.Helper()
		running, err := virt.WaitVMIRunning(ctx, e.a, vm.Namespace, vm.Name, 5*time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		launcher, err := virt.LauncherPod(ctx, e.a, running)
		if err != nil {
			t.Fatal(err)
		}
		m, err := virt.WaitConsole(ctx, e.a, running, regexp.MustCompile(`^ADDR4 eth0 ?(\S*)`), 3*time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		if want := launcher.Status.PodIP + "/24"; m[1] != want {
			t.Errorf("guest address %q, want the pod's %s from passt's DHCP", m[1], want)
		}
		return launcher.Status.PodIP, running.UID
	}
	runStrategy := func(s kubevirtv1.VirtualMachineRunStrategy) {
		t.Helper()
		patch := []byte(`{"spec":{"runStrategy":"` + string(s) + `"}}`)
		if _, err := vms.Patch(ctx, vm.Name, types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	first, firstUID := ip()
	t.Logf("VM %s runs with IP %s", vm.Name, first)
	runStrategy(halted)
	deadline := time.Now().Add(3 * time.Minute)
	for {
		_, err := virt.GetVMI(ctx, e.a, vm.Namespace, vm.Name)
		if apierrors.IsNotFound(err) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the VM's VMI still exists 3m after its stop: %v", err)
		}
		time.Sleep(250 * time.Millisecond)
	}
	// A pod that takes an address of the pool while the VM is stopped:
	// had Spiderpool freed the VM's address, it would be the lowest free
	// one, and this pod's.
	if p := e.underlayPod(t, "stop-start-other", nil); p.Status.PodIP == first {
		t.Fatalf("a pod took the stopped VM's IP %s", first)
	}
	runStrategy(always)
	second, secondUID := ip()
	if secondUID == firstUID {
		t.Fatalf("the VM runs the same VMI %s after its stop and start", firstUID)
	}
	if second != first {
		t.Errorf("the VM has the IP %s after its stop and start, %s before", second, first)
	}
	t.Logf("VM %s runs again with IP %s", vm.Name, second)
}
