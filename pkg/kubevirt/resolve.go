package kubevirt

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"strings"

	corev1 "k8s.io/api/core/v1"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/vmnic/vmnic/pkg/netconf"
)

// Annotations and labels KubeVirt and Multus put on a virt-launcher pod.
const (
	MultusNetworksAnnotation = "k8s.v1.cni.cncf.io/networks"
	PodNetworkInterface      = "eth0"
	// DefaultBinding is the name vmnic's binding is registered under in the
	// KubeVirt CR (spec.configuration.network.binding.<name>).
	DefaultBinding = "vmnic"
)

// HashedIfName is the pod interface KubeVirt names after a secondary
// network: "pod" + the first 11 hex digits of sha256(network name).
func HashedIfName(network string) string {
	h := sha256.Sum256([]byte(network))
	return "pod" + hex.EncodeToString(h[:])[:11]
}

// LauncherVMI returns the name of the VMI a virt-launcher pod belongs to, or
// "" when the pod is not a virt-launcher pod (label kubevirt.io=virt-launcher
// and a controller ownerRef of kind VirtualMachineInstance).
func LauncherVMI(pod *corev1.Pod) string {
	if pod.Labels[kubevirtv1.AppLabel] != "virt-launcher" {
		return ""
	}
	for _, ref := range pod.OwnerReferences {
		if ref.Kind == "VirtualMachineInstance" && ref.Controller != nil && *ref.Controller {
			return ref.Name
		}
	}
	return ""
}

// multusSelection is one entry of the k8s.v1.cni.cncf.io/networks annotation.
type multusSelection struct {
	Name      string `json:"name"`
	Namespace string `json:"namespace,omitempty"`
	Interface string `json:"interface,omitempty"`
}

// networkFor finds the VMI network whose pod interface is ifName.
func networkFor(pod *corev1.Pod, vmi *kubevirtv1.VirtualMachineInstance, ifName string) (*kubevirtv1.Network, error) {
	nets := vmi.Spec.Networks
	if primary := primaryNetwork(nets); primary != nil && ifName == primaryIfName(vmi, primary) {
		return primary, nil
	}
	if ifName == PodNetworkInterface {
		return nil, fmt.Errorf("VMI %s/%s has no pod network for %s", vmi.Namespace, vmi.Name, ifName)
	}
	// 1. The pod's Multus annotation names the interface per attachment.
	if raw := pod.Annotations[MultusNetworksAnnotation]; strings.HasPrefix(strings.TrimSpace(raw), "[") {
		var sel []multusSelection
		if err := json.Unmarshal([]byte(raw), &sel); err == nil {
			for _, s := range sel {
				if s.Interface != ifName {
					continue
				}
				for i := range nets {
					if m := nets[i].Multus; m != nil && !m.Default && sameNAD(m.NetworkName, s, vmi.Namespace) {
						return &nets[i], nil
					}
				}
			}
		}
	}
	// 2. KubeVirt's hashed naming, then 3. the legacy net1, net2 … order.
	ordinal := 0
	for i := range nets {
		m := nets[i].Multus
		if m == nil || m.Default {
			continue
		}
		ordinal++
		if HashedIfName(nets[i].Name) == ifName || fmt.Sprintf("net%d", ordinal) == ifName {
			return &nets[i], nil
		}
	}
	return nil, fmt.Errorf("no network of VMI %s/%s maps to pod interface %s", vmi.Namespace, vmi.Name, ifName)
}

// IsPrimary reports whether a VMI network is its primary one: the pod
// network, or the Multus default network that replaces it.
func IsPrimary(n *kubevirtv1.Network) bool {
	return n.Pod != nil || (n.Multus != nil && n.Multus.Default)
}

func primaryNetwork(nets []kubevirtv1.Network) *kubevirtv1.Network {
	for i := range nets {
		if IsPrimary(&nets[i]) {
			return &nets[i]
		}
	}
	return nil
}

// primaryIfName is the pod interface of the primary network: eth0, unless
// the VMI's status reports another one (KubeVirt takes it from the pod's
// network-status, as for OVN-Kubernetes' user-defined primary networks).
func primaryIfName(vmi *kubevirtv1.VirtualMachineInstance, primary *kubevirtv1.Network) string {
	for _, st := range vmi.Status.Interfaces {
		if st.Name == primary.Name && st.PodInterfaceName != "" {
			return st.PodInterfaceName
		}
	}
	return PodNetworkInterface
}

func sameNAD(ref string, s multusSelection, vmiNS string) bool {
	ns, name, ok := strings.Cut(ref, "/")
	if !ok {
		ns, name = vmiNS, ref
	}
	sns := s.Namespace
	if sns == "" {
		sns = vmiNS
	}
	return name == s.Name && ns == sns
}

// MigrationOf returns the migration a virt-launcher pod is the target of,
// or nil for a pod that is not a migration target.
func MigrationOf(pod *corev1.Pod) *Migration {
	uid := pod.Labels[kubevirtv1.MigrationJobLabel]
	job := pod.Annotations[kubevirtv1.MigrationJobNameAnnotation]
	if uid == "" && job == "" {
		return nil
	}
	return &Migration{Job: job, UID: uid}
}

// CorePasst names KubeVirt's own passt binding (passtBinding, v1.8 and
// later; the deprecated passt method before).
const CorePasst = "core:passt"

// BindingName is the binding of a VMI interface: a plugin binding's name, or
// "core:<method>" for KubeVirt's built-in ones.
func BindingName(iface *kubevirtv1.Interface) string {
	switch {
	case iface.Binding != nil:
		return iface.Binding.Name
	case iface.Masquerade != nil:
		return "core:masquerade"
	case iface.Bridge != nil:
		return "core:bridge"
	case iface.SRIOV != nil:
		return "core:sriov"
	case iface.PasstBinding != nil, iface.DeprecatedPasst != nil:
		return CorePasst
	}
	return "core:default"
}

// VCPUs is the VMI's vCPU count, which KubeVirt uses as the queue count of
// a multiqueue NIC.
func VCPUs(vmi *kubevirtv1.VirtualMachineInstance) int {
	c := vmi.Spec.Domain.CPU
	if c == nil {
		return 1
	}
	n := max(1, int(c.Sockets)) * max(1, int(c.Cores)) * max(1, int(c.Threads))
	return min(n, netconf.MaxQueues)
}

// Resolve decides the facts of one pod interface from the pod and its VMI.
// bindings are the binding names vmnic serves.
func Resolve(pod *corev1.Pod, vmi *kubevirtv1.VirtualMachineInstance, ifName string, bindings []string) (*Facts, error) {
	network, err := networkFor(pod, vmi, ifName)
	if err != nil {
		return nil, err
	}
	var iface *kubevirtv1.Interface
	for i := range vmi.Spec.Domain.Devices.Interfaces {
		if vmi.Spec.Domain.Devices.Interfaces[i].Name == network.Name {
			iface = &vmi.Spec.Domain.Devices.Interfaces[i]
		}
	}
	if iface == nil {
		return nil, fmt.Errorf("VMI %s/%s has network %q but no interface for it", vmi.Namespace, vmi.Name, network.Name)
	}
	f := &Facts{VMName: vmi.Name, Binding: BindingName(iface), MAC: iface.MacAddress, Primary: IsPrimary(network)}
	for _, b := range bindings {
		if f.Binding == b {
			f.Serve = true
		}
	}
	for _, p := range iface.Ports {
		f.Ports = append(f.Ports, netconf.Port{Name: p.Name, Protocol: p.Protocol, Port: int(p.Port)})
	}
	if mq := vmi.Spec.Domain.Devices.NetworkInterfaceMultiQueue; mq != nil && *mq {
		f.Queues = VCPUs(vmi)
	}
	f.Migration = MigrationOf(pod)
	return f, nil
}
