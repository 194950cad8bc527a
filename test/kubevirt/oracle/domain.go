package oracle

import (
	"fmt"
	"runtime"
	"strconv"

	"github.com/containernetworking/plugins/pkg/ns"

	v1 "kubevirt.io/api/core/v1"

	"kubevirt.io/kubevirt/pkg/network/cache"
	"kubevirt.io/kubevirt/pkg/network/domainspec"
	netdriver "kubevirt.io/kubevirt/pkg/network/driver"
	"kubevirt.io/kubevirt/pkg/network/link"
	launcher "kubevirt.io/kubevirt/pkg/network/setup"
	"kubevirt.io/kubevirt/pkg/network/vmispec"
	"kubevirt.io/kubevirt/pkg/virt-launcher/virtwrap/api"
	"kubevirt.io/kubevirt/pkg/virt-launcher/virtwrap/converter/arch"
	"kubevirt.io/kubevirt/pkg/virt-launcher/virtwrap/converter/network"
	"kubevirt.io/kubevirt/pkg/virt-launcher/virtwrap/converter/virtio"
)

// DomainInterface is one <interface> of the libvirt domain virt-launcher
// defines. Name is the VMI interface (the domain alias' user name);
// PodInterface the pod interface KubeVirt discovers for its network ("" when
// none, or for a network that is neither the pod network nor Multus).
type DomainInterface struct {
	Name         string `json:"name"`
	PodInterface string `json:"podInterface"`
	Type         string `json:"type"`
	MAC          string `json:"mac"`
	Target       string `json:"target"`
	// Source is a vhost-user interface's device (passt's pod interface).
	Source    string `json:"source,omitempty"`
	MTU       int    `json:"mtu"`
	Model     string `json:"model"`
	Queues    uint   `json:"queues"`
	LinkState string `json:"linkState"`
}

func domainCmd(args []string) (any, error) {
	fs := newFlagSet("domain")
	vmiPath := fs.file("vmi", "VirtualMachineInstance JSON `file`", true)
	bindingsPath := fs.file("bindings", "`file` with the KubeVirt CR's spec.configuration.network.binding (JSON)", true)
	netnsPath := fs.String("netns", "", "`path` of the pod's network namespace")
	fs.required = append(fs.required, "netns")
	if err := fs.parse(args); err != nil {
		return nil, err
	}
	var vmi v1.VirtualMachineInstance
	if err := readJSON(*vmiPath, &vmi); err != nil {
		return nil, fmt.Errorf("VMI: %w", err)
	}
	var bindings map[string]v1.InterfaceBindingPlugin
	if err := readJSON(*bindingsPath, &bindings); err != nil {
		return nil, fmt.Errorf("bindings: %w", err)
	}
	ifaces, err := domainInterfaces(&vmi, bindings, *netnsPath)
	if err != nil {
		return nil, err
	}
	return struct {
		Interfaces []DomainInterface `json:"interfaces"`
	}{ifaces}, nil
}

func domainInterfaces(vmi *v1.VirtualMachineInstance, bindings map[string]v1.InterfaceBindingPlugin, netnsPath string) ([]DomainInterface, error) {
	nonAbsentIfaces := vmispec.FilterInterfacesSpec(vmi.Spec.Domain.Devices.Interfaces, func(iface v1.Interface) bool {
		return iface.State != v1.InterfaceStateAbsent
	})
	for _, iface := range nonAbsentIfaces {
		if iface.Masquerade != nil || iface.Bridge != nil {
			return nil, fmt.Errorf("VMI %s/%s: interface %q uses a core masquerade/bridge binding, for which virt-launcher starts its own DHCP server in the pod: not in scope", vmi.Namespace, vmi.Name, iface.Name)
		}
	}
	nonAbsentNets := vmispec.FilterNetworksByInterfaces(vmi.Spec.Networks, nonAbsentIfaces)

	// What virt-handler hands virt-launcher (vm.go, migration-target.go).
	attachments := domainspec.DomainAttachmentByInterfaceName(vmi.Spec.Domain.Devices.Interfaces, bindings)

	// The converter's network configurator, with the options converter.go
	// passes it for this architecture (no SEV/PV launch security).
	archConverter := arch.NewConverter(runtime.GOARCH)
	domain := &api.Domain{}
	err := network.NewDomainConfigurator(
		network.WithDomainAttachmentByInterfaceName(attachments),
		network.WithROMTuningSupport(archConverter.IsROMTuningSupported()),
		network.WithVirtioModel(virtio.InterpretTransitionalModelType(vmi.Spec.Domain.Devices.UseVirtioTransitional, runtime.GOARCH)),
	).Configure(vmi, domain)
	if err != nil {
		return nil, fmt.Errorf("configure the domain interfaces of VMI %s/%s: %w", vmi.Namespace, vmi.Name, err)
	}

	podIfaces := map[string]string{}
	err = ns.WithNetNSPath(netnsPath, func(ns.NetNS) (err error) {
		// A panic here would kill the process from ns.Do's goroutine.
		defer recoverInto(&err)
		// As the domain manager's preStartHook calls it (manager.go).
		err = launcher.NewVMNetworkConfigurator(vmi, cache.CacheCreator{}, launcher.WithDomainAttachments(attachments)).
			SetupPodNetworkPhase2(domain, nonAbsentNets)
		if err != nil {
			return fmt.Errorf("SetupPodNetworkPhase2: %w", err)
		}
		for _, n := range nonAbsentNets {
			if n.Pod == nil && n.Multus == nil {
				continue
			}
			l, err := link.DiscoverByNetwork(&netdriver.NetworkUtilsHandler{}, vmi.Spec.Networks, n, vmi.Status.Interfaces)
			if err != nil {
				return fmt.Errorf("discover the pod interface of network %q: %w", n.Name, err)
			}
			if l != nil {
				podIfaces[n.Name] = l.Attrs().Name
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("VMI %s/%s in network namespace %s: %w", vmi.Namespace, vmi.Name, netnsPath, err)
	}

	out := make([]DomainInterface, 0, len(domain.Spec.Devices.Interfaces))
	for _, di := range domain.Spec.Devices.Interfaces {
		o, err := domainInterface(di)
		if err != nil {
			return nil, err
		}
		o.PodInterface = podIfaces[o.Name]
		out = append(out, o)
	}
	return out, nil
}

// domainInterface flattens a domain interface into the oracle's answer.
func domainInterface(di api.Interface) (DomainInterface, error) {
	o := DomainInterface{Type: di.Type}
	if di.Alias != nil {
		o.Name = di.Alias.GetName()
	}
	if di.MAC != nil {
		o.MAC = di.MAC.MAC
	}
	if di.Target != nil {
		o.Target = di.Target.Device
	}
	o.Source = di.Source.Device
	if di.MTU != nil && di.MTU.Size != "" {
		mtu, err := strconv.Atoi(di.MTU.Size)
		if err != nil {
			return o, fmt.Errorf("domain interface %q: MTU %q: %w", o.Name, di.MTU.Size, err)
		}
		o.MTU = mtu
	}
	if di.Model != nil {
		o.Model = di.Model.Type
	}
	if di.Driver != nil && di.Driver.Queues != nil {
		o.Queues = *di.Driver.Queues
	}
	if di.LinkState != nil {
		o.LinkState = di.LinkState.State
	}
	return o, nil
}
