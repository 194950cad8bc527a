package nft

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"net"
	"reflect"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// describeRule renders a rule's expressions as nft syntax, the way
// `nft list` prints them. It is the normalized form Check compares: it does
// not depend on handles, register numbers or NUL padding, and it folds what
// nft generates for the same statement into one text (e.g. a port range as a
// range expression or as a cmp >= / cmp <= pair). Expressions it does not
// know are printed as Go values, so any difference still shows.
func describeRule(tf nftables.TableFamily, exprs []expr.Any) string {
	d := describer{fam: familyOf(tf), regs: map[uint32]regSrc{}}
	for i := 0; i < len(exprs); i++ {
		i += d.expr(exprs, i)
	}
	d.flushProto()
	return strings.Join(d.parts, " ")
}

type regKind int

const (
	regNone regKind = iota
	regMeta
	regPayload
	regImm
)

// regSrc remembers what was loaded into a register.
type regSrc struct {
	kind regKind
	meta expr.MetaKey
	base expr.PayloadBase
	off  uint32
	len  uint32
	data []byte
}

type describer struct {
	fam   *family // nil for a family vmnic does not use
	regs  map[uint32]regSrc
	parts []string
	proto string // "meta l4proto X" waiting to be folded into "X dport N"
}

func (d *describer) emit(s string) { d.parts = append(d.parts, s) }

func (d *describer) flushProto() {
	if d.proto != "" {
		d.emit("meta l4proto " + d.proto)
		d.proto = ""
	}
}

var cmpOps = map[expr.CmpOp]string{
	expr.CmpOpEq: "", expr.CmpOpNeq: "!= ", expr.CmpOpLt: "< ",
	expr.CmpOpLte: "<= ", expr.CmpOpGt: "> ", expr.CmpOpGte: ">= ",
}

func opString(op expr.CmpOp) string {
	if s, ok := cmpOps[op]; ok {
		return s
	}
	return fmt.Sprintf("op(%d) ", op)
}

// expr describes exprs[i] and returns how many following expressions it
// consumed as well.
func (d *describer) expr(exprs []expr.Any, i int) int {
	switch e := exprs[i].(type) {
	case *expr.Meta:
		if !e.SourceRegister {
			d.regs[e.Register] = regSrc{kind: regMeta, meta: e.Key}
			return 0
		}
	case *expr.Payload:
		if e.OperationType == expr.PayloadLoad {
			d.regs[e.DestRegister] = regSrc{kind: regPayload, base: e.Base, off: e.Offset, len: e.Len}
			return 0
		}
	case *expr.Immediate:
		d.regs[e.Register] = regSrc{kind: regImm, data: e.Data}
		return 0
	case *expr.Cmp:
		src := d.regs[e.Register]
		if src.kind == regMeta && src.meta == expr.MetaKeyL4PROTO && e.Op == expr.CmpOpEq && len(e.Data) == 1 {
			d.flushProto()
			d.proto = protoName(e.Data[0])
			return 0
		}
		// nft writes a range as "cmp gte" followed by "cmp lte".
		if e.Op == expr.CmpOpGte && i+1 < len(exprs) {
			if next, ok := exprs[i+1].(*expr.Cmp); ok && next.Op == expr.CmpOpLte && next.Register == e.Register {
				d.emit(d.lhs(src) + " " + d.value(src, e.Data) + "-" + d.value(src, next.Data))
				return 1
			}
		}
		d.emit(d.lhs(src) + " " + opString(e.Op) + d.value(src, e.Data))
		return 0
	case *expr.Range:
		src := d.regs[e.Register]
		op := ""
		if e.Op != expr.CmpOpEq {
			op = "!= "
		}
		d.emit(d.lhs(src) + " " + op + d.value(src, e.FromData) + "-" + d.value(src, e.ToData))
		return 0
	}
	d.flushProto()
	switch e := exprs[i].(type) {
	case *expr.NAT:
		d.emit(d.nat(e))
	case *expr.Masq:
		s := "masquerade"
		if e.ToPorts {
			s += " to :" + d.port(e.RegProtoMin, e.RegProtoMax)
		}
		d.emit(s + natFlags(e.Random, e.FullyRandom, e.Persistent))
	case *expr.Verdict:
		d.emit(verdictString(e))
	case *expr.Counter:
		d.emit("counter")
	default:
		// Unknown to the describer: the Go value, e.g. "Log{Level:0 ...}".
		t := reflect.TypeOf(e)
		if t.Kind() == reflect.Pointer {
			t = t.Elem()
		}
		d.emit(t.Name() + strings.TrimPrefix(fmt.Sprintf("%+v", e), "&"))
	}
	return 0
}

// lhs is the left-hand side of a match on what src loaded.
func (d *describer) lhs(src regSrc) string {
	switch src.kind {
	case regMeta:
		switch src.meta {
		case expr.MetaKeyIIFNAME:
			d.flushProto()
			return "iifname"
		case expr.MetaKeyOIFNAME:
			d.flushProto()
			return "oifname"
		case expr.MetaKeyL4PROTO:
			d.flushProto()
			return "meta l4proto"
		case expr.MetaKeyPROTOCOL:
			d.flushProto()
			return "meta protocol"
		}
		d.flushProto()
		return fmt.Sprintf("meta key %d", src.meta)
	case regPayload:
		if src.base == expr.PayloadBaseTransportHeader && src.len == 1 && src.off == 0 && d.proto == "ipv6-icmp" {
			d.proto = ""
			return "icmpv6 type"
		}
		if src.base == expr.PayloadBaseTransportHeader && src.len == 2 && (src.off == 0 || src.off == 2) {
			field := "dport"
			if src.off == 0 {
				field = "sport"
			}
			proto := "th"
			if d.proto != "" {
				proto, d.proto = d.proto, ""
			}
			return proto + " " + field
		}
		d.flushProto()
		if src.base == expr.PayloadBaseNetworkHeader && d.fam != nil && int(src.len) == d.fam.addrLen {
			switch src.off {
			case d.fam.saddrOff:
				return d.fam.name + " saddr"
			case d.fam.daddrOff:
				return d.fam.name + " daddr"
			}
		}
		bases := map[expr.PayloadBase]string{
			expr.PayloadBaseLLHeader: "ll", expr.PayloadBaseNetworkHeader: "nh", expr.PayloadBaseTransportHeader: "th",
		}
		return fmt.Sprintf("@%s,%d,%d", bases[src.base], src.off*8, src.len*8)
	case regImm:
		d.flushProto()
		return "immediate 0x" + hex.EncodeToString(src.data)
	}
	d.flushProto()
	return "(unloaded register)"
}

// value formats data compared against what src loaded.
func (d *describer) value(src regSrc, data []byte) string {
	switch {
	case src.kind == regMeta && (src.meta == expr.MetaKeyIIFNAME || src.meta == expr.MetaKeyOIFNAME):
		if n := bytes.IndexByte(data, 0); n >= 0 {
			return fmt.Sprintf("%q", data[:n])
		}
		// No terminating NUL: nft's prefix match "eth*".
		return fmt.Sprintf("%q", string(data)+"*")
	case src.kind == regMeta && src.meta == expr.MetaKeyL4PROTO && len(data) == 1:
		return protoName(data[0])
	case src.kind == regMeta && src.meta == expr.MetaKeyPROTOCOL && len(data) == 2:
		switch binary.BigEndian.Uint16(data) {
		case unix.ETH_P_IP:
			return "ip"
		case unix.ETH_P_IPV6:
			return "ip6"
		}
	case src.kind == regPayload && src.base == expr.PayloadBaseTransportHeader && src.len == 1 && src.off == 0 && len(data) == 1 && data[0] == 135:
		return "nd-neighbor-solicit"
	case src.kind == regPayload && src.base == expr.PayloadBaseTransportHeader && src.len == 2 && len(data) == 2:
		return fmt.Sprint(binary.BigEndian.Uint16(data))
	case src.kind == regPayload && src.base == expr.PayloadBaseNetworkHeader && (len(data) == 4 || len(data) == 16):
		return net.IP(data).String()
	}
	return "0x" + hex.EncodeToString(data)
}

func protoName(p byte) string {
	if p == unix.IPPROTO_ICMPV6 {
		return "ipv6-icmp"
	}
	for name, n := range l4protos {
		if n == p {
			return name
		}
	}
	return fmt.Sprint(p)
}

func (d *describer) addr(r uint32) string {
	src, ok := d.regs[r]
	if !ok || src.kind != regImm {
		return fmt.Sprintf("(register %d)", r)
	}
	if len(src.data) == 4 || len(src.data) == 16 {
		return net.IP(src.data).String()
	}
	return "0x" + hex.EncodeToString(src.data)
}

func (d *describer) port(min, max uint32) string {
	p := func(r uint32) string {
		src, ok := d.regs[r]
		if !ok || src.kind != regImm || len(src.data) != 2 {
			return fmt.Sprintf("(register %d)", r)
		}
		return fmt.Sprint(binary.BigEndian.Uint16(src.data))
	}
	s := p(min)
	if max != 0 && max != min {
		s += "-" + p(max)
	}
	return s
}

func (d *describer) nat(e *expr.NAT) string {
	s := "snat"
	if e.Type == expr.NATTypeDestNAT {
		s = "dnat"
	} else if e.Type != expr.NATTypeSourceNAT {
		s = fmt.Sprintf("nat(type %d)", e.Type)
	}
	if d.fam == nil || e.Family != d.fam.nfproto {
		switch e.Family {
		case unix.NFPROTO_IPV4:
			s += " ip"
		case unix.NFPROTO_IPV6:
			s += " ip6"
		default:
			s += fmt.Sprintf(" family(%d)", e.Family)
		}
	}
	s += " to"
	if e.Prefix {
		s += " prefix"
	}
	target := ""
	if e.RegAddrMin != 0 {
		target = d.addr(e.RegAddrMin)
		// The kernel reports addr_max even when only addr_min was given.
		if e.RegAddrMax != 0 && e.RegAddrMax != e.RegAddrMin {
			if max := d.addr(e.RegAddrMax); max != target {
				target += "-" + max
			}
		}
	}
	if e.RegProtoMin != 0 {
		if d.fam != nil && d.fam.tf == nftables.TableFamilyIPv6 && target != "" {
			target = "[" + target + "]"
		}
		target += ":" + d.port(e.RegProtoMin, e.RegProtoMax)
	}
	return s + " " + target + natFlags(e.Random, e.FullyRandom, e.Persistent)
}

func natFlags(random, fullyRandom, persistent bool) string {
	var f []string
	if random {
		f = append(f, "random")
	}
	if fullyRandom {
		f = append(f, "fully-random")
	}
	if persistent {
		f = append(f, "persistent")
	}
	if len(f) == 0 {
		return ""
	}
	return " " + strings.Join(f, ",")
}

func verdictString(v *expr.Verdict) string {
	switch v.Kind {
	case expr.VerdictAccept:
		return "accept"
	case expr.VerdictDrop:
		return "drop"
	case expr.VerdictContinue:
		return "continue"
	case expr.VerdictReturn:
		return "return"
	case expr.VerdictJump:
		return "jump " + v.Chain
	case expr.VerdictGoto:
		return "goto " + v.Chain
	case expr.VerdictQueue:
		return "queue"
	case expr.VerdictStolen:
		return "stolen"
	case expr.VerdictBreak:
		return "break"
	}
	return fmt.Sprintf("verdict(%d) %s", v.Kind, v.Chain)
}

var hookNames = map[nftables.ChainHook]string{
	*nftables.ChainHookPrerouting:  "prerouting",
	*nftables.ChainHookInput:       "input",
	*nftables.ChainHookForward:     "forward",
	*nftables.ChainHookOutput:      "output",
	*nftables.ChainHookPostrouting: "postrouting",
}

// chainHeader renders a base chain's definition as nft prints it, e.g.
// "type nat hook prerouting priority dstnat; policy accept;".
func chainHeader(typ nftables.ChainType, hook *nftables.ChainHook, prio *nftables.ChainPriority, policy *nftables.ChainPolicy) string {
	if hook == nil {
		return ""
	}
	h, ok := hookNames[*hook]
	if !ok {
		h = fmt.Sprint(*hook)
	}
	p := "?"
	if prio != nil {
		p = fmt.Sprint(int32(*prio))
		switch {
		case *hook == *nftables.ChainHookPrerouting && *prio == *nftables.ChainPriorityNATDest:
			p = "dstnat"
		case *hook == *nftables.ChainHookPostrouting && *prio == *nftables.ChainPriorityNATSource:
			p = "srcnat"
		}
	}
	s := fmt.Sprintf("type %s hook %s priority %s;", typ, h, p)
	if policy != nil {
		switch *policy {
		case nftables.ChainPolicyAccept:
			s += " policy accept;"
		case nftables.ChainPolicyDrop:
			s += " policy drop;"
		default:
			s += fmt.Sprintf(" policy %d;", *policy)
		}
	}
	return s
}

// checkTable compares the live vmnic table of one family (nil if absent) with
// the desired one (nil if the family is not wanted) and returns the problems.
func checkTable(c *nftables.Conn, fam family, want *tableDef, live *nftables.Table, chains []*nftables.Chain) ([]string, error) {
	where := fmt.Sprintf("nft table %s %s", fam.name, TableName)
	if want == nil {
		if live != nil {
			return []string{fmt.Sprintf("%s: present, but the pod has no %s configuration", where, fam.name)}, nil
		}
		return nil, nil
	}
	if live == nil {
		return []string{where + ": missing"}, nil
	}
	var problems []string
	if flags := tableFlags(live); flags != 0 {
		s := fmt.Sprintf("%s: unexpected table flags 0x%x", where, flags)
		if flags&unix.NFT_TABLE_F_DORMANT != 0 {
			s += " (dormant)"
		}
		problems = append(problems, s)
	}
	liveChains := map[string]*nftables.Chain{}
	var liveOrder []string
	for _, ch := range chains {
		if ch.Table != nil && ch.Table.Name == TableName && ch.Table.Family == fam.tf {
			liveChains[ch.Name] = ch
			liveOrder = append(liveOrder, ch.Name)
		}
	}
	wanted := map[string]bool{}
	for _, cd := range want.chains {
		wanted[cd.name] = true
		ch := liveChains[cd.name]
		if ch == nil {
			problems = append(problems, fmt.Sprintf("%s: chain %q missing", where, cd.name))
			continue
		}
		if w, g := cd.header(), chainHeader(ch.Type, ch.Hooknum, ch.Priority, ch.Policy); w != g {
			if w == "" {
				w = "regular chain"
			}
			if g == "" {
				g = "regular chain"
			}
			problems = append(problems, fmt.Sprintf("%s: chain %q differs: want %q, got %q", where, cd.name, w, g))
		}
		rules, err := c.GetRules(live, ch)
		if err != nil {
			return nil, fmt.Errorf("list rules of %s chain %s: %w", where, cd.name, err)
		}
		got := make([]string, len(rules))
		for i, r := range rules {
			got[i] = describeRule(fam.tf, r.Exprs)
		}
		wantRules := make([]string, len(cd.rules))
		for i, r := range cd.rules {
			wantRules[i] = describeRule(fam.tf, r)
		}
		for _, p := range diffRules(cd.name, wantRules, got) {
			problems = append(problems, where+": "+p)
		}
	}
	for _, name := range liveOrder {
		if !wanted[name] {
			problems = append(problems, fmt.Sprintf("%s: unexpected chain %q", where, name))
		}
	}
	return problems, nil
}

// tableFlags returns the table's flags. nftables v0.3.0 decodes
// NFTA_TABLE_FLAGS in host byte order although netlink carries it big endian;
// undo that.
func tableFlags(t *nftables.Table) uint32 {
	return binary.BigEndian.Uint32(binary.NativeEndian.AppendUint32(nil, t.Flags))
}

// diffRules aligns the wanted and live rule descriptions (longest common
// subsequence) and describes each mismatch, numbering rules from 1:
// `rule 2 of chain "inbound" differs: want …, got …` (a replaced rule),
// `rule 3 of chain "inbound" missing: want …` and
// `unexpected rule 1 of chain "inbound": …` (numbered in the live chain).
func diffRules(chain string, want, got []string) []string {
	n, m := len(want), len(got)
	lcs := make([][]int, n+1)
	for i := range lcs {
		lcs[i] = make([]int, m+1)
	}
	for i := n - 1; i >= 0; i-- {
		for j := m - 1; j >= 0; j-- {
			if want[i] == got[j] {
				lcs[i][j] = lcs[i+1][j+1] + 1
			} else {
				lcs[i][j] = max(lcs[i+1][j], lcs[i][j+1])
			}
		}
	}
	var out []string
	var missing, extra []int // pending unmatched indexes since the last match
	flush := func() {
		k := 0
		for ; k < len(missing) && k < len(extra); k++ {
			out = append(out, fmt.Sprintf("rule %d of chain %q differs: want %q, got %q", missing[k]+1, chain, want[missing[k]], got[extra[k]]))
		}
		for _, i := range missing[k:] {
			out = append(out, fmt.Sprintf("rule %d of chain %q missing: want %q", i+1, chain, want[i]))
		}
		for _, j := range extra[k:] {
			out = append(out, fmt.Sprintf("unexpected rule %d of chain %q: %q", j+1, chain, got[j]))
		}
		missing, extra = nil, nil
	}
	i, j := 0, 0
	for i < n || j < m {
		switch {
		case i < n && j < m && want[i] == got[j]:
			flush()
			i++
			j++
		case j == m || (i < n && lcs[i+1][j] >= lcs[i][j+1]):
			missing = append(missing, i)
			i++
		default:
			extra = append(extra, j)
			j++
		}
	}
	flush()
	return out
}
