// Package passt prepares a VM pod's interface for KubeVirt's passt binding,
// chained after the macvlan or ipvlan plugin that created the interface and
// gave it its address (Spiderpool in production): the sysctls passt needs
// to run unprivileged in virt-launcher, and the live-migration hold.
//
// passt hands the guest the pod interface's own addresses, so during a
// live migration the source and target pods hold the same IP on the same
// underlay. The target's interface is held: a netdev egress hook drops
// everything it would send (ARP replies, gratuitous ARP, neighbor
// advertisements, DAD probes), so peers keep reaching the source. At the
// switchover the hold goes and the addresses are announced from the
// target's MAC; the source is held until its DEL.
package passt

import (
	"fmt"
	"net"
	"strings"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/utils/sysctl"

	"github.com/vmnic/vmnic/pkg/announce"
	"github.com/vmnic/vmnic/pkg/failpoint"
	"github.com/vmnic/vmnic/pkg/netconf"
	"github.com/vmnic/vmnic/pkg/nft"
	"github.com/vmnic/vmnic/pkg/podnet"
)

// Sysctls are what passt needs in the pod netns, as KubeVirt's
// virt-handler sets them for its core passt binding: unprivileged ports
// from 0 (passt binds the guest's ports as the qemu user) and ICMP echo
// sockets for uid/gid 107.
var Sysctls = [][2]string{
	{"net.ipv4.ip_unprivileged_port_start", "0"},
	{"net.ipv4.ping_group_range", "107 107"},
}

// Spec is one passt-prepared pod interface, stored in the attachment record.
type Spec struct {
	ContainerID string   `json:"containerID"`
	Netns       string   `json:"netns"`
	PodIf       string   `json:"podIf"`
	Owner       string   `json:"owner"`
	MAC         string   `json:"mac,omitempty"` // the pod interface's, once wired
	IPs         []string `json:"ips"`
	// Held: a migration target, silent until it takes over.
	Held bool `json:"held,omitempty"`
	// Silenced: a migration source that handed over.
	Silenced bool `json:"silenced,omitempty"`
}

// NewSpec decides from the previous plugin's result; it touches nothing.
func NewSpec(containerID, netnsPath, ifName string, prev *current.Result, target bool) (*Spec, error) {
	s := &Spec{ContainerID: containerID, Netns: netnsPath, PodIf: ifName, Owner: podnet.Alias(containerID, ifName), Held: target}
	for _, ipc := range prev.IPs {
		s.IPs = append(s.IPs, ipc.Address.IP.String())
	}
	if len(s.IPs) == 0 {
		return nil, types.NewError(types.ErrInvalidNetworkConfig,
			"prevResult.ips: the underlay plugin gave the pod no address; passt hands the pod's addresses to the guest", "")
	}
	return s, nil
}

// Steps of Add in order, each followed by a failpoint (pkg/failpoint); the
// hold is only taken on a migration target.
var Steps = []string{"hold", "sysctl"}

// Add sets the sysctls and, for a migration target, the hold. On error the
// hold is removed again; the sysctls go with the netns.
func Add(s *Spec) (err error) {
	h, closeNS, err := podnet.OpenHandle(s.Netns)
	if err != nil {
		return types.NewError(types.ErrInvalidEnvironmentVariables, fmt.Sprintf("CNI_NETNS: %v", err), "")
	}
	defer closeNS()
	l, err := h.LinkByName(s.PodIf)
	if err != nil {
		return types.NewError(types.ErrInvalidNetworkConfig,
			fmt.Sprintf("CNI_IFNAME: pod interface %q not found in %s (the macvlan or ipvlan plugin must create it): %v", s.PodIf, s.Netns, err), "")
	}
	s.MAC = l.Attrs().HardwareAddr.String()
	if s.Held {
		// First, before anything could make the pod speak for the address.
		if err = nft.ApplyHold(s.Netns, s.PodIf); err != nil {
			return err
		}
		defer func() {
			if err != nil {
				_ = nft.DeleteHold(s.Netns, s.PodIf)
			}
		}()
		if err = failpoint.Hit(netconf.ModePasst, "hold"); err != nil {
			return err
		}
	}
	err = ns.WithNetNSPath(s.Netns, func(ns.NetNS) error {
		for _, kv := range Sysctls {
			if _, serr := sysctl.Sysctl(kv[0], kv[1]); serr != nil {
				return fmt.Errorf("set %s: %w", kv[0], serr)
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	return failpoint.Hit(netconf.ModePasst, "sysctl")
}

// Del removes the hold, if any. The sysctls go with the netns.
func Del(s *Spec) error { return nft.DeleteHold(s.Netns, s.PodIf) }

// Check reports drift of the sysctls and the hold.
func Check(s *Spec) error {
	var bad []string
	err := ns.WithNetNSPath(s.Netns, func(ns.NetNS) error {
		for _, kv := range Sysctls {
			v, err := sysctl.Sysctl(kv[0])
			if err != nil {
				return err
			}
			if strings.Join(strings.Fields(v), " ") != kv[1] {
				bad = append(bad, fmt.Sprintf("%s is %q, want %q", kv[0], v, kv[1]))
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("CHECK: %w", err)
	}
	held, err := nft.Held(s.Netns, s.PodIf)
	if err != nil {
		return fmt.Errorf("CHECK: %w", err)
	}
	if want := s.Held || s.Silenced; held != want {
		bad = append(bad, fmt.Sprintf("%s held %v, want %v", s.PodIf, held, want))
	}
	if len(bad) > 0 {
		return types.NewError(types.ErrInternal, "CHECK: "+strings.Join(bad, "; "), "")
	}
	return nil
}

// Release ends a target's hold and announces its addresses from its MAC.
func Release(s *Spec) error {
	if err := nft.DeleteHold(s.Netns, s.PodIf); err != nil {
		return err
	}
	s.Held = false
	return Announce(s)
}

// Announce announces the interface's addresses from its MAC.
func Announce(s *Spec) error {
	mac, err := net.ParseMAC(s.MAC)
	if err != nil {
		return fmt.Errorf("pod interface MAC %q: %w", s.MAC, err)
	}
	var ips []net.IP
	for _, a := range s.IPs {
		ips = append(ips, net.ParseIP(a))
	}
	return announce.Send(announce.Announcement{Netns: s.Netns, IfName: s.PodIf, MAC: mac, IPs: ips})
}

// Silence holds a source that handed over.
func Silence(s *Spec) error {
	if err := nft.ApplyHold(s.Netns, s.PodIf); err != nil {
		return err
	}
	s.Silenced = true
	return nil
}
