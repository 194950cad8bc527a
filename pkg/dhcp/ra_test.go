package dhcp

import (
	"encoding/binary"
	"fmt"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv6"
)

var (
	podPrefix = net.IPNet{IP: net.ParseIP("fd10:0:2::"), Mask: net.CIDRMask(120, 128)}
	prefix64  = net.IPNet{IP: net.ParseIP("fd10:0:2::"), Mask: net.CIDRMask(64, 128)}
)

// parsedRA is a decoded Router Advertisement.
type parsedRA struct {
	curHopLimit, flags byte
	lifetime           time.Duration
	slla               net.HardwareAddr
	mtu                int
	prefix             string // "" if none
	prefixFlags        byte
	valid, preferred   time.Duration
}

func parseRA(b []byte) (parsedRA, error) {
	var ra parsedRA
	if len(b) < 16 || b[0] != ndpRouterAdvertisement || b[1] != 0 {
		return ra, fmt.Errorf("not a router advertisement: % x", b)
	}
	ra.curHopLimit, ra.flags = b[4], b[5]
	ra.lifetime = time.Duration(binary.BigEndian.Uint16(b[6:])) * time.Second
	for opts := b[16:]; len(opts) > 0; {
		if len(opts) < 2 || opts[1] == 0 || int(opts[1])*8 > len(opts) {
			return ra, fmt.Errorf("malformed options: % x", opts)
		}
		o := opts[:int(opts[1])*8]
		switch o[0] {
		case ndpOptSourceLinkAddr:
			ra.slla = net.HardwareAddr(o[2:8])
		case ndpOptMTU:
			ra.mtu = int(binary.BigEndian.Uint32(o[4:]))
		case ndpOptPrefixInfo:
			ra.prefix = (&net.IPNet{IP: net.IP(o[16:32]), Mask: net.CIDRMask(int(o[2]), 128)}).String()
			ra.prefixFlags = o[3]
			ra.valid = time.Duration(binary.BigEndian.Uint32(o[4:])) * time.Second
			ra.preferred = time.Duration(binary.BigEndian.Uint32(o[8:])) * time.Second
		}
		opts = opts[len(o):]
	}
	return ra, nil
}

func TestBuildRA(t *testing.T) {
	got := buildRA(&RA{Prefix: podPrefix, MTU: 1400, RouterLifetime: 1800 * time.Second, Other: true}, bridgeMAC)
	want := []byte{
		134, 0, 0, 0, 64, 0x40, 0x07, 0x08, 0, 0, 0, 0, 0, 0, 0, 0,
		1, 1, 2, 0, 0, 0, 0, 0,
		5, 1, 0, 0, 0, 0, 0x05, 0x78,
		3, 4, 120, 0x80, 0, 1, 0x51, 0x80, 0, 0, 0x38, 0x40, 0, 0, 0, 0,
		0xfd, 0x10, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
	}
	if string(got) != string(want) {
		t.Errorf("buildRA =\n% x\nwant\n% x", got, want)
	}
	if got := buildRA(&RA{}, bridgeMAC); len(got) != 24 {
		t.Errorf("RA without MTU and prefix has %d bytes, want 24", len(got))
	}
}

// TestRADefaultRoute checks what RAs are for: the guest kernel installs a
// default route via the bridge's link-local address. The bridge keeps DAD on,
// so the server starts while that address is still tentative.
func TestRADefaultRoute(t *testing.T) {
	tn := newTestNet(t, netOpts{podDAD: true})
	s := tn.start(t, Config{ClientMAC: guestMAC, RA: &RA{Prefix: podPrefix, MTU: 1400, RouterLifetime: 30 * time.Minute}})
	ll := tn.bridgeLinkLocal(t)

	var routes []netlink.Route
	tn.inGuest(t, func() error {
		l, err := netlink.LinkByName(guestIf)
		if err != nil {
			return err
		}
		poll(t, 5*time.Second, "default route via "+ll.String(), func() bool {
			routes, err = netlink.RouteListFiltered(netlink.FAMILY_V6, &netlink.Route{LinkIndex: l.Attrs().Index}, netlink.RT_FILTER_OIF)
			if err != nil {
				t.Fatal(err)
			}
			for _, r := range routes {
				if (r.Dst == nil || r.Dst.String() == "::/0") && r.Gw.Equal(ll) {
					return true
				}
			}
			return false
		})
		onLink := false
		for _, r := range routes {
			onLink = onLink || r.Dst != nil && r.Dst.String() == podPrefix.String() && r.Gw == nil
		}
		if !onLink {
			t.Errorf("no on-link route for %s in %v", podPrefix.String(), routes)
		}
		mtu, err := os.ReadFile("/proc/sys/net/ipv6/conf/" + guestIf + "/mtu")
		if err != nil {
			return err
		}
		if got := strings.TrimSpace(string(mtu)); got != "1400" {
			t.Errorf("guest IPv6 MTU = %s, want 1400", got)
		}
		return nil
	})
	if st := s.Stats(); st.RAsSent == 0 {
		t.Errorf("stats = %+v, want RAs sent", st)
	}
}

// guestICMP opens a raw ICMPv6 socket in the guest that sees only RAs.
func guestICMP() (*icmp.PacketConn, *net.Interface, error) {
	ifi, err := net.InterfaceByName(guestIf)
	if err != nil {
		return nil, nil, err
	}
	c, err := icmp.ListenPacket("ip6:ipv6-icmp", "::")
	if err != nil {
		return nil, nil, err
	}
	p := c.IPv6PacketConn()
	var f ipv6.ICMPFilter
	f.SetAll(true)
	f.Accept(ipv6.ICMPTypeRouterAdvertisement)
	for _, err := range []error{
		p.SetICMPFilter(&f),
		p.SetControlMessage(ipv6.FlagHopLimit|ipv6.FlagSrc, true),
		p.SetMulticastInterface(ifi),
		p.SetMulticastHopLimit(255),
	} {
		if err != nil {
			c.Close()
			return nil, nil, err
		}
	}
	return c, ifi, nil
}

// TestRASolicited checks that a Router Solicitation is answered at once (the
// periodic interval is an hour) and what the advertisement holds.
func TestRASolicited(t *testing.T) {
	tn := newTestNet(t, netOpts{})
	ll := tn.bridgeLinkLocal(t)
	for _, tc := range []struct {
		name string
		ra   RA
		want parsedRA
	}{
		{
			"default router with /120 on-link prefix",
			RA{Prefix: podPrefix, MTU: 1400, RouterLifetime: 30 * time.Minute},
			parsedRA{lifetime: 30 * time.Minute, mtu: 1400, prefix: "fd10:0:2::/120", prefixFlags: 0x80},
		},
		{
			"managed, other, /64 prefix autoconfigures",
			RA{Prefix: prefix64, RouterLifetime: 9000 * time.Second, Managed: true, Other: true},
			parsedRA{flags: 0xc0, lifetime: 9000 * time.Second, prefix: "fd10:0:2::/64", prefixFlags: 0xc0},
		},
		{"not a default router, no prefix", RA{}, parsedRA{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ra := tc.ra
			ra.Interval = time.Hour
			s := tn.start(t, Config{ClientMAC: guestMAC, RA: &ra})
			poll(t, 2*time.Second, "initial RA", func() bool { return s.Stats().RAsSent == 1 })

			var got parsedRA
			var elapsed time.Duration
			tn.inGuest(t, func() error {
				c, ifi, err := guestICMP()
				if err != nil {
					return err
				}
				defer c.Close()
				p := c.IPv6PacketConn()
				rs := append([]byte{ndpRouterSolicitation, 0, 0, 0, 0, 0, 0, 0, ndpOptSourceLinkAddr, 1}, guestMAC...)
				sent := time.Now()
				if _, err := p.WriteTo(rs, &ipv6.ControlMessage{HopLimit: 255, IfIndex: ifi.Index}, &net.IPAddr{IP: allRouters}); err != nil {
					return fmt.Errorf("send RS: %w", err)
				}
				if err := c.SetReadDeadline(time.Now().Add(time.Second)); err != nil {
					return err
				}
				buf := make([]byte, 1500)
				n, cm, src, err := p.ReadFrom(buf)
				if err != nil {
					return fmt.Errorf("read RA: %w", err)
				}
				elapsed = time.Since(sent)
				if cm == nil || cm.HopLimit != 255 {
					t.Errorf("RA control message = %v, want hop limit 255", cm)
				}
				if a, _ := src.(*net.IPAddr); a == nil || !a.IP.Equal(ll) {
					t.Errorf("RA source = %v, want %s", src, ll)
				}
				got, err = parseRA(buf[:n])
				return err
			})
			t.Logf("RA %s after the RS", elapsed)
			want := tc.want
			want.curHopLimit = raCurHopLimit
			want.slla = bridgeMAC
			if want.prefix != "" {
				want.valid, want.preferred = prefixValidLifetime, prefixPreferredLifetime
			}
			if fmt.Sprint(got) != fmt.Sprint(want) {
				t.Errorf("RA = %+v\nwant %+v", got, want)
			}
			// The counter moves once the send returned, maybe after the read.
			poll(t, time.Second, "2 RAs counted", func() bool { return s.Stats().RAsSent == 2 })
			if st := s.Stats(); st.RSsReceived != 1 {
				t.Errorf("stats = %+v, want 1 RS received", st)
			}
		})
	}
}

// TestRSFromAnotherClient checks that the client filter applies to RSs.
func TestRSFromAnotherClient(t *testing.T) {
	tn := newTestNet(t, netOpts{})
	s := tn.start(t, Config{ClientMAC: otherMAC, RA: &RA{Interval: time.Hour}})
	poll(t, 2*time.Second, "initial RA", func() bool { return s.Stats().RAsSent == 1 })
	tn.inGuest(t, func() error {
		c, ifi, err := guestICMP()
		if err != nil {
			return err
		}
		defer c.Close()
		rs := append([]byte{ndpRouterSolicitation, 0, 0, 0, 0, 0, 0, 0, ndpOptSourceLinkAddr, 1}, guestMAC...)
		if _, err := c.IPv6PacketConn().WriteTo(rs, &ipv6.ControlMessage{HopLimit: 255, IfIndex: ifi.Index}, &net.IPAddr{IP: allRouters}); err != nil {
			return err
		}
		if err := c.SetReadDeadline(time.Now().Add(300 * time.Millisecond)); err != nil {
			return err
		}
		if _, _, err := c.ReadFrom(make([]byte, 1500)); err == nil {
			t.Error("got an RA for another client's RS")
		}
		return nil
	})
	if st := s.Stats(); st.RSsReceived != 0 || st.RAsSent != 1 {
		t.Errorf("stats = %+v, want the RS ignored", st)
	}
}
