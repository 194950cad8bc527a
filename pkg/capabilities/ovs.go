package capabilities

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/vmnic/vmnic/pkg/apis/v1alpha1"
	"github.com/vmnic/vmnic/pkg/ovsdb"
)

// OVS reads Open vSwitch's state.
type OVS interface {
	// Endpoint names the database, for the report.
	Endpoint() string
	Status(ctx context.Context) (ovsdb.Status, error)
}

// ovsDialTimeout bounds one attempt to connect to the database.
const ovsDialTimeout = 2 * time.Second

// LazyOVS is the real OVS: a pkg/ovsdb client dialled on first use and kept
// (it reconnects by itself). A failed dial is retried on the next Status.
type LazyOVS struct {
	endpoint string
	log      *slog.Logger

	mu     sync.Mutex
	client *ovsdb.Client
}

// NewOVS returns the OVS for endpoint ("unix:/run/openvswitch/db.sock"), or
// nil when endpoint is empty: no OVS configured. Close it when done.
func NewOVS(endpoint string, log *slog.Logger) *LazyOVS {
	if endpoint == "" {
		return nil
	}
	if log == nil {
		log = slog.Default()
	}
	return &LazyOVS{endpoint: endpoint, log: log}
}

// Endpoint implements OVS.
func (o *LazyOVS) Endpoint() string { return o.endpoint }

// Status implements OVS. It dials (until ctx ends) when no connection is up.
func (o *LazyOVS) Status(ctx context.Context) (ovsdb.Status, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.client == nil {
		// Dial retries until its context ends; a switch that is not
		// there should cost a probe little, and the next Status tries
		// again.
		dctx, cancel := context.WithTimeout(ctx, ovsDialTimeout)
		c, err := ovsdb.Dial(dctx, o.endpoint, o.log)
		cancel()
		if err != nil {
			return ovsdb.Status{}, err
		}
		o.client = c
	}
	if !o.client.Connected() {
		// The cache holds what the database said last, not what it
		// says now.
		return ovsdb.Status{}, fmt.Errorf("ovsdb %q: connection lost, reconnecting", o.endpoint)
	}
	s, err := o.client.Status(ctx)
	if err != nil {
		return ovsdb.Status{}, fmt.Errorf("ovsdb %q status: %w", o.endpoint, err)
	}
	return s, nil
}

// Close closes the connection, if any.
func (o *LazyOVS) Close() {
	if o == nil {
		return
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.client != nil {
		o.client.Close()
		o.client = nil
	}
}

// isNil is true for a nil OVS, including a nil *LazyOVS (what NewOVS
// returns for no endpoint) stored in the interface.
func isNil(o OVS) bool {
	if o == nil {
		return true
	}
	l, ok := o.(*LazyOVS)
	return ok && l == nil
}

// probeOVS reads the switch's state; ovs nil means none is configured.
func probeOVS(ctx context.Context, ovs OVS, timeout time.Duration) v1alpha1.OVSStatus {
	if isNil(ovs) {
		return v1alpha1.OVSStatus{Error: "no OVSDB endpoint configured"}
	}
	out := v1alpha1.OVSStatus{Endpoint: ovs.Endpoint()}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	s, err := ovs.Status(ctx)
	if err != nil {
		out.Error = err.Error()
		return out
	}
	if !s.Connected {
		// The cache is what the database said last; it is not the
		// database's state now.
		out.Error = fmt.Sprintf("ovsdb %q: connection lost, reconnecting", ovs.Endpoint())
		return out
	}
	out.Reachable = true
	out.Version = s.OVSVersion
	out.Applied = s.Applied
	out.DatapathTypes = slices.Clone(s.DatapathTypes)
	for _, b := range s.Bridges {
		dp := b.DatapathType
		if dp == "" {
			dp = "system"
		}
		out.Bridges = append(out.Bridges, v1alpha1.OVSBridge{Name: b.Name, DatapathType: dp})
	}
	slices.SortFunc(out.Bridges, func(a, b v1alpha1.OVSBridge) int { return strings.Compare(a.Name, b.Name) })
	return out
}
