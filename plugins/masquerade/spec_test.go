package masquerade

import (
	"log/slog"
	"net"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/vmnic/vmnic/pkg/kubevirt"
	"github.com/vmnic/vmnic/pkg/netconf"
)

func prevResult(addrs ...string) *current.Result {
	r := &current.Result{CNIVersion: "1.0.0", DNS: types.DNS{Nameservers: []string{"198.18.0.10"}, Search: []string{"prev.local"}}}
	for _, a := range addrs {
		ip, n, _ := net.ParseCIDR(a)
		n.IP = ip
		r.IPs = append(r.IPs, &current.IPConfig{Address: *n})
	}
	return r
}

func conf(t *testing.T, js string) *netconf.Conf {
	t.Helper()
	c, err := netconf.Parse([]byte(js))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestNewSpec(t *testing.T) {
	base := `{"name":"n","mode":"masquerade"`
	cases := []struct {
		name       string
		conf       string
		ifName     string
		prev       *current.Result
		facts      *kubevirt.Facts
		v4, v6     bool
		dns        string
		search     string
		tap, bridg string
		errCode    uint
	}{
		{
			name: "dual stack, dns from runtime", conf: base + `,"runtimeConfig":{"dns":{"servers":["198.18.0.53","fd00::53"],"searches":["ns.svc.cluster.local"]}}}`,
			ifName: "eth0", prev: prevResult("198.18.0.2/24", "fd00:198:18::2/64"), v4: true, v6: true,
			dns: "198.18.0.53,fd00::53", search: "ns.svc.cluster.local", tap: "tap0", bridg: "k6t-eth0",
		},
		{
			name: "v4 only, dns from prevResult", conf: base + `}`, ifName: "eth0", prev: prevResult("198.18.0.2/24"),
			v4: true, dns: "198.18.0.10", search: "prev.local", tap: "tap0", bridg: "k6t-eth0",
		},
		{
			name: "v6 only, hashed interface name", conf: base + `}`, ifName: "pod16477688c0e", prev: prevResult("fd00:198:18::2/64"),
			v6: true, dns: "198.18.0.10", search: "prev.local", tap: "tap16477688c0e", bridg: "k6t-16477688c0e",
		},
		{
			name: "dns from config when nothing else", conf: base + `,"dns":{"nameservers":["198.18.0.99"]}}`, ifName: "eth0",
			prev: &current.Result{IPs: prevResult("198.18.0.2/24").IPs}, v4: true, dns: "198.18.0.99", tap: "tap0", bridg: "k6t-eth0",
		},
		{name: "no addresses", conf: base + `}`, ifName: "eth0", prev: &current.Result{}, errCode: types.ErrInvalidNetworkConfig},
		{name: "interface name too short", conf: base + `}`, ifName: "e0", prev: prevResult("198.18.0.2/24"), errCode: types.ErrInvalidEnvironmentVariables},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s, err := NewSpec(Input{ContainerID: "c1", Netns: "/var/run/netns/p", IfName: tc.ifName, Conf: conf(t, tc.conf), Facts: tc.facts, Prev: tc.prev})
			if tc.errCode != 0 {
				te, ok := err.(*types.Error)
				if !ok || te.Code != tc.errCode {
					t.Fatalf("err = %v, want CNI code %d", err, tc.errCode)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if s.IPv4 != tc.v4 || s.IPv6 != tc.v6 {
				t.Errorf("families v4 %t v6 %t, want %t %t", s.IPv4, s.IPv6, tc.v4, tc.v6)
			}
			if got := strings.Join(s.DNS, ","); got != tc.dns {
				t.Errorf("dns %q, want %q", got, tc.dns)
			}
			if got := strings.Join(s.Search, ","); got != tc.search {
				t.Errorf("search %q, want %q", got, tc.search)
			}
			if s.Tap != tc.tap || s.Bridge != tc.bridg || s.Owner != "vmnic:c1/"+tc.ifName {
				t.Errorf("names tap %q bridge %q owner %q", s.Tap, s.Bridge, s.Owner)
			}
		})
	}
}

func TestDHCPConfigSplitsFamilies(t *testing.T) {
	s := &Spec{
		Netns: "/p", Bridge: "k6t-eth0", IPv4: true, IPv6: true, MTU: 1450, Hostname: "vm1",
		GuestMAC: "02:00:00:00:00:09", DNS: []string{"198.18.0.53", "fd00::53", "bogus"}, Search: []string{"a.local"},
	}
	c := s.dhcpConfig(slog.Default())
	if c.V4 == nil || c.V6 == nil || c.RA == nil {
		t.Fatalf("servers missing: %+v", c)
	}
	if len(c.V4.DNS) != 1 || !c.V4.DNS[0].Equal(net.ParseIP("198.18.0.53")) || len(c.V6.DNS) != 1 {
		t.Errorf("DNS split wrong: v4 %v v6 %v", c.V4.DNS, c.V6.DNS)
	}
	if c.V4.MTU != 1450 || c.RA.MTU != 1450 || c.V4.Hostname != "vm1" || !c.V4.Address.IP.Equal(Guest4) {
		t.Errorf("v4 lease %+v / RA %+v", c.V4, c.RA)
	}
	if c.RA.RouterLifetime <= 0 || !c.RA.Managed {
		t.Errorf("RA must advertise a default router and DHCPv6: %+v", c.RA)
	}
	if c.ClientMAC.String() != "02:00:00:00:00:09" {
		t.Errorf("client MAC %v", c.ClientMAC)
	}
	v4only := &Spec{IPv4: true, MTU: 1500}
	if c := v4only.dhcpConfig(slog.Default()); c.V6 != nil || c.RA != nil {
		t.Error("IPv6 servers for an IPv4-only pod")
	}
}

func TestNftSpecPorts(t *testing.T) {
	s := &Spec{PodIf: "eth0", Bridge: "k6t-eth0", IPv4: true, Ports: []netconf.Port{{Port: 80}, {Port: 53, Protocol: "UDP"}}}
	m := s.nftSpec()
	if m.V6 != nil || m.V4 == nil || len(m.Ports) != 2 || m.Ports[0].Protocol != "tcp" || m.Ports[1].Protocol != "udp" {
		t.Errorf("nft spec %+v", m)
	}
}
