// Package masquerade wires a VM NIC behind NAT, chained after any primary CNI:
// in the pod netns a bridge k6t-<if> holding the guest's gateway addresses, a
// tap for QEMU owned by the launcher's qemu user, forwarding sysctls, an
// nftables NAT ruleset, and DHCPv4/DHCPv6/Router Advertisement servers that
// give the guest 10.0.2.2 and fd10:0:2::2 with an IPv6 default route.
//
// The shape follows KubeVirt's masquerade binding, so guests and docs written
// for it keep working; the differences are deliberate: Router Advertisements
// (KubeVirt leaves IPv6 guests without a default route) and owner marks on
// everything created.
package masquerade

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/utils/sysctl"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/vmnic/vmnic/pkg/dhcp"
	"github.com/vmnic/vmnic/pkg/failpoint"
	"github.com/vmnic/vmnic/pkg/kubevirt"
	"github.com/vmnic/vmnic/pkg/mode"
	"github.com/vmnic/vmnic/pkg/netconf"
	"github.com/vmnic/vmnic/pkg/nft"
	"github.com/vmnic/vmnic/pkg/podnet"
)

// The fixed addresses of KubeVirt's masquerade binding.
var (
	BridgeMAC = net.HardwareAddr{0x02, 0, 0, 0, 0, 0}
	Gateway4  = net.IPv4(10, 0, 2, 1).To4()
	Guest4    = net.IPv4(10, 0, 2, 2).To4()
	Mask4     = net.CIDRMask(24, 32)
	Gateway6  = net.ParseIP("fd10:0:2::1")
	Guest6    = net.ParseIP("fd10:0:2::2")
	Mask6     = net.CIDRMask(120, 128)
)

// AliasPrefix starts the owner mark of every link vmnic creates.
const AliasPrefix = podnet.AliasPrefix

// Spec is everything needed to wire, check, restore and remove one
// masquerade NIC. The daemon stores it in the attachment record, so DEL and
// CHECK act on what ADD did, not on what the config says now.
type Spec struct {
	Netns    string         `json:"netns"`
	PodIf    string         `json:"podIf"`
	Bridge   string         `json:"bridge"`
	Tap      string         `json:"tap"`
	Owner    string         `json:"owner"`
	MTU      int            `json:"mtu,omitempty"`
	Queues   int            `json:"queues,omitempty"`
	GuestMAC string         `json:"guestMAC,omitempty"`
	IPv4     bool           `json:"ipv4"`
	IPv6     bool           `json:"ipv6"`
	Ports    []netconf.Port `json:"ports,omitempty"`
	DNS      []string       `json:"dns,omitempty"`
	Search   []string       `json:"search,omitempty"`
	Hostname string         `json:"hostname,omitempty"`
}

// Input is what NewSpec derives a Spec from.
type Input struct {
	ContainerID string
	Netns       string
	IfName      string
	Conf        *netconf.Conf
	Facts       *kubevirt.Facts
	Prev        *current.Result
}

// Alias is the owner mark of an attachment's links.
func Alias(containerID, ifName string) string { return podnet.Alias(containerID, ifName) }

// NewSpec decides the wiring; it touches nothing.
func NewSpec(in Input) (*Spec, error) {
	if len(in.IfName) <= 3 {
		return nil, types.NewError(types.ErrInvalidEnvironmentVariables,
			fmt.Sprintf("CNI_IFNAME: %q is too short to derive the tap name (KubeVirt's rule is tap+name[3:])", in.IfName), "")
	}
	s := &Spec{
		Netns:  in.Netns,
		PodIf:  in.IfName,
		Bridge: kubevirt.BridgeName(in.IfName),
		Tap:    kubevirt.TapName(in.IfName, in.Facts != nil && in.Facts.Primary),
		Owner:  Alias(in.ContainerID, in.IfName),
	}
	if f := in.Facts; f != nil {
		s.GuestMAC = f.MAC
		s.Ports = f.Ports
		s.Queues = f.Queues
		s.Hostname = f.VMName
	}
	for _, ipc := range in.Prev.IPs {
		if ipc.Address.IP.To4() != nil {
			s.IPv4 = true
		} else {
			s.IPv6 = true
		}
	}
	if !s.IPv4 && !s.IPv6 {
		return nil, types.NewError(types.ErrInvalidNetworkConfig,
			"prevResult.ips: the primary CNI gave the pod no address; masquerade needs at least one", "")
	}
	// The pod's own DNS (runtime "dns" capability) first, as the guest
	// should resolve like the pod; then the primary's result, then the
	// config's dns block.
	switch dns := in.Prev.DNS; {
	case in.Conf.RuntimeConfig.DNS != nil && len(in.Conf.RuntimeConfig.DNS.Servers) > 0:
		s.DNS = in.Conf.RuntimeConfig.DNS.Servers
		s.Search = in.Conf.RuntimeConfig.DNS.Searches
	case len(dns.Nameservers) > 0:
		s.DNS, s.Search = dns.Nameservers, dns.Search
	default:
		s.DNS, s.Search = in.Conf.DNS.Nameservers, in.Conf.DNS.Search
	}
	return s, nil
}

// Servers runs the DHCP servers of attachments, keyed by attachment.
type Servers = mode.Servers

// Plugin wires masquerade NICs.
type Plugin struct {
	Servers Servers
	Log     *slog.Logger
}

// Steps of Add in order, each followed by a failpoint (pkg/failpoint).
var Steps = []string{"bridge", "tap", "sysctl", "nft", "dhcp"}

func step(name string) error { return failpoint.Hit(netconf.ModeMasquerade, name) }

// Add wires the NIC. On error everything it created is removed again.
func (p *Plugin) Add(ctx context.Context, key string, s *Spec) (err error) {
	h, closeNS, err := openHandle(s.Netns)
	if err != nil {
		return podnet.NetnsError(err)
	}
	defer closeNS()

	podLink, err := h.LinkByName(s.PodIf)
	if err != nil {
		return types.NewError(types.ErrInvalidNetworkConfig,
			fmt.Sprintf("CNI_IFNAME: pod interface %q not found in %s (the primary plugin must create it): %v", s.PodIf, s.Netns, err), "")
	}
	s.MTU = podLink.Attrs().MTU
	if s.GuestMAC == "" {
		// KubeVirt's tap binding gives the guest the pod interface's MAC
		// when the VMI names none: that is the one DHCP answers.
		s.GuestMAC = podLink.Attrs().HardwareAddr.String()
	}

	defer func() {
		if err != nil {
			if cerr := p.undo(key, s); cerr != nil {
				p.log().Error("rollback after failed ADD left something behind", "key", key, "err", cerr)
			}
		}
	}()

	if err = removeStale(h, s); err != nil {
		return err
	}
	br, err := p.addBridge(h, s)
	if err != nil {
		return err
	}
	if err = step("bridge"); err != nil {
		return err
	}
	if err = p.addTap(h, s, br); err != nil {
		return err
	}
	if err = step("tap"); err != nil {
		return err
	}
	if err = setSysctls(s); err != nil {
		return err
	}
	if err = step("sysctl"); err != nil {
		return err
	}
	if err = nft.Apply(s.Netns, s.nftSpec()); err != nil {
		return fmt.Errorf("program NAT in %s: %w", s.Netns, err)
	}
	if err = step("nft"); err != nil {
		return err
	}
	if err = p.Servers.Start(ctx, key, s.dhcpConfig(p.log())); err != nil {
		return fmt.Errorf("start DHCP servers on %s: %w", s.Bridge, err)
	}
	return step("dhcp")
}

func (p *Plugin) log() *slog.Logger {
	if p.Log != nil {
		return p.Log
	}
	return slog.Default()
}

// Restore restarts the DHCP servers of a wired NIC (daemon restart). A NIC
// whose netns or bridge is gone is left to DEL and GC.
func (p *Plugin) Restore(ctx context.Context, key string, s *Spec) error {
	if p.Servers.Running(key) {
		return nil
	}
	h, closeNS, err := openHandle(s.Netns)
	if err != nil {
		return err
	}
	defer closeNS()
	if _, err := ownedLink(h, s.Bridge, s.Owner); err != nil {
		return fmt.Errorf("restore %s: %w", key, err)
	}
	return p.Servers.Start(ctx, key, s.dhcpConfig(p.log()))
}

// Del removes the NIC. Whatever is already gone is fine, and so is a netns
// that no longer exists; only links carrying this attachment's mark are
// deleted.
func (p *Plugin) Del(_ context.Context, key string, s *Spec) error {
	return p.undo(key, s)
}

func (p *Plugin) undo(key string, s *Spec) error {
	p.Servers.Stop(key)
	h, closeNS, err := openHandle(s.Netns)
	if errors.Is(err, errNetnsGone) {
		return nil
	}
	if err != nil {
		return err
	}
	defer closeNS()
	var errs []error
	// A DEL without a record does not know whether the NIC was the VMI's
	// primary one: both tap names are the attachment's.
	names := kubevirt.TapCandidates(s.PodIf)
	if !slices.Contains(names, s.Tap) {
		names = append(names, s.Tap)
	}
	if err := podnet.DeleteOwned(h, s.Owner, append(names, s.Bridge)...); err != nil {
		errs = append(errs, err)
	}
	if err := podnet.DeletePrivate(h, s.Owner, podnet.TempNames(s.Owner)...); err != nil {
		errs = append(errs, err)
	}
	if err := nft.Delete(s.Netns); err != nil {
		errs = append(errs, fmt.Errorf("delete NAT tables: %w", err))
	}
	return errors.Join(errs...)
}

var (
	errNetnsGone = podnet.ErrNetnsGone
	errLinkGone  = podnet.ErrLinkGone
	errNotOwned  = podnet.ErrNotOwned
	openHandle   = podnet.OpenHandle
	ownedLink    = podnet.OwnedLink
)

// removeStale clears what a previous ADD of the same attachment left (a
// retried ADD), and refuses to touch links that someone else owns.
func removeStale(h netlinksafe.Handle, s *Spec) error {
	if err := podnet.DeletePrivate(h, s.Owner, podnet.TempNames(s.Owner)...); err != nil {
		return err
	}
	for _, name := range []string{s.Tap, s.Bridge} {
		l, err := ownedLink(h, name, s.Owner)
		switch {
		case errors.Is(err, errLinkGone):
		case errors.Is(err, errNotOwned):
			return types.NewError(types.ErrInvalidNetworkConfig,
				fmt.Sprintf("link %q already exists in %s and is not vmnic's (alias %q)", name, s.Netns, l.Attrs().Alias), "")
		case err != nil:
			return err
		default:
			if err := h.LinkDel(l); err != nil {
				return fmt.Errorf("delete stale link %q: %w", name, err)
			}
		}
	}
	return nil
}

func (p *Plugin) addBridge(h netlinksafe.Handle, s *Spec) (netlink.Link, error) {
	tmp := podnet.TempName(s.Owner, podnet.TempBridge)
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{
		Name:         tmp,
		MTU:          s.MTU,
		HardwareAddr: BridgeMAC,
		TxQLen:       -1,
	}}
	if err := h.LinkAdd(br); err != nil {
		return nil, fmt.Errorf("create bridge %q: %w", s.Bridge, err)
	}
	l, err := podnet.MarkAndRename(h, tmp, s.Bridge, s.Owner)
	if err != nil {
		_ = podnet.DeletePrivate(h, s.Owner, tmp)
		return nil, fmt.Errorf("bridge %q: %w", s.Bridge, err)
	}
	for _, a := range s.bridgeAddrs() {
		if err := h.AddrAdd(l, a); err != nil {
			return nil, fmt.Errorf("add address %s to %q: %w", a.IPNet, s.Bridge, err)
		}
	}
	if err := h.LinkSetUp(l); err != nil {
		return nil, fmt.Errorf("set %q up: %w", s.Bridge, err)
	}
	return l, nil
}

func (s *Spec) bridgeAddrs() []*netlink.Addr {
	var out []*netlink.Addr
	if s.IPv4 {
		out = append(out, &netlink.Addr{IPNet: &net.IPNet{IP: Gateway4, Mask: Mask4}})
	}
	if s.IPv6 {
		// No DAD: the address is private to the pod and must answer the
		// guest's first DHCPv6/RS at once.
		out = append(out, &netlink.Addr{IPNet: &net.IPNet{IP: Gateway6, Mask: Mask6}, Flags: unix.IFA_F_NODAD})
	}
	return out
}

func (p *Plugin) addTap(h netlinksafe.Handle, s *Spec, br netlink.Link) error {
	return podnet.AddTap(h, podnet.Tap{Netns: s.Netns, Name: s.Tap, Owner: s.Owner, MTU: s.MTU, Queues: s.Queues}, br)
}

// sysctls returns the settings the NIC needs, as name → value.
func (s *Spec) sysctls() [][2]string {
	var out [][2]string
	if s.IPv4 {
		out = append(out,
			[2]string{"net.ipv4.ip_forward", "1"},
			// The output DNAT of 127.0.0.1 to the guest routes a loopback
			// source out of the bridge.
			[2]string{"net.ipv4.conf." + s.Bridge + ".route_localnet", "1"})
	}
	if s.IPv6 {
		out = append(out, [2]string{"net.ipv6.conf.all.forwarding", "1"})
	}
	return out
}

func setSysctls(s *Spec) error {
	return ns.WithNetNSPath(s.Netns, func(ns.NetNS) error {
		if s.IPv6 {
			// Forwarding turns off RA acceptance on interfaces with
			// accept_ra=1; keep the pod interface learning routes if it did.
			name := "net.ipv6.conf." + s.PodIf + ".accept_ra"
			if v, err := sysctl.Sysctl(name); err == nil && strings.TrimSpace(v) == "1" {
				if _, err := sysctl.Sysctl(name, "2"); err != nil {
					return fmt.Errorf("set %s: %w", name, err)
				}
			}
		}
		for _, kv := range s.sysctls() {
			if _, err := sysctl.Sysctl(kv[0], kv[1]); err != nil {
				return fmt.Errorf("set %s=%s: %w", kv[0], kv[1], err)
			}
		}
		return nil
	})
}

func (s *Spec) nftSpec() nft.Masquerade {
	m := nft.Masquerade{PodIf: s.PodIf, Bridge: s.Bridge}
	if s.IPv4 {
		m.V4 = &nft.Family{Guest: Guest4, Gateway: Gateway4}
	}
	if s.IPv6 {
		m.V6 = &nft.Family{Guest: Guest6, Gateway: Gateway6}
	}
	for _, p := range s.Ports {
		m.Ports = append(m.Ports, nft.Port{Protocol: p.ProtocolName(), Port: uint16(p.Port)})
	}
	return m
}

func (s *Spec) dhcpConfig(log *slog.Logger) dhcp.Config {
	cfg := dhcp.Config{NetnsPath: s.Netns, IfName: s.Bridge, Logger: log}
	if s.GuestMAC != "" {
		cfg.ClientMAC, _ = net.ParseMAC(s.GuestMAC)
	}
	var dns4, dns6 []net.IP
	for _, d := range s.DNS {
		if ip := net.ParseIP(d); ip != nil {
			if ip.To4() != nil {
				dns4 = append(dns4, ip)
			} else {
				dns6 = append(dns6, ip)
			}
		}
	}
	if s.IPv4 {
		cfg.V4 = &dhcp.V4{
			Address:  net.IPNet{IP: Guest4, Mask: Mask4},
			ServerID: Gateway4,
			Router:   Gateway4,
			DNS:      dns4,
			Search:   s.Search,
			MTU:      s.MTU,
			Hostname: s.Hostname,
		}
	}
	if s.IPv6 {
		cfg.V6 = &dhcp.V6{Address: Guest6, DNS: dns6, Search: s.Search}
		cfg.RA = &dhcp.RA{
			Prefix:         net.IPNet{IP: Gateway6.Mask(Mask6), Mask: Mask6},
			MTU:            s.MTU,
			RouterLifetime: 30 * time.Minute,
			Managed:        true,
			Other:          true,
		}
	}
	return cfg
}

// Result is prevResult with the bridge and the tap added as sandbox
// interfaces; the addresses stay where the primary CNI put them.
func (s *Spec) Result(prev *current.Result) (*current.Result, error) {
	r := *prev
	r.Interfaces = append(append([]*current.Interface(nil), prev.Interfaces...),
		&current.Interface{Name: s.Bridge, Sandbox: s.Netns},
		&current.Interface{Name: s.Tap, Sandbox: s.Netns},
	)
	// Every interface carries the MAC it has in the kernel, the new ones
	// read back rather than assumed.
	h, closeNS, err := openHandle(s.Netns)
	if err != nil {
		return nil, podnet.NetnsError(err)
	}
	defer closeNS()
	for _, ifc := range r.Interfaces[len(prev.Interfaces):] {
		l, lerr := h.LinkByName(ifc.Name)
		if lerr != nil {
			return nil, fmt.Errorf("read MAC of %q: %w", ifc.Name, lerr)
		}
		ifc.Mac = l.Attrs().HardwareAddr.String()
	}
	return &r, nil
}
