package dhcp

import (
	"bytes"
	"context"
	"fmt"
	"math"
	"net"
	"syscall"
	"time"

	"github.com/insomniacslk/dhcp/dhcpv6"
	"github.com/insomniacslk/dhcp/iana"
	"golang.org/x/net/ipv6"
)

// infinite is the all-ones lifetime of DHCPv4 leases, DHCPv6 lifetimes and
// RA prefixes.
const infinite = time.Duration(math.MaxUint32) * time.Second

// listenV6 opens the DHCPv6 server socket, [::]:547 bound to ifi and joined
// to All_DHCP_Relay_Agents_and_Servers. It runs inside the namespace.
func listenV6(ctx context.Context, ifi *net.Interface) (*ipv6.PacketConn, error) {
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		return setSockopts(c, ifi.Name, false)
	}}
	pc, err := lc.ListenPacket(ctx, "udp6", fmt.Sprintf("[::]:%d", dhcpv6.DefaultServerPort))
	if err != nil {
		return nil, fmt.Errorf("listen for dhcpv6 on %s: %w", ifi.Name, err)
	}
	p := ipv6.NewPacketConn(pc)
	if err := p.JoinGroup(ifi, &net.UDPAddr{IP: dhcpv6.AllDHCPRelayAgentsAndServers}); err != nil {
		_ = p.Close()
		return nil, fmt.Errorf("join %s on %s: %w", dhcpv6.AllDHCPRelayAgentsAndServers, ifi.Name, err)
	}
	if err := p.SetControlMessage(ipv6.FlagInterface, true); err != nil {
		_ = p.Close()
		return nil, fmt.Errorf("ask for packet info on dhcpv6 socket for %s: %w", ifi.Name, err)
	}
	return p, nil
}

func (s *Server) serveV6() {
	defer s.wg.Done()
	buf := make([]byte, 65536)
	pause := 50 * time.Millisecond
	for {
		n, _, src, err := s.v6conn.ReadFrom(buf)
		if err != nil {
			if s.readFailed("dhcpv6", err, &pause) {
				return
			}
			continue
		}
		peer, ok := src.(*net.UDPAddr)
		if !ok {
			continue
		}
		pkt, err := dhcpv6.FromBytes(buf[:n])
		if err != nil {
			s.log.Debug("dropped malformed dhcpv6 packet", "peer", peer.IP, "error", err)
			continue
		}
		msg, ok := pkt.(*dhcpv6.Message)
		if !ok {
			s.log.Debug("ignored relayed dhcpv6 packet", "peer", peer.IP)
			continue
		}
		resp := s.handleV6(msg, peer.IP)
		if resp == nil {
			continue
		}
		// The zone of peer was resolved in whatever namespace this thread is
		// in; the control message names the interface instead.
		dst := &net.UDPAddr{IP: peer.IP, Port: peer.Port}
		cm := &ipv6.ControlMessage{IfIndex: s.ifIndex}
		if _, err := s.v6conn.WriteTo(resp.ToBytes(), cm, dst); err != nil {
			s.log.Warn("send dhcpv6 reply failed", "type", resp.MessageType, "to", dst, "error", err)
			continue
		}
		s.log.Debug("sent dhcpv6 reply", "type", resp.MessageType, "to", dst)
	}
}

// v6ClientMAC returns the MAC a DHCPv6 client reveals: the one embedded in an
// EUI-64 link-local source address, else the one in a DUID-LL or DUID-LLT.
// The DUID is per host, not per interface, so it only serves the records.
func v6ClientMAC(src net.IP, msg *dhcpv6.Message) (mac net.HardwareAddr, fromSource bool) {
	if m := eui64MAC(src); m != nil {
		return m, true
	}
	switch d := msg.Options.ClientID().(type) {
	case *dhcpv6.DUIDLL:
		if d.HWType == iana.HWTypeEthernet {
			return d.LinkLayerAddr, false
		}
	case *dhcpv6.DUIDLLT:
		if d.HWType == iana.HWTypeEthernet {
			return d.LinkLayerAddr, false
		}
	}
	return nil, false
}

// eui64MAC returns the MAC embedded in a modified EUI-64 link-local address,
// nil if ip is no such address.
func eui64MAC(ip net.IP) net.HardwareAddr {
	if !ip.IsLinkLocalUnicast() || ip.To4() != nil {
		return nil
	}
	m, err := dhcpv6.GetMacAddressFromEUI64(ip)
	if err != nil {
		return nil
	}
	return m
}

// handleV6 answers one message; it returns nil when there is no answer.
func (s *Server) handleV6(msg *dhcpv6.Message, src net.IP) *dhcpv6.Message {
	log := s.log.With("type", msg.MessageType, "peer", src, "xid", msg.TransactionID)
	mac, fromSource := v6ClientMAC(src, msg)
	if s.cfg.ClientMAC != nil && fromSource && !bytes.Equal(mac, s.cfg.ClientMAC) {
		log.Debug("ignored dhcpv6 message from another client", "mac", mac.String())
		return nil
	}
	cid := msg.Options.ClientID()
	sid := msg.Options.ServerID()
	if cid == nil && msg.MessageType != dhcpv6.MessageTypeInformationRequest {
		log.Debug("ignored dhcpv6 message without client id")
		return nil
	}
	ours := sid != nil && sid.Equal(s.duid)
	log.Debug("received dhcpv6 message", "client", cid)

	var resp *dhcpv6.Message
	var err error
	switch msg.MessageType {
	case dhcpv6.MessageTypeSolicit:
		if sid != nil {
			log.Debug("ignored dhcpv6 solicit with a server id")
			return nil
		}
		if msg.GetOneOption(dhcpv6.OptionRapidCommit) != nil {
			resp, err = dhcpv6.NewReplyFromMessage(msg)
		} else {
			// Preference 255 lets the client go on without waiting for others.
			resp, err = dhcpv6.NewAdvertiseFromSolicit(msg, dhcpv6.WithPreference(255))
		}
		if err == nil {
			s.addIAs(resp, msg)
		}
	case dhcpv6.MessageTypeRequest, dhcpv6.MessageTypeRenew:
		if !ours {
			log.Debug("ignored dhcpv6 message for another server", "server", sid)
			return nil
		}
		resp, err = dhcpv6.NewReplyFromMessage(msg)
		if err == nil {
			s.addIAs(resp, msg)
		}
	case dhcpv6.MessageTypeRebind:
		if sid != nil {
			log.Debug("ignored dhcpv6 rebind with a server id")
			return nil
		}
		resp, err = dhcpv6.NewReplyFromMessage(msg)
		if err == nil {
			s.addIAs(resp, msg)
		}
	case dhcpv6.MessageTypeConfirm:
		if sid != nil {
			log.Debug("ignored dhcpv6 confirm with a server id")
			return nil
		}
		status, found := s.confirm(msg)
		if !found {
			return nil // RFC 8415 18.3.3: no addresses, no reply
		}
		resp, err = dhcpv6.NewReplyFromMessage(msg, dhcpv6.WithOption(status))
	case dhcpv6.MessageTypeRelease, dhcpv6.MessageTypeDecline:
		if !ours {
			log.Debug("ignored dhcpv6 message for another server", "server", sid)
			return nil
		}
		if msg.MessageType == dhcpv6.MessageTypeDecline {
			log.Warn("guest declined its dhcpv6 address: address conflict on the link", "address", s.cfg.V6.Address)
		} else {
			log.Info("dhcpv6 lease released")
		}
		resp, err = dhcpv6.NewReplyFromMessage(msg, dhcpv6.WithOption(&dhcpv6.OptStatusCode{StatusCode: iana.StatusSuccess}))
	case dhcpv6.MessageTypeInformationRequest:
		if sid != nil && !ours {
			log.Debug("ignored dhcpv6 message for another server", "server", sid)
			return nil
		}
		if cid == nil {
			// NewReplyFromMessage wants a client id, which is optional here.
			resp = &dhcpv6.Message{MessageType: dhcpv6.MessageTypeReply, TransactionID: msg.TransactionID}
		} else {
			resp, err = dhcpv6.NewReplyFromMessage(msg)
		}
	default:
		log.Debug("ignored dhcpv6 message")
		return nil
	}
	if err != nil {
		log.Error("build dhcpv6 reply failed", "error", err)
		return nil
	}
	resp.AddOption(dhcpv6.OptServerID(s.duid))
	if v := s.cfg.V6; msg.MessageType != dhcpv6.MessageTypeRelease && msg.MessageType != dhcpv6.MessageTypeDecline {
		if len(v.DNS) > 0 {
			resp.AddOption(dhcpv6.OptDNS(v.DNS...))
		}
		if len(v.Search) > 0 {
			dhcpv6.WithDomainSearchList(v.Search...)(resp)
		}
	}

	if resp.MessageType == dhcpv6.MessageTypeAdvertise {
		s.count(func(st *Stats) { st.V6Advertises++ })
		return resp
	}
	s.count(func(st *Stats) { st.V6Replies++ })
	if len(resp.Options.IANA()) > 0 {
		log.Info("dhcpv6 lease acknowledged", "address", s.cfg.V6.Address, "mac", mac.String())
		lease := Lease{IP: s.cfg.V6.Address, HWAddr: mac, Time: time.Now()}
		s.count(func(st *Stats) { st.LastV6Lease = lease.clone() })
	}
	return resp
}

// lifetimes returns the preferred/valid lifetime and T1, T2 of the address.
func (s *Server) lifetimes() (life, t1, t2 time.Duration) {
	life = s.cfg.V6.LeaseTime
	if life == 0 || life >= infinite {
		return infinite, infinite, infinite
	}
	life = max(life.Round(time.Second), time.Second)
	return life, life / 2, life * 4 / 5
}

// addIAs answers every IA_NA of req with the guest's address. Addresses the
// client asked to renew or rebind that are not the guest's are returned with
// zero lifetimes, so that the client drops them (RFC 8415 18.3.4, 18.3.5).
func (s *Server) addIAs(resp, req *dhcpv6.Message) {
	life, t1, t2 := s.lifetimes()
	renewing := req.MessageType == dhcpv6.MessageTypeRenew || req.MessageType == dhcpv6.MessageTypeRebind
	for _, ia := range req.Options.IANA() {
		out := &dhcpv6.OptIANA{IaId: ia.IaId, T1: t1, T2: t2}
		out.Options.Add(&dhcpv6.OptIAAddress{
			IPv6Addr:          s.cfg.V6.Address,
			PreferredLifetime: life,
			ValidLifetime:     life,
		})
		if renewing {
			for _, a := range ia.Options.Addresses() {
				if !a.IPv6Addr.Equal(s.cfg.V6.Address) {
					out.Options.Add(&dhcpv6.OptIAAddress{IPv6Addr: a.IPv6Addr})
				}
			}
		}
		resp.AddOption(out)
	}
}

// confirm checks the addresses of a CONFIRM; found reports whether there was
// one at all.
func (s *Server) confirm(msg *dhcpv6.Message) (status *dhcpv6.OptStatusCode, found bool) {
	status = &dhcpv6.OptStatusCode{StatusCode: iana.StatusSuccess}
	for _, ia := range msg.Options.IANA() {
		for _, a := range ia.Options.Addresses() {
			found = true
			if !a.IPv6Addr.Equal(s.cfg.V6.Address) {
				status = &dhcpv6.OptStatusCode{StatusCode: iana.StatusNotOnLink, StatusMessage: "address is not this client's"}
			}
		}
	}
	return status, found
}
