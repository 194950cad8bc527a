package dhcp

import (
	"context"
	"errors"
	"net"
	"slices"
	"testing"
	"time"

	"github.com/insomniacslk/dhcp/dhcpv6"
	"github.com/insomniacslk/dhcp/dhcpv6/nclient6"
	"github.com/insomniacslk/dhcp/iana"
)

// newV6Client opens an nclient6 client on the guest interface; it runs inside
// the guest netns.
func newV6Client(timeout time.Duration, retry int) (*nclient6.Client, error) {
	return nclient6.New(guestIf, nclient6.WithTimeout(timeout), nclient6.WithRetry(retry))
}

var bridgeDUID = &dhcpv6.DUIDLL{HWType: iana.HWTypeEthernet, LinkLayerAddr: bridgeMAC}

// checkV6 compares an ADVERTISE or REPLY with the V6 it came from.
func checkV6(t *testing.T, m *dhcpv6.Message, mt dhcpv6.MessageType, v *V6) {
	t.Helper()
	if m.MessageType != mt {
		t.Errorf("message type = %s, want %s", m.MessageType, mt)
	}
	if sid := m.Options.ServerID(); sid == nil || !sid.Equal(bridgeDUID) {
		t.Errorf("server id = %v, want %v", sid, bridgeDUID)
	}
	life, t1, t2 := infinite, infinite, infinite
	if v.LeaseTime > 0 {
		life, t1, t2 = v.LeaseTime, v.LeaseTime/2, v.LeaseTime*4/5
	}
	ia := m.Options.OneIANA()
	if ia == nil {
		t.Fatalf("no IA_NA in %s", m.Summary())
	}
	if ia.T1 != t1 || ia.T2 != t2 {
		t.Errorf("T1, T2 = %s, %s, want %s, %s", ia.T1, ia.T2, t1, t2)
	}
	addrs := ia.Options.Addresses()
	if len(addrs) != 1 || !addrs[0].IPv6Addr.Equal(v.Address) {
		t.Fatalf("IA_NA addresses = %v, want %s", addrs, v.Address)
	}
	if a := addrs[0]; a.PreferredLifetime != life || a.ValidLifetime != life {
		t.Errorf("lifetimes = %s/%s, want %s", a.PreferredLifetime, a.ValidLifetime, life)
	}
	if got := m.Options.DNS(); !slices.EqualFunc(got, v.DNS, net.IP.Equal) {
		t.Errorf("dns = %v, want %v", got, v.DNS)
	}
	var search []string
	if l := m.Options.DomainSearchList(); l != nil {
		search = l.Labels
	}
	if !slices.Equal(search, v.Search) {
		t.Errorf("search = %q, want %q", search, v.Search)
	}
}

func TestDHCPv6(t *testing.T) {
	tn := newTestNet(t, netOpts{})
	finite := v6Config()
	finite.LeaseTime = time.Hour
	for _, tc := range []struct {
		name  string
		rapid bool
		v6    *V6
	}{
		{"rapid commit", true, v6Config()},
		{"advertise and request", false, finite},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := tn.start(t, Config{ClientMAC: guestMAC, V6: tc.v6})
			var adv, reply *dhcpv6.Message
			tn.inGuest(t, func() error {
				c, err := newV6Client(time.Second, 2)
				if err != nil {
					return err
				}
				defer c.Close()
				if tc.rapid {
					reply, err = c.RapidSolicit(context.Background())
					return err
				}
				if adv, err = c.Solicit(context.Background()); err != nil {
					return err
				}
				reply, err = c.Request(context.Background(), adv)
				return err
			})
			checkV6(t, reply, dhcpv6.MessageTypeReply, tc.v6)
			if got := reply.GetOneOption(dhcpv6.OptionRapidCommit) != nil; got != tc.rapid {
				t.Errorf("rapid commit option in reply = %v, want %v", got, tc.rapid)
			}
			wantAdv := uint64(0)
			if !tc.rapid {
				wantAdv = 1
				checkV6(t, adv, dhcpv6.MessageTypeAdvertise, tc.v6)
				if p := adv.Options.Preference(); p != 255 {
					t.Errorf("preference = %d, want 255", p)
				}
			}
			st := s.Stats()
			if st.V6Advertises != wantAdv || st.V6Replies != 1 {
				t.Errorf("stats = %+v, want %d advertise and 1 reply", st, wantAdv)
			}
			if !st.LastV6Lease.IP.Equal(tc.v6.Address) || st.LastV6Lease.HWAddr.String() != guestMAC.String() {
				t.Errorf("last lease = %+v, want %s for %s", st.LastV6Lease, tc.v6.Address, guestMAC)
			}
		})
	}
}

// TestDHCPv6Exchanges sends the messages after the first lease.
func TestDHCPv6Exchanges(t *testing.T) {
	tn := newTestNet(t, netOpts{})
	v := v6Config()
	tn.start(t, Config{ClientMAC: guestMAC, V6: v})
	foreign := net.ParseIP("fd10:0:2::99")
	otherServer := &dhcpv6.DUIDLL{HWType: iana.HWTypeEthernet, LinkLayerAddr: otherMAC}

	type want struct {
		reply    bool
		status   iana.StatusCode // top-level status, if not Success
		ia       bool            // an IA_NA with the address
		foreign0 bool            // and the foreign address with zero lifetimes
	}
	tests := []struct {
		name   string
		typ    dhcpv6.MessageType
		server dhcpv6.DUID // server id sent
		addrs  []net.IP    // addresses in the IA_NA sent, nil = no IA_NA
		noCID  bool
		want   want
	}{
		{"renew", dhcpv6.MessageTypeRenew, bridgeDUID, []net.IP{guestV6, foreign}, false, want{reply: true, ia: true, foreign0: true}},
		{"rebind", dhcpv6.MessageTypeRebind, nil, []net.IP{guestV6}, false, want{reply: true, ia: true}},
		{"confirm own address", dhcpv6.MessageTypeConfirm, nil, []net.IP{guestV6}, false, want{reply: true}},
		{"confirm foreign address", dhcpv6.MessageTypeConfirm, nil, []net.IP{foreign}, false, want{reply: true, status: iana.StatusNotOnLink}},
		{"confirm without address", dhcpv6.MessageTypeConfirm, nil, nil, false, want{}},
		{"information request", dhcpv6.MessageTypeInformationRequest, nil, nil, false, want{reply: true}},
		{"anonymous information request", dhcpv6.MessageTypeInformationRequest, nil, nil, true, want{reply: true}},
		{"release", dhcpv6.MessageTypeRelease, bridgeDUID, []net.IP{guestV6}, false, want{reply: true}},
		{"request for another server", dhcpv6.MessageTypeRequest, otherServer, []net.IP{guestV6}, false, want{}},
		{"renew for another server", dhcpv6.MessageTypeRenew, otherServer, []net.IP{guestV6}, false, want{}},
		{"rebind with server id", dhcpv6.MessageTypeRebind, bridgeDUID, []net.IP{guestV6}, false, want{}},
	}
	tn.inGuest(t, func() error {
		c, err := newV6Client(time.Second, 1)
		if err != nil {
			return err
		}
		defer c.Close()

		for _, tc := range tests {
			t.Run(tc.name, func(t *testing.T) {
				msg, err := dhcpv6.NewMessage()
				if err != nil {
					t.Fatal(err)
				}
				msg.MessageType = tc.typ
				if !tc.noCID {
					msg.AddOption(dhcpv6.OptClientID(&dhcpv6.DUIDLL{HWType: iana.HWTypeEthernet, LinkLayerAddr: guestMAC}))
				}
				if tc.server != nil {
					msg.AddOption(dhcpv6.OptServerID(tc.server))
				}
				msg.AddOption(dhcpv6.OptElapsedTime(0))
				msg.AddOption(dhcpv6.OptRequestedOption(dhcpv6.OptionDNSRecursiveNameServer, dhcpv6.OptionDomainSearchList))
				if tc.addrs != nil {
					ia := &dhcpv6.OptIANA{IaId: [4]byte{0, 0, 0, 2}}
					for _, a := range tc.addrs {
						ia.Options.Add(&dhcpv6.OptIAAddress{IPv6Addr: a, PreferredLifetime: time.Hour, ValidLifetime: time.Hour})
					}
					msg.AddOption(ia)
				}

				ctx := context.Background()
				if !tc.want.reply {
					var cancel context.CancelFunc
					ctx, cancel = context.WithTimeout(ctx, 200*time.Millisecond)
					defer cancel()
				}
				resp, err := c.SendAndRead(ctx, c.RemoteAddr(), msg, nil)
				if !tc.want.reply {
					if !errors.Is(err, context.DeadlineExceeded) {
						t.Fatalf("got %v, %v; want no response", resp, err)
					}
					return
				}
				if err != nil {
					t.Fatal(err)
				}
				if resp.MessageType != dhcpv6.MessageTypeReply {
					t.Fatalf("got %s, want a reply", resp.MessageType)
				}
				if sid := resp.Options.ServerID(); sid == nil || !sid.Equal(bridgeDUID) {
					t.Errorf("server id = %v, want %v", sid, bridgeDUID)
				}
				status := iana.StatusSuccess
				if st := resp.Options.Status(); st != nil {
					status = st.StatusCode
				}
				if status != tc.want.status {
					t.Errorf("status = %s, want %s", status, tc.want.status)
				}
				if tc.typ == dhcpv6.MessageTypeInformationRequest {
					if !slices.EqualFunc(resp.Options.DNS(), v.DNS, net.IP.Equal) {
						t.Errorf("dns = %v, want %v", resp.Options.DNS(), v.DNS)
					}
				}
				ia := resp.Options.OneIANA()
				if (ia != nil) != tc.want.ia {
					t.Fatalf("IA_NA in reply = %v, want %v", ia, tc.want.ia)
				}
				if ia == nil {
					return
				}
				if ia.IaId != [4]byte{0, 0, 0, 2} {
					t.Errorf("IAID = %v, want the client's", ia.IaId)
				}
				var got []string
				for _, a := range ia.Options.Addresses() {
					got = append(got, a.IPv6Addr.String()+" "+a.ValidLifetime.String())
				}
				wantAddrs := []string{guestV6.String() + " " + infinite.String()}
				if tc.want.foreign0 {
					wantAddrs = append(wantAddrs, foreign.String()+" 0s")
				}
				if !slices.Equal(got, wantAddrs) {
					t.Errorf("IA_NA addresses = %q, want %q", got, wantAddrs)
				}
			})
		}
		return nil
	})
}
