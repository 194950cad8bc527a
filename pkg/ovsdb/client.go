// Package ovsdb is vmnic's Open vSwitch database client: typed models of the
// four vswitch tables vmnic touches, one persistent libovsdb connection with
// a monitor cache of them (re-established by itself when ovsdb-server goes
// away), and the port operations the bridge binding needs.
//
// Every write is one OVSDB transaction that also bumps Open_vSwitch.next_cfg;
// the call then waits (bounded by its context) until ovs-vswitchd reports the
// same number in cur_cfg, i.e. until the switch has applied it, which is what
// `ovs-vsctl` does without --no-wait. Bridge.ports is mutated (insert/delete
// one UUID), never rewritten, so the transaction stays the same size however
// many ports the bridge has (ovs-vswitchd's own reconfiguration still walks
// the whole bridge, so the wait does grow with it).
//
// Ports are owned through external_ids: AddPort requires at least one mark,
// DeletePort deletes only a port carrying all the marks it is given.
package ovsdb

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/go-logr/logr"
	"github.com/ovn-org/libovsdb/cache"
	"github.com/ovn-org/libovsdb/client"
	"github.com/ovn-org/libovsdb/model"
	libovsdb "github.com/ovn-org/libovsdb/ovsdb"
)

const (
	// reconnectTimeout bounds one reconnection attempt (dial, schema,
	// monitor); libovsdb retries with reconnectBackoff between attempts.
	reconnectTimeout = 10 * time.Second
	// cfgPoll re-reads cur_cfg when no cache event arrived: libovsdb drops
	// events when its buffer is full, so notifications alone are not enough.
	cfgPoll = 200 * time.Millisecond
	// dialRetry spaces Dial's attempts while ovsdb-server is not up yet.
	dialRetry = 200 * time.Millisecond
)

// Client is a connection to one ovsdb-server with a cache of the
// Open_vSwitch, Bridge, Port and Interface tables. It is safe for concurrent
// use. Reads are served from the cache; writes go to the server.
type Client struct {
	log      *slog.Logger
	endpoint string
	db       client.Client
	backoff  *reconnectBackoff

	mu      sync.Mutex
	changed chan struct{} // closed (and replaced) on every Open_vSwitch change

	// traceTxn, when set (by tests), sees every transaction and how long
	// the server took to answer it.
	traceTxn func(ops []libovsdb.Operation, took time.Duration)
}

// Dial connects to endpoint ("unix:/run/openvswitch/db.sock",
// "tcp:127.0.0.1:6640"), retrying until ctx ends, and starts monitoring the
// tables. The returned Client reconnects by itself; Close it when done.
func Dial(ctx context.Context, endpoint string, log *slog.Logger) (*Client, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With("ovsdb", endpoint)
	dbModel, err := DatabaseModel()
	if err != nil {
		return nil, fmt.Errorf("ovsdb model: %w", err)
	}
	c := &Client{
		log:      log,
		endpoint: endpoint,
		backoff:  newReconnectBackoff(),
		changed:  make(chan struct{}),
	}
	lr := logr.FromSlogHandler(log.Handler())
	db, err := client.NewOVSDBClient(dbModel,
		client.WithEndpoint(endpoint),
		client.WithReconnect(reconnectTimeout, c.backoff),
		client.WithLogger(&lr))
	if err != nil {
		return nil, fmt.Errorf("ovsdb client for %q: %w", endpoint, err)
	}
	c.db = db
	success := false
	defer func() {
		if !success {
			c.Close()
		}
	}()

	for {
		err = db.Connect(ctx)
		if err == nil {
			break
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("connect to ovsdb %q: %w (last error: %w)", endpoint, ctx.Err(), err)
		case <-time.After(dialRetry):
		}
	}

	// The cache object survives reconnections (libovsdb purges and refills
	// it), so one handler registered now sees every later change.
	wake := func(table string) {
		if table == OpenvSwitchTable {
			c.notify()
		}
	}
	db.Cache().AddEventHandler(&cache.EventHandlerFuncs{
		AddFunc:    func(table string, _ model.Model) { wake(table) },
		UpdateFunc: func(table string, _, _ model.Model) { wake(table) },
		DeleteFunc: func(table string, _ model.Model) { wake(table) },
	})

	// Without explicit columns libovsdb monitors every column of the
	// schema, including Interface statistics that change all the time.
	ovs, br, port, iface := &OpenvSwitch{}, &Bridge{}, &Port{}, &Interface{}
	monitor := db.NewMonitor(
		client.WithTable(ovs, &ovs.Bridges, &ovs.NextCfg, &ovs.CurCfg, &ovs.ExternalIDs,
			&ovs.DatapathTypes, &ovs.OVSVersion, &ovs.IfaceTypes),
		client.WithTable(br, &br.Name, &br.Ports, &br.DatapathType, &br.ExternalIDs),
		client.WithTable(port, &port.Name, &port.Interfaces, &port.Tag, &port.Trunks,
			&port.VLANMode, &port.ExternalIDs),
		client.WithTable(iface, &iface.Name, &iface.Type, &iface.MTURequest, &iface.MTU,
			&iface.Ofport, &iface.Error, &iface.ExternalIDs, &iface.AdminState, &iface.LinkState),
	)
	if _, err := db.Monitor(ctx, monitor); err != nil {
		return nil, fmt.Errorf("monitor ovsdb %q: %w", endpoint, err)
	}
	success = true
	log.Debug("connected to ovsdb")
	return c, nil
}

// Close ends the connection and stops reconnecting. It is safe to call more
// than once.
func (c *Client) Close() {
	c.backoff.close()
	if c.db != nil {
		c.db.Close()
	}
}

// Connected reports whether the client is connected right now; false while
// it is between reconnection attempts. (libovsdb's own Connected stays true
// while it reconnects; only the endpoint is cleared.)
func (c *Client) Connected() bool { return c.db.Connected() && c.db.CurrentEndpoint() != "" }

func (c *Client) notify() {
	c.mu.Lock()
	close(c.changed)
	c.changed = make(chan struct{})
	c.mu.Unlock()
}

func (c *Client) changes() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.changed
}

// list reads a whole table from the cache. libovsdb waits for the cache to
// be consistent (after a reconnection) only until ctx ends and then reads
// anyway, so a done ctx is turned into an error here.
func list[T any](ctx context.Context, c *Client, what string) ([]T, error) {
	var rows []T
	if err := c.db.List(ctx, &rows); err != nil {
		return nil, fmt.Errorf("list %s from ovsdb cache: %w", what, err)
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("list %s from ovsdb cache: %w", what, err)
	}
	return rows, nil
}

// root returns the Open_vSwitch row.
func (c *Client) root(ctx context.Context) (OpenvSwitch, error) {
	rows, err := list[OpenvSwitch](ctx, c, "Open_vSwitch")
	if err != nil {
		return OpenvSwitch{}, err
	}
	if len(rows) != 1 {
		return OpenvSwitch{}, fmt.Errorf("ovsdb %q: %w (found %d Open_vSwitch rows)", c.endpoint, ErrNotInitialized, len(rows))
	}
	return rows[0], nil
}

// Bridges returns the bridges in the cache, sorted by name.
func (c *Client) Bridges(ctx context.Context) ([]Bridge, error) {
	bridges, err := list[Bridge](ctx, c, "bridges")
	if err != nil {
		return nil, err
	}
	slices.SortFunc(bridges, func(a, b Bridge) int { return strings.Compare(a.Name, b.Name) })
	return bridges, nil
}

// Status is what a capability probe or a health check wants to know.
type Status struct {
	Connected     bool
	OVSVersion    string // empty when nobody set it (ovs-ctl does at boot)
	DatapathTypes []string
	IfaceTypes    []string
	NextCfg       int
	CurCfg        int
	// Applied is true when ovs-vswitchd has applied the latest
	// configuration (cur_cfg == next_cfg); false while it lags or is down.
	Applied bool
	Bridges []BridgeStatus
}

// DatapathNetdev is the datapath_type of a bridge on Open vSwitch's
// userspace datapath (DPDK, AF_XDP, or no kernel module); "" and "system"
// are the kernel's.
const DatapathNetdev = "netdev"

// BridgeStatus is one bridge in Status.
type BridgeStatus struct {
	Name         string
	DatapathType string // "" means "system", the kernel datapath
	Ports        int
}

// Status reports the switch's version, datapath and interface types, whether
// ovs-vswitchd is caught up, and the bridges, all from the cache.
func (c *Client) Status(ctx context.Context) (Status, error) {
	root, err := c.root(ctx)
	if err != nil {
		return Status{}, err
	}
	bridges, err := c.Bridges(ctx)
	if err != nil {
		return Status{}, err
	}
	s := Status{
		Connected:     c.Connected(),
		DatapathTypes: slices.Sorted(slices.Values(root.DatapathTypes)),
		IfaceTypes:    slices.Sorted(slices.Values(root.IfaceTypes)),
		NextCfg:       root.NextCfg,
		CurCfg:        root.CurCfg,
		Applied:       root.CurCfg == root.NextCfg,
	}
	if root.OVSVersion != nil {
		s.OVSVersion = *root.OVSVersion
	}
	for _, b := range bridges {
		s.Bridges = append(s.Bridges, BridgeStatus{Name: b.Name, DatapathType: b.DatapathType, Ports: len(b.Ports)})
	}
	return s, nil
}

// waitApplied waits until ovs-vswitchd has applied configuration cfg
// (cur_cfg >= cfg) or ctx ends.
func (c *Client) waitApplied(ctx context.Context, cfg int) error {
	ticker := time.NewTicker(cfgPoll)
	defer ticker.Stop()
	cur := -1
	for {
		changed := c.changes() // before reading, so no change slips between
		root, err := c.root(ctx)
		if err == nil {
			cur = root.CurCfg
			if cur >= cfg {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for ovs-vswitchd to apply configuration %d (cur_cfg %d): %w", cfg, cur, ctx.Err())
		case <-changed:
		case <-ticker.C:
		}
	}
}

// reconnectBackoff paces libovsdb's reconnection attempts. It never gives
// up: libovsdb v0.7.0 panics when the backoff returns Stop (the stock
// ExponentialBackOff does after 15 minutes). After close it parks the
// reconnect goroutine instead, because libovsdb's Close does not stop a
// reconnection loop that is already running.
type reconnectBackoff struct {
	mu     sync.Mutex
	next   time.Duration
	closed bool
}

const (
	backoffMin = 100 * time.Millisecond
	backoffMax = 2 * time.Second
	parked     = time.Duration(1 << 62)
)

func newReconnectBackoff() *reconnectBackoff { return &reconnectBackoff{next: backoffMin} }

// NextBackOff implements backoff.BackOff.
func (b *reconnectBackoff) NextBackOff() time.Duration {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return parked
	}
	d := b.next
	b.next = min(2*b.next, backoffMax)
	return d/2 + rand.N(d/2+1) // jitter, so many clients do not reconnect in step
}

// Reset implements backoff.BackOff.
func (b *reconnectBackoff) Reset() {
	b.mu.Lock()
	b.next = backoffMin
	b.mu.Unlock()
}

func (b *reconnectBackoff) close() {
	b.mu.Lock()
	b.closed = true
	b.mu.Unlock()
}

// Errors callers can test with errors.Is.
var (
	// ErrNotInitialized means the database has no Open_vSwitch row
	// (ovs-vsctl init has not run).
	ErrNotInitialized = errors.New("open vswitch database not initialized")
	// ErrBridgeNotFound means the named bridge does not exist.
	ErrBridgeNotFound = errors.New("bridge not found")
	// ErrPortExists means a port or interface of that name exists already.
	ErrPortExists = errors.New("port exists")
	// ErrNoOwner means an owner mark (external_ids) was required and empty.
	ErrNoOwner = errors.New("owner mark (external_ids) required")
	// ErrNotOwner means the port lacks the caller's owner mark.
	ErrNotOwner = errors.New("port not owned by caller")
	// ErrWrongBridge means the port exists on another bridge.
	ErrWrongBridge = errors.New("port is on another bridge")
	// ErrInvalidSpec means a PortSpec failed validation.
	ErrInvalidSpec = errors.New("invalid port spec")
)
