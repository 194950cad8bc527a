package integration

import (
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"

	"github.com/vmnic/vmnic/test/harness"
)

// burstAtt is one attachment of the burst: a pod's interface on a network.
type burstAtt struct {
	p *harness.Pod
	l *libcni.NetworkConfigList
}

// tryAll runs f for every item at once, released together, and returns
// the items whose call failed with their errors, each call's latency, and
// the wall time of the whole.
func tryAll[T any](items []T, f func(T) error) (failed []T, errs []error, lat []time.Duration, wall time.Duration) {
	var wg sync.WaitGroup
	var mu sync.Mutex
	lat = make([]time.Duration, len(items))
	start := make(chan struct{})
	for i, it := range items {
		wg.Go(func() {
			<-start
			t0 := time.Now()
			err := f(it)
			lat[i] = time.Since(t0)
			if err != nil {
				mu.Lock()
				failed, errs = append(failed, it), append(errs, err)
				mu.Unlock()
			}
		})
	}
	t0 := time.Now()
	close(start)
	wg.Wait()
	return failed, errs, lat, time.Since(t0)
}

// burst runs f for every attachment at once and returns the wall time of
// the whole burst and each call's latency; it fails b on any error.
func burst(b *testing.B, verb string, atts []burstAtt, f func(burstAtt) error) (time.Duration, []time.Duration) {
	b.Helper()
	failed, errs, lat, wall := tryAll(atts, f)
	if len(errs) > 0 {
		msgs := make([]string, len(errs))
		for i, a := range failed {
			msgs[i] = fmt.Sprintf("%s %s/%s: %v", verb, a.p.Name, a.p.IfName, errs[i])
		}
		b.Fatalf("%d of %d %ss failed:\n%s", len(errs), len(atts), verb, strings.Join(msgs, "\n"))
	}
	return wall, lat
}

// BenchmarkConcurrentAddDel: per iteration, 100 CNI ADDs through libcni all
// at once, then their 100 DELs all at once, in bridge mode on userspace
// OVS: 33 VM pods with two networks each attached in parallel (as
// containerd does) and 34 plain pods, the mix of TestConcurrentAddDel
// (without its GC passes). Every operation must succeed and nothing may be
// left. Reports the throughput and wall time of each burst (medians over
// the iterations) and the p50/p99 latency of one operation in a burst
// (over all iterations). Setup is heavy: use -benchtime 1x or a few x.
func BenchmarkConcurrentAddDel(b *testing.B) {
	const vms, plains = 33, 34 // 2*33 + 34 = 100 attachments
	ctx := benchCtx(b)
	n := newOVSNode(b)
	blue := n.bridgeList(b, "blue", map[string]any{"vlan": 100}, n.hostLocalOn("10.100.0.0/24", "10.100.0.1", "10.100.0.10", "10.100.0.250"))
	green := n.bridgeList(b, "green", map[string]any{"vlan": 200}, n.hostLocalOn("10.200.0.0/24", "10.200.0.1", "10.200.0.10", "10.200.0.250"))
	var atts []burstAtt
	for i := range max(vms, plains) {
		if i < vms {
			vm := newPod(b, fmt.Sprintf("virt-launcher-burst%d-x", i))
			// One pod, two networks: each attachment needs its own Pod
			// value for its interface name; they share the netns.
			vm2 := *vm
			vm.IfName, vm2.IfName = "net1", "net2"
			atts = append(atts, burstAtt{vm, blue}, burstAtt{&vm2, green})
		}
		if i < plains {
			plain := newPod(b, fmt.Sprintf("plain-burst%d", i))
			plain.IfName = "net1"
			atts = append(atts, burstAtt{plain, blue})
		}
	}
	var addWall, delWall, addLat, delLat []time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		w, lat := burst(b, "ADD", atts, func(a burstAtt) error { _, err := n.Add(ctx, a.l, a.p); return err })
		addWall, addLat = append(addWall, w), append(addLat, lat...)
		b.StopTimer()
		if ports := n.vmnicPorts(b); len(ports) != len(atts) {
			b.Fatalf("iteration %d: %d OVS ports after %d ADDs", i+1, len(ports), len(atts))
		}
		b.StartTimer()
		w, lat = burst(b, "DEL", atts, func(a burstAtt) error { return n.Del(ctx, a.l, a.p) })
		delWall, delLat = append(delWall, w), append(delLat, lat...)
		b.StopTimer()
		pods := make([]*harness.Pod, 0, len(atts))
		for _, a := range atts {
			pods = append(pods, a.p)
		}
		n.assertNoTrace(b, "blue", pods...)
		if ips := n.allocated(b, "green"); len(ips) != 0 {
			b.Errorf("green addresses left: %v", ips)
		}
		if b.Failed() {
			b.Fatalf("iteration %d: something was left after the DELs", i+1)
		}
		b.StartTimer()
	}
	b.StopTimer()
	addMed, delMed := median(addWall), median(delWall)
	b.ReportMetric(float64(len(atts))/addMed.Seconds(), "ADD/s")
	b.ReportMetric(float64(len(atts))/delMed.Seconds(), "DEL/s")
	b.ReportMetric(ms(addMed), "add-burst-ms")
	b.ReportMetric(ms(delMed), "del-burst-ms")
	b.ReportMetric(ms(percentile(addLat, 0.5)), "add-p50-ms")
	b.ReportMetric(ms(percentile(addLat, 0.99)), "add-p99-ms")
	b.ReportMetric(ms(percentile(delLat, 0.5)), "del-p50-ms")
	b.ReportMetric(ms(percentile(delLat, 0.99)), "del-p99-ms")
}
