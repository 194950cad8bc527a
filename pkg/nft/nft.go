// Package nft programs the NAT ruleset of vmnic's masquerade mode into a pod
// network namespace, over netlink (github.com/google/nftables), without
// entering the namespace and without the nft binary.
//
// The ruleset mirrors KubeVirt's masquerade binding. For each IP family the
// pod has, vmnic owns one table:
//
//	table ip vmnic   (IPv4)
//	table ip6 vmnic  (IPv6)
//
// The table name "vmnic" (TableName) in the families ip and ip6 is the owner
// mark: vmnic creates, replaces, checks and deletes only those two tables and
// never reads or writes any other table of the namespace (the primary CNI or a
// service mesh may keep their own nat tables there).
//
// Each table has these chains (names are stable, see the Chain* constants):
//
//	prerouting   nat hook prerouting  priority dstnat (-100)
//	             iifname <PodIf> jump inbound
//	inbound      [<proto> dport <excluded> return ...]
//	             dnat to <guest>                     (all ports), or
//	             <proto> dport <p> dnat to <guest>   (one rule per listed port)
//	output       nat hook output      priority -100
//	             [<proto> dport <excluded> return ...]
//	             ip daddr 127.0.0.1 dnat to <guest>  (per listed port if a list is given)
//	postrouting  nat hook postrouting priority srcnat (100)
//	             ip saddr <guest> masquerade
//	             oifname <Bridge> jump inbound-post
//	inbound-post ip saddr 127.0.0.1 snat to <gateway> (per listed port if a list is given)
//
// IPv6 uses ::1 and the IPv6 guest and gateway addresses.
//
// Apply writes the whole desired state of both families in one nf_tables
// netlink batch (delete own table + re-add everything), which the kernel
// commits atomically; re-applying replaces. Check reads the live tables back
// and compares them to the desired rules by a normalized, nft-like
// description of the expressions (never by handles). Delete removes only the
// vmnic tables and succeeds when they, or the namespace, are already gone.
//
// The caller is responsible for the sysctls the ruleset relies on:
// net.ipv4.ip_forward (and net.ipv6.conf.all.forwarding) in the pod, and
// net.ipv4.conf.<Bridge>.route_localnet=1 for the 127.0.0.1 -> guest case.
// The IPv6 ::1 rules mirror KubeVirt but do not make [::1]:port reach the
// guest: Linux has no route_localnet for IPv6 and drops ::1-sourced packets
// leaving the loopback device.
package nft

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"strings"

	"github.com/google/nftables"
	"golang.org/x/sys/unix"
)

// TableName is the name of the tables vmnic owns (in the families ip and ip6).
// It is the ownership mark: vmnic never touches a table of another name.
const TableName = "vmnic"

// Chain names inside the vmnic tables.
const (
	ChainPrerouting  = "prerouting"
	ChainOutput      = "output"
	ChainPostrouting = "postrouting"
	ChainInbound     = "inbound"
	ChainInboundPost = "inbound-post"
)

// Port is a transport port (or port range) of the guest.
type Port struct {
	// Protocol is "tcp", "udp" or "sctp" (case-insensitive; "" means tcp).
	Protocol string
	// Port is the (first) port; must not be 0.
	Port uint16
	// EndPort is the last port of a range; 0 (or == Port) means a single port.
	EndPort uint16
}

// String returns the port in nft syntax, e.g. "tcp dport 80" or
// "udp dport 1000-2000".
func (p Port) String() string {
	proto := strings.ToLower(p.Protocol)
	if proto == "" {
		proto = "tcp"
	}
	if p.EndPort != 0 && p.EndPort != p.Port {
		return fmt.Sprintf("%s dport %d-%d", proto, p.Port, p.EndPort)
	}
	return fmt.Sprintf("%s dport %d", proto, p.Port)
}

// Family holds the addresses of one IP family of the masquerade network.
type Family struct {
	// Guest is the VM's address (10.0.2.2 / fd10:0:2::2).
	Guest net.IP
	// Gateway is the bridge's address (10.0.2.1 / fd10:0:2::1).
	Gateway net.IP
}

// Masquerade is the desired NAT configuration of one pod interface.
type Masquerade struct {
	// PodIf is the pod's interface towards the cluster network, e.g. "eth0".
	PodIf string
	// Bridge is the bridge the guest's tap hangs on, e.g. "k6t-eth0".
	Bridge string
	// V4 and V6 are the families the pod has; at least one must be set. A
	// family left nil gets no table (and Apply removes a stale one).
	V4, V6 *Family
	// Ports lists the forwarded ports; empty means all ports (and all
	// protocols) are forwarded to the guest.
	Ports []Port
	// ExcludePorts are never DNATed to the guest (neither from outside nor
	// from the pod's localhost); they become "return" rules at the top of the
	// inbound and output chains, whatever Ports says. Used for the ports of a
	// service mesh sidecar (e.g. Istio's 15000-15090).
	ExcludePorts []Port
}

// DriftError is returned by Check when the live ruleset differs from the
// desired one. Each problem names the table, chain and rule concerned.
type DriftError struct {
	Problems []string
}

func (e *DriftError) Error() string {
	return "nft ruleset differs from desired state: " + strings.Join(e.Problems, "; ")
}

// Apply programs the masquerade ruleset into the network namespace at
// netnsPath (a bind mount or /proc/<pid>/ns/net), replacing whatever vmnic
// tables exist there, in one atomic netlink transaction. Tables of other
// owners are left alone.
func Apply(netnsPath string, m Masquerade) error {
	want, err := build(m)
	if err != nil {
		return err
	}
	if err := withConn(netnsPath, func(c *nftables.Conn) error {
		live, err := ownTables(c)
		if err != nil {
			return err
		}
		for _, fam := range families {
			t := &nftables.Table{Name: TableName, Family: fam.tf}
			td := want[fam.tf]
			if td == nil && live[fam.tf] == nil {
				continue
			}
			// Add (no-op if present) then delete: the delete can never fail
			// on a missing table, and the batch starts from a clean slate.
			c.AddTable(t)
			c.DelTable(t)
			if td == nil {
				continue
			}
			c.AddTable(t)
			chains := make(map[string]*nftables.Chain, len(td.chains))
			// All chains first: jump targets must exist before the rules
			// that reference them.
			for _, cd := range td.chains {
				chains[cd.name] = c.AddChain(cd.nftChain(t))
			}
			for _, cd := range td.chains {
				for _, r := range cd.rules {
					c.AddRule(&nftables.Rule{Table: t, Chain: chains[cd.name], Exprs: r})
				}
			}
		}
		if err := c.Flush(); err != nil {
			return fmt.Errorf("commit nftables batch: %w", err)
		}
		return nil
	}); err != nil {
		return fmt.Errorf("nft apply in %s: %w", netnsPath, err)
	}
	return nil
}

// Delete removes vmnic's tables (ip vmnic, ip6 vmnic) from the namespace at
// netnsPath. It succeeds if the tables are already gone, and if the
// namespace itself is gone (path missing or no longer a namespace).
func Delete(netnsPath string) error {
	err := withConn(netnsPath, func(c *nftables.Conn) error {
		live, err := ownTables(c)
		if err != nil {
			return err
		}
		n := 0
		for _, fam := range families {
			if live[fam.tf] == nil {
				continue
			}
			t := &nftables.Table{Name: TableName, Family: fam.tf}
			// Add before delete so that a concurrent removal cannot make
			// the batch fail with ENOENT.
			c.AddTable(t)
			c.DelTable(t)
			n++
		}
		if n == 0 {
			return nil
		}
		if err := c.Flush(); err != nil {
			return fmt.Errorf("commit nftables batch: %w", err)
		}
		return nil
	})
	if errors.Is(err, errNetNSGone) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("nft delete in %s: %w", netnsPath, err)
	}
	return nil
}

// Check reads vmnic's tables back from the namespace at netnsPath and
// compares them to the ruleset Apply would program for m. It returns nil if
// they match, a *DriftError naming every missing, different or unexpected
// table, chain and rule otherwise, or another error if the namespace cannot
// be read.
func Check(netnsPath string, m Masquerade) error {
	want, err := build(m)
	if err != nil {
		return err
	}
	var problems []string
	if err := withConn(netnsPath, func(c *nftables.Conn) error {
		live, err := ownTables(c)
		if err != nil {
			return err
		}
		var chains []*nftables.Chain
		if len(live) > 0 {
			chains, err = c.ListChains()
			if err != nil {
				return fmt.Errorf("list chains: %w", err)
			}
		}
		for _, fam := range families {
			p, err := checkTable(c, fam, want[fam.tf], live[fam.tf], chains)
			if err != nil {
				return err
			}
			problems = append(problems, p...)
		}
		return nil
	}); err != nil {
		return fmt.Errorf("nft check in %s: %w", netnsPath, err)
	}
	if len(problems) > 0 {
		return &DriftError{Problems: problems}
	}
	return nil
}

// Render returns the desired ruleset for m as nft syntax (the same text
// `nft list table` prints for it), deterministic, for golden files and logs.
// An invalid m renders as a comment line naming the error.
func Render(m Masquerade) string {
	want, err := build(m)
	if err != nil {
		return "# invalid masquerade config: " + err.Error() + "\n"
	}
	var b strings.Builder
	first := true
	for _, fam := range families {
		td := want[fam.tf]
		if td == nil {
			continue
		}
		if !first {
			b.WriteString("\n")
		}
		first = false
		td.render(&b)
	}
	return b.String()
}

var errNetNSGone = errors.New("network namespace is gone")

// withConn opens the namespace at path and runs fn with an nftables
// connection bound to it. The namespace is never entered by this process'
// threads other than the one netlink uses to create its socket.
func withConn(path string, fn func(c *nftables.Conn) error) error {
	f, err := os.Open(path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("%w: %w", errNetNSGone, err)
		}
		return err
	}
	defer func() { _ = f.Close() }()
	var st unix.Statfs_t
	if err = unix.Fstatfs(int(f.Fd()), &st); err != nil {
		return fmt.Errorf("statfs %s: %w", path, err)
	}
	// A netns bind mount or /proc/<pid>/ns/net resolves to an nsfs inode; an
	// unmounted bind mount point is an ordinary (empty) file.
	if st.Type != unix.NSFS_MAGIC {
		return fmt.Errorf("%w: %s is not a network namespace", errNetNSGone, path)
	}
	c, err := nftables.New(nftables.WithNetNSFd(int(f.Fd())), nftables.AsLasting())
	if err != nil {
		return fmt.Errorf("netlink to netns %s: %w", path, err)
	}
	defer func() { _ = c.CloseLasting() }()
	return fn(c)
}

// ownTables lists the namespace's tables and returns vmnic's, by family.
func ownTables(c *nftables.Conn) (map[nftables.TableFamily]*nftables.Table, error) {
	ts, err := c.ListTables()
	if err != nil {
		return nil, fmt.Errorf("list tables: %w", err)
	}
	own := map[nftables.TableFamily]*nftables.Table{}
	for _, t := range ts {
		if t.Name != TableName {
			continue
		}
		if t.Family == nftables.TableFamilyIPv4 || t.Family == nftables.TableFamilyIPv6 {
			own[t.Family] = t
		}
	}
	return own, nil
}
