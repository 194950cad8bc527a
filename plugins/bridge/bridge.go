// Package bridge wires a pod into an Open vSwitch bridge: a veth pair whose
// node end is an OVS port (VLAN access tag or trunk, MTU, owner marks in
// external_ids), addresses from the network's IPAM plugin, and for a VM pod
// the KubeVirt layout behind the pod end: bridge k6t-<if> with the pod
// interface and the tap as ports, and vmnic's DHCP server handing the guest
// the pod's address, gateway, routes, DNS and MTU.
//
// For a VM the pod's own network stack is kept off the VLAN: the port has no
// address and no IPv6, and a bridge-family nftables table drops whatever
// the pod itself would send or receive through it (see nft.Guard). The
// guest is the only host behind the port.
//
// The guest's MAC is the VMI interface's macAddress when set; otherwise it
// follows the IP: 02:76 followed by the four bytes of the first IPv4
// address (the last four of the IPv6 address when there is none). A VM that
// restarts or migrates and keeps its IP therefore keeps its MAC.
//
// KubeVirt's tap binding gives the domain the MAC of the link named as the
// pod interface (net1, pod<hash>, eth0) when the VMI sets none, and a bridge
// port can not carry the MAC of a host behind it. So, as KubeVirt's own
// bridge binding does, the veth's pod end is the bridge port under the name
// "<if>-nic" (kubevirt.NicName), and the pod interface's name is held by a
// placeholder link that carries the guest's MAC and the port's MTU and
// nothing else: a Linux bridge without ports, kept down. KubeVirt uses a
// dummy link there; the bridge kind exists wherever vmnic runs (k6t- is
// one), needs no module of its own, and can not pass a frame either.
package bridge

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"strconv"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/utils/sysctl"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/vmnic/vmnic/pkg/announce"
	"github.com/vmnic/vmnic/pkg/dhcp"
	"github.com/vmnic/vmnic/pkg/failpoint"
	ipamexec "github.com/vmnic/vmnic/pkg/ipam"
	"github.com/vmnic/vmnic/pkg/kubevirt"
	"github.com/vmnic/vmnic/pkg/mode"
	"github.com/vmnic/vmnic/pkg/netconf"
	"github.com/vmnic/vmnic/pkg/nft"
	"github.com/vmnic/vmnic/pkg/ovsdb"
	"github.com/vmnic/vmnic/pkg/podnet"
	"github.com/vmnic/vmnic/pkg/state"
)

// External IDs vmnic writes on its OVS ports and interfaces.
const (
	OwnerKey      = "vmnic.io/owner"
	OwnerValue    = "vmnic"
	AttachmentKey = "vmnic.io/attachment" // <containerID>/<ifname>
	NetnsKey      = "vmnic.io/netns"
	IfaceKey      = "vmnic.io/iface"
	PodNSKey      = "vmnic.io/pod-namespace"
	PodNameKey    = "vmnic.io/pod-name"
	PodUIDKey     = "vmnic.io/pod-uid"
	NetworkKey    = "vmnic.io/network"
)

// ServerAddr is the address the pod bridge holds for the DHCP server, as
// KubeVirt's bridge binding does: link-local, /32, never routed.
var ServerAddr = net.IPv4(169, 254, 75, 10).To4()

// Spec is everything needed to wire, check, restore and remove one port.
// The daemon stores it in the attachment record.
type Spec struct {
	ContainerID string `json:"containerID"`
	Network     string `json:"network"`
	Netns       string `json:"netns"`
	PodIf       string `json:"podIf"`
	// NicIf is a VM's bridge port, the veth's pod end ("<if>-nic"); PodIf
	// is then the placeholder holding the guest's MAC. Empty in records of
	// older vmnic versions, whose port was PodIf itself.
	NicIf string `json:"nicIf,omitempty"`
	// HostNetns is where the node end lives and OVS runs; "" is the
	// daemon's own namespace.
	HostNetns string `json:"hostNetns,omitempty"`
	HostIf    string `json:"hostIf"`
	Owner     string `json:"owner"`

	OVSBridge string `json:"ovsBridge"`
	OVSDB     string `json:"ovsdb,omitempty"`
	VLAN      *int   `json:"vlan,omitempty"`
	Trunks    []int  `json:"trunks,omitempty"`
	MTU       int    `json:"mtu,omitempty"`
	// LinkMTU is the pod interface's MTU once wired, handed to the guest.
	LinkMTU int `json:"linkMTU,omitempty"`

	PodNamespace string `json:"podNamespace,omitempty"`
	PodName      string `json:"podName,omitempty"`
	PodUID       string `json:"podUID,omitempty"`

	// VM is set for a VM NIC: the KubeVirt layout behind the pod interface.
	VM          bool   `json:"vm,omitempty"`
	LinuxBridge string `json:"linuxBridge,omitempty"`
	Tap         string `json:"tap,omitempty"`
	Queues      int    `json:"queues,omitempty"`
	// Held: the target of a live migration, silent until it takes over.
	Held bool `json:"held,omitempty"`
	// Silenced: the source of a live migration that handed over.
	Silenced bool `json:"silenced,omitempty"`
	// GuestMAC is the VMI's MAC; empty until IPAM when it follows the IP.
	GuestMAC string   `json:"guestMAC,omitempty"`
	Hostname string   `json:"hostname,omitempty"`
	DNS      []string `json:"dns,omitempty"`
	Search   []string `json:"search,omitempty"`

	IPAM ipamexec.Call `json:"ipam"`
	// Addresses is the IPAM result, set once IPAM answered.
	Addresses *current.Result `json:"addresses,omitempty"`
}

// Input is what NewSpec derives a Spec from.
type Input struct {
	ContainerID, Netns, IfName, Args, Path string
	HostNetns                              string
	Config                                 []byte
	Conf                                   *netconf.Conf
	Pod                                    netconf.PodArgs
	// Facts is nil for a pod that is no VM (a plain port).
	Facts *kubevirt.Facts
	// OVSDB is the daemon's default endpoint.
	OVSDB string
}

// HostIfName is the node end of the veth (and the OVS port's name): vmn and
// 11 hex digits of a hash of the attachment.
func HostIfName(containerID, ifName string) string {
	sum := sha256.Sum256([]byte(state.Key(containerID, ifName)))
	return "vmn" + hex.EncodeToString(sum[:])[:11]
}

// NewSpec decides the wiring; it touches nothing.
func NewSpec(in Input) (*Spec, error) {
	c := in.Conf
	s := &Spec{
		ContainerID: in.ContainerID, Network: c.Name,
		Netns: in.Netns, PodIf: in.IfName, HostNetns: in.HostNetns,
		HostIf:    HostIfName(in.ContainerID, in.IfName),
		Owner:     podnet.Alias(in.ContainerID, in.IfName),
		OVSBridge: c.Bridge, OVSDB: c.OVSDBSocket, VLAN: c.VLAN, Trunks: c.TrunkVLANs(), MTU: c.MTU,
		PodNamespace: in.Pod.Namespace, PodName: in.Pod.Name, PodUID: in.Pod.UID,
		DNS: c.DNS.Nameservers, Search: c.DNS.Search,
		IPAM: ipamexec.Call{
			Type: c.IPAM.Type, Config: in.Config, ContainerID: in.ContainerID,
			Netns: in.Netns, IfName: in.IfName, Args: in.Args, Path: in.Path,
		},
	}
	if s.OVSDB == "" {
		s.OVSDB = in.OVSDB
	}
	if f := in.Facts; f != nil && f.Serve {
		if len(in.IfName) <= 3 {
			return nil, types.NewError(types.ErrInvalidEnvironmentVariables,
				fmt.Sprintf("CNI_IFNAME: %q is too short to derive the tap name (KubeVirt's rule is tap+name[3:])", in.IfName), "")
		}
		nic, err := kubevirt.NicName(in.IfName)
		if err != nil {
			return nil, types.NewError(types.ErrInvalidEnvironmentVariables, "CNI_IFNAME: "+err.Error(), "")
		}
		s.VM = true
		s.NicIf = nic
		s.LinuxBridge = kubevirt.BridgeName(in.IfName)
		s.Tap = kubevirt.TapName(in.IfName, f.Primary)
		s.Queues = f.Queues
		s.GuestMAC = f.MAC
		s.Hostname = f.VMName
		s.Held = f.Migration != nil
	}
	return s, nil
}

// GuestMACFor is the MAC rule for a guest whose VMI names none.
func GuestMACFor(ip net.IP) net.HardwareAddr {
	b := ip.To4()
	if b == nil {
		b = ip.To16()[12:]
	}
	return net.HardwareAddr{0x02, 0x76, b[0], b[1], b[2], b[3]}
}

// portMAC is the MAC of a VM's bridge port (and of k6t-<if>): it must differ
// from the guest's, or the bridge would take the guest's frames for its own.
func portMAC(guest net.HardwareAddr) net.HardwareAddr {
	m := append(net.HardwareAddr(nil), guest...)
	m[1] ^= 0x01
	return m
}

// OVS gives the plugin a client for an ovsdb-server endpoint.
type OVS func(ctx context.Context, endpoint string) (*ovsdb.Client, error)

// Servers runs the DHCP servers of attachments, keyed by attachment.
type Servers = mode.Servers

// Plugin wires bridge-mode ports.
type Plugin struct {
	OVS     OVS
	Servers Servers
	Log     *slog.Logger
}

// Steps of Add in order, each followed by a failpoint (pkg/failpoint).
var Steps = []string{"ipam", "veth", "ovs", "pod", "nft", "dhcp"}

func step(name string) error { return failpoint.Hit(netconf.ModeBridge, name) }

func (p *Plugin) log() *slog.Logger {
	if p.Log != nil {
		return p.Log
	}
	return slog.Default()
}

// ExternalIDs are the marks of the attachment's port.
func (s *Spec) ExternalIDs() map[string]string {
	m := map[string]string{
		OwnerKey:      OwnerValue,
		AttachmentKey: state.Key(s.ContainerID, s.PodIf),
		NetnsKey:      s.Netns,
		IfaceKey:      s.PodIf,
		NetworkKey:    s.Network,
	}
	for k, v := range map[string]string{PodNSKey: s.PodNamespace, PodNameKey: s.PodName, PodUIDKey: s.PodUID} {
		if v != "" {
			m[k] = v
		}
	}
	return m
}

// owner is what DeletePort requires of a port before deleting it.
func (s *Spec) owner() map[string]string {
	return map[string]string{OwnerKey: OwnerValue, AttachmentKey: state.Key(s.ContainerID, s.PodIf)}
}

// Add wires the port; save is called once IPAM answered so the caller can
// record the addresses before anything else is created. On error
// everything Add created is removed and the addresses are released.
func (p *Plugin) Add(ctx context.Context, key string, s *Spec, save func() error) (err error) {
	defer func() {
		if err != nil {
			if cerr := p.undo(context.WithoutCancel(ctx), key, s); cerr != nil {
				p.log().Error("rollback after failed ADD left something behind", "key", key, "err", cerr)
			}
		}
	}()
	podH, closePod, err := podnet.OpenHandle(s.Netns)
	if err != nil {
		return podnet.NetnsError(err)
	}
	defer closePod()
	for _, name := range []string{s.PodIf, s.NicIf} {
		if name == "" {
			continue
		}
		if _, lerr := podH.LinkByName(name); lerr == nil {
			return types.NewError(types.ErrInvalidEnvironmentVariables,
				fmt.Sprintf("CNI_IFNAME: %q already exists in %s", name, s.Netns), "")
		}
	}
	client, err := p.OVS(ctx, s.OVSDB)
	if err != nil {
		return types.NewError(types.ErrTryAgainLater, fmt.Sprintf("ovsdbSocket: OVS database %s unreachable: %v", s.OVSDB, err), "")
	}
	datapath, lerr := bridgeDatapath(ctx, client, s.OVSBridge)
	if lerr != nil {
		return lerr
	}

	res, err := s.IPAM.Add(ctx)
	if res != nil {
		s.Addresses = res
	}
	if err != nil {
		return err
	}
	if s.VM && s.GuestMAC == "" {
		s.GuestMAC = GuestMACFor(res.IPs[0].Address.IP).String()
	}
	if err = save(); err != nil {
		return err
	}
	if err = step("ipam"); err != nil {
		return err
	}

	hostH, closeHost, err := podnet.OpenHost(s.HostNetns)
	if err != nil {
		return err
	}
	defer closeHost()
	if err = p.addVeth(hostH, podH, s); err != nil {
		return err
	}
	if datapath == ovsdb.DatapathNetdev {
		// OVS's userspace datapath forwards what the pod sends (the
		// guest's too, through the tap) with the checksum the kernel
		// left to the receiver unfilled: TCP and UDP would be dropped
		// by every receiver. The kernel fills them in when the link
		// does not offload them.
		if err = podnet.SetTxChecksum(s.Netns, s.podEnd(), false); err != nil {
			return fmt.Errorf("bridge %s has the userspace datapath: %w", s.OVSBridge, err)
		}
	}
	if err = step("veth"); err != nil {
		return err
	}
	if err = client.AddPort(ctx, ovsdb.PortSpec{
		Bridge: s.OVSBridge, Name: s.HostIf, Tag: s.VLAN, Trunks: s.Trunks, MTU: s.MTU,
		ExternalIDs: s.ExternalIDs(),
	}); err != nil {
		return portError(s, err)
	}
	if err = step("ovs"); err != nil {
		return err
	}
	if !s.VM {
		return p.configurePod(podH, s)
	}
	if err = p.wireVM(podH, s); err != nil {
		return err
	}
	if err = step("pod"); err != nil {
		return err
	}
	if err = nft.ApplyGuard(s.Netns, s.guard()); err != nil {
		return fmt.Errorf("program the pod's bridge filter: %w", err)
	}
	if err = step("nft"); err != nil {
		return err
	}
	if err = p.Servers.Start(ctx, key, s.dhcpConfig(p.log())); err != nil {
		return fmt.Errorf("start DHCP servers on %s: %w", s.LinuxBridge, err)
	}
	return step("dhcp")
}

// bridgeDatapath returns the datapath type of the OVS bridge name ("" or
// "system": the kernel's; "netdev": the userspace one), or a CNI error
// when the bridge does not exist.
func bridgeDatapath(ctx context.Context, c *ovsdb.Client, name string) (string, error) {
	brs, err := c.Bridges(ctx)
	if err != nil {
		return "", types.NewError(types.ErrTryAgainLater, fmt.Sprintf("list OVS bridges: %v", err), "")
	}
	for _, b := range brs {
		if b.Name == name {
			return b.DatapathType, nil
		}
	}
	return "", types.NewError(types.ErrInvalidNetworkConfig, fmt.Sprintf("bridge: OVS bridge %q does not exist on this node", name), "")
}

func portError(s *Spec, err error) error {
	switch {
	case errors.Is(err, ovsdb.ErrBridgeNotFound):
		return types.NewError(types.ErrInvalidNetworkConfig, fmt.Sprintf("bridge: OVS bridge %q does not exist on this node", s.OVSBridge), "")
	case errors.Is(err, ovsdb.ErrInvalidSpec):
		return types.NewError(types.ErrInvalidNetworkConfig, err.Error(), "")
	}
	return fmt.Errorf("OVS port: %w", err)
}

// Port is the pod-side link that is the VM's bridge port: NicIf, or PodIf
// in records of older versions.
func (s *Spec) Port() string {
	if s.NicIf != "" {
		return s.NicIf
	}
	return s.PodIf
}

// podEnd is the veth's pod end: the VM's port, or a plain pod's interface.
func (s *Spec) podEnd() string {
	if s.VM {
		return s.Port()
	}
	return s.PodIf
}

func (s *Spec) guard() nft.Guard {
	return nft.Guard{Name: s.PodIf, PodIf: s.Port(), Tap: s.Tap, Held: s.Held || s.Silenced}
}

// Release ends a migration target's hold: the guest behind the tap is
// connected to the VLAN and its addresses are announced from here
// (gratuitous ARP, unsolicited NA) with its MAC, so switches and peers
// move to this port at once.
func (p *Plugin) Release(s *Spec) error {
	s.Held = false
	if err := nft.ApplyGuard(s.Netns, s.guard()); err != nil {
		s.Held = true
		return fmt.Errorf("release hold of %s: %w", s.PodIf, err)
	}
	mac, err := net.ParseMAC(s.GuestMAC)
	if err != nil {
		return fmt.Errorf("guest MAC %q: %w", s.GuestMAC, err)
	}
	var ips []net.IP
	for _, ipc := range s.ips() {
		ips = append(ips, ipc.Address.IP)
	}
	return announce.Send(announce.Announcement{Netns: s.Netns, IfName: s.Port(), MAC: mac, IPs: ips})
}

// Silence cuts a migration source's guest off the VLAN once the target
// took over, until the source pod's DEL.
func (p *Plugin) Silence(s *Spec) error {
	s.Silenced = true
	if err := nft.ApplyGuard(s.Netns, s.guard()); err != nil {
		s.Silenced = false
		return fmt.Errorf("silence %s: %w", s.PodIf, err)
	}
	return nil
}

// addVeth creates the pair from the node side, the pod end (podEnd) in the
// pod netns, both marked, and sets the node end up.
func (p *Plugin) addVeth(hostH, podH netlinksafe.Handle, s *Spec) error {
	podNS, err := ns.GetNS(s.Netns)
	if err != nil {
		return fmt.Errorf("open netns %s: %w", s.Netns, err)
	}
	defer func() { _ = podNS.Close() }()
	tmpPeer := podnet.TempName(s.Owner, podnet.TempPeer)
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: s.HostIf, MTU: s.MTU},
		PeerName:      tmpPeer,
		PeerNamespace: netlink.NsFd(int(podNS.Fd())),
	}
	if s.MTU > 0 {
		veth.PeerMTU = uint32(s.MTU)
	}
	if verr := hostH.LinkAdd(veth); verr != nil {
		if errors.Is(verr, unix.EEXIST) {
			return types.NewError(types.ErrInvalidNetworkConfig, fmt.Sprintf("veth %q already exists", s.HostIf), "")
		}
		return fmt.Errorf("create veth %s/%s: %w", s.HostIf, s.podEnd(), verr)
	}
	// The node end's name is the attachment's own; the pod end is created
	// under a temporary one and renamed once marked.
	host, err := hostH.LinkByName(s.HostIf)
	if err != nil {
		return fmt.Errorf("look up %q: %w", s.HostIf, err)
	}
	if aerr := hostH.LinkSetAlias(host, s.Owner); aerr != nil {
		_ = hostH.LinkDel(host)
		return fmt.Errorf("mark %q: %w", s.HostIf, aerr)
	}
	if _, rerr := podnet.MarkAndRename(podH, tmpPeer, s.podEnd(), s.Owner); rerr != nil {
		return fmt.Errorf("pod end: %w", rerr)
	}
	if err := hostH.LinkSetUp(host); err != nil {
		return fmt.Errorf("set %q up: %w", s.HostIf, err)
	}
	return nil
}

// configurePod gives a plain pod its addresses and routes on the pod end.
func (p *Plugin) configurePod(h netlinksafe.Handle, s *Spec) error {
	l, err := h.LinkByName(s.PodIf)
	if err != nil {
		return fmt.Errorf("look up %q: %w", s.PodIf, err)
	}
	for _, ipc := range s.ips() {
		a := &netlink.Addr{IPNet: &net.IPNet{IP: ipc.Address.IP, Mask: ipc.Address.Mask}}
		if ipc.Address.IP.To4() == nil {
			a.Flags = unix.IFA_F_NODAD
		}
		if err := h.AddrAdd(l, a); err != nil {
			return fmt.Errorf("add %s to %q: %w", a.IPNet, s.PodIf, err)
		}
	}
	if err := h.LinkSetUp(l); err != nil {
		return fmt.Errorf("set %q up: %w", s.PodIf, err)
	}
	for _, r := range s.Addresses.Routes {
		gw := r.GW
		if gw == nil {
			gw = s.gatewayFor(r.Dst.IP)
		}
		rt := &netlink.Route{LinkIndex: l.Attrs().Index, Dst: &r.Dst, Gw: gw, Priority: r.Priority}
		if ones, _ := r.Dst.Mask.Size(); ones == 0 {
			rt.Dst = nil
			if r.Dst.IP.To4() == nil {
				rt.Family = netlink.FAMILY_V6
			}
		}
		if err := h.RouteAdd(rt); err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("add route %s via %v on %q: %w", r.Dst.String(), gw, s.PodIf, err)
		}
	}
	return nil
}

// gatewayFor returns the IPAM gateway of dst's family.
func (s *Spec) gatewayFor(dst net.IP) net.IP {
	v4 := dst.To4() != nil
	for _, ipc := range s.ips() {
		if (ipc.Address.IP.To4() != nil) == v4 && ipc.Gateway != nil {
			return ipc.Gateway
		}
	}
	return nil
}

// wireVM builds the KubeVirt layout behind the pod end: the port NicIf and
// the tap on k6t-<if>, and the placeholder PodIf with the guest's MAC.
func (p *Plugin) wireVM(h netlinksafe.Handle, s *Spec) error {
	guest, err := net.ParseMAC(s.GuestMAC)
	if err != nil {
		return fmt.Errorf("guest MAC %q: %w", s.GuestMAC, err)
	}
	port, err := h.LinkByName(s.Port())
	if err != nil {
		return fmt.Errorf("look up %q: %w", s.Port(), err)
	}
	mtu := port.Attrs().MTU
	s.LinkMTU = mtu
	wantV6 := s.hasV6()
	// The port carries only the guest's frames: no address, no IPv6 of its
	// own (no link-local, no DAD, no MLD).
	if serr := disableIPv6(s.Netns, s.Port()); serr != nil {
		return serr
	}
	if lerr := h.LinkSetHardwareAddr(port, portMAC(guest)); lerr != nil {
		return fmt.Errorf("set MAC of %q: %w", s.Port(), lerr)
	}
	if _, lerr := h.LinkByName(s.LinuxBridge); lerr == nil {
		return types.NewError(types.ErrInvalidNetworkConfig, fmt.Sprintf("link %q already exists in %s", s.LinuxBridge, s.Netns), "")
	}
	tmp := podnet.TempName(s.Owner, podnet.TempBridge)
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{
		Name: tmp, MTU: mtu, HardwareAddr: portMAC(guest), TxQLen: -1,
	}}
	if berr := h.LinkAdd(br); berr != nil {
		return fmt.Errorf("create bridge %q: %w", s.LinuxBridge, berr)
	}
	brl, err := podnet.MarkAndRename(h, tmp, s.LinuxBridge, s.Owner)
	if err != nil {
		_ = podnet.DeletePrivate(h, s.Owner, tmp)
		return fmt.Errorf("bridge %q: %w", s.LinuxBridge, err)
	}
	if !wantV6 {
		if err := disableIPv6(s.Netns, s.LinuxBridge); err != nil {
			return err
		}
	}
	if s.hasV4() {
		a := &netlink.Addr{IPNet: &net.IPNet{IP: ServerAddr, Mask: net.CIDRMask(32, 32)}, Scope: unix.RT_SCOPE_LINK}
		if err := h.AddrAdd(brl, a); err != nil {
			return fmt.Errorf("add %s to %q: %w", a.IPNet, s.LinuxBridge, err)
		}
	}
	if err := h.LinkSetMaster(port, brl); err != nil {
		return fmt.Errorf("attach %q to %q: %w", s.Port(), s.LinuxBridge, err)
	}
	if err := h.LinkSetUp(port); err != nil {
		return fmt.Errorf("set %q up: %w", s.Port(), err)
	}
	if err := h.LinkSetUp(brl); err != nil {
		return fmt.Errorf("set %q up: %w", s.LinuxBridge, err)
	}
	if err := podnet.AddTap(h, podnet.Tap{Netns: s.Netns, Name: s.Tap, Owner: s.Owner, MTU: mtu, Queues: s.Queues}, brl); err != nil {
		return err
	}
	return addPlaceholder(h, s, guest, mtu)
}

// addPlaceholder creates the link named as the pod interface that KubeVirt's
// tap binding reads the guest's MAC and MTU from: a bridge with no ports,
// left down, with no address and IPv6 off.
func addPlaceholder(h netlinksafe.Handle, s *Spec, guest net.HardwareAddr, mtu int) error {
	tmp := podnet.TempName(s.Owner, podnet.TempPlaceholder)
	ph := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: tmp, MTU: mtu, HardwareAddr: guest, TxQLen: -1}}
	if err := h.LinkAdd(ph); err != nil {
		return fmt.Errorf("create placeholder %q: %w", s.PodIf, err)
	}
	if _, err := podnet.MarkAndRename(h, tmp, s.PodIf, s.Owner); err != nil {
		_ = podnet.DeletePrivate(h, s.Owner, tmp)
		return fmt.Errorf("placeholder %q: %w", s.PodIf, err)
	}
	return disableIPv6(s.Netns, s.PodIf)
}

func disableIPv6(netnsPath, ifName string) error {
	err := ns.WithNetNSPath(netnsPath, func(ns.NetNS) error {
		_, e := sysctl.Sysctl("net.ipv6.conf."+ifName+".disable_ipv6", "1")
		return e
	})
	if err != nil {
		return fmt.Errorf("disable IPv6 on %s: %w", ifName, err)
	}
	return nil
}

func (s *Spec) hasV4() bool {
	for _, ip := range s.ips() {
		if ip.Address.IP.To4() != nil {
			return true
		}
	}
	return false
}

func (s *Spec) hasV6() bool {
	for _, ip := range s.ips() {
		if ip.Address.IP.To4() == nil {
			return true
		}
	}
	return false
}

func (s *Spec) ips() []*current.IPConfig {
	if s.Addresses == nil {
		return nil
	}
	return s.Addresses.IPs
}

func (s *Spec) dhcpConfig(log *slog.Logger) dhcp.Config {
	cfg := dhcp.Config{NetnsPath: s.Netns, IfName: s.LinuxBridge, Logger: log}
	cfg.ClientMAC, _ = net.ParseMAC(s.GuestMAC)
	mtu := s.LinkMTU
	if mtu == 0 {
		mtu = s.MTU
	}
	var dns4, dns6 []net.IP
	dnsNames, search := s.DNS, s.Search
	if s.Addresses != nil && len(s.Addresses.DNS.Nameservers) > 0 {
		dnsNames, search = s.Addresses.DNS.Nameservers, s.Addresses.DNS.Search
	}
	for _, d := range dnsNames {
		if ip := net.ParseIP(d); ip != nil {
			if ip.To4() != nil {
				dns4 = append(dns4, ip)
			} else {
				dns6 = append(dns6, ip)
			}
		}
	}
	for _, ipc := range s.ips() {
		if ipc.Address.IP.To4() != nil {
			if cfg.V4 != nil {
				continue // one address per family goes to the guest
			}
			v4 := &dhcp.V4{
				Address:  net.IPNet{IP: ipc.Address.IP.To4(), Mask: ipc.Address.Mask},
				ServerID: ServerAddr,
				Router:   ipc.Gateway.To4(),
				DNS:      dns4,
				Search:   search,
				MTU:      mtu,
				Hostname: s.Hostname,
			}
			for _, r := range s.Addresses.Routes {
				if r.Dst.IP.To4() == nil {
					continue
				}
				if ones, _ := r.Dst.Mask.Size(); ones == 0 {
					if v4.Router == nil && r.GW != nil {
						v4.Router = r.GW.To4()
					}
					continue
				}
				v4.Routes = append(v4.Routes, dhcp.Route{Dst: r.Dst, Gw: r.GW})
			}
			cfg.V4 = v4
			continue
		}
		if cfg.V6 == nil {
			cfg.V6 = &dhcp.V6{Address: ipc.Address.IP, DNS: dns6, Search: search}
		}
	}
	return cfg
}

// Result lists the node end and the pod interface (for a VM also its port,
// the bridge and the tap), with the IPAM addresses on the pod interface:
// Multus copies it into the pod's network-status, where KubeVirt and users
// read the interface's IPs and MAC. FillMACs then gives every interface the
// MAC it has in the kernel.
func (s *Spec) Result() *current.Result {
	r := &current.Result{CNIVersion: current.ImplementedSpecVersion}
	r.Interfaces = []*current.Interface{{Name: s.HostIf}, {Name: s.PodIf, Sandbox: s.Netns}}
	if s.VM {
		if s.NicIf != "" {
			r.Interfaces = append(r.Interfaces, &current.Interface{Name: s.NicIf, Sandbox: s.Netns})
		}
		r.Interfaces = append(r.Interfaces,
			&current.Interface{Name: s.LinuxBridge, Sandbox: s.Netns},
			&current.Interface{Name: s.Tap, Sandbox: s.Netns})
	}
	if s.Addresses != nil {
		for _, ipc := range s.Addresses.IPs {
			c := *ipc
			c.Interface = current.Int(1)
			r.IPs = append(r.IPs, &c)
		}
		r.Routes = s.Addresses.Routes
		r.DNS = s.Addresses.DNS
	}
	return r
}

// FillMACs reads the MAC of every interface in r from the kernel: the node
// end from the node's netns, the rest from the pod's.
func (s *Spec) FillMACs(r *current.Result) error {
	h, closeH, err := podnet.OpenHost(s.HostNetns)
	if err != nil {
		return err
	}
	defer closeH()
	podH, closePod, err := podnet.OpenHandle(s.Netns)
	if err != nil {
		return podnet.NetnsError(err)
	}
	defer closePod()
	for _, ifc := range r.Interfaces {
		hh := h
		if ifc.Sandbox != "" {
			hh = podH
		}
		l, lerr := hh.LinkByName(ifc.Name)
		if lerr != nil {
			return fmt.Errorf("read MAC of %q: %w", ifc.Name, lerr)
		}
		ifc.Mac = l.Attrs().HardwareAddr.String()
	}
	return nil
}

// Restore restarts the DHCP server of a wired VM NIC (daemon restart).
func (p *Plugin) Restore(ctx context.Context, key string, s *Spec) error {
	if !s.VM || p.Servers.Running(key) {
		return nil
	}
	h, closeNS, err := podnet.OpenHandle(s.Netns)
	if err != nil {
		return err
	}
	defer closeNS()
	if _, err := podnet.OwnedLink(h, s.LinuxBridge, s.Owner); err != nil {
		return fmt.Errorf("restore %s: %w", key, err)
	}
	return p.Servers.Start(ctx, key, s.dhcpConfig(p.log()))
}

// Del removes the port and releases the addresses. What is already gone is
// fine; only links and ports carrying this attachment's marks are deleted.
func (p *Plugin) Del(ctx context.Context, key string, s *Spec) error {
	return p.undo(ctx, key, s)
}

func (p *Plugin) undo(ctx context.Context, key string, s *Spec) error {
	p.Servers.Stop(key)
	var errs []error
	if client, err := p.OVS(ctx, s.OVSDB); err != nil {
		errs = append(errs, fmt.Errorf("OVS database %s unreachable, port %s kept: %w", s.OVSDB, s.HostIf, err))
	} else if err := client.DeletePort(ctx, s.OVSBridge, s.HostIf, s.owner()); err != nil {
		errs = append(errs, err)
	}
	if h, closeNS, err := podnet.OpenHandle(s.Netns); err == nil {
		if lerr := podnet.DeleteOwned(h, s.Owner, s.ownedNames()...); lerr != nil {
			errs = append(errs, lerr)
		}
		if lerr := podnet.DeletePrivate(h, s.Owner, podnet.TempNames(s.Owner)...); lerr != nil {
			errs = append(errs, lerr)
		}
		closeNS()
		if s.VM {
			if lerr := nft.DeleteGuard(s.Netns, s.PodIf); lerr != nil {
				errs = append(errs, lerr)
			}
		}
	} else if !errors.Is(err, podnet.ErrNetnsGone) {
		errs = append(errs, err)
	}
	if h, closeH, err := podnet.OpenHost(s.HostNetns); err == nil {
		if lerr := podnet.DeletePrivate(h, s.Owner, s.HostIf); lerr != nil {
			errs = append(errs, lerr)
		}
		closeH()
	} else if !errors.Is(err, podnet.ErrNetnsGone) {
		errs = append(errs, err)
	}
	if s.IPAM.Type != "" {
		if err := s.IPAM.Del(ctx); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// ownedNames are the pod-side links of the attachment, by name; each is
// deleted only with the attachment's owner mark.
func (s *Spec) ownedNames() []string {
	names := []string{s.PodIf}
	if !s.VM {
		return names
	}
	// A DEL without a record does not know whether the NIC was the VMI's
	// primary one: both tap names are the attachment's.
	names = append(names, kubevirt.TapCandidates(s.PodIf)...)
	for _, n := range []string{s.Tap, s.LinuxBridge, s.NicIf} {
		if n != "" && !slices.Contains(names, n) {
			names = append(names, n)
		}
	}
	return names
}

// Check compares the attachment with what Add made and names every piece
// that drifted.
func (p *Plugin) Check(ctx context.Context, key string, s *Spec) error {
	if err := podnet.RequireNetns(s.Netns); err != nil {
		return err
	}
	var bad []string
	problem := func(format string, a ...any) { bad = append(bad, fmt.Sprintf(format, a...)) }

	client, err := p.OVS(ctx, s.OVSDB)
	if err != nil {
		return types.NewError(types.ErrTryAgainLater, fmt.Sprintf("ovsdbSocket: OVS database %s unreachable: %v", s.OVSDB, err), "")
	}
	ports, err := client.Ports(ctx, s.owner())
	if err != nil {
		return fmt.Errorf("CHECK: list OVS ports: %w", err)
	}
	switch {
	case len(ports) == 0:
		problem("OVS port %s missing", s.HostIf)
	case ports[0].Bridge != s.OVSBridge:
		problem("OVS port %s on bridge %q, want %q", s.HostIf, ports[0].Bridge, s.OVSBridge)
	default:
		pt := ports[0]
		if !equalTag(pt.Tag, s.VLAN) {
			problem("OVS port %s tag %s, want %s", s.HostIf, tagString(pt.Tag), tagString(s.VLAN))
		}
		if !equalInts(pt.Trunks, s.Trunks) {
			problem("OVS port %s trunks %v, want %v", s.HostIf, pt.Trunks, s.Trunks)
		}
		if s.MTU > 0 && pt.Interface.MTURequest != s.MTU {
			problem("OVS interface %s mtu_request %d, want %d", s.HostIf, pt.Interface.MTURequest, s.MTU)
		}
		if pt.Interface.Error != "" {
			problem("OVS interface %s error: %s", s.HostIf, pt.Interface.Error)
		}
	}
	if h, closeH, herr := podnet.OpenHost(s.HostNetns); herr == nil {
		checkLink(h, s.HostIf, s.Owner, "veth", problem)
		closeH()
	} else {
		problem("node netns: %v", herr)
	}
	h, closeNS, err := podnet.OpenHandle(s.Netns)
	if err != nil {
		return podnet.NetnsError(err)
	}
	defer closeNS()
	if !s.VM {
		if pod := checkLink(h, s.PodIf, s.Owner, "veth", problem); pod != nil {
			checkAddrs(h, pod, s.ips(), problem)
		}
		return drift(key, bad)
	}
	port := checkLink(h, s.Port(), s.Owner, "veth", problem)
	br := checkLink(h, s.LinuxBridge, s.Owner, "bridge", problem)
	tap := checkLink(h, s.Tap, s.Owner, "tuntap", problem)
	if br != nil {
		for _, l := range []netlink.Link{port, tap} {
			if l != nil && l.Attrs().MasterIndex != br.Attrs().Index {
				problem("%s is not a port of %s", l.Attrs().Name, s.LinuxBridge)
			}
		}
	}
	if port != nil {
		if addrs, err := h.AddrList(port, netlink.FAMILY_ALL); err == nil && len(addrs) > 0 {
			problem("%s holds address %s; the port of a VM must hold none", s.Port(), addrs[0].IPNet)
		}
	}
	if s.NicIf != "" {
		checkPlaceholder(h, s, port, problem)
	}
	if err := nft.CheckGuard(s.Netns, s.guard()); err != nil {
		problem("%v", err)
	}
	if !p.Servers.Running(key) {
		problem("DHCP server on %s not running", s.LinuxBridge)
	}
	return drift(key, bad)
}

// checkPlaceholder: the pod interface's name holds the guest's MAC and the
// port's MTU, for KubeVirt to read, and is connected to nothing.
func checkPlaceholder(h netlinksafe.Handle, s *Spec, port netlink.Link, problem func(string, ...any)) {
	l, err := podnet.OwnedLink(h, s.PodIf, s.Owner)
	switch {
	case errors.Is(err, podnet.ErrLinkGone):
		problem("placeholder %s missing", s.PodIf)
		return
	case errors.Is(err, podnet.ErrNotOwned):
		problem("link %s has another owner mark (%q)", s.PodIf, l.Attrs().Alias)
		return
	case err != nil:
		problem("%v", err)
		return
	}
	a := l.Attrs()
	if l.Type() != "bridge" {
		problem("placeholder %s is a %s, want bridge", s.PodIf, l.Type())
	}
	if a.HardwareAddr.String() != s.GuestMAC {
		problem("placeholder %s has MAC %s, want the guest's %s", s.PodIf, a.HardwareAddr, s.GuestMAC)
	}
	if port != nil && a.MTU != port.Attrs().MTU {
		problem("placeholder %s has MTU %d, want the port's %d", s.PodIf, a.MTU, port.Attrs().MTU)
	}
	if a.MasterIndex != 0 || a.Flags&net.FlagUp != 0 {
		problem("placeholder %s must be down and a port of nothing", s.PodIf)
	}
}

func drift(key string, bad []string) error {
	if len(bad) == 0 {
		return nil
	}
	msg := "CHECK " + key + ": "
	for i, b := range bad {
		if i > 0 {
			msg += "; "
		}
		msg += b
	}
	return types.NewError(types.ErrInternal, msg, "")
}

func checkLink(h netlinksafe.Handle, name, owner, typ string, problem func(string, ...any)) netlink.Link {
	l, err := podnet.OwnedLink(h, name, owner)
	switch {
	case errors.Is(err, podnet.ErrLinkGone):
		problem("link %s missing", name)
		return nil
	case errors.Is(err, podnet.ErrNotOwned):
		problem("link %s has another owner mark (%q)", name, l.Attrs().Alias)
		return nil
	case err != nil:
		problem("%v", err)
		return nil
	}
	if l.Type() != typ {
		problem("link %s is a %s, want %s", name, l.Type(), typ)
	}
	if l.Attrs().Flags&net.FlagUp == 0 {
		problem("link %s is down", name)
	}
	return l
}

func checkAddrs(h netlinksafe.Handle, l netlink.Link, want []*current.IPConfig, problem func(string, ...any)) {
	addrs, err := h.AddrList(l, netlink.FAMILY_ALL)
	if err != nil {
		problem("list addresses of %s: %v", l.Attrs().Name, err)
		return
	}
	for _, w := range want {
		found := false
		for _, a := range addrs {
			if a.IPNet.String() == w.Address.String() {
				found = true
			}
		}
		if !found {
			problem("%s lacks address %s", l.Attrs().Name, w.Address.String())
		}
	}
}

func equalTag(a, b *int) bool {
	if a == nil || b == nil {
		return a == nil && b == nil
	}
	return *a == *b
}

func tagString(t *int) string {
	if t == nil {
		return "none"
	}
	return strconv.Itoa(*t)
}

func equalInts(a, b []int) bool {
	if len(a) != len(b) {
		return false
	}
	seen := map[int]bool{}
	for _, v := range a {
		seen[v] = true
	}
	for _, v := range b {
		if !seen[v] {
			return false
		}
	}
	return true
}

// WatchGuest calls seen with the time of each frame the guest sends on the
// tap (the first on a migration target is QEMU's self-announcement of a VM
// that resumed on this side) until seen returns false, ctx ends, or the
// tap goes. Its packet socket sees the frames before the bridge (and the
// hold) drops them.
func WatchGuest(ctx context.Context, s *Spec, seen func(mode.GuestFrame) bool) error {
	mac, err := net.ParseMAC(s.GuestMAC)
	if err != nil {
		return fmt.Errorf("guest MAC %q: %w", s.GuestMAC, err)
	}
	// Frames the guest sent arrive on the tap from the host's view
	// (PACKET_HOST/OTHERHOST...), never as PACKET_OUTGOING.
	fromGuest := func(f podnet.Frame) bool {
		return !f.Outgoing && len(f.Data) >= 12 && bytes.Equal(f.Data[6:12], mac)
	}
	return podnet.WatchFrames(ctx, s.Netns, s.Tap, fromGuest, func(f podnet.Frame, at time.Time) bool {
		return seen(mode.GuestFrame{At: at, Traffic: podnet.IsTraffic(f.Data), What: podnet.Describe(f.Data)})
	})
}
