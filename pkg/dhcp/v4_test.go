package dhcp

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/insomniacslk/dhcp/dhcpv4"
	"github.com/insomniacslk/dhcp/dhcpv4/nclient4"
	"github.com/vishvananda/netlink"
)

// checkV4 compares every option of an OFFER or ACK with the V4 it came from.
func checkV4(t *testing.T, m *dhcpv4.DHCPv4, mt dhcpv4.MessageType, v *V4, wantRoutes []string) {
	t.Helper()
	if got := m.MessageType(); got != mt {
		t.Errorf("message type = %s, want %s", got, mt)
	}
	if !m.YourIPAddr.Equal(v.Address.IP) {
		t.Errorf("yiaddr = %s, want %s", m.YourIPAddr, v.Address.IP)
	}
	if got := m.ServerIdentifier(); !got.Equal(v.ServerID) {
		t.Errorf("server id = %s, want %s", got, v.ServerID)
	}
	if got := m.SubnetMask().String(); got != net.IPMask(v.Address.Mask).String() {
		t.Errorf("mask = %s, want %s", got, v.Address.Mask)
	}
	if got := m.Router(); v.Router == nil && got != nil || v.Router != nil && (len(got) != 1 || !got[0].Equal(v.Router)) {
		t.Errorf("router = %v, want %v", got, v.Router)
	}
	var routes []string
	for _, r := range m.ClasslessStaticRoute() {
		routes = append(routes, r.Dest.String()+" via "+r.Router.String())
	}
	if !slices.Equal(routes, wantRoutes) {
		t.Errorf("classless routes = %q, want %q", routes, wantRoutes)
	}
	if got := m.DNS(); !slices.EqualFunc(got, v.DNS, net.IP.Equal) {
		t.Errorf("dns = %v, want %v", got, v.DNS)
	}
	var search []string
	if l := m.DomainSearch(); l != nil {
		search = l.Labels
	}
	if !slices.Equal(search, v.Search) {
		t.Errorf("search = %q, want %q", search, v.Search)
	}
	wantDomain := ""
	if len(v.Search) > 0 {
		wantDomain = v.Search[0]
	}
	if got := m.DomainName(); got != wantDomain {
		t.Errorf("domain name = %q, want %q", got, wantDomain)
	}
	mtu := 0
	if b := m.GetOneOption(dhcpv4.OptionInterfaceMTU); len(b) == 2 {
		mtu = int(binary.BigEndian.Uint16(b))
	} else if b != nil {
		t.Errorf("mtu option has %d bytes", len(b))
	}
	if mtu != v.MTU {
		t.Errorf("mtu = %d, want %d", mtu, v.MTU)
	}
	if got := m.HostName(); got != v.Hostname {
		t.Errorf("hostname = %q, want %q", got, v.Hostname)
	}
	wantLease := v.LeaseTime
	if wantLease == 0 {
		wantLease = infinite
	}
	if got := m.IPAddressLeaseTime(0); got != wantLease {
		t.Errorf("lease time = %s, want %s", got, wantLease)
	}
}

func TestDHCPv4Options(t *testing.T) {
	tn := newTestNet(t, netOpts{})
	routed := v4Config()
	routed.Routes = []Route{
		{Dst: net.IPNet{IP: net.ParseIP("10.1.0.0"), Mask: net.CIDRMask(16, 32)}, Gw: serverV4},
		{Dst: net.IPNet{IP: net.ParseIP("192.168.7.0").To4(), Mask: net.CIDRMask(24, 32)}},
	}
	noRouter := v4Config()
	noRouter.Router = nil
	noRouter.Routes = routed.Routes
	minimal := &V4{Address: net.IPNet{IP: guestV4, Mask: net.CIDRMask(24, 32)}, ServerID: serverV4}

	for _, tc := range []struct {
		name   string
		v4     *V4
		routes []string
	}{
		{"all options", v4Config(), nil},
		{
			"classless routes add the default route", routed,
			[]string{"10.1.0.0/16 via 10.0.2.1", "192.168.7.0/24 via 0.0.0.0", "0.0.0.0/0 via 10.0.2.1"},
		},
		{
			"classless routes without router", noRouter,
			[]string{"10.1.0.0/16 via 10.0.2.1", "192.168.7.0/24 via 0.0.0.0"},
		},
		{"minimal with infinite lease", minimal, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := tn.start(t, Config{IfName: bridgeName, ClientMAC: guestMAC, V4: tc.v4})
			var lease *nclient4.Lease
			tn.inGuest(t, func() error {
				c, err := nclient4.New(guestIf, nclient4.WithTimeout(2*time.Second), nclient4.WithRetry(2))
				if err != nil {
					return err
				}
				defer c.Close()
				lease, err = c.Request(context.Background())
				return err
			})
			checkV4(t, lease.Offer, dhcpv4.MessageTypeOffer, tc.v4, tc.routes)
			checkV4(t, lease.ACK, dhcpv4.MessageTypeAck, tc.v4, tc.routes)
			st := s.Stats()
			if st.V4Offers != 1 || st.V4Acks != 1 || st.V4Naks != 0 {
				t.Errorf("stats = %+v, want 1 offer and 1 ack", st)
			}
			if !st.LastV4Lease.IP.Equal(guestV4) || st.LastV4Lease.HWAddr.String() != guestMAC.String() || st.LastV4Lease.Time.IsZero() {
				t.Errorf("last lease = %+v, want %s for %s", st.LastV4Lease, guestV4, guestMAC)
			}
		})
	}
}

// udpClient opens a plain UDP socket on 0.0.0.0:68 bound to the guest
// interface, as a client without a raw socket would. It only gets what is
// broadcast or sent to an address the guest has configured.
func udpClient(opts ...nclient4.ClientOpt) (*nclient4.Client, error) {
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		return setSockopts(c, guestIf, true)
	}}
	pc, err := lc.ListenPacket(context.Background(), "udp4", "0.0.0.0:68")
	if err != nil {
		return nil, err
	}
	c, err := nclient4.NewWithConn(pc, guestMAC, opts...)
	if err != nil {
		pc.Close()
	}
	return c, err
}

func addGuestAddr(cidr string) error {
	l, err := netlink.LinkByName(guestIf)
	if err != nil {
		return err
	}
	a, err := netlink.ParseAddr(cidr)
	if err != nil {
		return err
	}
	return netlink.AddrAdd(l, a)
}

// TestDHCPv4Lifecycle walks a client without a raw socket and without the
// broadcast flag through DORA (answers must be broadcast), then renew and
// inform (answers unicast to its address), a foreign request (NAK), a request
// for another server (ignored) and a release.
func TestDHCPv4Lifecycle(t *testing.T) {
	tn := newTestNet(t, netOpts{})
	v := v4Config()
	s := tn.start(t, Config{ClientMAC: guestMAC, V4: v})
	ctx := context.Background()
	noBroadcast := dhcpv4.WithBroadcast(false)

	tn.inGuest(t, func() error {
		c, err := udpClient(nclient4.WithTimeout(time.Second), nclient4.WithRetry(2))
		if err != nil {
			return err
		}
		defer c.Close()

		lease, err := c.Request(ctx, noBroadcast)
		if err != nil {
			return fmt.Errorf("request without broadcast flag: %w", err)
		}
		checkV4(t, lease.ACK, dhcpv4.MessageTypeAck, v, nil)

		// The guest now configures its lease; renewals are unicast to it.
		if err := addGuestAddr("10.0.2.2/24"); err != nil {
			return err
		}
		renewed, err := c.Renew(ctx, lease, noBroadcast)
		if err != nil {
			return fmt.Errorf("renew: %w", err)
		}
		checkV4(t, renewed.ACK, dhcpv4.MessageTypeAck, v, nil)

		inform, err := c.Inform(ctx, guestV4, noBroadcast)
		if err != nil {
			return fmt.Errorf("inform: %w", err)
		}
		if inform.MessageType() != dhcpv4.MessageTypeAck || !inform.YourIPAddr.IsUnspecified() ||
			inform.Options.Has(dhcpv4.OptionIPAddressLeaseTime) || !slices.EqualFunc(inform.DNS(), v.DNS, net.IP.Equal) {
			t.Errorf("inform answer = %s, want an ACK with DNS and no lease", inform.Summary())
		}

		offer, err := c.DiscoverOffer(ctx)
		if err != nil {
			return fmt.Errorf("discover: %w", err)
		}
		_, err = c.RequestFromOffer(ctx, offer, dhcpv4.WithOption(dhcpv4.OptRequestedIPAddress(net.ParseIP("10.0.2.99"))))
		var nak *nclient4.ErrNak
		if !errors.As(err, &nak) {
			return fmt.Errorf("request for a foreign address: got %v, want a NAK", err)
		}

		other, err := nclient4.New(guestIf, nclient4.WithTimeout(200*time.Millisecond), nclient4.WithRetry(1))
		if err != nil {
			return err
		}
		defer other.Close()
		_, err = other.RequestFromOffer(ctx, offer, dhcpv4.WithOption(dhcpv4.OptServerIdentifier(net.ParseIP("10.0.2.254"))))
		if !errors.Is(err, nclient4.ErrNoResponse) {
			return fmt.Errorf("request for another server: got %v, want no response", err)
		}

		return c.Release(renewed)
	})
	poll(t, 2*time.Second, "release", func() bool { return s.Stats().V4Releases == 1 })
	if st := s.Stats(); st.V4Naks != 1 || st.V4Acks != 2 {
		t.Errorf("stats = %+v, want 2 acks and 1 nak", st)
	}
}

func TestClientMACFilter(t *testing.T) {
	tn := newTestNet(t, netOpts{})
	for _, tc := range []struct {
		name     string
		mac      net.HardwareAddr
		answered bool
	}{
		{"no filter", nil, true},
		{"guest's MAC", guestMAC, true},
		{"another MAC", otherMAC, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := tn.start(t, Config{ClientMAC: tc.mac, V4: v4Config(), V6: v6Config()})
			tn.inGuest(t, func() error {
				c4, err := nclient4.New(guestIf, nclient4.WithTimeout(300*time.Millisecond), nclient4.WithRetry(1))
				if err != nil {
					return err
				}
				defer c4.Close()
				_, err4 := c4.Request(context.Background())
				c6, err := newV6Client(300*time.Millisecond, 1)
				if err != nil {
					return err
				}
				defer c6.Close()
				_, err6 := c6.RapidSolicit(context.Background())
				for proto, err := range map[string]error{"v4": err4, "v6": err6} {
					if tc.answered && err != nil {
						t.Errorf("dhcp%s: %v, want an answer", proto, err)
					}
					if !tc.answered && err == nil {
						t.Errorf("dhcp%s: answered, want no answer", proto)
					}
				}
				return nil
			})
			st := s.Stats()
			if got := st.V4Acks+st.V6Replies > 0; got != tc.answered {
				t.Errorf("stats = %+v, answered = %v, want %v", st, got, tc.answered)
			}
		})
	}
}

func TestClasslessRouteEncoding(t *testing.T) {
	v := &V4{
		Address:  net.IPNet{IP: guestV4, Mask: net.CIDRMask(24, 32)},
		ServerID: serverV4,
		Router:   serverV4,
		Routes: []Route{
			{Dst: net.IPNet{IP: net.ParseIP("10.1.2.3"), Mask: net.CIDRMask(16, 32)}, Gw: net.ParseIP("10.0.2.254")},
		},
	}
	if err := v.validate(); err != nil {
		t.Fatal(err)
	}
	o := newV4Options(v)
	var raw []byte
	for _, opt := range o.config {
		if opt.Code == dhcpv4.OptionClasslessStaticRoute {
			raw = opt.Value.ToBytes()
		}
	}
	// RFC 3442: width, significant octets of the destination, router.
	want := []byte{16, 10, 1, 10, 0, 2, 254, 0, 10, 0, 2, 1}
	if !slices.Equal(raw, want) {
		t.Errorf("option 121 = %v, want %v", raw, want)
	}
}

// TestDHCPv4ReplySource checks that replies leave from ServerID even when it
// is not the bridge's first address, and still leave when it is no address
// of the bridge at all.
func TestDHCPv4ReplySource(t *testing.T) {
	tn := newTestNet(t, netOpts{})
	err := tn.pod.Do(func(ns.NetNS) error {
		br, err := netlink.LinkByName(bridgeName)
		if err != nil {
			return err
		}
		first, _ := netlink.ParseAddr("10.0.9.1/24")
		ours, _ := netlink.ParseAddr("10.0.2.1/24")
		if err := netlink.AddrAdd(br, first); err != nil {
			return err
		}
		if err := netlink.AddrDel(br, ours); err != nil {
			return err
		}
		return netlink.AddrAdd(br, ours)
	})
	if err != nil {
		t.Fatalf("reorder bridge addresses: %v", err)
	}
	for _, tc := range []struct {
		name     string
		serverID net.IP
		src      net.IP
	}{
		{"server id is a later bridge address", serverV4, serverV4},
		{"server id is no bridge address", net.ParseIP("10.0.2.254").To4(), net.ParseIP("10.0.9.1").To4()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v := v4Config()
			v.ServerID = tc.serverID
			tn.start(t, Config{V4: v})
			tn.inGuest(t, func() error {
				lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
					return setSockopts(c, guestIf, true)
				}}
				pc, err := lc.ListenPacket(context.Background(), "udp4", "0.0.0.0:68")
				if err != nil {
					return err
				}
				defer pc.Close()
				discover, err := dhcpv4.NewDiscovery(guestMAC, dhcpv4.WithBroadcast(false))
				if err != nil {
					return err
				}
				if _, err := pc.WriteTo(discover.ToBytes(), &net.UDPAddr{IP: net.IPv4bcast, Port: 67}); err != nil {
					return err
				}
				if err := pc.SetReadDeadline(time.Now().Add(time.Second)); err != nil {
					return err
				}
				buf := make([]byte, 1500)
				n, from, err := pc.ReadFrom(buf)
				if err != nil {
					return fmt.Errorf("read offer: %w", err)
				}
				offer, err := dhcpv4.FromBytes(buf[:n])
				if err != nil {
					return err
				}
				if src := from.(*net.UDPAddr).IP; !src.Equal(tc.src) {
					t.Errorf("offer came from %s, want %s", src, tc.src)
				}
				if sid := offer.ServerIdentifier(); !sid.Equal(tc.serverID) {
					t.Errorf("server id = %s, want %s", sid, tc.serverID)
				}
				return nil
			})
		})
	}
}
