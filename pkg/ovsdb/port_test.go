package ovsdb

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	libovsdb "github.com/ovn-org/libovsdb/ovsdb"

	"github.com/vmnic/vmnic/test/need"
)

func TestStatusAndBridges(t *testing.T) {
	e := newEnv(t)
	ctx := ctxT(t, 10*time.Second)
	s, err := e.c.Status(ctx)
	if err != nil {
		t.Fatalf("status: %v", err)
	}
	t.Logf("status: %+v", s)
	if !s.Connected || s.OVSVersion == "" || !s.Applied {
		t.Errorf("status = %+v, want connected, a version, applied", s)
	}
	if !slices.Contains(s.DatapathTypes, "netdev") {
		t.Errorf("datapath types %v lack netdev", s.DatapathTypes)
	}
	if !slices.Contains(s.IfaceTypes, "system") {
		t.Errorf("interface types %v lack system", s.IfaceTypes)
	}
	want := []BridgeStatus{{Name: "br1", DatapathType: "netdev", Ports: 1}} // its internal port
	if !slices.Equal(s.Bridges, want) {
		t.Errorf("bridges = %+v, want %+v", s.Bridges, want)
	}
	bridges, err := e.c.Bridges(ctx)
	if err != nil || len(bridges) != 1 || bridges[0].Name != "br1" || bridges[0].DatapathType != "netdev" {
		t.Errorf("Bridges() = %+v, %v", bridges, err)
	}
}

func TestAddPortAccessTag(t *testing.T) {
	e := newEnv(t)
	e.veth(t, "acc0", nil)
	ctx := ctxT(t, 20*time.Second)
	ids := ownerPlus("vmnic.io/pod", "ns/pod-a")
	if err := e.c.AddPort(ctx, PortSpec{Bridge: "br1", Name: "acc0", Tag: intp(100), ExternalIDs: ids}); err != nil {
		t.Fatalf("add port: %v", err)
	}
	// Applied means ovs-vswitchd has been through it: the veth has an
	// OpenFlow port number and no error.
	p := e.port(t, "acc0")
	if p.Bridge != "br1" || p.Tag == nil || *p.Tag != 100 || len(p.Trunks) != 0 {
		t.Errorf("port = %+v, want on br1 with tag 100 and no trunks", p)
	}
	if p.Interface.Name != "acc0" || p.Interface.Type != "" || p.Interface.Ofport <= 0 || p.Interface.Error != "" {
		t.Errorf("interface = %+v, want system acc0 with an ofport and no error", p.Interface)
	}
	if p.ExternalIDs["vmnic.io/pod"] != "ns/pod-a" {
		t.Errorf("external_ids = %v", p.ExternalIDs)
	}
	// What the switch itself says.
	if got := vsctl(t, e.ovs, "get", "Port", "acc0", "tag"); got != "100" {
		t.Errorf("ovs-vsctl get port tag = %q", got)
	}
	if got := vsctl(t, e.ovs, "list-ports", "br1"); got != "acc0" {
		t.Errorf("ovs-vsctl list-ports br1 = %q", got)
	}
	if got := vsctl(t, e.ovs, "get", "Interface", "acc0", "external_ids:vmnic.io/owner"); got != `vmnic` {
		t.Errorf("interface owner mark = %q", got)
	}
	if got, err := e.ovs.Appctl("dpif/show"); err != nil || !strings.Contains(got, "acc0") {
		t.Errorf("dpif/show lacks acc0: %q %v", got, err)
	}
	// Matching by external_ids.
	if ps, err := e.c.Ports(ctx, map[string]string{"vmnic.io/pod": "ns/pod-a"}); err != nil || len(ps) != 1 {
		t.Errorf("Ports(pod-a) = %+v, %v", ps, err)
	}
	if ps, err := e.c.Ports(ctx, map[string]string{"vmnic.io/pod": "other"}); err != nil || len(ps) != 0 {
		t.Errorf("Ports(other) = %+v, %v", ps, err)
	}
}

func TestAddPortTrunks(t *testing.T) {
	e := newEnv(t)
	e.veth(t, "trk0", nil)
	ctx := ctxT(t, 20*time.Second)
	if err := e.c.AddPort(ctx, PortSpec{Bridge: "br1", Name: "trk0", Trunks: []int{30, 10, 20}, ExternalIDs: owner}); err != nil {
		t.Fatalf("add port: %v", err)
	}
	p := e.port(t, "trk0")
	if p.Tag != nil || !slices.Equal(p.Trunks, []int{10, 20, 30}) {
		t.Errorf("port = %+v, want trunks 10,20,30 and no tag", p)
	}
	if got := vsctl(t, e.ovs, "get", "Port", "trk0", "trunks"); got != "[10, 20, 30]" {
		t.Errorf("ovs-vsctl get port trunks = %q", got)
	}
}

func TestAddPortMTU(t *testing.T) {
	e := newEnv(t)
	e.veth(t, "mtu0", nil)
	if m := linkMTU(t, e.ns, "mtu0"); m != 1500 {
		t.Fatalf("veth starts with mtu %d, want 1500", m)
	}
	ctx := ctxT(t, 20*time.Second)
	if err := e.c.AddPort(ctx, PortSpec{Bridge: "br1", Name: "mtu0", MTU: 1400, ExternalIDs: owner}); err != nil {
		t.Fatalf("add port: %v", err)
	}
	if got := vsctl(t, e.ovs, "get", "Interface", "mtu0", "mtu_request"); got != "1400" {
		t.Errorf("mtu_request = %q, want 1400", got)
	}
	// Interface.mtu is ephemeral status ovs-vswitchd writes on its own
	// schedule, possibly after cur_cfg: poll.
	eventually(t, 10*time.Second, "Interface.mtu reaches 1400", func() (bool, string) {
		p := e.port(t, "mtu0")
		return p.Interface.MTU == 1400, fmt.Sprintf("%+v", p.Interface)
	})
	if p := e.port(t, "mtu0"); p.Interface.MTURequest != 1400 {
		t.Errorf("cached mtu_request = %d", p.Interface.MTURequest)
	}
	if m := linkMTU(t, e.ns, "mtu0"); m != 1400 {
		t.Errorf("kernel link mtu = %d, want 1400 (set by ovs-vswitchd)", m)
	}
}

func TestAddPortFailsCleanly(t *testing.T) {
	e := newEnv(t)
	ctx := ctxT(t, 20*time.Second)
	cfgBefore := vsctl(t, e.ovs, "get", "Open_vSwitch", ".", "next_cfg")

	err := e.c.AddPort(ctx, PortSpec{Bridge: "nobr", Name: "x0", ExternalIDs: owner})
	if !errors.Is(err, ErrBridgeNotFound) || !strings.Contains(err.Error(), `"nobr"`) {
		t.Errorf("missing bridge: err = %v, want ErrBridgeNotFound naming nobr", err)
	}
	if got := vsctl(t, e.ovs, "--columns=name", "find", "Interface", "name=x0"); got != "" {
		t.Errorf("interface x0 left behind: %q", got)
	}
	if cfg := vsctl(t, e.ovs, "get", "Open_vSwitch", ".", "next_cfg"); cfg != cfgBefore {
		t.Errorf("failed transaction bumped next_cfg %s -> %s", cfgBefore, cfg)
	}

	// A port of that name, made by someone else.
	vsctl(t, e.ovs, "add-port", "br1", "taken0")
	err = e.c.AddPort(ctx, PortSpec{Bridge: "br1", Name: "taken0", ExternalIDs: owner})
	if !errors.Is(err, ErrPortExists) || !strings.Contains(err.Error(), `"taken0"`) {
		t.Errorf("existing port: err = %v, want ErrPortExists naming taken0", err)
	}
	if got := vsctl(t, e.ovs, "get", "Port", "taken0", "external_ids"); got != "{}" {
		t.Errorf("existing port was changed: external_ids %s", got)
	}
	// Our own port, added twice.
	if err := e.c.AddPort(ctx, PortSpec{Bridge: "br1", Name: "twice0", ExternalIDs: owner}); err != nil {
		t.Fatalf("add port: %v", err)
	}
	if err := e.c.AddPort(ctx, PortSpec{Bridge: "br1", Name: "twice0", ExternalIDs: owner}); !errors.Is(err, ErrPortExists) {
		t.Errorf("second add: err = %v, want ErrPortExists", err)
	}

	if err := e.c.AddPort(ctx, PortSpec{Bridge: "br1", Name: "noown0"}); !errors.Is(err, ErrNoOwner) {
		t.Errorf("no owner mark: err = %v, want ErrNoOwner", err)
	}
	if err := e.c.AddPort(ctx, PortSpec{Bridge: "br1", Name: "bad0", Tag: intp(5000), ExternalIDs: owner}); !errors.Is(err, ErrInvalidSpec) {
		t.Errorf("tag 5000: err = %v, want ErrInvalidSpec", err)
	}
}

func TestAddPortMissingLinkReportsError(t *testing.T) {
	e := newEnv(t)
	ctx := ctxT(t, 20*time.Second)
	// No veth of that name: the database takes it, ovs-vswitchd reports.
	if err := e.c.AddPort(ctx, PortSpec{Bridge: "br1", Name: "ghost0", ExternalIDs: owner}); err != nil {
		t.Fatalf("add port: %v", err)
	}
	eventually(t, 10*time.Second, "ghost0 reports an error", func() (bool, string) {
		p := e.port(t, "ghost0")
		return p.Interface.Error != "" && p.Interface.Ofport == -1, fmt.Sprintf("%+v", p.Interface)
	})
	t.Logf("interface error: %s", e.port(t, "ghost0").Interface.Error)
}

func TestDeletePort(t *testing.T) {
	e := newEnv(t)
	ctx := ctxT(t, 30*time.Second)
	for _, n := range []string{"del0", "del1"} {
		e.veth(t, n, nil)
		if err := e.c.AddPort(ctx, PortSpec{Bridge: "br1", Name: n, Tag: intp(7), ExternalIDs: ownerPlus("vmnic.io/pod", n)}); err != nil {
			t.Fatalf("add port %s: %v", n, err)
		}
	}
	if err := e.ovs.AddBridge("br2"); err != nil {
		t.Fatal(err)
	}

	t.Run("owner mismatch refused", func(t *testing.T) {
		err := e.c.DeletePort(ctx, "br1", "del0", map[string]string{"vmnic.io/owner": "someone-else"})
		if !errors.Is(err, ErrNotOwner) || !strings.Contains(err.Error(), `"del0"`) {
			t.Errorf("err = %v, want ErrNotOwner naming del0", err)
		}
		// A subset of the marks is not enough either.
		err = e.c.DeletePort(ctx, "br1", "del0", ownerPlus("vmnic.io/pod", "del1"))
		if !errors.Is(err, ErrNotOwner) {
			t.Errorf("wrong pod mark: err = %v, want ErrNotOwner", err)
		}
		e.port(t, "del0")
		if got := vsctl(t, e.ovs, "port-to-br", "del0"); got != "br1" {
			t.Errorf("port-to-br del0 = %q", got)
		}
	})
	t.Run("empty owner refused", func(t *testing.T) {
		if err := e.c.DeletePort(ctx, "br1", "del0", nil); !errors.Is(err, ErrNoOwner) {
			t.Errorf("err = %v, want ErrNoOwner", err)
		}
	})
	t.Run("wrong bridge refused", func(t *testing.T) {
		err := e.c.DeletePort(ctx, "br2", "del0", owner)
		if !errors.Is(err, ErrWrongBridge) || !strings.Contains(err.Error(), `"br1"`) {
			t.Errorf("err = %v, want ErrWrongBridge naming br1", err)
		}
		e.port(t, "del0")
	})
	t.Run("owner match deletes", func(t *testing.T) {
		if err := e.c.DeletePort(ctx, "br1", "del0", ownerPlus("vmnic.io/pod", "del0")); err != nil {
			t.Fatalf("delete: %v", err)
		}
		ps, err := e.c.Ports(ctx, owner)
		if err != nil || len(ps) != 1 || ps[0].Name != "del1" {
			t.Errorf("ports after delete = %+v, %v; want only del1", ps, err)
		}
		if got := vsctl(t, e.ovs, "list-ports", "br1"); got != "del1" {
			t.Errorf("list-ports br1 = %q", got)
		}
		for _, table := range []string{"Port", "Interface"} {
			if got := vsctl(t, e.ovs, "--columns=name", "find", table, "name=del0"); got != "" {
				t.Errorf("%s row del0 left: %q", table, got)
			}
		}
		if got, _ := e.ovs.Appctl("dpif/show"); strings.Contains(got, "del0") {
			t.Errorf("datapath still has del0:\n%s", got)
		}
	})
	t.Run("missing is success", func(t *testing.T) {
		for _, br := range []string{"br1", "nobr"} {
			if err := e.c.DeletePort(ctx, br, "del0", owner); err != nil {
				t.Errorf("delete gone port from %s: %v", br, err)
			}
		}
	})
}

// TestManyPorts adds and deletes 200 ports and checks that each transaction
// mutates Bridge.ports by one UUID instead of rewriting the set: the
// transaction for the 200th port is exactly as big as the one for the 1st
// (names have equal length). Times are logged, not asserted: ovs-vswitchd's
// own reconfiguration walks every port, so "applied" grows with the bridge
// even when the database transaction does not.
func TestManyPorts(t *testing.T) {
	const n = 200
	e := newEnv(t)
	ctx := ctxT(t, 5*time.Minute)
	name := func(i int) string { return fmt.Sprintf("m%03d", i) }
	for i := range n {
		e.veth(t, name(i), nil)
	}

	type txnTrace struct {
		bytes int
		took  time.Duration
	}
	var traces []txnTrace // only this goroutine transacts
	e.c.traceTxn = func(ops []libovsdb.Operation, took time.Duration) {
		for _, op := range ops {
			if op.Table != BridgeTable || op.Op == libovsdb.OperationWait || op.Op == libovsdb.OperationSelect {
				continue
			}
			if op.Op != libovsdb.OperationMutate || len(op.Mutations) != 1 || op.Mutations[0].Column != "ports" {
				t.Errorf("bridge operation %+v, want a mutate of ports", op)
			}
		}
		b, err := json.Marshal(ops)
		if err != nil {
			t.Errorf("marshal ops: %v", err)
		}
		traces = append(traces, txnTrace{len(b), took})
	}

	addTimes := make([]time.Duration, n)
	for i := range n {
		start := time.Now()
		if err := e.c.AddPort(ctx, PortSpec{Bridge: "br1", Name: name(i), Tag: intp(10), ExternalIDs: owner}); err != nil {
			t.Fatalf("add port %d: %v", i, err)
		}
		addTimes[i] = time.Since(start)
	}
	adds := traces
	if got := vsctl(t, e.ovs, "--columns=ports", "--format=json", "list", "Bridge", "br1"); strings.Count(got, `"uuid"`) != n+1 {
		t.Errorf("br1 has %d ports, want %d", strings.Count(got, `"uuid"`), n+1)
	}
	ps, err := e.c.Ports(ctx, owner)
	if err != nil || len(ps) != n {
		t.Fatalf("Ports() = %d ports, %v; want %d", len(ps), err, n)
	}
	for _, p := range ps {
		if p.Bridge != "br1" || p.Interface.Ofport <= 0 {
			t.Errorf("port %s not applied: %+v", p.Name, p)
		}
	}

	traces = nil
	delTimes := make([]time.Duration, n)
	for i := range n {
		start := time.Now()
		if err := e.c.DeletePort(ctx, "br1", name(i), owner); err != nil {
			t.Fatalf("delete port %d: %v", i, err)
		}
		delTimes[i] = time.Since(start)
	}
	if got := vsctl(t, e.ovs, "list-ports", "br1"); got != "" {
		t.Errorf("ports left on br1: %q", got)
	}
	// DeletePort sends a lookup, then the delete.
	dels := make([]txnTrace, 0, n)
	for i := 1; i < len(traces); i += 2 {
		dels = append(dels, traces[i])
	}

	if adds[0].bytes != adds[n-1].bytes {
		t.Errorf("AddPort transaction grew from %d to %d bytes between port 1 and %d", adds[0].bytes, adds[n-1].bytes, n)
	}
	if dels[0].bytes != dels[n-1].bytes {
		t.Errorf("DeletePort transaction went from %d to %d bytes between port 1 and %d", dels[0].bytes, dels[n-1].bytes, n)
	}
	commit := func(ts []txnTrace) []time.Duration {
		var ds []time.Duration
		for _, tr := range ts {
			ds = append(ds, tr.took)
		}
		return ds
	}
	t.Logf("AddPort (commit + applied by vswitchd): 1st %v, %dth %v; median of first 20 %v, of last 20 %v",
		addTimes[0], n, addTimes[n-1], median(addTimes[:20]), median(addTimes[n-20:]))
	t.Logf("AddPort transaction only: 1st %v, %dth %v; median of first 20 %v, of last 20 %v; %d bytes each",
		adds[0].took, n, adds[n-1].took, median(commit(adds[:20])), median(commit(adds[n-20:])), adds[0].bytes)
	t.Logf("DeletePort (while %d..1 ports remain): 1st %v, %dth %v; median of first 20 %v, of last 20 %v",
		n, delTimes[0], n, delTimes[n-1], median(delTimes[:20]), median(delTimes[n-20:]))
	t.Logf("DeletePort transaction only: median of first 20 %v, of last 20 %v; %d bytes each",
		median(commit(dels[:20])), median(commit(dels[n-20:])), dels[0].bytes)
}

func TestConcurrentAddPort(t *testing.T) {
	const n = 20
	e := newEnv(t)
	ctx := ctxT(t, time.Minute)
	for i := range n {
		e.veth(t, fmt.Sprintf("c%d", i), nil)
	}
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i := range n {
		wg.Go(func() {
			errs[i] = e.c.AddPort(ctx, PortSpec{Bridge: "br1", Name: fmt.Sprintf("c%d", i), Tag: intp(i + 1), ExternalIDs: owner})
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatalf("concurrent adds: %v", err)
	}
	ps, err := e.c.Ports(ctx, owner)
	if err != nil || len(ps) != n {
		t.Fatalf("Ports() = %d, %v; want %d", len(ps), err, n)
	}
	for _, p := range ps {
		if p.Interface.Ofport <= 0 {
			t.Errorf("port %s not applied: %+v", p.Name, p.Interface)
		}
	}
	for i := range n {
		wg.Go(func() {
			errs[i] = e.c.DeletePort(ctx, "br1", fmt.Sprintf("c%d", i), owner)
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatalf("concurrent deletes: %v", err)
	}
	if got := vsctl(t, e.ovs, "list-ports", "br1"); got != "" {
		t.Errorf("ports left: %q", got)
	}
}

// TestReconnect kills ovsdb-server and starts it again on the same socket
// and database file: the same Client carries on.
func TestReconnect(t *testing.T) {
	e := newEnv(t)
	ctx := ctxT(t, time.Minute)
	e.veth(t, "rc0", nil)
	e.veth(t, "rc1", nil)
	if err := e.c.AddPort(ctx, PortSpec{Bridge: "br1", Name: "rc0", Tag: intp(5), ExternalIDs: owner}); err != nil {
		t.Fatalf("add before restart: %v", err)
	}
	if err := e.ovs.KillDB(); err != nil {
		t.Fatalf("kill ovsdb-server: %v", err)
	}
	eventually(t, 5*time.Second, "client notices the loss", func() (bool, string) {
		return !e.c.Connected(), "still connected"
	})
	// While the server is away, calls wait for it only as long as their
	// context allows.
	short := ctxT(t, 500*time.Millisecond)
	if err := e.c.AddPort(short, PortSpec{Bridge: "br1", Name: "rc1", ExternalIDs: owner}); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("AddPort while ovsdb-server is down: err = %v, want a deadline error", err)
	}
	if _, err := e.c.Bridges(short); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Bridges while ovsdb-server is down: err = %v, want a deadline error", err)
	}
	if err := e.ovs.StartDB(); err != nil {
		t.Fatalf("start ovsdb-server again: %v", err)
	}
	start := time.Now()
	// Blocks until reconnected (and until ovs-vswitchd, which reconnects
	// on its own schedule, has applied it).
	if err := e.c.AddPort(ctx, PortSpec{Bridge: "br1", Name: "rc1", Tag: intp(5), ExternalIDs: owner}); err != nil {
		t.Fatalf("add after restart: %v", err)
	}
	t.Logf("first AddPort after the restart took %v", time.Since(start))
	if !e.c.Connected() {
		t.Error("not connected after a successful AddPort")
	}
	ps, err := e.c.Ports(ctx, owner)
	if err != nil || len(ps) != 2 || ps[0].Name != "rc0" || ps[1].Name != "rc1" {
		t.Fatalf("ports after restart = %+v, %v", ps, err)
	}
	for _, p := range ps {
		if p.Interface.Ofport <= 0 {
			t.Errorf("port %s not applied: %+v", p.Name, p.Interface)
		}
	}
	if err = e.c.DeletePort(ctx, "br1", "rc0", owner); err != nil {
		t.Fatalf("delete after restart: %v", err)
	}
	if got := vsctl(t, e.ovs, "list-ports", "br1"); got != "rc1" {
		t.Errorf("list-ports br1 = %q, want rc1", got)
	}
	s, err := e.c.Status(ctx)
	if err != nil || !s.Applied {
		t.Errorf("status after restart = %+v, %v", s, err)
	}
}

// TestTraffic: namespaces whose veths sit on access ports of the same VLAN
// reach each other through the userspace datapath; across VLANs they do not.
func TestTraffic(t *testing.T) {
	need.Binary(t, "ping")
	need.Binary(t, "nsenter")
	e := newEnv(t)
	ctx := ctxT(t, 30*time.Second)
	pods := map[string]struct {
		tag  int
		addr string
	}{
		"tp1": {100, "10.99.0.1"},
		"tp2": {100, "10.99.0.2"},
		"tp3": {200, "10.99.0.3"},
		"tp4": {200, "10.99.0.4"},
	}
	netnsOf := map[string]ns.NetNS{}
	for _, name := range []string{"tp1", "tp2", "tp3", "tp4"} {
		p := pods[name]
		pod := newNS(t)
		netnsOf[name] = pod
		e.veth(t, name, pod)
		if _, err := inNS(pod, "ip", "addr", "add", p.addr+"/24", "dev", "eth0"); err != nil {
			t.Fatal(err)
		}
		if err := e.c.AddPort(ctx, PortSpec{Bridge: "br1", Name: name, Tag: intp(p.tag), ExternalIDs: owner}); err != nil {
			t.Fatalf("add port %s: %v", name, err)
		}
	}
	ping := func(from, to string) error {
		_, err := inNS(netnsOf[from], "ping", "-c", "3", "-i", "0.2", "-W", "1", pods[to].addr)
		return err
	}
	if err := ping("tp1", "tp2"); err != nil {
		t.Errorf("tp1 -> tp2 on VLAN 100: %v", err)
	}
	if err := ping("tp2", "tp1"); err != nil {
		t.Errorf("tp2 -> tp1 on VLAN 100: %v", err)
	}
	if err := ping("tp3", "tp4"); err != nil {
		t.Errorf("tp3 -> tp4 on VLAN 200: %v", err)
	}
	if err := ping("tp1", "tp3"); err == nil {
		t.Errorf("tp1 (VLAN 100) reached tp3 (VLAN 200)")
	}
	if err := ping("tp3", "tp2"); err == nil {
		t.Errorf("tp3 (VLAN 200) reached tp2 (VLAN 100)")
	}
}

func median(ds []time.Duration) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[len(s)/2]
}
