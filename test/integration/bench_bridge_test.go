package integration

import (
	"context"
	"fmt"
	"log/slog"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/vmnic/vmnic/daemon"
	"github.com/vmnic/vmnic/test/harness"
)

// applyLog is a log handler that keeps, per added OVS port, how long the
// wait for ovs-vswitchd took (the "applied" minus "committed" of
// pkg/ovsdb's debug record): the switch's share of an ADD.
type applyLog struct {
	mu sync.Mutex
	w  []time.Duration
}

func (a *applyLog) Enabled(context.Context, slog.Level) bool { return true }
func (a *applyLog) WithAttrs([]slog.Attr) slog.Handler       { return a }
func (a *applyLog) WithGroup(string) slog.Handler            { return a }
func (a *applyLog) Handle(_ context.Context, r slog.Record) error {
	if r.Message != "added port" {
		return nil
	}
	var committed, applied time.Duration
	r.Attrs(func(at slog.Attr) bool {
		switch at.Key {
		case "committed":
			committed = at.Value.Duration()
		case "applied":
			applied = at.Value.Duration()
		}
		return true
	})
	a.mu.Lock()
	a.w = append(a.w, applied-committed)
	a.mu.Unlock()
	return nil
}

func (a *applyLog) waits() []time.Duration {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]time.Duration(nil), a.w...)
}

// BenchmarkScaleBridge wires 250 VM NICs on one OVS bridge, one after the
// other through libcni, and compares the ADD latency of the last ones with
// the first ones (the goal: flat, under 1.5x); then one CNI GC pass over
// them and their DELs. It runs the 250 once whatever -benchtime says: use
// -benchtime 1x.
func BenchmarkScaleBridge(b *testing.B) {
	const count, window = 250, 25
	ctx := benchCtx(b)
	applied := &applyLog{}
	n := newOVSNodeWith(b, func(c *daemon.Config) { c.Logger = slog.New(applied) })
	ipam := n.hostLocalOn("10.64.0.0/16", "10.64.0.1", "10.64.0.10", "10.64.3.250")
	l := n.bridgeList(b, "scale", map[string]any{"vlan": 100}, ipam)
	var pods []*harness.Pod
	var adds []time.Duration
	var valid []types.GCAttachment
	for i := range count {
		p := newPod(b, fmt.Sprintf("virt-launcher-scale%d-x", i))
		p.IfName = "net1"
		t0 := time.Now()
		if _, err := n.Add(ctx, l, p); err != nil {
			b.Fatalf("ADD #%d: %v", i+1, err)
		}
		adds = append(adds, time.Since(t0))
		pods = append(pods, p)
		valid = append(valid, types.GCAttachment{ContainerID: p.ContainerID, IfName: p.IfName})
	}
	t0 := time.Now()
	if err := n.GC(ctx, l, valid); err != nil {
		b.Fatalf("GC: %v", err)
	}
	gc := time.Since(t0)
	if ports := n.vmnicPorts(b); len(ports) != count {
		b.Fatalf("GC with every attachment valid left %d ports of %d", len(ports), count)
	}
	var ms0 runtime.MemStats
	runtime.ReadMemStats(&ms0)
	var dels []time.Duration
	for _, p := range pods {
		t0 := time.Now()
		if err := n.Del(ctx, l, p); err != nil {
			b.Fatal(err)
		}
		dels = append(dels, time.Since(t0))
	}
	first, last := median(adds[:window]), median(adds[count-window:])
	if waits := applied.waits(); len(waits) >= count {
		w0, w1 := median(waits[:window]), median(waits[count-window:count])
		b.ReportMetric(ms(w0), "ovs-apply-first25-ms-median")
		b.ReportMetric(ms(w1), "ovs-apply-last25-ms-median")
		b.ReportMetric(float64(last-w1)/float64(first-w0), "last/first-without-ovs-apply")
	}
	b.ReportMetric(ms(percentile(adds[:50], 0.5)), "add-first50-p50-ms")
	b.ReportMetric(ms(percentile(adds[:50], 0.99)), "add-first50-p99-ms")
	b.ReportMetric(ms(percentile(adds[count-50:], 0.5)), "add-last50-p50-ms")
	b.ReportMetric(ms(percentile(adds[count-50:], 0.99)), "add-last50-p99-ms")
	b.ReportMetric(ms(adds[0]), "add1-ms")
	b.ReportMetric(ms(adds[count-1]), "add250-ms")
	b.ReportMetric(ms(first), "add-first25-ms-median")
	b.ReportMetric(ms(last), "add-last25-ms-median")
	b.ReportMetric(float64(last)/float64(first), "last/first")
	b.ReportMetric(ms(gc), "gc-pass-ms")
	b.ReportMetric(ms(median(dels)), "del-ms-median")
	b.ReportMetric(float64(ms0.HeapInuse)/(1<<20), "heap-MiB-at-250")
}
