package integration

import (
	"bytes"
	"context"
	"os/exec"
	"path/filepath"
	"sort"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"

	"github.com/vmnic/vmnic/test/harness"
)

func median(d []time.Duration) time.Duration {
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2]
}

// benchCtx outlives ctxT's two minutes: a benchmark runs many iterations.
func benchCtx(b *testing.B) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	b.Cleanup(cancel)
	return ctx
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// BenchmarkMasqueradeAddDel: ADD+DEL of a masquerade VM NIC through libcni
// (ptp + host-local + vmnic), no guest. Reports the median. The network is
// IPv4-only: with IPv6 the primary plugin waits ~2 s for DAD to settle,
// which would bury vmnic's own share.
func BenchmarkMasqueradeAddDel(b *testing.B) {
	ctx := benchCtx(b)
	node, _ := newNode(b, true)
	l := list(b, node, harness.NetOptions{Vmnic: true, VM: vm1, Subnet6: "-"})
	pod := newPod(b, "virt-launcher-vm1-bench")
	var adds, dels, total []time.Duration
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
		t2 := time.Now()
		adds, dels, total = append(adds, t1.Sub(t0)), append(dels, t2.Sub(t1)), append(total, t2.Sub(t0))
	}
	b.ReportMetric(ms(median(adds)), "add-ms-median")
	b.ReportMetric(ms(median(dels)), "del-ms-median")
	b.ReportMetric(ms(median(total)), "adddel-ms-median")
}

// BenchmarkPassThroughOverhead: ADD+DEL of a non-VM pod with vmnic chained
// vs the same conflist without vmnic, interleaved in one run so both see the
// same machine. The goal is an overhead under 2 ms.
func BenchmarkPassThroughOverhead(b *testing.B) {
	ctx := benchCtx(b)
	node, _ := newNode(b, true)
	plain := list(b, node, harness.NetOptions{Name: "podnet", Subnet6: "-"})
	chained := list(b, node, harness.NetOptions{Name: "podnet", Vmnic: true, Subnet6: "-"})
	pod := newPod(b, "web-0")
	var without, with []time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		t0 := time.Now()
		if _, err := node.Add(ctx, plain, pod); err != nil {
			b.Fatal(err)
		}
		if err := node.Del(ctx, plain, pod); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		if _, err := node.Add(ctx, chained, pod); err != nil {
			b.Fatal(err)
		}
		if err := node.Del(ctx, chained, pod); err != nil {
			b.Fatal(err)
		}
		t2 := time.Now()
		without, with = append(without, t1.Sub(t0)), append(with, t2.Sub(t1))
	}
	b.ReportMetric(ms(median(without)), "without-ms-median")
	b.ReportMetric(ms(median(with)), "with-vmnic-ms-median")
	b.ReportMetric(ms(median(with)-median(without)), "overhead-ms")
}

// BenchmarkShimExec separates the pass-through's cost from the machine's
// process start cost: one exec of the shim answering a non-VM ADD, one exec
// of the reference loopback plugin answering VERSION, and one of /bin/true,
// interleaved.
func BenchmarkShimExec(b *testing.B) {
	bin, err := harness.BinDir()
	if err != nil {
		b.Fatal(err)
	}
	conf := []byte(`{"cniVersion":"1.0.0","name":"podnet","type":"vmnic","mode":"masquerade","prevResult":{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/var/run/netns/x"}],"ips":[{"address":"198.18.0.5/24","interface":0}]}}`)
	env := []string{
		"CNI_COMMAND=ADD", "CNI_CONTAINERID=c1", "CNI_NETNS=/proc/1/ns/net", "CNI_IFNAME=eth0", "CNI_PATH=" + bin,
		"CNI_ARGS=K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0",
	}
	run := func(path string, env []string, stdin []byte) time.Duration {
		cmd := exec.Command(path)
		cmd.Env = env
		cmd.Stdin = bytes.NewReader(stdin)
		t0 := time.Now()
		if out, err := cmd.CombinedOutput(); err != nil {
			b.Fatalf("%s: %v\n%s", path, err, out)
		}
		return time.Since(t0)
	}
	var shim, loop, truth []time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		shim = append(shim, run(filepath.Join(bin, "vmnic"), env, conf))
		loop = append(loop, run(filepath.Join(bin, "loopback"), []string{"CNI_COMMAND=VERSION"}, []byte(`{"cniVersion":"1.0.0"}`)))
		truth = append(truth, run("/bin/true", nil, nil))
	}
	b.ReportMetric(ms(median(shim)), "shim-passthrough-ms-median")
	b.ReportMetric(ms(median(loop)), "loopback-version-ms-median")
	b.ReportMetric(ms(median(truth)), "bin-true-ms-median")
}

// BenchmarkStatus: STATUS of the node's primary conflist, as containerd
// calls it on every CRI Status poll, interleaved in one run: the primary
// alone; with vmnic chained (masquerade) and vmnicd stopped, which must not
// wait for it; and a bridge-mode network, which asks vmnicd (running).
func BenchmarkStatus(b *testing.B) {
	ctx := benchCtx(b)
	n := newOVSNode(b)
	plain := list(b, n.Node, harness.NetOptions{Name: "podnet"})
	chained := list(b, n.Node, harness.NetOptions{Name: "podnet", Vmnic: true, Extra: map[string]any{
		// Another node's vmnicd, which is not running: STATUS must not
		// look for it.
		"socket": filepath.Join(n.Dir, "stopped", "vmnic.sock"),
	}})
	bridged := n.bridgeList(b, "ovs", map[string]any{"vlan": 100}, n.hostLocal("10.100.0.10", "10.100.0.50"))
	var alone, away, bridge []time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		for _, c := range []struct {
			l   *libcni.NetworkConfigList
			out *[]time.Duration
		}{{plain, &alone}, {chained, &away}, {bridged, &bridge}} {
			t0 := time.Now()
			if err := n.Status(ctx, c.l); err != nil {
				b.Fatalf("STATUS of %s: %v", c.l.Name, err)
			}
			*c.out = append(*c.out, time.Since(t0))
		}
	}
	b.ReportMetric(ms(median(alone)), "primary-ms-median")
	b.ReportMetric(ms(median(away)), "chained-vmnicd-away-ms-median")
	b.ReportMetric(ms(median(bridge)), "bridge-ms-median")
}
