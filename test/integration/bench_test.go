package integration

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
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

// benchArm is one plugin configuration of an interleaved benchmark.
type benchArm struct {
	name     string
	add, del func(context.Context, *harness.Pod) error
}

// listArm runs a network list on node.
func listArm(node *harness.Node, l *libcni.NetworkConfigList) benchArm {
	return benchArm{
		name: l.Name,
		add:  func(ctx context.Context, p *harness.Pod) error { _, err := node.Add(ctx, l, p); return err },
		del:  func(ctx context.Context, p *harness.Pod) error { return node.Del(ctx, l, p) },
	}
}

// addDelArms runs, iterations times, ADD then DEL of pods[j] on arms[j],
// the arms' order rotated every iteration, and returns each arm's ADD and
// DEL latencies (index i of both is the same iteration).
func addDelArms(b *testing.B, iterations int, arms []benchArm, pods []*harness.Pod) (adds, dels [][]time.Duration) {
	b.Helper()
	ctx := benchCtx(b)
	adds, dels = make([][]time.Duration, len(arms)), make([][]time.Duration, len(arms))
	for i := range iterations {
		for k := range arms {
			j := (i + k) % len(arms)
			t0 := time.Now()
			if err := arms[j].add(ctx, pods[j]); err != nil {
				b.Fatalf("%s ADD: %v", arms[j].name, err)
			}
			t1 := time.Now()
			if err := arms[j].del(ctx, pods[j]); err != nil {
				b.Fatalf("%s DEL: %v", arms[j].name, err)
			}
			adds[j], dels[j] = append(adds[j], t1.Sub(t0)), append(dels[j], time.Since(t1))
		}
	}
	return adds, dels
}

// BenchmarkMasqueradeAddDel: ADD+DEL of a masquerade VM NIC through libcni
// (ptp + host-local + vmnic), no guest, interleaved with the same primary
// alone (the pod's network without vmnic). Reports the medians. The network is
// IPv4-only: with IPv6 the primary plugin waits ~2 s for DAD to settle,
// which would bury vmnic's own share.
func BenchmarkMasqueradeAddDel(b *testing.B) {
	node, _ := newNode(b, true)
	vmnic := list(b, node, harness.NetOptions{Vmnic: true, VM: vm1, Subnet6: "-"})
	primary := list(b, node, harness.NetOptions{Subnet6: "-"})
	pod := newPod(b, "virt-launcher-vm1-bench")
	b.ResetTimer()
	adds, dels := addDelArms(b, b.N, []benchArm{listArm(node, vmnic), listArm(node, primary)}, []*harness.Pod{pod, pod})
	b.ReportMetric(ms(median(adds[0])), "add-ms-median")
	b.ReportMetric(ms(median(dels[0])), "del-ms-median")
	b.ReportMetric(ms(median(adds[1])), "primary-add-ms-median")
	b.ReportMetric(ms(median(dels[1])), "primary-del-ms-median")
}

// BenchmarkPassThroughOverhead: ADD+DEL of a non-VM pod with vmnic chained
// vs the same conflist without vmnic, interleaved in one run so both see the
// same machine. The goal is an overhead under 2 ms.
func BenchmarkPassThroughOverhead(b *testing.B) {
	node, _ := newNode(b, true)
	plain := list(b, node, harness.NetOptions{Name: "podnet", Subnet6: "-"})
	chained := list(b, node, harness.NetOptions{Name: "podnet", Vmnic: true, Subnet6: "-"})
	pod := newPod(b, "web-0")
	b.ResetTimer()
	adds, dels := addDelArms(b, b.N, []benchArm{listArm(node, plain), listArm(node, chained)}, []*harness.Pod{pod, pod})
	total := func(j int) []time.Duration {
		d := make([]time.Duration, len(adds[j]))
		for i := range d {
			d[i] = adds[j][i] + dels[j][i]
		}
		return d
	}
	without, with := median(total(0)), median(total(1))
	b.ReportMetric(ms(without), "without-ms-median")
	b.ReportMetric(ms(with), "with-vmnic-ms-median")
	b.ReportMetric(ms(with-without), "overhead-ms")
}

// floorPrograms are the Go programs the shim's exec is measured against,
// each built as a main package of this module that exists only in a build
// overlay: "minimal" prints {} (the floor of any Go binary); "linked" is
// that with the shim's packages linked in and never called (what the
// shim's imports cost, their init and its size, before any work); "json"
// reads its stdin, decodes it with encoding/json and prints its prevResult
// (the floor of a Go plugin that parses its config).
var floorPrograms = map[string]string{
	"minimal": `package main

import "os"

func main() { _, _ = os.Stdout.Write([]byte("{}")) }
`,
	"linked": `package main

import (
	"os"

	_ "github.com/vmnic/vmnic/pkg/shim"
)

func main() { _, _ = os.Stdout.Write([]byte("{}")) }
`,
	"json": `package main

import (
	"encoding/json"
	"io"
	"os"
)

func main() {
	b, _ := io.ReadAll(os.Stdin)
	var m map[string]json.RawMessage
	if json.Unmarshal(b, &m) != nil {
		os.Exit(1)
	}
	_, _ = os.Stdout.Write(m["prevResult"])
}
`,
}

// releaseBuild builds pkg of the module in root as make build and the
// image build the shim: static, -trimpath, -s -w; extra flags (an
// -overlay) go first.
func releaseBuild(b *testing.B, root, out, pkg string, extra ...string) {
	b.Helper()
	args := append([]string{"build"}, extra...)
	cmd := exec.Command("go", append(args, "-trimpath", "-ldflags", "-s -w", "-o", out, pkg)...)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if o, err := cmd.CombinedOutput(); err != nil {
		b.Fatalf("go build %s: %v\n%s", pkg, err, o)
	}
}

// buildFloors builds floorPrograms into dir, by name.
func buildFloors(b *testing.B, root, dir string) map[string]string {
	b.Helper()
	replace := map[string]string{}
	for name, src := range floorPrograms {
		file := filepath.Join(dir, name+".go")
		if err := os.WriteFile(file, []byte(src), 0o644); err != nil {
			b.Fatal(err)
		}
		replace[filepath.Join(root, "cmd", "vmnic-floor-"+name, "main.go")] = file
	}
	overlay, err := json.Marshal(map[string]any{"Replace": replace})
	if err != nil {
		b.Fatal(err)
	}
	overlayFile := filepath.Join(dir, "overlay.json")
	if err := os.WriteFile(overlayFile, overlay, 0o644); err != nil {
		b.Fatal(err)
	}
	floors := map[string]string{}
	for name := range floorPrograms {
		floors[name] = filepath.Join(dir, name)
		releaseBuild(b, root, floors[name], "./cmd/vmnic-floor-"+name, "-overlay", overlayFile)
	}
	return floors
}

// BenchmarkShimExec separates the pass-through's cost from the machine's
// process start cost: one exec of the shim as released (make build's flags)
// answering a non-VM ADD, of each floor program, of the reference loopback
// plugin answering VERSION, and of /bin/true, interleaved, each with the
// same environment and stdin. The goal is the shim ≤ 1.1x the minimal Go
// binary.
func BenchmarkShimExec(b *testing.B) {
	bin, err := harness.BinDir()
	if err != nil {
		b.Fatal(err)
	}
	root, err := harness.RepoRoot()
	if err != nil {
		b.Fatal(err)
	}
	dir := b.TempDir()
	shimBin := filepath.Join(dir, "vmnic")
	releaseBuild(b, root, shimBin, "./cmd/vmnic")
	floors := buildFloors(b, root, dir)
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
	var shim, minimal, decode, linked, loop, truth []time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		shim = append(shim, run(shimBin, env, conf))
		minimal = append(minimal, run(floors["minimal"], env, conf))
		decode = append(decode, run(floors["json"], env, conf))
		linked = append(linked, run(floors["linked"], env, conf))
		loop = append(loop, run(filepath.Join(bin, "loopback"), []string{"CNI_COMMAND=VERSION"}, []byte(`{"cniVersion":"1.0.0"}`)))
		truth = append(truth, run("/bin/true", env, conf))
	}
	b.ReportMetric(ms(median(shim)), "shim-passthrough-ms-median")
	b.ReportMetric(ms(median(minimal)), "go-minimal-ms-median")
	b.ReportMetric(ms(median(decode)), "go-json-ms-median")
	b.ReportMetric(float64(median(shim))/float64(median(minimal)), "shim/go-minimal")
	b.ReportMetric(float64(median(decode))/float64(median(minimal)), "go-json/go-minimal")
	b.ReportMetric(ms(median(linked)), "go-linked-ms-median")
	b.ReportMetric(float64(median(linked))/float64(median(minimal)), "go-linked/go-minimal")
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
