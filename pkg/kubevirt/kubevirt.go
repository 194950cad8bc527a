// Package kubevirt holds what vmnic knows about KubeVirt: the names it gives
// the devices in a virt-launcher pod and the VM facts behind a CNI request.
// Facts come from a Source: Standalone reads them from the network config
// (no API server); the cluster-backed source reads the VMI.
package kubevirt

import (
	"context"
	"fmt"
	"strings"

	"github.com/vmnic/vmnic/pkg/netconf"
)

// LauncherUID and LauncherGID own the tap: the qemu user of virt-launcher.
const (
	LauncherUID = 107
	LauncherGID = 107
)

// maxIfName is IFNAMSIZ-1.
const maxIfName = 15

// HashedPrefix starts KubeVirt's hashed pod interface names
// ("pod" + sha256(network name)[:11]).
const HashedPrefix = "pod"

// PrimaryTap is the tap KubeVirt (v1.5 and later) hands QEMU for the pod
// network, whatever the pod interface is called.
const PrimaryTap = "tap0"

// TapName is the tap KubeVirt hands to QEMU for a tap binding, as
// GenerateTapDeviceName derives it: tap0 for the VMI's primary network (the
// pod network or the Multus default network), "tap" plus the pod interface
// name without its first three characters for a secondary Multus network
// (net1 → tap1, pod1a2b3c4d5e6 → tap1a2b3c4d5e6). KubeVirt v1.4 and older
// used the second rule for every network; the two agree on every name those
// releases gave a primary interface (eth0).
func TapName(podIf string, primary bool) string {
	if primary {
		return PrimaryTap
	}
	if len(podIf) <= 3 {
		return "tap" + podIf
	}
	return "tap" + podIf[3:]
}

// TapCandidates are the taps an attachment of podIf may have, primary or
// not: what a DEL without a record looks for (under the owner mark).
func TapCandidates(podIf string) []string {
	a, b := TapName(podIf, false), TapName(podIf, true)
	if a == b {
		return []string{a}
	}
	return []string{a, b}
}

// BridgeName is the in-pod bridge as KubeVirt's GenerateBridgeName names it:
// "k6t-" and the pod interface name without the hashed names' "pod"
// prefix (eth0 → k6t-eth0, pod1a2b3c4d5e6 → k6t-1a2b3c4d5e6). A name that
// would not fit IFNAMSIZ keeps its last characters.
func BridgeName(podIf string) string {
	const prefix = "k6t-"
	podIf = strings.TrimPrefix(podIf, HashedPrefix)
	if len(prefix)+len(podIf) > maxIfName {
		podIf = podIf[len(podIf)-(maxIfName-len(prefix)):]
	}
	return prefix + podIf
}

// NicName is the name the pod interface's traffic-carrying link takes when
// the interface's own name must hold the guest's MAC, as KubeVirt's
// GenerateNewBridgedVmiInterfaceName derives it for its bridge binding:
// "<name>-nic" without the hashed names' "pod" prefix (net1 → net1-nic,
// pod1a2b3c4d5e6 → 1a2b3c4d5e6-nic). It fails for a name that leaves no
// room for the suffix, as KubeVirt's pod interface names always do.
func NicName(podIf string) (string, error) {
	n := strings.TrimPrefix(podIf, HashedPrefix) + "-nic"
	if len(n) > maxIfName || n == "-nic" {
		return "", fmt.Errorf("interface name %q leaves no room for the %q suffix (at most %d characters before it)", podIf, "-nic", maxIfName-4)
	}
	return n, nil
}

// Facts are what vmnic needs to know about the VM behind an interface.
type Facts struct {
	// Serve is false when vmnic must pass the request through (not a VM
	// interface, or a binding vmnic does not serve).
	Serve  bool
	VMName string
	// Binding names the VMI interface's binding, when known.
	Binding string
	// Primary: the interface is the VMI's primary network (the pod network
	// or the Multus default network), whose tap KubeVirt names tap0.
	Primary bool
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
	// Phase is the migration's stage when the pod was wired, named as
	// the VMIM phase it matches, if the VMI showed it already (it does
	// from the handoff on, after the target pod runs).
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
	// Without a VMI the pod network is the interface the runtime names
	// eth0, as Multus and every runtime do.
	f := &Facts{Serve: true, VMName: q.Pod.Name, Primary: q.IfName == PodNetworkInterface}
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
