package nft

import (
	"encoding/binary"
	"fmt"
	"net"
	"slices"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// family describes one IP family the ruleset handles.
type family struct {
	tf       nftables.TableFamily
	name     string // nft family keyword: "ip" or "ip6"
	nfproto  uint32 // NFPROTO_* for the nat expression
	addrLen  int
	saddrOff uint32 // offset of the source address in the network header
	daddrOff uint32 // offset of the destination address in the network header
	loopback net.IP
}

// families lists the families in the order they are applied and rendered.
var families = []family{
	{
		tf: nftables.TableFamilyIPv4, name: "ip", nfproto: unix.NFPROTO_IPV4,
		addrLen: net.IPv4len, saddrOff: 12, daddrOff: 16,
		loopback: net.IPv4(127, 0, 0, 1).To4(),
	},
	{
		tf: nftables.TableFamilyIPv6, name: "ip6", nfproto: unix.NFPROTO_IPV6,
		addrLen: net.IPv6len, saddrOff: 8, daddrOff: 24,
		loopback: net.IPv6loopback,
	},
}

func familyOf(tf nftables.TableFamily) *family {
	for i := range families {
		if families[i].tf == tf {
			return &families[i]
		}
	}
	return nil
}

// addr returns ip in the family's wire length, or nil if it is not of the family.
func (f *family) addr(ip net.IP) net.IP {
	if f.addrLen == net.IPv4len {
		return ip.To4()
	}
	if ip.To4() != nil {
		return nil
	}
	return ip.To16()
}

// l4 protocols a Port may name.
var l4protos = map[string]byte{"tcp": unix.IPPROTO_TCP, "udp": unix.IPPROTO_UDP, "sctp": unix.IPPROTO_SCTP}

// port is a validated, normalized Port.
type port struct {
	proto    byte
	from, to uint16 // to == from for a single port
}

func normalizePorts(ps []Port, what string) ([]port, error) {
	out := make([]port, 0, len(ps))
	for _, p := range ps {
		name := strings.ToLower(p.Protocol)
		if name == "" {
			name = "tcp"
		}
		proto, ok := l4protos[name]
		if !ok {
			return nil, fmt.Errorf("%s %v: unsupported protocol %q (want tcp, udp or sctp)", what, p, p.Protocol)
		}
		if p.Port == 0 {
			return nil, fmt.Errorf("%s %v: port 0", what, p)
		}
		to := p.EndPort
		if to == 0 {
			to = p.Port
		}
		if to < p.Port {
			return nil, fmt.Errorf("%s %v: end port %d below port %d", what, p, p.EndPort, p.Port)
		}
		out = append(out, port{proto: proto, from: p.Port, to: to})
	}
	slices.SortFunc(out, func(a, b port) int {
		if a.proto != b.proto {
			return int(a.proto) - int(b.proto)
		}
		if a.from != b.from {
			return int(a.from) - int(b.from)
		}
		return int(a.to) - int(b.to)
	})
	return slices.Compact(out), nil
}

func validIfname(what, name string) error {
	switch {
	case name == "":
		return fmt.Errorf("%s interface name is empty", what)
	case len(name) >= unix.IFNAMSIZ:
		return fmt.Errorf("%s interface name %q longer than %d bytes", what, name, unix.IFNAMSIZ-1)
	case strings.ContainsAny(name, "\x00/ \t\n"):
		return fmt.Errorf("%s interface name %q has invalid characters", what, name)
	}
	return nil
}

// chainDef is one desired chain with its rules.
type chainDef struct {
	name  string
	hook  *nftables.ChainHook // nil: regular chain
	prio  *nftables.ChainPriority
	rules [][]expr.Any
}

// tableDef is the desired vmnic table of one family.
type tableDef struct {
	fam    *family
	chains []chainDef
}

var policyAccept = nftables.ChainPolicyAccept

func (cd *chainDef) nftChain(t *nftables.Table) *nftables.Chain {
	ch := &nftables.Chain{Name: cd.name, Table: t}
	if cd.hook != nil {
		p := policyAccept
		ch.Type = nftables.ChainTypeNAT
		ch.Hooknum = cd.hook
		ch.Priority = cd.prio
		ch.Policy = &p
	}
	return ch
}

func (cd *chainDef) header() string {
	if cd.hook == nil {
		return ""
	}
	p := policyAccept
	return chainHeader(nftables.ChainTypeNAT, cd.hook, cd.prio, &p)
}

// build validates m and returns the desired tables by family.
func build(m Masquerade) (map[nftables.TableFamily]*tableDef, error) {
	if err := validIfname("pod", m.PodIf); err != nil {
		return nil, fmt.Errorf("invalid masquerade config: %w", err)
	}
	if err := validIfname("bridge", m.Bridge); err != nil {
		return nil, fmt.Errorf("invalid masquerade config: %w", err)
	}
	if m.V4 == nil && m.V6 == nil {
		return nil, fmt.Errorf("invalid masquerade config: neither IPv4 nor IPv6 configured")
	}
	ports, err := normalizePorts(m.Ports, "port")
	if err != nil {
		return nil, fmt.Errorf("invalid masquerade config: %w", err)
	}
	excl, err := normalizePorts(m.ExcludePorts, "excluded port")
	if err != nil {
		return nil, fmt.Errorf("invalid masquerade config: %w", err)
	}
	out := map[nftables.TableFamily]*tableDef{}
	for i := range families {
		fam := &families[i]
		fa := m.V4
		if fam.tf == nftables.TableFamilyIPv6 {
			fa = m.V6
		}
		if fa == nil {
			continue
		}
		guest, gw := fam.addr(fa.Guest), fam.addr(fa.Gateway)
		if guest == nil || gw == nil {
			return nil, fmt.Errorf("invalid masquerade config: %s guest %v / gateway %v not both %s addresses", fam.name, fa.Guest, fa.Gateway, fam.name)
		}
		out[fam.tf] = buildTable(fam, m, guest, gw, ports, excl)
	}
	return out, nil
}

func buildTable(fam *family, m Masquerade, guest, gw net.IP, ports, excl []port) *tableDef {
	var inbound, output, inboundPost [][]expr.Any
	for _, p := range excl {
		inbound = append(inbound, rule(matchPort(p), verdict(expr.VerdictReturn, "")))
		output = append(output, rule(matchPort(p), verdict(expr.VerdictReturn, "")))
	}
	if len(ports) == 0 {
		inbound = append(inbound, rule(nat(fam, expr.NATTypeDestNAT, guest)))
		output = append(output, rule(matchAddr(fam, fam.daddrOff, fam.loopback), nat(fam, expr.NATTypeDestNAT, guest)))
		inboundPost = append(inboundPost, rule(matchAddr(fam, fam.saddrOff, fam.loopback), nat(fam, expr.NATTypeSourceNAT, gw)))
	}
	for _, p := range ports {
		inbound = append(inbound, rule(matchPort(p), nat(fam, expr.NATTypeDestNAT, guest)))
		output = append(output, rule(matchPort(p), matchAddr(fam, fam.daddrOff, fam.loopback), nat(fam, expr.NATTypeDestNAT, guest)))
		inboundPost = append(inboundPost, rule(matchPort(p), matchAddr(fam, fam.saddrOff, fam.loopback), nat(fam, expr.NATTypeSourceNAT, gw)))
	}
	return &tableDef{fam: fam, chains: []chainDef{
		{
			name: ChainPrerouting, hook: nftables.ChainHookPrerouting, prio: nftables.ChainPriorityNATDest,
			rules: [][]expr.Any{rule(matchIfname(expr.MetaKeyIIFNAME, m.PodIf), verdict(expr.VerdictJump, ChainInbound))},
		},
		{
			name: ChainOutput, hook: nftables.ChainHookOutput, prio: nftables.ChainPriorityNATDest,
			rules: output,
		},
		{
			name: ChainPostrouting, hook: nftables.ChainHookPostrouting, prio: nftables.ChainPriorityNATSource,
			rules: [][]expr.Any{
				rule(matchAddr(fam, fam.saddrOff, guest), []expr.Any{&expr.Masq{}}),
				rule(matchIfname(expr.MetaKeyOIFNAME, m.Bridge), verdict(expr.VerdictJump, ChainInboundPost)),
			},
		},
		{name: ChainInbound, rules: inbound},
		{name: ChainInboundPost, rules: inboundPost},
	}}
}

func (td *tableDef) render(b *strings.Builder) {
	fmt.Fprintf(b, "table %s %s {\n", td.fam.name, TableName)
	for i, cd := range td.chains {
		if i > 0 {
			b.WriteString("\n")
		}
		fmt.Fprintf(b, "\tchain %s {\n", cd.name)
		if h := cd.header(); h != "" {
			fmt.Fprintf(b, "\t\t%s\n", h)
		}
		for _, r := range cd.rules {
			fmt.Fprintf(b, "\t\t%s\n", describeRule(td.fam.tf, r))
		}
		b.WriteString("\t}\n")
	}
	b.WriteString("}\n")
}

// Expression builders. Every match loads into register 1 and compares it,
// like nft does.

const reg = unix.NFT_REG_1

func rule(parts ...[]expr.Any) []expr.Any {
	var r []expr.Any
	for _, p := range parts {
		r = append(r, p...)
	}
	return r
}

// ifname returns name NUL-padded to IFNAMSIZ, as nft compares interface names.
func ifname(name string) []byte {
	b := make([]byte, unix.IFNAMSIZ)
	copy(b, name)
	return b
}

func matchIfname(key expr.MetaKey, name string) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: key, Register: reg},
		&expr.Cmp{Op: expr.CmpOpEq, Register: reg, Data: ifname(name)},
	}
}

func matchAddr(fam *family, off uint32, ip net.IP) []expr.Any {
	return []expr.Any{
		&expr.Payload{DestRegister: reg, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: uint32(fam.addrLen)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: reg, Data: []byte(ip)},
	}
}

func be16(v uint16) []byte { return binary.BigEndian.AppendUint16(nil, v) }

// matchPort is "meta l4proto <p>; th dport <port>" (nft: "tcp dport 80"); a
// range uses the range expression.
func matchPort(p port) []expr.Any {
	e := []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: reg},
		&expr.Cmp{Op: expr.CmpOpEq, Register: reg, Data: []byte{p.proto}},
		&expr.Payload{DestRegister: reg, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
	}
	if p.from == p.to {
		return append(e, &expr.Cmp{Op: expr.CmpOpEq, Register: reg, Data: be16(p.from)})
	}
	return append(e, &expr.Range{Op: expr.CmpOpEq, Register: reg, FromData: be16(p.from), ToData: be16(p.to)})
}

func nat(fam *family, typ expr.NATType, ip net.IP) []expr.Any {
	return []expr.Any{
		&expr.Immediate{Register: reg, Data: []byte(ip)},
		&expr.NAT{Type: typ, Family: fam.nfproto, RegAddrMin: reg},
	}
}

func verdict(kind expr.VerdictKind, chain string) []expr.Any {
	return []expr.Any{&expr.Verdict{Kind: kind, Chain: chain}}
}
