package dhcp

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/net/ipv6"
	"golang.org/x/sys/unix"
)

var (
	allNodes   = net.ParseIP("ff02::1")
	allRouters = net.ParseIP("ff02::2")
)

const (
	// Prefix lifetimes, radvd's defaults; advertisements refresh them.
	prefixValidLifetime     = 86400 * time.Second
	prefixPreferredLifetime = 14400 * time.Second
	// raCurHopLimit is the hop limit the guest should use.
	raCurHopLimit = 64
	// minSolicitedGap spaces advertisements answering solicitations, so a
	// flood of solicitations is not answered by a flood of advertisements.
	minSolicitedGap = 100 * time.Millisecond
	// linkLocalPoll is how often the link-local address is looked for while
	// it is missing or tentative, slowPoll once that took linkLocalPatience.
	linkLocalPoll     = 100 * time.Millisecond
	slowPoll          = time.Second
	linkLocalPatience = 10 * time.Second
)

// NDP message and option types (RFC 4861 4.6).
const (
	ndpRouterSolicitation  = 133
	ndpRouterAdvertisement = 134
	ndpOptSourceLinkAddr   = 1
	ndpOptPrefixInfo       = 3
	ndpOptMTU              = 5
)

// listenRA opens the raw ICMPv6 socket: bound to ifi, receiving only Router
// Solicitations sent to all-routers, sending with hop limit 255 and not
// looping its own multicasts back. It runs inside the namespace.
func listenRA(ctx context.Context, ifi *net.Interface) (*ipv6.PacketConn, error) {
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		return setSockopts(c, ifi.Name, false)
	}}
	pc, err := lc.ListenPacket(ctx, "ip6:ipv6-icmp", "::")
	if err != nil {
		return nil, fmt.Errorf("open icmpv6 socket on %s: %w", ifi.Name, err)
	}
	p := ipv6.NewPacketConn(pc)
	var filter ipv6.ICMPFilter
	filter.SetAll(true)
	filter.Accept(ipv6.ICMPTypeRouterSolicitation)
	steps := []struct {
		what string
		do   func() error
	}{
		{"set icmpv6 filter", func() error { return p.SetICMPFilter(&filter) }},
		{"set multicast hop limit", func() error { return p.SetMulticastHopLimit(255) }},
		{"set unicast hop limit", func() error { return p.SetHopLimit(255) }},
		{"disable multicast loopback", func() error { return p.SetMulticastLoopback(false) }},
		{"set multicast interface", func() error { return p.SetMulticastInterface(ifi) }},
		{"join " + allRouters.String(), func() error { return p.JoinGroup(ifi, &net.IPAddr{IP: allRouters}) }},
		{"ask for hop limit and packet info", func() error {
			return p.SetControlMessage(ipv6.FlagHopLimit|ipv6.FlagInterface, true)
		}},
	}
	for _, st := range steps {
		if err := st.do(); err != nil {
			_ = p.Close()
			return nil, fmt.Errorf("%s on icmpv6 socket for %s: %w", st.what, ifi.Name, err)
		}
	}
	return p, nil
}

// buildRA encodes a Router Advertisement with the Source Link-Layer Address,
// MTU and Prefix Information options. The kernel fills in the checksum.
func buildRA(ra *RA, mac net.HardwareAddr) []byte {
	b := make([]byte, 16, 16+8+8+32)
	b[0] = ndpRouterAdvertisement
	b[4] = raCurHopLimit
	if ra.Managed {
		b[5] |= 0x80
	}
	if ra.Other {
		b[5] |= 0x40
	}
	lifetime := ra.RouterLifetime / time.Second
	if ra.RouterLifetime > 0 {
		lifetime = max(lifetime, 1)
	}
	binary.BigEndian.PutUint16(b[6:], uint16(min(lifetime, 65535)))
	// Reachable Time and Retrans Timer stay 0: unspecified.

	b = append(b, ndpOptSourceLinkAddr, 1)
	b = append(b, mac[:6]...)
	if ra.MTU > 0 {
		b = append(b, ndpOptMTU, 1, 0, 0)
		b = binary.BigEndian.AppendUint32(b, uint32(ra.MTU))
	}
	if ra.Prefix.IP != nil {
		ones, _ := ra.Prefix.Mask.Size()
		flags := byte(0x80) // on-link
		if ones == 64 {
			flags |= 0x40 // autonomous address configuration
		}
		b = append(b, ndpOptPrefixInfo, 4, byte(ones), flags)
		b = binary.BigEndian.AppendUint32(b, uint32(prefixValidLifetime/time.Second))
		b = binary.BigEndian.AppendUint32(b, uint32(prefixPreferredLifetime/time.Second))
		b = append(b, 0, 0, 0, 0)
		b = append(b, ra.Prefix.IP.Mask(ra.Prefix.Mask).To16()...)
	}
	return b
}

// receiveRS reads Router Solicitations and asks advertise to answer them.
func (s *Server) receiveRS() {
	defer s.wg.Done()
	buf := make([]byte, 65536)
	pause := 50 * time.Millisecond
	for {
		n, cm, src, err := s.raConn.ReadFrom(buf)
		if err != nil {
			if s.readFailed("icmpv6", err, &pause) {
				return
			}
			continue
		}
		var from net.IP
		if a, ok := src.(*net.IPAddr); ok {
			from = a.IP
		}
		if err := s.checkRS(buf[:n], cm, from); err != nil {
			s.log.Debug("ignored router solicitation", "peer", from, "reason", err)
			continue
		}
		s.count(func(st *Stats) { st.RSsReceived++ })
		s.log.Debug("received router solicitation", "peer", from)
		select {
		case s.rsCh <- struct{}{}:
		default: // an answer is pending already
		}
	}
}

// checkRS validates a Router Solicitation (RFC 4861 6.1.1) and applies the
// client filter to its Source Link-Layer Address or EUI-64 source address.
func (s *Server) checkRS(b []byte, cm *ipv6.ControlMessage, src net.IP) error {
	if len(b) < 8 || b[0] != ndpRouterSolicitation || b[1] != 0 {
		return fmt.Errorf("not a router solicitation")
	}
	if cm != nil && cm.HopLimit != 255 {
		return fmt.Errorf("hop limit %d is not 255", cm.HopLimit)
	}
	var slla net.HardwareAddr
	for opts := b[8:]; len(opts) > 0; {
		if len(opts) < 2 || opts[1] == 0 || int(opts[1])*8 > len(opts) {
			return fmt.Errorf("malformed option")
		}
		l := int(opts[1]) * 8
		if opts[0] == ndpOptSourceLinkAddr && l >= 8 {
			slla = net.HardwareAddr(opts[2:8])
		}
		opts = opts[l:]
	}
	if src == nil || src.IsUnspecified() {
		if slla != nil {
			return fmt.Errorf("unspecified source with a link-layer address option")
		}
		return nil
	}
	if s.cfg.ClientMAC == nil {
		return nil
	}
	mac := slla
	if mac == nil {
		mac = eui64MAC(src)
	}
	if mac != nil && !bytes.Equal(mac, s.cfg.ClientMAC) {
		return fmt.Errorf("from another client %s", mac)
	}
	return nil
}

// advertise sends an advertisement right when the link-local address is
// usable, then every Interval and whenever a solicitation came in.
func (s *Server) advertise() {
	defer s.wg.Done()
	ra := s.cfg.RA
	pkt := buildRA(ra, s.ifMAC)
	dst := &net.IPAddr{IP: allNodes}
	if ra.RouterLifetime > 0 && ra.RouterLifetime < ra.Interval {
		s.log.Warn("router lifetime is shorter than the advertisement interval: the guest's default route will flap",
			"lifetime", ra.RouterLifetime, "interval", ra.Interval)
	}

	timer := time.NewTimer(0)
	defer timer.Stop()
	var last, waitingSince time.Time
	var warned, failing bool
	for {
		solicited := false
		select {
		case <-s.done:
			return
		case <-timer.C:
		case <-s.rsCh:
			solicited = true
		}

		src, err := s.linkLocal()
		if src == nil {
			if waitingSince.IsZero() {
				waitingSince = time.Now()
				s.log.Debug("waiting for a usable link-local address", "reason", err)
			}
			wait := time.Since(waitingSince)
			if !warned && wait > 5*time.Second {
				s.log.Warn("router advertisements wait for a usable link-local address", "error", err)
				warned = true
			}
			if wait < linkLocalPatience {
				timer.Reset(linkLocalPoll)
			} else {
				timer.Reset(slowPoll)
			}
			continue
		}
		if !waitingSince.IsZero() {
			s.log.Debug("link-local address is usable", "address", src, "waited", time.Since(waitingSince))
			waitingSince, warned = time.Time{}, false
		}
		if gap := time.Since(last); solicited && gap < minSolicitedGap {
			timer.Reset(minSolicitedGap - gap)
			continue
		}

		cm := &ipv6.ControlMessage{HopLimit: 255, Src: src, IfIndex: s.ifIndex}
		if _, err := s.raConn.WriteTo(pkt, cm, dst); err != nil {
			if s.stopping() {
				return
			}
			if !failing {
				s.log.Warn("send router advertisement failed", "from", src, "error", err)
			}
			failing = true
		} else {
			if failing {
				s.log.Info("sending router advertisements again", "from", src)
			}
			failing = false
			last = time.Now()
			s.count(func(st *Stats) { st.RAsSent++ })
			s.log.Debug("sent router advertisement", "from", src, "solicited", solicited)
		}
		timer.Reset(ra.Interval)
	}
}

// linkLocal returns the interface's link-local address once it is usable as
// a source: neither tentative nor failed duplicate address detection.
func (s *Server) linkLocal() (net.IP, error) {
	link := &netlink.Device{LinkAttrs: netlink.LinkAttrs{Index: s.ifIndex}}
	addrs, err := s.nl.AddrList(link, netlink.FAMILY_V6)
	if err != nil {
		return nil, fmt.Errorf("list addresses of %s: %w", s.cfg.IfName, err)
	}
	for _, a := range addrs {
		if a.IP.IsLinkLocalUnicast() && a.Flags&(unix.IFA_F_TENTATIVE|unix.IFA_F_DADFAILED) == 0 {
			return a.IP, nil
		}
	}
	return nil, fmt.Errorf("interface %s has no usable link-local address", s.cfg.IfName)
}
