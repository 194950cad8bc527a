package dhcp

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"net"
	"syscall"
	"time"

	"github.com/insomniacslk/dhcp/dhcpv4"
	"github.com/insomniacslk/dhcp/rfc1035label"
	"golang.org/x/net/ipv4"
	"golang.org/x/sys/unix"
)

// v4Options is a V4 turned into what goes on the wire.
type v4Options struct {
	yiaddr   net.IP     // the guest's address, 4 bytes
	subnet   *net.IPNet // the guest's subnet, 4 bytes each
	serverID net.IP     // 4 bytes
	lease    uint32     // seconds, math.MaxUint32 = infinite
	config   []dhcpv4.Option
}

func (v *V4) validate() error {
	if v.Address.IP.To4() == nil {
		return fmt.Errorf("dhcpv4 address %q is not an IPv4 address", v.Address.IP)
	}
	if mask4(v.Address.Mask) == nil {
		return fmt.Errorf("dhcpv4 address %s has no IPv4 mask", v.Address.String())
	}
	if v.ServerID.To4() == nil {
		return fmt.Errorf("dhcpv4 server id %q is not an IPv4 address", v.ServerID)
	}
	if v.ServerID.Equal(v.Address.IP) {
		return fmt.Errorf("dhcpv4 server id %s equals the guest address", v.ServerID)
	}
	if v.Router != nil && v.Router.To4() == nil {
		return fmt.Errorf("dhcpv4 router %q is not an IPv4 address", v.Router)
	}
	for _, r := range v.Routes {
		if r.Dst.IP.To4() == nil || mask4(r.Dst.Mask) == nil {
			return fmt.Errorf("dhcpv4 route destination %s is not an IPv4 prefix", r.Dst.String())
		}
		if r.Gw != nil && r.Gw.To4() == nil {
			return fmt.Errorf("dhcpv4 route gateway %q for %s is not an IPv4 address", r.Gw, r.Dst.String())
		}
	}
	for _, ip := range v.DNS {
		if ip.To4() == nil {
			return fmt.Errorf("dhcpv4 dns server %q is not an IPv4 address", ip)
		}
	}
	if err := validateSearch(v.Search); err != nil {
		return fmt.Errorf("dhcpv4 %w", err)
	}
	if v.MTU != 0 && (v.MTU < 68 || v.MTU > math.MaxUint16) {
		return fmt.Errorf("dhcpv4 mtu %d is not within 68..65535", v.MTU)
	}
	if len(v.Hostname) > 255 {
		return fmt.Errorf("dhcpv4 hostname %.20q... is longer than 255 bytes", v.Hostname)
	}
	if v.LeaseTime < 0 || v.LeaseTime/time.Second >= math.MaxUint32 {
		return fmt.Errorf("dhcpv4 lease time %s is not within 0..%ds", v.LeaseTime, uint32(math.MaxUint32-1))
	}
	return nil
}

// mask4 returns m as a 4-byte mask, nil if it is no IPv4 mask.
func mask4(m net.IPMask) net.IPMask {
	ones, bits := m.Size()
	switch {
	case bits == 32:
		return m
	case bits == 128 && ones >= 96 && bytes.Equal(m[:12], net.CIDRMask(96, 128)[:12]):
		return net.CIDRMask(ones-96, 32)
	}
	return nil
}

// newV4Options encodes a validated V4.
func newV4Options(v *V4) *v4Options {
	mask := mask4(v.Address.Mask)
	o := &v4Options{
		yiaddr:   v.Address.IP.To4(),
		subnet:   &net.IPNet{IP: v.Address.IP.To4().Mask(mask), Mask: mask},
		serverID: v.ServerID.To4(),
		lease:    math.MaxUint32,
	}
	if v.LeaseTime > 0 {
		o.lease = uint32(max(v.LeaseTime/time.Second, 1))
	}
	o.config = append(o.config, dhcpv4.OptSubnetMask(mask))
	if v.Router != nil {
		o.config = append(o.config, dhcpv4.OptRouter(v.Router.To4()))
	}
	if len(v.Routes) > 0 {
		var routes []*dhcpv4.Route
		hasDefault := false
		for _, r := range v.Routes {
			m := mask4(r.Dst.Mask)
			dst := &net.IPNet{IP: r.Dst.IP.To4().Mask(m), Mask: m}
			gw := net.IPv4zero.To4()
			if r.Gw != nil {
				gw = r.Gw.To4()
			}
			if ones, _ := m.Size(); ones == 0 {
				hasDefault = true
			}
			routes = append(routes, &dhcpv4.Route{Dest: dst, Router: gw})
		}
		if v.Router != nil && !hasDefault {
			routes = append(routes, &dhcpv4.Route{
				Dest:   &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)},
				Router: v.Router.To4(),
			})
		}
		o.config = append(o.config, dhcpv4.OptClasslessStaticRoute(routes...))
	}
	if len(v.DNS) > 0 {
		dns := make([]net.IP, len(v.DNS))
		for i, ip := range v.DNS {
			dns[i] = ip.To4()
		}
		o.config = append(o.config, dhcpv4.OptDNS(dns...))
	}
	if len(v.Search) > 0 {
		o.config = append(o.config,
			dhcpv4.OptDomainName(v.Search[0]),
			// Encoded now, as rfc1035label.Labels is not safe for concurrent use.
			dhcpv4.OptGeneric(dhcpv4.OptionDNSDomainSearchList,
				(&rfc1035label.Labels{Labels: v.Search}).ToBytes()))
	}
	if v.MTU > 0 {
		o.config = append(o.config, dhcpv4.OptGeneric(dhcpv4.OptionInterfaceMTU,
			binary.BigEndian.AppendUint16(nil, uint16(v.MTU))))
	}
	if v.Hostname != "" {
		o.config = append(o.config, dhcpv4.OptHostName(v.Hostname))
	}
	return o
}

// listenV4 opens the DHCPv4 server socket, 0.0.0.0:67 bound to ifname. It
// runs inside the namespace. SO_REUSEADDR is deliberately not set: a second
// DHCP server on the same interface must fail to start rather than race us.
func listenV4(ctx context.Context, ifname string) (*net.UDPConn, error) {
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		return setSockopts(c, ifname, true)
	}}
	pc, err := lc.ListenPacket(ctx, "udp4", fmt.Sprintf("0.0.0.0:%d", dhcpv4.ServerPort))
	if err != nil {
		return nil, fmt.Errorf("listen for dhcpv4 on %s: %w", ifname, err)
	}
	return pc.(*net.UDPConn), nil
}

// setSockopts binds a socket to ifname and optionally allows broadcasts.
func setSockopts(c syscall.RawConn, ifname string, broadcast bool) error {
	var serr error
	err := c.Control(func(fd uintptr) {
		if serr = unix.BindToDevice(int(fd), ifname); serr != nil {
			serr = fmt.Errorf("bind socket to device %s: %w", ifname, serr)
			return
		}
		if broadcast {
			if serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_BROADCAST, 1); serr != nil {
				serr = fmt.Errorf("allow broadcast on socket for %s: %w", ifname, serr)
			}
		}
	})
	if err != nil {
		return fmt.Errorf("control socket for %s: %w", ifname, err)
	}
	return serr
}

func (s *Server) serveV4() {
	defer s.wg.Done()
	buf := make([]byte, 65536)
	pause := 50 * time.Millisecond
	for {
		n, peer, err := s.v4conn.ReadFrom(buf)
		if err != nil {
			if s.readFailed("dhcpv4", err, &pause) {
				return
			}
			continue
		}
		req, err := dhcpv4.FromBytes(buf[:n])
		if err != nil {
			s.log.Debug("dropped malformed dhcpv4 packet", "peer", peer, "error", err)
			continue
		}
		resp, dst := s.handleV4(req)
		if resp == nil {
			continue
		}
		if err := s.sendV4(resp.ToBytes(), dst); err != nil {
			s.log.Warn("send dhcpv4 reply failed", "type", resp.MessageType(), "to", dst, "error", err)
			continue
		}
		s.log.Debug("sent dhcpv4 reply", "type", resp.MessageType(), "to", dst, "mac", req.ClientHWAddr.String())
	}
}

// sendV4 sends a reply from ServerID. Should ServerID not be an address of
// the interface, the kernel refuses that source: the reply then leaves from
// the address the kernel picks, and a warning says so once.
func (s *Server) sendV4(b []byte, dst *net.UDPAddr) error {
	_, err := s.v4pc.WriteTo(b, &ipv4.ControlMessage{Src: s.v4opts.serverID}, dst)
	// Linux says ENETUNREACH for a foreign source; EINVAL and EADDRNOTAVAIL
	// are the other errnos of a source it will not use.
	if !errors.Is(err, unix.ENETUNREACH) && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.EADDRNOTAVAIL) {
		return err
	}
	if !s.v4SrcWarned {
		s.log.Warn("dhcpv4 server id is no address of the interface: replies leave from another address",
			"server_id", s.v4opts.serverID, "error", err)
		s.v4SrcWarned = true
	}
	_, err = s.v4conn.WriteTo(b, dst)
	return err
}

var v4Broadcast = &net.UDPAddr{IP: net.IPv4bcast, Port: dhcpv4.ClientPort}

// handleV4 answers one request; it returns a nil reply when there is none.
func (s *Server) handleV4(req *dhcpv4.DHCPv4) (*dhcpv4.DHCPv4, *net.UDPAddr) {
	o := s.v4opts
	mt := req.MessageType()
	log := s.log.With("type", mt, "mac", req.ClientHWAddr.String(), "xid", req.TransactionID)
	if req.OpCode != dhcpv4.OpcodeBootRequest || mt == dhcpv4.MessageTypeNone {
		log.Debug("ignored non-dhcp bootp packet")
		return nil, nil
	}
	if s.cfg.ClientMAC != nil && !bytes.Equal(req.ClientHWAddr, s.cfg.ClientMAC) {
		log.Debug("ignored dhcpv4 request from another client")
		return nil, nil
	}
	if gi := req.GatewayIPAddr; gi != nil && !gi.IsUnspecified() {
		log.Debug("ignored relayed dhcpv4 request", "giaddr", gi)
		return nil, nil
	}
	log.Debug("received dhcpv4 request", "ciaddr", req.ClientIPAddr, "requested", req.RequestedIPAddress())

	var resp *dhcpv4.DHCPv4
	var err error
	switch mt {
	case dhcpv4.MessageTypeDiscover:
		resp, err = s.v4Reply(req, dhcpv4.MessageTypeOffer)
		if err == nil {
			s.count(func(st *Stats) { st.V4Offers++ })
		}
	case dhcpv4.MessageTypeRequest:
		if sid := req.ServerIdentifier(); sid != nil && !sid.Equal(o.serverID) {
			log.Debug("ignored dhcpv4 request for another server", "server", sid)
			return nil, nil
		}
		want := req.RequestedIPAddress()
		if want == nil || want.IsUnspecified() {
			want = req.ClientIPAddr // RENEWING or REBINDING
		}
		if !want.Equal(o.yiaddr) {
			log.Info("refused dhcpv4 request for a foreign address", "requested", want, "address", o.yiaddr)
			resp, err = s.v4Reply(req, dhcpv4.MessageTypeNak)
			if err == nil {
				s.count(func(st *Stats) { st.V4Naks++ })
			}
			break
		}
		resp, err = s.v4Reply(req, dhcpv4.MessageTypeAck)
		if err == nil {
			log.Info("dhcpv4 lease acknowledged", "address", o.yiaddr)
			lease := Lease{IP: o.yiaddr, HWAddr: req.ClientHWAddr, Time: time.Now()}
			s.count(func(st *Stats) { st.V4Acks++; st.LastV4Lease = lease.clone() })
		}
	case dhcpv4.MessageTypeInform:
		resp, err = s.v4Reply(req, dhcpv4.MessageTypeAck)
	case dhcpv4.MessageTypeRelease:
		log.Info("dhcpv4 lease released", "address", req.ClientIPAddr)
		s.count(func(st *Stats) { st.V4Releases++ })
		return nil, nil
	case dhcpv4.MessageTypeDecline:
		log.Warn("guest declined its dhcpv4 address: address conflict on the link", "address", req.RequestedIPAddress())
		return nil, nil
	default:
		log.Debug("ignored dhcpv4 message")
		return nil, nil
	}
	if err != nil {
		log.Error("build dhcpv4 reply failed", "error", err)
		return nil, nil
	}
	return resp, s.v4Dest(req, resp)
}

// v4Reply builds an OFFER, ACK (for REQUEST or INFORM) or NAK.
func (s *Server) v4Reply(req *dhcpv4.DHCPv4, mt dhcpv4.MessageType) (*dhcpv4.DHCPv4, error) {
	o := s.v4opts
	mods := []dhcpv4.Modifier{
		dhcpv4.WithMessageType(mt),
		dhcpv4.WithOption(dhcpv4.OptServerIdentifier(o.serverID)),
	}
	switch {
	case mt == dhcpv4.MessageTypeNak:
		mods = append(mods, dhcpv4.WithOption(dhcpv4.OptMessage("requested address is not this client's")))
	case req.MessageType() == dhcpv4.MessageTypeInform:
		// RFC 2131 4.3.5: no lease time and no yiaddr.
		for _, opt := range o.config {
			mods = append(mods, dhcpv4.WithOption(opt))
		}
	default:
		mods = append(mods, dhcpv4.WithYourIP(o.yiaddr), dhcpv4.WithLeaseTime(o.lease))
		for _, opt := range o.config {
			mods = append(mods, dhcpv4.WithOption(opt))
		}
	}
	return dhcpv4.NewReplyFromRequest(req, mods...)
}

// v4Dest is where a reply goes (RFC 2131 4.1): to ciaddr when the client has
// its address, else to the broadcast address. Unicasting to yiaddr would need
// an ARP entry for an address the client does not answer ARP for yet.
func (s *Server) v4Dest(req, resp *dhcpv4.DHCPv4) *net.UDPAddr {
	if resp.MessageType() == dhcpv4.MessageTypeNak {
		return v4Broadcast
	}
	ci := req.ClientIPAddr
	if ci != nil && !ci.IsUnspecified() && s.v4opts.subnet.Contains(ci) {
		return &net.UDPAddr{IP: ci, Port: dhcpv4.ClientPort}
	}
	return v4Broadcast
}
