package integration

import (
	"fmt"
	"sort"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/vmnic/vmnic/test/harness"
)

// percentile is the p-th percentile (nearest rank) of d.
func percentile(d []time.Duration, p float64) time.Duration {
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	i := int(p*float64(len(s))+0.5) - 1
	return s[max(0, min(i, len(s)-1))]
}

// BenchmarkScaleMasquerade wires 250 masquerade VM NICs on one node (each
// its own pod: ptp + host-local + vmnic) against a vmnicd process, one
// after the other through libcni, and reports the ADD p50/p99 of the first
// and the last 50, the daemon's RSS with 250 attachments (DHCP servers
// running), one CNI GC pass over them and the DEL median. It runs once
// whatever -benchtime says: use -benchtime 1x.
func BenchmarkScaleMasquerade(b *testing.B) {
	const count, window = 250, 50
	ctx := benchCtx(b)
	node, _ := newNode(b, false)
	d, err := node.StartDaemonProcess("--metrics-addr=")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = d.Stop() })
	l := list(b, node, harness.NetOptions{Vmnic: true, Subnet4: "198.18.0.0/22", Subnet6: "-"})
	var pods []*harness.Pod
	var adds []time.Duration
	var valid []types.GCAttachment
	for i := range count {
		p := newPod(b, fmt.Sprintf("virt-launcher-m%d-x", i))
		t0 := time.Now()
		if _, err := node.Add(ctx, l, p); err != nil {
			b.Fatalf("ADD #%d: %v", i+1, err)
		}
		adds = append(adds, time.Since(t0))
		pods = append(pods, p)
		valid = append(valid, types.GCAttachment{ContainerID: p.ContainerID, IfName: p.IfName})
	}
	rss, err := rssKiB(d.Cmd.Process.Pid)
	if err != nil {
		b.Fatal(err)
	}
	t0 := time.Now()
	if err := node.GC(ctx, l, valid); err != nil {
		b.Fatalf("GC: %v", err)
	}
	gc := time.Since(t0)
	var dels []time.Duration
	for _, p := range pods {
		t0 := time.Now()
		if err := node.Del(ctx, l, p); err != nil {
			b.Fatal(err)
		}
		dels = append(dels, time.Since(t0))
	}
	first, last := adds[:window], adds[count-window:]
	b.ReportMetric(ms(percentile(first, 0.5)), "add-first50-p50-ms")
	b.ReportMetric(ms(percentile(first, 0.99)), "add-first50-p99-ms")
	b.ReportMetric(ms(percentile(last, 0.5)), "add-last50-p50-ms")
	b.ReportMetric(ms(percentile(last, 0.99)), "add-last50-p99-ms")
	b.ReportMetric(float64(percentile(last, 0.5))/float64(percentile(first, 0.5)), "last/first-p50")
	b.ReportMetric(float64(rss)/1024, "vmnicd-rss-MiB-at-250")
	b.ReportMetric(ms(gc), "gc-pass-ms")
	b.ReportMetric(ms(median(dels)), "del-ms-median")
}
