package nft

import (
	"flag"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

var update = flag.Bool("update", false, "rewrite testdata/*.golden from Render")

var (
	v4 = &Family{Guest: net.ParseIP("10.0.2.2"), Gateway: net.ParseIP("10.0.2.1")}
	v6 = &Family{Guest: net.ParseIP("fd10:0:2::2"), Gateway: net.ParseIP("fd10:0:2::1")}
)

// goldenCases are rendered into testdata/<name>.golden; the root tests also
// apply them and compare with what the nft binary lists.
var goldenCases = []struct {
	name string
	m    Masquerade
}{
	{"v4_all_ports", Masquerade{PodIf: "eth0", Bridge: "k6t-eth0", V4: v4}},
	{"dual_stack_ports", Masquerade{
		PodIf: "eth0", Bridge: "k6t-eth0", V4: v4, V6: v6,
		Ports: []Port{
			{Protocol: "tcp", Port: 80},
			{Protocol: "UDP", Port: 53},
			{Protocol: "sctp", Port: 9999},
			{Protocol: "tcp", Port: 8000, EndPort: 8010},
		},
	}},
	{"exclude_ports", Masquerade{
		PodIf: "eth0", Bridge: "k6t-eth0", V4: v4, V6: v6,
		ExcludePorts: []Port{
			{Protocol: "tcp", Port: 15000, EndPort: 15090},
			{Protocol: "udp", Port: 15053},
		},
	}},
}

func TestRenderGolden(t *testing.T) {
	for _, tc := range goldenCases {
		t.Run(tc.name, func(t *testing.T) {
			got := Render(tc.m)
			path := filepath.Join("testdata", tc.name+".golden")
			if *update {
				if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run with -update to create)", err)
			}
			if got != string(want) {
				t.Errorf("Render differs from %s (run with -update to accept):\n--- got\n%s--- want\n%s", path, got, want)
			}
		})
	}
}

// TestRenderTablesGolden: bridge mode's guard (open and held), passt's
// hold and the migration source's DAD guard, against testdata goldens.
func TestRenderTablesGolden(t *testing.T) {
	for _, tc := range []struct{ name, got string }{
		{"guard_net1", RenderGuard(Guard{Name: "net1", PodIf: "net1-nic", Tap: "tap1"})},
		{"guard_net1_held", RenderGuard(Guard{Name: "net1", PodIf: "net1-nic", Tap: "tap1", Held: true})},
		{"hold_eth0", RenderHold("eth0")},
		{"dad_eth0", RenderDADGuard("eth0")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join("testdata", tc.name+".golden")
			if *update {
				if err := os.WriteFile(path, []byte(tc.got), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run with -update to create)", err)
			}
			if tc.got != string(want) {
				t.Errorf("%s differs from %s (run with -update to accept):\n--- got\n%s--- want\n%s", tc.name, path, tc.got, want)
			}
		})
	}
}

func TestRenderDeterministic(t *testing.T) {
	a := Masquerade{
		PodIf: "eth0", Bridge: "k6t-eth0", V4: v4, V6: v6,
		Ports: []Port{{Protocol: "udp", Port: 53}, {Protocol: "tcp", Port: 80}, {Port: 80}, {Protocol: "sctp", Port: 9}},
	}
	b := a
	b.Ports = []Port{{Protocol: "sctp", Port: 9}, {Protocol: "TCP", Port: 80}, {Protocol: "udp", Port: 53, EndPort: 53}}
	if ra, rb := Render(a), Render(b); ra != rb {
		t.Errorf("same ports in another order/spelling render differently:\n%s\n%s", ra, rb)
	}
	// Two renderings of the same config must agree byte for byte (map
	// iteration order must not leak into the output).
	if r1, r2 := Render(a), Render(a); r1 != r2 {
		t.Errorf("Render is not deterministic:\n%s\n%s", r1, r2)
	}
}

func TestRenderV6Only(t *testing.T) {
	got := Render(Masquerade{PodIf: "eth0", Bridge: "k6t-eth0", V6: v6})
	for _, want := range []string{
		"table ip6 vmnic {",
		"\t\tip6 saddr fd10:0:2::2 masquerade\n",
		"\t\tip6 daddr ::1 dnat to fd10:0:2::2\n",
		"\t\tip6 saddr ::1 snat to fd10:0:2::1\n",
		"\t\tdnat to fd10:0:2::2\n",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("v6-only render lacks %q:\n%s", want, got)
		}
	}
	if strings.Contains(got, "table ip vmnic") {
		t.Errorf("v6-only render has an ip table:\n%s", got)
	}
}

func TestInvalidConfig(t *testing.T) {
	ok := Masquerade{PodIf: "eth0", Bridge: "k6t-eth0", V4: v4}
	for name, mod := range map[string]func(*Masquerade){
		"no family":      func(m *Masquerade) { m.V4 = nil },
		"no pod if":      func(m *Masquerade) { m.PodIf = "" },
		"long bridge":    func(m *Masquerade) { m.Bridge = "k6t-0123456789abc" },
		"v6 addr in v4":  func(m *Masquerade) { m.V4 = &Family{Guest: net.ParseIP("fd10::2"), Gateway: net.ParseIP("10.0.2.1")} },
		"v4 addr in v6":  func(m *Masquerade) { m.V6 = &Family{Guest: net.ParseIP("10.0.2.2"), Gateway: net.ParseIP("fd10::1")} },
		"nil gateway":    func(m *Masquerade) { m.V4 = &Family{Guest: net.ParseIP("10.0.2.2")} },
		"bad protocol":   func(m *Masquerade) { m.Ports = []Port{{Protocol: "icmp", Port: 1}} },
		"port 0":         func(m *Masquerade) { m.Ports = []Port{{Protocol: "tcp"}} },
		"reversed range": func(m *Masquerade) { m.ExcludePorts = []Port{{Protocol: "tcp", Port: 20, EndPort: 10}} },
	} {
		m := ok
		mod(&m)
		if _, err := build(m); err == nil {
			t.Errorf("%s: build accepted %+v", name, m)
		}
		if err := Apply("/nonexistent", m); err == nil || !strings.Contains(err.Error(), "invalid masquerade config") {
			t.Errorf("%s: Apply error = %v, want a config error", name, err)
		}
		if r := Render(m); !strings.HasPrefix(r, "# invalid masquerade config") {
			t.Errorf("%s: Render = %q", name, r)
		}
	}
	if _, err := build(ok); err != nil {
		t.Fatalf("valid config rejected: %v", err)
	}
}

func TestPortString(t *testing.T) {
	for p, want := range map[Port]string{
		{Port: 80}:                                "tcp dport 80",
		{Protocol: "UDP", Port: 53, EndPort: 53}:  "udp dport 53",
		{Protocol: "sctp", Port: 1, EndPort: 100}: "sctp dport 1-100",
	} {
		if got := p.String(); got != want {
			t.Errorf("%#v.String() = %q, want %q", p, got, want)
		}
	}
}

// TestDescribeRule covers the forms nft itself generates for the same
// statements (so rules edited with the nft binary compare equal when they
// mean the same) and the fallbacks that make any difference visible.
func TestDescribeRule(t *testing.T) {
	ip4 := nftables.TableFamilyIPv4
	l4 := func(p byte) []expr.Any {
		return []expr.Any{
			&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{p}},
		}
	}
	th := &expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2}
	for _, tc := range []struct {
		want  string
		exprs []expr.Any
	}{
		{"tcp dport 15000-15090 return", rule(l4(unix.IPPROTO_TCP), []expr.Any{
			th,
			&expr.Cmp{Op: expr.CmpOpGte, Register: 1, Data: be16(15000)},
			&expr.Cmp{Op: expr.CmpOpLte, Register: 1, Data: be16(15090)},
			&expr.Verdict{Kind: expr.VerdictReturn},
		})},
		{"udp dport != 53 accept", rule(l4(unix.IPPROTO_UDP), []expr.Any{
			th,
			&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: be16(53)},
			&expr.Verdict{Kind: expr.VerdictAccept},
		})},
		{"meta l4proto sctp counter", rule(l4(unix.IPPROTO_SCTP), []expr.Any{&expr.Counter{Packets: 3}})},
		{"th dport 80 drop", rule([]expr.Any{th, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: be16(80)}, &expr.Verdict{Kind: expr.VerdictDrop}})},
		{`iifname "eth*" jump inbound`, rule([]expr.Any{
			&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte("eth")},
		}, verdict(expr.VerdictJump, "inbound"))},
		{`oifname "k6t-eth0" goto x`, rule(matchIfname(expr.MetaKeyOIFNAME, "k6t-eth0"), verdict(expr.VerdictGoto, "x"))},
		{"dnat to 10.0.2.2", []expr.Any{
			&expr.Immediate{Register: 1, Data: net.ParseIP("10.0.2.2").To4()},
			&expr.NAT{Type: expr.NATTypeDestNAT, Family: unix.NFPROTO_IPV4, RegAddrMin: 1, RegAddrMax: 1},
		}},
		{"dnat to 10.0.2.2-10.0.2.9:8080 persistent", []expr.Any{
			&expr.Immediate{Register: 1, Data: net.ParseIP("10.0.2.2").To4()},
			&expr.Immediate{Register: 2, Data: net.ParseIP("10.0.2.9").To4()},
			&expr.Immediate{Register: 3, Data: be16(8080)},
			&expr.NAT{Type: expr.NATTypeDestNAT, Family: unix.NFPROTO_IPV4, RegAddrMin: 1, RegAddrMax: 2, RegProtoMin: 3, Persistent: true},
		}},
		{"snat ip6 to ::1", []expr.Any{
			&expr.Immediate{Register: 1, Data: net.IPv6loopback},
			&expr.NAT{Type: expr.NATTypeSourceNAT, Family: unix.NFPROTO_IPV6, RegAddrMin: 1},
		}},
		{"ip daddr 127.0.0.1 masquerade random", rule(matchAddr(&families[0], 16, net.IPv4(127, 0, 0, 1).To4()), []expr.Any{&expr.Masq{Random: true}})},
		{"@nh,64,8 0x40 Log{Level:0 Flags:0 Key:0 Snaplen:0 Group:0 QThreshold:0 Data:[]}", []expr.Any{
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 8, Len: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{64}},
			&expr.Log{},
		}},
	} {
		if got := describeRule(ip4, tc.exprs); got != tc.want {
			t.Errorf("describeRule = %q, want %q", got, tc.want)
		}
	}
}

func TestDiffRules(t *testing.T) {
	w := []string{"a", "b", "c"}
	for _, tc := range []struct {
		got  []string
		want []string
	}{
		{[]string{"a", "b", "c"}, nil},
		{[]string{"a", "c"}, []string{`rule 2 of chain "x" missing: want "b"`}},
		{[]string{"z", "a", "b", "c"}, []string{`unexpected rule 1 of chain "x": "z"`}},
		{[]string{"a", "B", "c"}, []string{`rule 2 of chain "x" differs: want "b", got "B"`}},
		{nil, []string{`rule 1 of chain "x" missing: want "a"`, `rule 2 of chain "x" missing: want "b"`, `rule 3 of chain "x" missing: want "c"`}},
		{[]string{"a", "b", "c", "d"}, []string{`unexpected rule 4 of chain "x": "d"`}},
	} {
		got := diffRules("x", w, tc.got)
		if strings.Join(got, "\n") != strings.Join(tc.want, "\n") {
			t.Errorf("diffRules(%q) = %q, want %q", tc.got, got, tc.want)
		}
	}
}
