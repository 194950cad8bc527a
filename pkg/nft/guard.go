package nft

import (
	"errors"
	"fmt"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// GuardPrefix starts the name of a bridge-mode guard table; the pod
// interface's name follows, so each NIC of a pod has its own table.
const GuardPrefix = "vmnic_"

// Guard is the bridge-family filter of one bridge-mode VM NIC. It keeps the
// pod's own network stack off the underlay: the pod interface is a bridge
// port that only carries the guest's frames.
//
//   - input: nothing from the underlay reaches the pod's stack (so the DHCP
//     server never answers another VM's guest on the same VLAN);
//   - output: nothing the pod's stack sends leaves through the pod
//     interface (no ARP, NDP, MLD or DHCP replies of the pod on the VLAN);
//   - forward: the guest's DHCP requests do not leave for the underlay, and
//     no DHCP answer from the underlay reaches the guest, so the guest takes
//     its address from vmnic only.
//
// Held adds a hold in front of the forward chain: nothing passes between
// the tap and the rest of the bridge. A live migration's target is held
// until it takes over (the guest behind it must not be heard, nor fed stale
// traffic, before the switchover), and its source once it has handed over.
type Guard struct {
	// Name is the NIC's pod interface name (CNI_IFNAME), which names the
	// table; empty means PodIf.
	Name  string
	PodIf string // the bridge port that faces the underlay
	Tap   string // the guest's tap
	Held  bool
}

// Table is the guard's table name.
func (g Guard) Table() string {
	if g.Name != "" {
		return GuardPrefix + g.Name
	}
	return GuardPrefix + g.PodIf
}

const (
	dhcpServerPort  = 67
	dhcpClientPort  = 68
	dhcp6ClientPort = 546
	dhcp6ServerPort = 547
)

func (g Guard) chains() ([]guardChain, error) {
	if err := validIfname("pod", g.PodIf); err != nil {
		return nil, fmt.Errorf("invalid guard: %w", err)
	}
	if err := validIfname("tap", g.Tap); err != nil {
		return nil, fmt.Errorf("invalid guard: %w", err)
	}
	udp := func(p uint16) []expr.Any { return matchPort(port{proto: unix.IPPROTO_UDP, from: p, to: p}) }
	drop := verdict(expr.VerdictDrop, "")
	in, out := expr.MetaKeyIIFNAME, expr.MetaKeyOIFNAME
	var hold [][]expr.Any
	if g.Held {
		hold = [][]expr.Any{rule(matchIfname(in, g.Tap), drop), rule(matchIfname(out, g.Tap), drop)}
	}
	return []guardChain{
		{name: "input", hook: nftables.ChainHookInput, rules: [][]expr.Any{
			rule(matchIfname(in, g.PodIf), drop),
		}},
		{name: "output", hook: nftables.ChainHookOutput, rules: [][]expr.Any{
			rule(matchIfname(out, g.PodIf), drop),
		}},
		{name: "forward", hook: nftables.ChainHookForward, rules: append(hold,
			rule(matchIfname(in, g.Tap), matchIfname(out, g.PodIf), udp(dhcpServerPort), drop),
			rule(matchIfname(in, g.Tap), matchIfname(out, g.PodIf), udp(dhcp6ServerPort), drop),
			rule(matchIfname(in, g.PodIf), matchIfname(out, g.Tap), udp(dhcpClientPort), drop),
			rule(matchIfname(in, g.PodIf), matchIfname(out, g.Tap), udp(dhcp6ClientPort), drop),
		)},
	}, nil
}

type guardChain struct {
	name  string
	hook  *nftables.ChainHook
	rules [][]expr.Any
}

func (gc guardChain) nftChain(t *nftables.Table) *nftables.Chain {
	p := policyAccept
	return &nftables.Chain{
		Name: gc.name, Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: gc.hook, Priority: nftables.ChainPriorityFilter, Policy: &p,
	}
}

func (gc guardChain) header() string {
	p := policyAccept
	return chainHeader(nftables.ChainTypeFilter, gc.hook, nftables.ChainPriorityFilter, &p)
}

// ApplyGuard programs g's table in the namespace at netnsPath in one
// transaction, replacing a previous version of it.
func ApplyGuard(netnsPath string, g Guard) error {
	chains, err := g.chains()
	if err != nil {
		return err
	}
	err = withConn(netnsPath, func(c *nftables.Conn) error {
		t := &nftables.Table{Name: g.Table(), Family: nftables.TableFamilyBridge}
		c.AddTable(t)
		c.DelTable(t)
		c.AddTable(t)
		for _, gc := range chains {
			ch := c.AddChain(gc.nftChain(t))
			for _, r := range gc.rules {
				c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: r})
			}
		}
		if lerr := c.Flush(); lerr != nil {
			return fmt.Errorf("commit nftables batch: %w", lerr)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("nft guard in %s: %w", netnsPath, err)
	}
	return nil
}

// DeleteGuard removes the guard table of the NIC named ifName (the guard's
// Name). A missing table or namespace is success.
func DeleteGuard(netnsPath, ifName string) error {
	name := Guard{Name: ifName}.Table()
	err := withConn(netnsPath, func(c *nftables.Conn) error {
		ts, err := c.ListTablesOfFamily(nftables.TableFamilyBridge)
		if err != nil {
			return fmt.Errorf("list tables: %w", err)
		}
		for _, t := range ts {
			if t.Name == name {
				t := &nftables.Table{Name: name, Family: nftables.TableFamilyBridge}
				c.AddTable(t)
				c.DelTable(t)
				return c.Flush()
			}
		}
		return nil
	})
	if errors.Is(err, errNetNSGone) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("nft delete guard in %s: %w", netnsPath, err)
	}
	return nil
}

// CheckGuard compares the live guard table with g; a *DriftError lists the
// differences.
func CheckGuard(netnsPath string, g Guard) error {
	chains, err := g.chains()
	if err != nil {
		return err
	}
	var problems []string
	err = withConn(netnsPath, func(c *nftables.Conn) error {
		where := "nft table bridge " + g.Table()
		ts, lerr := c.ListTablesOfFamily(nftables.TableFamilyBridge)
		if lerr != nil {
			return fmt.Errorf("list tables: %w", lerr)
		}
		var live *nftables.Table
		for _, t := range ts {
			if t.Name == g.Table() {
				live = t
			}
		}
		if live == nil {
			problems = append(problems, where+": missing")
			return nil
		}
		all, cerr := c.ListChainsOfTableFamily(nftables.TableFamilyBridge)
		if cerr != nil {
			return fmt.Errorf("list chains: %w", cerr)
		}
		liveChains := map[string]*nftables.Chain{}
		for _, ch := range all {
			if ch.Table != nil && ch.Table.Name == g.Table() {
				liveChains[ch.Name] = ch
			}
		}
		for _, gc := range chains {
			ch := liveChains[gc.name]
			if ch == nil {
				problems = append(problems, fmt.Sprintf("%s: chain %q missing", where, gc.name))
				continue
			}
			delete(liveChains, gc.name)
			if w, got := gc.header(), chainHeader(ch.Type, ch.Hooknum, ch.Priority, ch.Policy); w != got {
				problems = append(problems, fmt.Sprintf("%s: chain %q differs: want %q, got %q", where, gc.name, w, got))
			}
			rules, rerr := c.GetRules(live, ch)
			if rerr != nil {
				return fmt.Errorf("list rules of %s chain %s: %w", where, gc.name, rerr)
			}
			got := make([]string, len(rules))
			for i, r := range rules {
				got[i] = describeRule(nftables.TableFamilyBridge, r.Exprs)
			}
			want := make([]string, len(gc.rules))
			for i, r := range gc.rules {
				want[i] = describeRule(nftables.TableFamilyBridge, r)
			}
			for _, p := range diffRules(gc.name, want, got) {
				problems = append(problems, where+": "+p)
			}
		}
		for name := range liveChains {
			problems = append(problems, fmt.Sprintf("%s: unexpected chain %q", where, name))
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("nft check guard in %s: %w", netnsPath, err)
	}
	if len(problems) > 0 {
		return &DriftError{Problems: problems}
	}
	return nil
}

// RenderGuard returns g's table as nft syntax.
func RenderGuard(g Guard) string {
	chains, err := g.chains()
	if err != nil {
		return "# " + err.Error() + "\n"
	}
	var b strings.Builder
	fmt.Fprintf(&b, "table bridge %s {\n", g.Table())
	for i, gc := range chains {
		if i > 0 {
			b.WriteString("\n")
		}
		fmt.Fprintf(&b, "\tchain %s {\n\t\t%s\n", gc.name, gc.header())
		for _, r := range gc.rules {
			fmt.Fprintf(&b, "\t\t%s\n", describeRule(nftables.TableFamilyBridge, r))
		}
		b.WriteString("\t}\n")
	}
	b.WriteString("}\n")
	return b.String()
}
