package nft

import (
	"errors"
	"fmt"

	"github.com/google/nftables"
)

// HoldPrefix starts the name of a device hold table; the device follows.
const HoldPrefix = "vmnic_hold_"

// holdTable is the netdev table holding dev: an egress chain bound to the
// device with a drop policy. Nothing leaves dev: no ARP reply, gratuitous
// ARP, neighbor advertisement or DAD probe for the addresses it holds, and
// no packet from them. A live migration's target pod interface is held
// until the switchover, its source once it has handed over.
func holdTable(dev string) (*nftables.Table, *nftables.Chain) {
	t := &nftables.Table{Name: HoldPrefix + dev, Family: nftables.TableFamilyNetdev}
	drop := nftables.ChainPolicyDrop
	return t, &nftables.Chain{
		Name: "egress", Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookEgress, Priority: nftables.ChainPriorityFilter,
		Policy: &drop, Device: dev,
	}
}

// ApplyHold holds dev in the namespace at netnsPath (idempotent).
func ApplyHold(netnsPath, dev string) error {
	if err := validIfname("held", dev); err != nil {
		return err
	}
	err := withConn(netnsPath, func(c *nftables.Conn) error {
		t, ch := holdTable(dev)
		c.AddTable(t)
		c.DelTable(t)
		c.AddTable(t)
		c.AddChain(ch)
		return c.Flush()
	})
	if err != nil {
		return fmt.Errorf("nft hold %s in %s: %w", dev, netnsPath, err)
	}
	return nil
}

// DeleteHold releases dev. A missing table or namespace is success.
func DeleteHold(netnsPath, dev string) error {
	err := withConn(netnsPath, func(c *nftables.Conn) error {
		held, err := holdPresent(c, dev)
		if err != nil || !held {
			return err
		}
		t, _ := holdTable(dev)
		c.DelTable(t)
		return c.Flush()
	})
	if errors.Is(err, errNetNSGone) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("nft release %s in %s: %w", dev, netnsPath, err)
	}
	return nil
}

// Held reports whether dev is held in the namespace at netnsPath.
func Held(netnsPath, dev string) (bool, error) {
	var held bool
	err := withConn(netnsPath, func(c *nftables.Conn) error {
		var err error
		held, err = holdPresent(c, dev)
		return err
	})
	return held, err
}

func holdPresent(c *nftables.Conn, dev string) (bool, error) {
	return tablePresent(c, nftables.TableFamilyNetdev, HoldPrefix+dev)
}

// RenderHold returns dev's hold table as nft syntax.
func RenderHold(dev string) string {
	t, ch := holdTable(dev)
	return fmt.Sprintf("table netdev %s {\n\tchain %s {\n\t\ttype filter hook egress device %q priority %d; policy drop;\n\t}\n}\n",
		t.Name, ch.Name, dev, *ch.Priority)
}
