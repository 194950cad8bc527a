// Package kubevirt holds what vmnic knows about KubeVirt: the names it gives
// the devices in a virt-launcher pod and the VM facts behind a CNI request.
// Facts come from a Source: Standalone reads them from the network config
// (no API server); the cluster-backed source reads the VMI.
package kubevirt

import (
	"context"

	"github.com/vmnic/vmnic/pkg/netconf"
)

// LauncherUID and LauncherGID own the tap: the qemu user of virt-launcher.
const (
	LauncherUID = 107
	LauncherGID = 107
)

// maxIfName is IFNAMSIZ-1.
const maxIfName = 15

// TapName is the tap KubeVirt hands to QEMU for a tap binding: "tap" plus the
// pod interface name without its first three characters (eth0 → tap0,
// net1 → tap1, pod1a2b3c4d5e6 → tap1a2b3c4d5e6).
func TapName(podIf string) string {
	if len(podIf) <= 3 {
		return "tap" + podIf
	}
	return "tap" + podIf[3:]
}

// BridgeName is the in-pod bridge "k6t-<podIf>", keeping the last characters
// of a long (hashed) interface name so the result fits IFNAMSIZ.
func BridgeName(podIf string) string {
	const prefix = "k6t-"
	if len(prefix)+len(podIf) > maxIfName {
		podIf = podIf[len(podIf)-(maxIfName-len(prefix)):]
	}
	return prefix + podIf
}

// Facts are what vmnic needs to know about the VM behind an interface.
type Facts struct {
	// Serve is false when vmnic must pass the request through (not a VM
	// interface, or a binding vmnic does not serve).
	Serve  bool
	VMName string
	// Binding names the VMI interface's binding, when known.
	Binding string
	MAC     string
	Ports   []netconf.Port
	Queues  int
	// Migration is set when the pod is the target of a live migration.
	Migration *Migration
}

// Migration identifies the live migration a target pod belongs to.
type Migration struct {
	// Job is the VMIM's name (annotation kubevirt.io/migrationJobName).
	Job string `json:"job"`
	// UID is the VMIM's UID (label kubevirt.io/migrationJobUID).
	UID string `json:"uid"`
	// Phase is the VMIM's phase when the pod was wired, if known.
	Phase string `json:"phase,omitempty"`
}

// Query is one lookup.
type Query struct {
	Pod    netconf.PodArgs
	IfName string
	Conf   *netconf.Conf
}

// Source answers which VM, if any, is behind a CNI request.
type Source interface {
	Lookup(ctx context.Context, q Query) (*Facts, error)
}

// Standalone is the Source used without an API server: a pod is a VM pod when
// its name starts with "virt-launcher-", and its facts are the config's
// args.cni.vmnic object.
type Standalone struct{}

// Lookup implements Source.
func (Standalone) Lookup(_ context.Context, q Query) (*Facts, error) {
	if !q.Pod.IsLauncherPod() {
		return &Facts{}, nil
	}
	f := &Facts{Serve: true, VMName: q.Pod.Name}
	if vm := q.Conf.VM(); vm != nil {
		if vm.Name != "" {
			f.VMName = vm.Name
		}
		f.MAC = vm.MAC
		f.Ports = vm.Ports
		f.Queues = vm.Queues
	}
	return f, nil
}
