package guest

import (
	"context"
	"net"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"github.com/insomniacslk/dhcp/dhcpv4"
	"github.com/insomniacslk/dhcp/dhcpv4/server4"
	"github.com/insomniacslk/dhcp/dhcpv6"
	"github.com/insomniacslk/dhcp/dhcpv6/server6"
	"github.com/insomniacslk/dhcp/iana"
	"github.com/vishvananda/netlink"
	"github.com/vmnic/vmnic/test/need"
)

// TestBoot boots one guest on a tap in a fresh network namespace and checks,
// in that single boot: static addressing and ping, the udhcpc lease script
// (address, MTU, classless static routes, DNS), the udhcpc6 replacement and
// its script, QMP, and a clean power-off.
func TestBoot(t *testing.T) {
	need.Root(t)
	need.NoError(t, Check())

	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()

	buildStart := time.Now()
	img, err := Build(t.TempDir())
	if err != nil {
		t.Fatalf("Build: %v", err)
	}
	t.Logf("built %s (kernel %s, modules %v) in %v", img.Initrd, img.KernelVersion, img.Modules, time.Since(buildStart))

	netns, err := testutils.NewNS()
	if err != nil {
		t.Fatalf("creating netns: %v", err)
	}
	t.Cleanup(func() {
		netns.Close()
		if err := testutils.UnmountNS(netns); err != nil {
			t.Errorf("removing netns: %v", err)
		}
	})

	var (
		tapAddr   = netip4("192.0.2.1")
		leaseV4   = netip4("192.0.2.10")
		dnsV4     = netip4("192.0.2.53")
		leaseV6   = net.ParseIP("2001:db8::10")
		dnsV6     = net.ParseIP("2001:db8::53")
		_, dst, _ = net.ParseCIDR("198.51.100.0/24")
	)
	err = netns.Do(func(ns.NetNS) error {
		tap := &netlink.Tuntap{
			LinkAttrs: netlink.LinkAttrs{Name: "tap0"},
			Mode:      netlink.TUNTAP_MODE_TAP,
			Flags:     netlink.TUNTAP_NO_PI | netlink.TUNTAP_VNET_HDR,
			// Queues == 0 and NonPersist == false: netlink makes the
			// tap persistent and closes its fds itself.
		}
		if err := netlink.LinkAdd(tap); err != nil {
			return err
		}
		if err := netlink.AddrAdd(tap, &netlink.Addr{IPNet: &net.IPNet{IP: tapAddr, Mask: net.CIDRMask(24, 32)}}); err != nil {
			return err
		}
		if err := netlink.LinkSetUp(tap); err != nil {
			return err
		}

		routes := []*dhcpv4.Route{
			{Dest: dst, Router: tapAddr},
			{Dest: &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}, Router: tapAddr},
		}
		s4, err := server4.NewServer("tap0", nil, func(conn net.PacketConn, _ net.Addr, m *dhcpv4.DHCPv4) {
			var typ dhcpv4.MessageType
			switch m.MessageType() {
			case dhcpv4.MessageTypeDiscover:
				typ = dhcpv4.MessageTypeOffer
			case dhcpv4.MessageTypeRequest:
				typ = dhcpv4.MessageTypeAck
			default:
				return
			}
			resp, err := dhcpv4.NewReplyFromRequest(m,
				dhcpv4.WithMessageType(typ),
				dhcpv4.WithYourIP(leaseV4),
				dhcpv4.WithNetmask(net.CIDRMask(24, 32)),
				dhcpv4.WithOption(dhcpv4.OptServerIdentifier(tapAddr)),
				dhcpv4.WithOption(dhcpv4.OptRouter(tapAddr)),
				dhcpv4.WithOption(dhcpv4.OptDNS(dnsV4)),
				dhcpv4.WithOption(dhcpv4.OptIPAddressLeaseTime(time.Hour)),
				dhcpv4.WithOption(dhcpv4.OptClasslessStaticRoute(routes...)),
				dhcpv4.WithGeneric(dhcpv4.OptionInterfaceMTU, []byte{0x05, 0x78}), // 1400
			)
			if err != nil {
				t.Errorf("DHCPv4 reply: %v", err)
				return
			}
			if _, err := conn.WriteTo(resp.ToBytes(), &net.UDPAddr{IP: net.IPv4bcast, Port: dhcpv4.ClientPort}); err != nil {
				t.Errorf("DHCPv4 send: %v", err)
			}
		})
		if err != nil {
			return err
		}
		serverID := &dhcpv6.DUIDLL{HWType: iana.HWTypeEthernet, LinkLayerAddr: net.HardwareAddr{2, 0, 0, 0, 0, 0xfe}}
		s6, err := server6.NewServer("tap0", nil, func(conn net.PacketConn, peer net.Addr, d dhcpv6.DHCPv6) {
			msg, err := d.GetInnerMessage()
			if err != nil || msg.Options.OneIANA() == nil {
				return
			}
			mods := []dhcpv6.Modifier{
				dhcpv6.WithServerID(serverID),
				dhcpv6.WithIAID(msg.Options.OneIANA().IaId),
				dhcpv6.WithIANA(dhcpv6.OptIAAddress{IPv6Addr: leaseV6, PreferredLifetime: time.Hour, ValidLifetime: 2 * time.Hour}),
				dhcpv6.WithDNS(dnsV6),
			}
			var resp *dhcpv6.Message
			switch msg.Type() {
			case dhcpv6.MessageTypeSolicit:
				resp, err = dhcpv6.NewAdvertiseFromSolicit(msg, mods...)
			case dhcpv6.MessageTypeRequest, dhcpv6.MessageTypeRenew:
				resp, err = dhcpv6.NewReplyFromMessage(msg, mods...)
			default:
				return
			}
			if err != nil {
				t.Errorf("DHCPv6 reply: %v", err)
				return
			}
			if _, err := conn.WriteTo(resp.ToBytes(), peer); err != nil {
				t.Errorf("DHCPv6 send: %v", err)
			}
		})
		if err != nil {
			s4.Close()
			return err
		}
		go s4.Serve()
		go s6.Serve()
		t.Cleanup(func() { s4.Close(); s6.Close() })
		return nil
	})
	if err != nil {
		t.Fatalf("setting up tap0 and DHCP servers in %s: %v", netns.Path(), err)
	}

	script := `
echo "IPV6 accept_ra=$(cat /proc/sys/net/ipv6/conf/eth0/accept_ra) disable_ipv6=$(cat /proc/sys/net/ipv6/conf/eth0/disable_ipv6)"
ip addr add 192.0.2.2/24 dev eth0
ping -c 3 -W 5 192.0.2.1 && echo PING-OK
udhcpc -i eth0 -q -f -n -t 5 -T 2 -O staticroutes -O mtu
ip -4 route | sed 's/^/ROUTE4 /'
ip link show dev eth0 | sed -n 's/.* mtu \([0-9]*\) .*/MTU \1/p'
udhcpc6 -i eth0 -q -n -t 5 -T 2
ip -6 addr show dev eth0 | sed -n 's/^ *inet6 \([^ ]*\) .*/ADDR6 \1/p'
sed 's/^/RESOLV /' /etc/resolv.conf
`
	start := time.Now()
	g, err := Start(ctx, img, Options{
		NetnsPath:     netns.Path(),
		Tap:           "tap0",
		MAC:           "02:00:00:00:00:01",
		Script:        script,
		MonitorSocket: filepath.Join(t.TempDir(), "qmp.sock"),
		Log:           func(l string) { t.Log("console: " + l) },
	})
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	defer g.Kill()

	wait := func(re string) []string {
		t.Helper()
		m, err := g.WaitFor(ctx, regexp.MustCompile(re))
		if err != nil {
			t.Fatal(err)
		}
		return m
	}
	wait(`^VMNIC-GUEST: boot `)
	t.Logf("kernel up after %v", time.Since(start).Round(100*time.Millisecond))
	wait(`^VMNIC-GUEST: eth0 up mac=02:00:00:00:00:01 queues=1$`)
	wait(`^VMNIC-GUEST: script start`)
	t.Logf("script started after %v", time.Since(start).Round(100*time.Millisecond))

	status, err := g.QMP(ctx, "query-status", nil)
	if err != nil {
		t.Errorf("QMP query-status: %v", err)
	} else if !strings.Contains(string(status), `"running"`) {
		t.Errorf("QMP query-status = %s, want running", status)
	}

	wait(`^IPV6 accept_ra=1 disable_ipv6=0$`)
	wait(`^PING-OK$`)
	wait(`^DHCP4 bound interface=eth0 ip=192\.0\.2\.10 mask=24 router=192\.0\.2\.1 mtu=1400 dns=192\.0\.2\.53 .*staticroutes=198\.51\.100\.0/24,192\.0\.2\.1,0\.0\.0\.0/0,192\.0\.2\.1 `)
	wait(`^ROUTE4 default via 192\.0\.2\.1 dev eth0`)
	wait(`^ROUTE4 198\.51\.100\.0/24 via 192\.0\.2\.1 dev eth0`)
	wait(`^MTU 1400$`)
	wait(`^DHCP6 bound interface=eth0 ipv6=2001:db8::10 ipv6prefix= lease=7200 dns=2001:db8::53 `)
	wait(`^ADDR6 2001:db8::10/128$`)
	wait(`^RESOLV nameserver 192\.0\.2\.53$`)
	wait(`^RESOLV nameserver 2001:db8::53$`)
	if m := wait(ScriptExit.String()); m[1] != "0" {
		t.Errorf("script exit status %s, want 0", m[1])
	}
	if err := g.Wait(); err != nil {
		t.Errorf("Wait: %v", err)
	}
	t.Logf("guest powered off after %v", time.Since(start).Round(100*time.Millisecond))

	// WaitFor on an exited guest fails with the console tail.
	if _, err := g.WaitFor(ctx, regexp.MustCompile(`^never$`)); err == nil || !strings.Contains(err.Error(), "script exit=0") {
		t.Errorf("WaitFor after exit: got %v, want an error with the console tail", err)
	}
}

func netip4(s string) net.IP { return net.ParseIP(s).To4() }
