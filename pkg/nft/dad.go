package nft

import (
	"errors"
	"fmt"
	"net"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// DADGuardPrefix starts the name of a DAD guard table; the device follows.
const DADGuardPrefix = "vmnic_dad_"

// icmpv6NeighborSolicit is the ICMPv6 type of a neighbour solicitation.
const icmpv6NeighborSolicit = 135

// dadGuardTable keeps dev from hearing duplicate address detection: an
// ingress chain bound to the device drops neighbour solicitations from the
// unspecified address (RFC 4862's DAD probes); everything else passes.
//
// A live migration's source pod interface shares its IPv6 address with the
// target's, whose underlay plugin runs DAD for it when it sets the target
// up (the macvlan plugin even fails the ADD when DAD fails). A source that
// answers the probe takes the address from the VM's new home; one that
// does not hear it lets the target keep it, and goes on answering ordinary
// neighbour solicitations, so its own traffic is unaffected.
func dadGuardTable(dev string) (*nftables.Table, *nftables.Chain, []expr.Any) {
	t := &nftables.Table{Name: DADGuardPrefix + dev, Family: nftables.TableFamilyNetdev}
	accept := nftables.ChainPolicyAccept
	ch := &nftables.Chain{
		Name: "ingress", Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookIngress, Priority: nftables.ChainPriorityFilter,
		Policy: &accept, Device: dev,
	}
	r := rule(
		[]expr.Any{
			&expr.Meta{Key: expr.MetaKeyPROTOCOL, Register: reg},
			&expr.Cmp{Op: expr.CmpOpEq, Register: reg, Data: be16(unix.ETH_P_IPV6)},
			&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: reg},
			&expr.Cmp{Op: expr.CmpOpEq, Register: reg, Data: []byte{unix.IPPROTO_ICMPV6}},
			&expr.Payload{DestRegister: reg, Base: expr.PayloadBaseTransportHeader, Offset: 0, Len: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: reg, Data: []byte{icmpv6NeighborSolicit}},
		},
		matchAddr(familyOf(nftables.TableFamilyIPv6), 8, net.IPv6unspecified),
		verdict(expr.VerdictDrop, ""),
	)
	return t, ch, r
}

// ApplyDADGuard keeps dev in the namespace at netnsPath from hearing DAD
// probes (idempotent).
func ApplyDADGuard(netnsPath, dev string) error {
	if err := validIfname("guarded", dev); err != nil {
		return err
	}
	err := withConn(netnsPath, func(c *nftables.Conn) error {
		t, ch, r := dadGuardTable(dev)
		c.AddTable(t)
		c.DelTable(t)
		c.AddTable(t)
		c.AddChain(ch)
		c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: r})
		return c.Flush()
	})
	if err != nil {
		return fmt.Errorf("nft DAD guard on %s in %s: %w", dev, netnsPath, err)
	}
	return nil
}

// DeleteDADGuard removes dev's DAD guard. A missing table or namespace is
// success.
func DeleteDADGuard(netnsPath, dev string) error {
	err := withConn(netnsPath, func(c *nftables.Conn) error {
		on, err := tablePresent(c, nftables.TableFamilyNetdev, DADGuardPrefix+dev)
		if err != nil || !on {
			return err
		}
		t, _, _ := dadGuardTable(dev)
		c.DelTable(t)
		return c.Flush()
	})
	if errors.Is(err, errNetNSGone) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("nft delete DAD guard on %s in %s: %w", dev, netnsPath, err)
	}
	return nil
}

// DADGuarded reports whether dev has its DAD guard in the namespace.
func DADGuarded(netnsPath, dev string) (bool, error) {
	var on bool
	err := withConn(netnsPath, func(c *nftables.Conn) error {
		var err error
		on, err = tablePresent(c, nftables.TableFamilyNetdev, DADGuardPrefix+dev)
		return err
	})
	return on, err
}

// RenderDADGuard returns dev's DAD guard table as nft syntax.
func RenderDADGuard(dev string) string {
	t, ch, r := dadGuardTable(dev)
	// The rule matches IPv6 headers only: it reads as in an ip6 table.
	return fmt.Sprintf("table netdev %s {\n\tchain %s {\n\t\ttype filter hook ingress device %q priority %d; policy accept;\n\t\t%s\n\t}\n}\n",
		t.Name, ch.Name, dev, *ch.Priority, describeRule(nftables.TableFamilyIPv6, r))
}

func tablePresent(c *nftables.Conn, fam nftables.TableFamily, name string) (bool, error) {
	ts, err := c.ListTablesOfFamily(fam)
	if err != nil {
		return false, fmt.Errorf("list tables: %w", err)
	}
	for _, t := range ts {
		if t.Name == name {
			return true, nil
		}
	}
	return false, nil
}
