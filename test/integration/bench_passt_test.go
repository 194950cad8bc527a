package integration

import (
	"path/filepath"
	"testing"
	"time"
)

// BenchmarkPasstAddDel: ADD+DEL of a passt VM interface through libcni
// (macvlan on a veth uplink + host-local + vmnic, standalone daemon, which
// sets passt's sysctls), IPv4 only as the masquerade benchmark is.
func BenchmarkPasstAddDel(b *testing.B) {
	ctx := benchCtx(b)
	node, _ := newNode(b, true)
	underlay(b, node)
	ipam := map[string]any{
		"type": "host-local", "dataDir": filepath.Join(node.Dir, "ipam"),
		"ranges": []any{[]any{map[string]any{"subnet": "10.50.0.0/24", "rangeStart": "10.50.0.10", "rangeEnd": "10.50.0.250"}}},
	}
	l := passtList(b, node, "1.1.0", ipam, nil)
	pod := newPod(b, "virt-launcher-vm1-passt")
	var adds, dels []time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		t0 := time.Now()
		if _, err := node.Add(ctx, l, pod); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		if err := node.Del(ctx, l, pod); err != nil {
			b.Fatal(err)
		}
		adds, dels = append(adds, t1.Sub(t0)), append(dels, time.Since(t1))
	}
	b.ReportMetric(ms(median(adds)), "add-ms-median")
	b.ReportMetric(ms(median(dels)), "del-ms-median")
}
