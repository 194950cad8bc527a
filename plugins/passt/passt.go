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
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"strings"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/utils/sysctl"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/vmnic/vmnic/pkg/announce"
	"github.com/vmnic/vmnic/pkg/failpoint"
	"github.com/vmnic/vmnic/pkg/netconf"
	"github.com/vmnic/vmnic/pkg/nft"
	"github.com/vmnic/vmnic/pkg/podnet"
)

// Sysctls are what passt needs in the pod netns: unprivileged ports from 0
// (passt binds the guest's ports as the qemu user) and ICMP echo sockets
// for uid/gid 107. Under KubeVirt someone else owns them: virt-handler sets
// them itself for the core passt binding (v1.8 and later), and the passt
// binding plugin's CNI (kubevirt-passt-binding) before that. vmnic sets them
// only without KubeVirt (a standalone daemon), so it never fights
// virt-handler over them.
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
	// SetSysctls: vmnic sets (and CHECK verifies) the Sysctls, because no
	// KubeVirt component does.
	SetSysctls bool `json:"setSysctls,omitempty"`
	// DADGuard: a migration source that does not hear DAD probes for the
	// addresses it shares with the target (nft.ApplyDADGuard).
	DADGuard bool `json:"dadGuard,omitempty"`
}

// Input is what NewSpec decides from.
type Input struct {
	ContainerID, Netns, IfName string
	Prev                       *current.Result
	// Target: the pod is a live migration's target.
	Target bool
	// SetSysctls: no KubeVirt component sets the Sysctls (see there).
	SetSysctls bool
}

// NewSpec decides from the previous plugin's result; it touches nothing.
func NewSpec(in Input) (*Spec, error) {
	s := &Spec{
		ContainerID: in.ContainerID, Netns: in.Netns, PodIf: in.IfName,
		Owner: podnet.Alias(in.ContainerID, in.IfName), Held: in.Target, SetSysctls: in.SetSysctls,
	}
	prev := in.Prev
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

// Add takes the hold of a migration target and sets the sysctls when vmnic
// owns them. On error the hold is removed again; the sysctls go with the
// netns.
func Add(s *Spec) (err error) {
	h, closeNS, err := podnet.OpenHandle(s.Netns)
	if err != nil {
		return podnet.NetnsError(err)
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
		// The underlay plugin ran DAD for the address the source still
		// holds. Held, the target may take the address without it: an
		// address still tentative (or failed, when the source answered
		// the probe) is put back without DAD.
		if err = settleIPv6(h, l); err != nil {
			return err
		}
	}
	if s.SetSysctls {
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
	}
	return failpoint.Hit(netconf.ModePasst, "sysctl")
}

// settleIPv6 replaces the link's tentative or DAD-failed IPv6 addresses
// with the same addresses flagged NODAD.
func settleIPv6(h netlinksafe.Handle, l netlink.Link) error {
	addrs, err := h.AddrList(l, netlink.FAMILY_V6)
	if err != nil {
		return fmt.Errorf("list IPv6 addresses of %s: %w", l.Attrs().Name, err)
	}
	for _, a := range addrs {
		if a.Flags&(unix.IFA_F_TENTATIVE|unix.IFA_F_DADFAILED) == 0 || a.IP.IsLinkLocalUnicast() {
			continue
		}
		if err := h.AddrDel(l, &a); err != nil {
			return fmt.Errorf("remove %s (DAD pending or failed) from %s: %w", a.IPNet, l.Attrs().Name, err)
		}
		na := &netlink.Addr{IPNet: a.IPNet, Flags: unix.IFA_F_NODAD}
		if err := h.AddrAdd(l, na); err != nil {
			return fmt.Errorf("put %s back on %s without DAD: %w", a.IPNet, l.Attrs().Name, err)
		}
	}
	return nil
}

// Del removes the hold and the DAD guard, if any. The sysctls go with the
// netns.
//
// A held pod interface (a migration source that handed over, a target
// whose migration failed) is taken down before its hold goes. vmnic's DEL
// runs before the underlay plugin's, which deletes the interface: between
// the two the interface would speak again. A source has traffic queued
// behind its hold (passt's connections closing as the pod goes, the ARP
// request for the peer they need), and an ARP request from the VM's
// address with the source's MAC moves every neighbour on the underlay back
// to the source, which is then deleted: the VM, running on the target, is
// cut off until those entries expire. A busy node stretches that window;
// a link that is down closes it.
func Del(s *Spec) error {
	if s.Held || s.Silenced {
		if err := podnet.SetDown(s.Netns, s.PodIf); err != nil {
			return fmt.Errorf("take held %s down before its hold goes: %w", s.PodIf, err)
		}
	}
	return errors.Join(nft.DeleteHold(s.Netns, s.PodIf), nft.DeleteDADGuard(s.Netns, s.PodIf))
}

// GuardDAD keeps a migration source from answering the target's DAD
// probes for their shared address, or lets it answer again (a migration
// that failed). It reports whether anything changed.
func GuardDAD(s *Spec, on bool) (bool, error) {
	switch {
	case on == s.DADGuard:
		return false, nil
	case on:
		if err := nft.ApplyDADGuard(s.Netns, s.PodIf); err != nil {
			return false, err
		}
	default:
		if err := nft.DeleteDADGuard(s.Netns, s.PodIf); err != nil {
			return false, err
		}
	}
	s.DADGuard = on
	return true, nil
}

// Check reports drift of the hold, and of the sysctls when vmnic set them.
func Check(s *Spec) error {
	if err := podnet.RequireNetns(s.Netns); err != nil {
		return err
	}
	var bad []string
	err := ns.WithNetNSPath(s.Netns, func(ns.NetNS) error {
		if !s.SetSysctls {
			return nil
		}
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
	return announceFrom(s, true)
}

// Reassert announces a migration source's IPv4 addresses again, against
// the gratuitous ARP the target's underlay plugin sends (macvlan sets
// arp_notify), and its IPv6 addresses too when v6: only in answer to the
// target's own advertisement, which comes once its DAD is done; sooner, an
// advertisement from the source would fail the target's DAD.
func Reassert(s *Spec, v6 bool) error { return announceFrom(s, v6) }

// announceFrom announces the interface's addresses from its MAC: IPv4, and
// IPv6 too when v6.
func announceFrom(s *Spec, v6 bool) error {
	mac, err := net.ParseMAC(s.MAC)
	if err != nil {
		return fmt.Errorf("pod interface MAC %q: %w", s.MAC, err)
	}
	ips := announced(s, v6)
	if len(ips) == 0 {
		return nil
	}
	return announce.Send(announce.Announcement{Netns: s.Netns, IfName: s.PodIf, MAC: mac, IPs: ips})
}

// announced are the interface's IPv4 addresses, and its IPv6 ones when v6.
func announced(s *Spec, v6 bool) []net.IP {
	var ips []net.IP
	for _, a := range s.IPs {
		ip := net.ParseIP(a)
		if ip.To4() != nil || v6 {
			ips = append(ips, ip)
		}
	}
	return ips
}

// Silence holds a source that handed over.
func Silence(s *Spec) error {
	if err := nft.ApplyHold(s.Netns, s.PodIf); err != nil {
		return err
	}
	s.Silenced = true
	return nil
}

// WatchClaims calls claimed whenever a frame on the pod interface claims
// one of its addresses for another MAC, until ctx ends: an ARP frame whose
// sender is an IPv4 address of the interface, or an IPv6 neighbour
// advertisement for one of its IPv6 addresses. A migration target's
// underlay plugin sends both when it brings the target's interface up
// (macvlan sets arp_notify and ndisc_notify), before vmnic, chained after
// it, can hold the target; the advertisement comes once the target's DAD
// for the address is done. A migration source answers each claim by
// reasserting that family's addresses at once, so the underlay goes on
// reaching the VM where it runs.
func WatchClaims(ctx context.Context, s *Spec, claimed func(from net.HardwareAddr, v6 bool)) error {
	own, err := net.ParseMAC(s.MAC)
	if err != nil {
		return fmt.Errorf("pod interface MAC %q: %w", s.MAC, err)
	}
	var mine []net.IP
	for _, a := range s.IPs {
		mine = append(mine, net.ParseIP(a))
	}
	fd, err := podnet.PacketSocket(s.Netns, s.PodIf, unix.ETH_P_ALL)
	if err != nil {
		return err
	}
	defer func() { _ = unix.Close(fd) }()
	// The watch runs for as long as the VM lives here: the guest's
	// traffic must not wake it.
	if err := podnet.AttachFilter(fd, claimFilter); err != nil {
		return err
	}
	buf := make([]byte, 256)
	for ctx.Err() == nil {
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return fmt.Errorf("watch %s for claims: %w", s.PodIf, err)
		}
		if n < 14 || bytes.Equal(buf[6:12], own) {
			continue
		}
		ip, v6 := claim(buf[:n])
		if ip == nil {
			continue
		}
		for _, m := range mine {
			if m.Equal(ip) {
				claimed(append(net.HardwareAddr(nil), buf[6:12]...), v6)
				break
			}
		}
	}
	return nil
}

// claimFilter passes what claim reads: ARP frames, and ICMPv6 neighbour
// advertisements without extension headers.
var claimFilter = []unix.SockFilter{
	{Code: unix.BPF_LD | unix.BPF_H | unix.BPF_ABS, K: 12},                     // ethertype
	{Code: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K, Jt: 5, K: unix.ETH_P_ARP}, // ARP: pass
	{Code: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K, Jf: 5, K: unix.ETH_P_IPV6},
	{Code: unix.BPF_LD | unix.BPF_B | unix.BPF_ABS, K: 14 + 6}, // next header
	{Code: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K, Jf: 3, K: unix.IPPROTO_ICMPV6},
	{Code: unix.BPF_LD | unix.BPF_B | unix.BPF_ABS, K: 14 + 40}, // ICMPv6 type
	{Code: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K, Jf: 1, K: 136},
	{Code: unix.BPF_RET | unix.BPF_K, K: 0xffff},
	{Code: unix.BPF_RET | unix.BPF_K, K: 0},
}

// claim is the address an Ethernet frame claims for its sender: the sender
// IP of an IPv4 ARP frame, or the target of an ICMPv6 neighbour
// advertisement (without extension headers, as Linux sends them).
func claim(f []byte) (net.IP, bool) {
	switch binary.BigEndian.Uint16(f[12:14]) {
	case unix.ETH_P_ARP:
		// htype 1, ptype IPv4, hlen 6, plen 4; sender IP at 28.
		if len(f) >= 42 && bytes.Equal(f[14:20], []byte{0, 1, 8, 0, 6, 4}) {
			return net.IP(f[28:32]), false
		}
	case unix.ETH_P_IPV6:
		// Next header ICMPv6, type 136; the target address follows the
		// ICMPv6 header and the flags word.
		const icmp = 14 + 40
		if len(f) >= icmp+24 && f[14+6] == unix.IPPROTO_ICMPV6 && f[icmp] == 136 {
			return net.IP(f[icmp+8 : icmp+24]), true
		}
	}
	return nil, false
}
