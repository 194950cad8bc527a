package ovsdb

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/ovn-org/libovsdb/model"
	libovsdb "github.com/ovn-org/libovsdb/ovsdb"
)

// maxIfName is IFNAMSIZ-1: a system interface is a kernel link.
const maxIfName = 15

// Named UUIDs of the rows AddPort inserts, valid inside its transaction.
const (
	newIface = "vmnic_new_iface"
	newPort  = "vmnic_new_port"
)

// PortSpec describes a port to add: one system interface (an existing veth,
// Interface.type "") of the same name, in its own Port.
type PortSpec struct {
	Bridge string
	Name   string
	// Tag makes the port an access port of that VLAN (0-4095).
	Tag *int
	// Trunks lists the VLANs a trunk port carries; empty with a nil Tag
	// means all VLANs. With Tag too, OVS's default vlan_mode applies
	// (native-untagged).
	Trunks []int
	// MTU, when not 0, goes to Interface.mtu_request: ovs-vswitchd sets the
	// link's MTU to it.
	MTU int
	// ExternalIDs go to both the Port and the Interface. They must carry
	// the caller's owner mark (e.g. "vmnic.io/owner": "vmnic"): DeletePort
	// deletes only ports that have it.
	ExternalIDs map[string]string
}

func (s PortSpec) validate() error {
	var errs []error
	if s.Bridge == "" {
		errs = append(errs, errors.New("bridge name empty"))
	}
	if s.Name == "" || len(s.Name) > maxIfName {
		errs = append(errs, fmt.Errorf("port name %q must be 1-%d bytes", s.Name, maxIfName))
	}
	if s.Tag != nil && !validVLAN(*s.Tag) {
		errs = append(errs, fmt.Errorf("tag %d out of range 0-4095", *s.Tag))
	}
	seen := map[int]bool{}
	for _, v := range s.Trunks {
		if !validVLAN(v) {
			errs = append(errs, fmt.Errorf("trunk %d out of range 0-4095", v))
		}
		if seen[v] {
			errs = append(errs, fmt.Errorf("trunk %d listed twice", v))
		}
		seen[v] = true
	}
	if s.MTU < 0 || s.MTU > 65535 {
		errs = append(errs, fmt.Errorf("mtu %d out of range 0-65535", s.MTU))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalidSpec, err)
	}
	if len(s.ExternalIDs) == 0 {
		return ErrNoOwner
	}
	return nil
}

func validVLAN(v int) bool { return v >= 0 && v <= 4095 }

// AddPort adds spec's interface to its bridge in one transaction (insert
// Interface and Port, insert the Port into Bridge.ports, bump next_cfg) and
// waits until ovs-vswitchd has applied it or ctx ends. The transaction
// itself checks that the bridge exists and that no port or interface has the
// name, so a concurrent writer cannot slip in between.
//
// When ctx ends during the wait, the port is in the database and the error
// says so; ovs-vswitchd will still apply it when it gets to it.
func (c *Client) AddPort(ctx context.Context, spec PortSpec) error {
	start := time.Now()
	fail := func(err error) error {
		return fmt.Errorf("add port %q to bridge %q: %w", spec.Name, spec.Bridge, err)
	}
	if err := spec.validate(); err != nil {
		return fail(err)
	}
	root, err := c.root(ctx)
	if err != nil {
		return fail(err)
	}

	iface := &Interface{UUID: newIface, Name: spec.Name, ExternalIDs: maps.Clone(spec.ExternalIDs)}
	if spec.MTU > 0 {
		iface.MTURequest = &spec.MTU
	}
	port := &Port{
		UUID:        newPort,
		Name:        spec.Name,
		Interfaces:  []string{newIface},
		Tag:         spec.Tag,
		Trunks:      slices.Clone(spec.Trunks),
		ExternalIDs: maps.Clone(spec.ExternalIDs),
	}
	inserts, err := c.db.Create(iface, port)
	if err != nil {
		return fail(fmt.Errorf("build insert: %w", err))
	}

	var t txn
	t.guard(waitRow(BridgeTable, byName(spec.Bridge), libovsdb.WaitConditionEqual, spec.Bridge),
		fmt.Errorf("%w: %q", ErrBridgeNotFound, spec.Bridge))
	t.guard(waitRow(PortTable, byName(spec.Name), libovsdb.WaitConditionNotEqual, spec.Name),
		fmt.Errorf("%w: port %q", ErrPortExists, spec.Name))
	t.guard(waitRow(InterfaceTable, byName(spec.Name), libovsdb.WaitConditionNotEqual, spec.Name),
		fmt.Errorf("%w: interface %q", ErrPortExists, spec.Name))
	t.add(inserts...)
	mutateBridge := t.add(libovsdb.Operation{
		Op:        libovsdb.OperationMutate,
		Table:     BridgeTable,
		Where:     byName(spec.Bridge),
		Mutations: []libovsdb.Mutation{*libovsdb.NewMutation("ports", libovsdb.MutateOperationInsert, uuidSet(newPort))},
	})
	cfgSelect := t.bumpCfg(root.UUID)

	results, err := c.transact(ctx, &t)
	if err != nil {
		return fail(err)
	}
	if n := results[mutateBridge].Count; n != 1 {
		// Cannot happen after the guard; if it did, the unreferenced Port
		// and Interface were garbage-collected by ovsdb-server.
		return fail(fmt.Errorf("bridge %q: mutated %d rows, want 1", spec.Bridge, n))
	}
	cfg, err := c.nextCfg(results[cfgSelect])
	if err != nil {
		return fail(err)
	}
	committed := time.Since(start)
	if err := c.waitApplied(ctx, cfg); err != nil {
		return fail(fmt.Errorf("port is in the database but not applied yet: %w", err))
	}
	c.log.Debug("added port", "bridge", spec.Bridge, "port", spec.Name,
		"committed", committed, "applied", time.Since(start))
	return nil
}

// DeletePort removes port name from bridge (Bridge.ports delete, Port and
// Interface rows deleted, next_cfg bumped) if its external_ids contain every
// key/value of owner, and waits until ovs-vswitchd has applied it. A port
// that does not exist is success; a port without the owner mark, or on
// another bridge, is an error and stays. The lookup reads the server, not
// the cache, so "not found" is never a stale answer.
func (c *Client) DeletePort(ctx context.Context, bridge, name string, owner map[string]string) error {
	start := time.Now()
	fail := func(err error) error {
		return fmt.Errorf("delete port %q from bridge %q: %w", name, bridge, err)
	}
	if len(owner) == 0 {
		return fail(ErrNoOwner)
	}
	root, err := c.root(ctx)
	if err != nil {
		return fail(err)
	}

	// The ports guard below makes the delete atomic with this lookup; if
	// another writer changed the port in between, look again.
	for attempt := 0; ; attempt++ {
		port, br, err := c.lookupPort(ctx, bridge, name)
		if err != nil {
			return fail(err)
		}
		if port == nil {
			c.log.Debug("port already gone", "bridge", bridge, "port", name)
			return nil
		}
		if !includes(port.ExternalIDs, owner) {
			return fail(fmt.Errorf("%w: external_ids %v lack %v", ErrNotOwner, port.ExternalIDs, owner))
		}
		if br == nil || !slices.Contains(br.Ports, port.UUID) {
			return fail(fmt.Errorf("%w: %s", ErrWrongBridge, c.bridgeOf(ctx, port.UUID)))
		}

		ownerMap, err := libovsdb.NewOvsMap(owner)
		if err != nil {
			return fail(err)
		}
		var t txn
		raced := errors.New("port changed during delete")
		t.guard(libovsdb.Operation{
			Op:    libovsdb.OperationWait,
			Table: PortTable,
			Where: []libovsdb.Condition{
				uuidIs(port.UUID),
				libovsdb.NewCondition("external_ids", libovsdb.ConditionIncludes, ownerMap),
			},
			Columns: []string{"name"},
			Until:   string(libovsdb.WaitConditionEqual),
			Rows:    []libovsdb.Row{{"name": name}},
			Timeout: new(int),
		}, raced)
		t.add(libovsdb.Operation{
			Op:        libovsdb.OperationMutate,
			Table:     BridgeTable,
			Where:     []libovsdb.Condition{uuidIs(br.UUID)},
			Mutations: []libovsdb.Mutation{*libovsdb.NewMutation("ports", libovsdb.MutateOperationDelete, uuidSet(port.UUID))},
		})
		t.add(libovsdb.Operation{Op: libovsdb.OperationDelete, Table: PortTable, Where: []libovsdb.Condition{uuidIs(port.UUID)}})
		for _, i := range port.Interfaces {
			t.add(libovsdb.Operation{Op: libovsdb.OperationDelete, Table: InterfaceTable, Where: []libovsdb.Condition{uuidIs(i)}})
		}
		cfgSelect := t.bumpCfg(root.UUID)

		results, err := c.transact(ctx, &t)
		if errors.Is(err, raced) && attempt < 3 {
			continue
		}
		if err != nil {
			return fail(err)
		}
		cfg, err := c.nextCfg(results[cfgSelect])
		if err != nil {
			return fail(err)
		}
		if err := c.waitApplied(ctx, cfg); err != nil {
			return fail(fmt.Errorf("port is gone from the database but removal not applied yet: %w", err))
		}
		c.log.Debug("deleted port", "bridge", bridge, "port", name, "took", time.Since(start))
		return nil
	}
}

// lookupPort reads port name and bridge from the server in one read-only
// transaction. A nil result means the row does not exist.
func (c *Client) lookupPort(ctx context.Context, bridge, name string) (*Port, *Bridge, error) {
	var t txn
	portSel := t.add(libovsdb.Operation{
		Op: libovsdb.OperationSelect, Table: PortTable, Where: byName(name),
		Columns: []string{"_uuid", "name", "interfaces", "external_ids"},
	})
	brSel := t.add(libovsdb.Operation{
		Op: libovsdb.OperationSelect, Table: BridgeTable, Where: byName(bridge),
		Columns: []string{"_uuid", "name", "ports"},
	})
	results, err := c.transact(ctx, &t)
	if err != nil {
		return nil, nil, fmt.Errorf("look up port: %w", err)
	}
	var port *Port
	var br *Bridge
	if rows := results[portSel].Rows; len(rows) > 0 {
		port = &Port{}
		if err := c.decode(PortTable, rows[0], port); err != nil {
			return nil, nil, err
		}
	}
	if rows := results[brSel].Rows; len(rows) > 0 {
		br = &Bridge{}
		if err := c.decode(BridgeTable, rows[0], br); err != nil {
			return nil, nil, err
		}
	}
	return port, br, nil
}

// bridgeOf names the bridge holding port uuid, from the cache, for messages.
func (c *Client) bridgeOf(ctx context.Context, uuid string) string {
	bridges, err := c.Bridges(ctx)
	if err != nil {
		return "its bridge is unknown"
	}
	for _, b := range bridges {
		if slices.Contains(b.Ports, uuid) {
			return fmt.Sprintf("it is on bridge %q", b.Name)
		}
	}
	return "no bridge holds it"
}

// PortInfo is a port as the cache sees it, with its bridge and interface.
type PortInfo struct {
	Bridge      string // "" while no bridge in the cache references it
	Name        string
	UUID        string
	Tag         *int
	Trunks      []int
	VLANMode    string
	ExternalIDs map[string]string
	Interface   InterfaceInfo
}

// InterfaceInfo is the port's interface (the one named like the port).
type InterfaceInfo struct {
	Name       string
	Type       string // "" is a system interface (a kernel link)
	MTURequest int    // 0: none requested
	MTU        int    // 0: not reported (yet) by ovs-vswitchd
	Ofport     int    // 0: not assigned yet; -1: ovs-vswitchd failed to add it
	Error      string // why ovs-vswitchd failed, e.g. the link does not exist
	AdminState string
	LinkState  string
}

// Ports returns the ports whose external_ids contain every key/value of
// match (all ports for an empty match), from the cache, sorted by bridge and
// name.
func (c *Client) Ports(ctx context.Context, match map[string]string) ([]PortInfo, error) {
	ports, err := list[Port](ctx, c, "ports")
	if err != nil {
		return nil, err
	}
	bridges, err := list[Bridge](ctx, c, "bridges")
	if err != nil {
		return nil, err
	}
	ifaces, err := list[Interface](ctx, c, "interfaces")
	if err != nil {
		return nil, err
	}
	bridgeOf := map[string]string{}
	for _, b := range bridges {
		for _, p := range b.Ports {
			bridgeOf[p] = b.Name
		}
	}
	ifaceByUUID := make(map[string]Interface, len(ifaces))
	for _, i := range ifaces {
		ifaceByUUID[i.UUID] = i
	}
	var out []PortInfo
	for _, p := range ports {
		if !includes(p.ExternalIDs, match) {
			continue
		}
		pi := PortInfo{
			Bridge:      bridgeOf[p.UUID],
			Name:        p.Name,
			UUID:        p.UUID,
			Tag:         p.Tag,
			Trunks:      slices.Sorted(slices.Values(p.Trunks)),
			VLANMode:    deref(p.VLANMode),
			ExternalIDs: p.ExternalIDs,
		}
		var i *Interface
		for _, u := range p.Interfaces {
			if cand, ok := ifaceByUUID[u]; ok && (i == nil || cand.Name == p.Name) {
				i = &cand
			}
		}
		if i != nil {
			pi.Interface = InterfaceInfo{
				Name:       i.Name,
				Type:       i.Type,
				MTURequest: deref(i.MTURequest),
				MTU:        deref(i.MTU),
				Ofport:     deref(i.Ofport),
				Error:      deref(i.Error),
				AdminState: deref(i.AdminState),
				LinkState:  deref(i.LinkState),
			}
		}
		out = append(out, pi)
	}
	slices.SortFunc(out, func(a, b PortInfo) int {
		if c := strings.Compare(a.Bridge, b.Bridge); c != 0 {
			return c
		}
		return strings.Compare(a.Name, b.Name)
	})
	return out, nil
}

// txn collects operations; a guard is a wait operation whose failure means
// the error registered with it instead of a raw "timed out".
type txn struct {
	ops    []libovsdb.Operation
	guards map[int]error
}

// add appends ops and returns the index of the first.
func (t *txn) add(ops ...libovsdb.Operation) int {
	t.ops = append(t.ops, ops...)
	return len(t.ops) - len(ops)
}

func (t *txn) guard(op libovsdb.Operation, err error) {
	if t.guards == nil {
		t.guards = map[int]error{}
	}
	t.guards[t.add(op)] = err
}

// bumpCfg adds next_cfg += 1 and a select of the new value, and returns the
// index of the select: the number ovs-vswitchd will copy to cur_cfg once it
// has applied this transaction.
func (t *txn) bumpCfg(rootUUID string) int {
	t.add(libovsdb.Operation{
		Op:        libovsdb.OperationMutate,
		Table:     OpenvSwitchTable,
		Where:     []libovsdb.Condition{uuidIs(rootUUID)},
		Mutations: []libovsdb.Mutation{*libovsdb.NewMutation("next_cfg", libovsdb.MutateOperationAdd, 1)},
	})
	return t.add(libovsdb.Operation{
		Op:      libovsdb.OperationSelect,
		Table:   OpenvSwitchTable,
		Where:   []libovsdb.Condition{uuidIs(rootUUID)},
		Columns: []string{"next_cfg"},
	})
}

// transact runs t and turns the first failed operation into an error.
func (c *Client) transact(ctx context.Context, t *txn) ([]libovsdb.OperationResult, error) {
	start := time.Now()
	results, err := c.db.Transact(ctx, t.ops...)
	if c.traceTxn != nil {
		c.traceTxn(t.ops, time.Since(start))
	}
	if err != nil {
		return nil, fmt.Errorf("ovsdb transaction: %w", err)
	}
	for i, r := range results {
		if r.Error == "" {
			continue
		}
		if g, ok := t.guards[i]; ok && r.Error == "timed out" {
			return nil, g
		}
		op := "commit"
		if i < len(t.ops) {
			op = t.ops[i].Op + " " + t.ops[i].Table
		}
		return nil, fmt.Errorf("ovsdb %s: %s: %s", op, r.Error, r.Details)
	}
	if len(results) < len(t.ops) {
		return nil, fmt.Errorf("ovsdb transaction: %d results for %d operations", len(results), len(t.ops))
	}
	return results, nil
}

// nextCfg reads next_cfg from the result of bumpCfg's select.
func (c *Client) nextCfg(r libovsdb.OperationResult) (int, error) {
	if len(r.Rows) != 1 {
		return 0, fmt.Errorf("select next_cfg: %d rows, want 1", len(r.Rows))
	}
	var root OpenvSwitch
	if err := c.decode(OpenvSwitchTable, r.Rows[0], &root); err != nil {
		return 0, err
	}
	return root.NextCfg, nil
}

// decode maps a selected row into a model with libovsdb's mapper.
func (c *Client) decode(table string, row libovsdb.Row, into model.Model) error {
	dbModel := c.db.Cache().DatabaseModel()
	info, err := dbModel.NewModelInfo(into)
	if err != nil {
		return fmt.Errorf("decode %s row: %w", table, err)
	}
	if err := dbModel.Mapper.GetRowData(&row, info); err != nil {
		return fmt.Errorf("decode %s row: %w", table, err)
	}
	// The mapper skips _uuid (it is not among the schema's columns).
	if u, ok := row["_uuid"].(libovsdb.UUID); ok {
		if err := info.SetField("_uuid", u.GoUUID); err != nil {
			return fmt.Errorf("decode %s row: %w", table, err)
		}
	}
	return nil
}

// waitRow is a guard that holds when the row named name exists (until "==")
// or does not (until "!="). Timeout 0: fail at once instead of waiting.
// ("==" against no rows cannot be said: libovsdb drops an empty "rows".)
func waitRow(table string, where []libovsdb.Condition, until libovsdb.WaitCondition, name string) libovsdb.Operation {
	return libovsdb.Operation{
		Op:      libovsdb.OperationWait,
		Table:   table,
		Where:   where,
		Columns: []string{"name"},
		Until:   string(until),
		Rows:    []libovsdb.Row{{"name": name}},
		Timeout: new(int),
	}
}

// byName matches on the name column. Conditions are written out instead of
// using libovsdb's Where(model): that one silently turns them into _uuid
// conditions when the cache holds a match, and a stale cache then makes a
// mutation match nothing.
func byName(name string) []libovsdb.Condition {
	return []libovsdb.Condition{libovsdb.NewCondition("name", libovsdb.ConditionEqual, name)}
}

func uuidIs(u string) libovsdb.Condition {
	return libovsdb.NewCondition("_uuid", libovsdb.ConditionEqual, libovsdb.UUID{GoUUID: u})
}

func uuidSet(uuids ...string) libovsdb.OvsSet {
	s := libovsdb.OvsSet{}
	for _, u := range uuids {
		s.GoSet = append(s.GoSet, libovsdb.UUID{GoUUID: u})
	}
	return s
}

// includes reports whether have contains every key/value of want.
func includes(have, want map[string]string) bool {
	for k, v := range want {
		if hv, ok := have[k]; !ok || hv != v {
			return false
		}
	}
	return true
}

func deref[T any](p *T) T {
	var zero T
	if p == nil {
		return zero
	}
	return *p
}
