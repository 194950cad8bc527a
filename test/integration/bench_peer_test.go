package integration

// Side by side with ovs-cni, the closest peer of bridge mode: both plugins
// run through libcni on the same userspace-datapath OVS (one ovsdb-server,
// one ovs-vswitchd) in the same node netns, arms interleaved, so both see
// the same machine. ovs-cni is built from its own module (test/tools/ovscni)
// by test/tools/build.sh, its netconf cache pointed into .tools/ovs-cni.
//
// How they differ in what an ADD waits for: vmnic returns once ovs-vswitchd
// has applied the port (the Interface row has its ofport); ovs-cni without
// IPAM returns after its OVSDB commit, and with IPAM polls the port's
// link_state every 600 ms until it is up.

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/version"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/vmnic/vmnic/daemon"
	"github.com/vmnic/vmnic/test/cluster"
	"github.com/vmnic/vmnic/test/harness"
)

// ovsCNIOwner is the owner ovs-cni writes into a port's external_ids.
const ovsCNIOwner = "ovs-cni.network.kubevirt.io"

// ovsCNI runs ovs-cni through libcni in an ovsNode's netns against its OVSDB.
type ovsCNI struct {
	n   *ovsNode
	cni *libcni.CNIConfig
}

func newOVSCNI(b testing.TB, n *ovsNode) *ovsCNI {
	b.Helper()
	bins, err := cluster.Binaries(context.Background(), "ovs-cni")
	if err != nil {
		b.Fatal(err)
	}
	dir := b.TempDir()
	// The runtime finds the plugin by its type: "ovs", as ovs-cni installs it.
	if err := os.Symlink(bins[0], filepath.Join(dir, "ovs")); err != nil {
		b.Fatal(err)
	}
	root, err := harness.RepoRoot()
	if err != nil {
		b.Fatal(err)
	}
	cache := filepath.Join(root, ".tools", "ovs-cni") // baked into the binary by build.sh
	_ = os.RemoveAll(cache)
	b.Cleanup(func() { _ = os.RemoveAll(cache) })
	// ovs-cni logs every OVSDB operation on stderr: keep it off the report.
	quiet := &invoke.DefaultExec{RawExec: &invoke.RawExec{Stderr: io.Discard}, PluginDecoder: version.PluginDecoder{}}
	return &ovsCNI{n: n, cni: libcni.NewCNIConfigWithCacheDir([]string{dir, n.BinDir}, filepath.Join(n.Dir, "ovs-cni-libcni-cache"), quiet)}
}

// list is an ovs-cni network on bridge (access port on VLAN 100), with ipam
// when it is not nil.
func (o *ovsCNI) list(b testing.TB, name, bridge string, ipam map[string]any) *libcni.NetworkConfigList {
	b.Helper()
	plugin := map[string]any{"type": "ovs", "bridge": bridge, "vlan": 100, "socket_file": o.n.sw.DB()}
	if ipam != nil {
		plugin["ipam"] = ipam
	}
	raw, err := json.Marshal(map[string]any{"cniVersion": "1.0.0", "name": name, "plugins": []any{plugin}})
	if err != nil {
		b.Fatal(err)
	}
	l, err := harness.List(raw)
	if err != nil {
		b.Fatal(err)
	}
	return l
}

func (o *ovsCNI) add(ctx context.Context, l *libcni.NetworkConfigList, p *harness.Pod) error {
	return o.n.In(func() error { _, err := o.cni.AddNetworkList(ctx, l, p.Runtime()); return err })
}

func (o *ovsCNI) del(ctx context.Context, l *libcni.NetworkConfigList, p *harness.Pod) error {
	return o.n.In(func() error { return o.cni.DelNetworkList(ctx, l, p.Runtime()) })
}

// ports lists the OVS ports ovs-cni owns.
func (o *ovsCNI) ports(b testing.TB) []string {
	b.Helper()
	out := o.n.vsctl(b, "--format=csv", "--no-headings", "--columns=name", "find", "port", "external_ids:owner="+ovsCNIOwner)
	if out == "" {
		return nil
	}
	return strings.Fields(strings.ReplaceAll(out, `"`, ""))
}

// nodeVeths counts the veth links in the node netns whose name starts with
// prefix: vmnic's host ends are "vmn…", ovs-cni's "veth…".
func (n *ovsNode) nodeVeths(b testing.TB, prefix string) int {
	b.Helper()
	count := 0
	err := n.NS.Do(func(ns.NetNS) error {
		links, err := netlink.LinkList()
		for _, l := range links {
			if l.Type() == "veth" && strings.HasPrefix(l.Attrs().Name, prefix) {
				count++
			}
		}
		return err
	})
	if err != nil {
		b.Fatal(err)
	}
	return count
}

func (n *ovsNode) addBridge(b testing.TB, name string) {
	b.Helper()
	if err := n.sw.AddBridge(name); err != nil {
		b.Fatal(err)
	}
}

// peerArm is one plugin configuration of a side-by-side run: a benchArm
// with its network and its pods.
type peerArm struct {
	benchArm
	list *libcni.NetworkConfigList
	pod  func(i int) *harness.Pod
}

// peerArms are the arms side by side: vmnic for an ordinary pod's port and
// for a VM NIC on vmnicBridge (host-local IPAM: bridge mode requires IPAM),
// and ovs-cni on peerBridge as KubeVirt's bridge binding uses it (no IPAM)
// and with the same host-local block.
func peerArms(b testing.TB, n *ovsNode, o *ovsCNI, vmnicBridge, peerBridge string) (vmnicPlain, vmnicVM, ovscni, ovscniHostLocal peerArm) {
	b.Helper()
	vmnic := n.bridgeList(b, "peer-vmnic", map[string]any{"vlan": 100, "bridge": vmnicBridge}, n.hostLocalOn("10.64.0.0/16", "10.64.0.1", "10.64.0.10", "10.64.3.250"))
	plain := o.list(b, "peer-ovscni", peerBridge, nil)
	ipam := o.list(b, "peer-ovscni-ipam", peerBridge, n.hostLocalOn("10.65.0.0/16", "10.65.0.1", "10.65.0.10", "10.65.3.250"))
	pod := func(prefix string) func(int) *harness.Pod {
		return func(i int) *harness.Pod {
			p := newPod(b, fmt.Sprintf("%s%d-x", prefix, i))
			p.IfName = "net1"
			return p
		}
	}
	ovs := func(name string, l *libcni.NetworkConfigList) benchArm {
		return benchArm{
			name: name,
			add:  func(ctx context.Context, p *harness.Pod) error { return o.add(ctx, l, p) },
			del:  func(ctx context.Context, p *harness.Pod) error { return o.del(ctx, l, p) },
		}
	}
	arm := listArm(n.Node, vmnic)
	arm.name = "vmnic-plain"
	vmnicPlain = peerArm{arm, vmnic, pod("web-peer")}
	arm.name = "vmnic-vm"
	vmnicVM = peerArm{arm, vmnic, pod("virt-launcher-peer")}
	return vmnicPlain, vmnicVM, peerArm{ovs("ovscni", plain), plain, pod("ovscni-peer")},
		peerArm{ovs("ovscni-hostlocal", ipam), ipam, pod("ovscni-ipam-peer")}
}

// BenchmarkPeerBridgeAddDel: ADD and DEL of one port on an empty bridge,
// vmnic against ovs-cni, the four arms of peerArms rotated every
// iteration. Reports each arm's medians and vmnic's ratios to ovs-cni's.
func BenchmarkPeerBridgeAddDel(b *testing.B) {
	n := newOVSNode(b)
	o := newOVSCNI(b, n)
	plain, vm, peer, peerHL := peerArms(b, n, o, "br1", "br1")
	peers := []peerArm{plain, vm, peer, peerHL}
	arms, pods := make([]benchArm, len(peers)), make([]*harness.Pod, len(peers))
	for j, a := range peers {
		arms[j], pods[j] = a.benchArm, a.pod(0)
	}
	b.ResetTimer()
	adds, dels := addDelArms(b, b.N, arms, pods)
	b.StopTimer()
	if left := append(n.vmnicPorts(b), o.ports(b)...); len(left) > 0 {
		b.Fatalf("ports left: %v", left)
	}
	add := map[string]time.Duration{}
	for j, a := range arms {
		add[a.name] = median(adds[j])
		b.ReportMetric(ms(add[a.name]), a.name+"-add-ms-median")
		b.ReportMetric(ms(median(dels[j])), a.name+"-del-ms-median")
	}
	for _, v := range []string{"vmnic-plain", "vmnic-vm"} {
		for _, p := range []string{"ovscni", "ovscni-hostlocal"} {
			b.ReportMetric(float64(add[v])/float64(add[p]), v+"/"+p+"-add")
		}
	}
}

// BenchmarkPeerScaleBridge: 250 ports one after the other for each plugin,
// interleaved, each on its own bridge of the same ovs-vswitchd (vmnic's
// ordinary pods' ports on br1, ovs-cni's on br2, so the 250th of each goes
// onto a bridge that has 249), like for like: a port and its veth.
// BenchmarkScaleBridge has vmnic's VM NICs at that scale. Reports the ratio
// of the last 25 ADDs to the first 25, then the ADD and DEL medians of a
// 250th port (15 rounds of ADD+DEL on the full bridges). Use -benchtime 1x.
func BenchmarkPeerScaleBridge(b *testing.B) {
	const count, window, rounds = 250, 25, 15
	ctx := benchCtx(b)
	applied := &applyLog{}
	n := newOVSNodeWith(b, func(c *daemon.Config) { c.Logger = slog.New(applied) })
	n.addBridge(b, "br2")
	o := newOVSCNI(b, n)
	vmnic, _, peer, _ := peerArms(b, n, o, "br1", "br2")
	arms := []peerArm{vmnic, peer}
	adds := make([][]time.Duration, len(arms))
	pods := make([][]*harness.Pod, len(arms))
	b.ResetTimer()
	for i := range count - 1 {
		for k := range arms {
			j := (i + k) % len(arms)
			p := arms[j].pod(i)
			t0 := time.Now()
			if err := arms[j].add(ctx, p); err != nil {
				b.Fatalf("%s ADD #%d: %v", arms[j].name, i+1, err)
			}
			adds[j], pods[j] = append(adds[j], time.Since(t0)), append(pods[j], p)
		}
	}
	// The 250th port, 15 rounds of ADD+DEL; the first round's ADD is the
	// 250th of the run.
	lastPods := make([]*harness.Pod, len(arms))
	for j, a := range arms {
		lastPods[j] = a.pod(count - 1)
	}
	add250, del250 := addDelArms(b, rounds, []benchArm{vmnic.benchArm, peer.benchArm}, lastPods)
	b.StopTimer()
	for j := range arms {
		adds[j] = append(adds[j], add250[j][0])
	}
	// vmnic's wait for ovs-vswitchd to apply each port, the first 250
	// ADDs' (ovs-cni does not wait).
	if w := applied.waits(); len(w) >= count {
		w0, w1 := median(w[:window]), median(w[count-window:count])
		b.ReportMetric(ms(w0), "vmnic-ovs-apply-first25-ms-median")
		b.ReportMetric(ms(w1), "vmnic-ovs-apply-last25-ms-median")
		b.ReportMetric(float64(median(adds[0][count-window:])-w1)/float64(median(adds[0][:window])-w0), "vmnic-last/first-without-ovs-apply")
	}
	for j, name := range []string{"vmnic", "ovscni"} {
		first, last := median(adds[j][:window]), median(adds[j][count-window:])
		b.ReportMetric(ms(first), name+"-add-first25-ms-median")
		b.ReportMetric(ms(last), name+"-add-last25-ms-median")
		b.ReportMetric(float64(last)/float64(first), name+"-last/first")
		b.ReportMetric(ms(median(add250[j])), name+"-add250-ms-median")
		b.ReportMetric(ms(median(del250[j])), name+"-del250-ms-median")
	}
	for j, a := range arms {
		for _, p := range pods[j] {
			if err := a.del(ctx, p); err != nil {
				b.Fatalf("%s DEL: %v", a.name, err)
			}
		}
	}
	if left := append(n.vmnicPorts(b), o.ports(b)...); len(left) > 0 {
		b.Fatalf("ports left after the DELs: %d", len(left))
	}
}

// untilAll runs f for every pod at once, then again at once for those that
// failed, until all have succeeded or retries are spent. It returns how
// many failed at their first try, and an error naming the last failure
// when some never succeeded. One first-try failure of each burst is logged
// (through b, so that it does not split the result line).
func untilAll(b *testing.B, pods []*harness.Pod, retries int, f func(*harness.Pod) error) (int, error) {
	pending, errs, _, _ := tryAll(pods, f)
	first := len(pending)
	if first > 0 {
		b.Logf("%d of %d failed at their first try, one with: %v", first, len(pods), errs[0])
	}
	for try := 0; len(pending) > 0; try++ {
		if try == retries {
			return first, fmt.Errorf("%d still failing after %d retries: %w", len(pending), retries, errs[0])
		}
		pending, errs, _, _ = tryAll(pending, f)
	}
	return first, nil
}

// BenchmarkPeerConcurrentAdd: 100 ADDs at once, then their 100 DELs, for
// vmnic (ordinary pods' ports and VM NICs, host-local) and for ovs-cni (no
// IPAM), one plugin at a time on the same bridge, the order rotated every
// iteration. An ADD (or DEL) that fails is retried at once with the others
// that failed, as a runtime would retry it (kubelet waits longer), until
// all 100 are done. Reports ADDs per second until all 100 are up (median
// over the iterations) and how many ADDs and DELs failed at their first try
// (summed).
func BenchmarkPeerConcurrentAdd(b *testing.B) {
	const burstSize, maxRetries = 100, 20
	ctx := benchCtx(b)
	n := newOVSNode(b)
	o := newOVSCNI(b, n)
	plain, vm, peer, _ := peerArms(b, n, o, "br1", "br1")
	arms := []peerArm{plain, vm, peer}
	pods := make([][]*harness.Pod, len(arms))
	for j, a := range arms {
		for i := range burstSize {
			pods[j] = append(pods[j], a.pod(1000+i))
		}
	}
	rate := map[string][]time.Duration{} // wall time until all 100 are up
	failedFirst := map[string]int{}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		for k := range arms {
			j := (i + k) % len(arms)
			a := arms[j]
			t0 := time.Now()
			failed, err := untilAll(b, pods[j], maxRetries, func(p *harness.Pod) error { return a.add(ctx, p) })
			if err != nil {
				b.Fatalf("%s ADD: %v", a.name, err)
			}
			rate[a.name] = append(rate[a.name], time.Since(t0))
			failedFirst[a.name+"-add"] += failed
			failed, err = untilAll(b, pods[j], maxRetries, func(p *harness.Pod) error { return a.del(ctx, p) })
			if err != nil {
				b.Fatalf("%s DEL: %v", a.name, err)
			}
			failedFirst[a.name+"-del"] += failed
			if left := append(n.vmnicPorts(b), o.ports(b)...); len(left) > 0 {
				b.Fatalf("%s: %d ports left after the DELs", a.name, len(left))
			}
		}
	}
	b.StopTimer()
	for _, a := range arms {
		b.ReportMetric(burstSize/median(rate[a.name]).Seconds(), a.name+"-ADD/s")
		b.ReportMetric(float64(failedFirst[a.name+"-add"]), a.name+"-add-failed-first-try")
		b.ReportMetric(float64(failedFirst[a.name+"-del"]), a.name+"-del-failed-first-try")
	}
	b.ReportMetric(float64(b.N*burstSize), "adds-per-arm")
}

// BenchmarkPeerKillMidAdd: what each plugin leaves behind when it is
// SIGKILLed in the middle of an ADD. Per arm, trials at delays spread over
// that arm's own ADD time: the plugin process is killed (libcni's exec
// context expiring, the way a runtime's timeout kills a plugin); for vmnic
// also the daemon (vmnicd as a process, SIGKILLed and restarted). Then the
// runtime's DEL; then, for vmnic, a CNI GC with no valid attachment (ovs-cni
// has no GC: the next ADD's clean-up of ports whose interface errs is what it
// has, counted after the sandbox is gone). Counts the OVS ports and node
// veths left, summed over the trials. Use -benchtime 1x.
func BenchmarkPeerKillMidAdd(b *testing.B) {
	const trials = 12
	ctx := benchCtx(b)
	n := newOVSNodeBare(b)
	bin, err := harness.BuildDaemon(b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	starts := 0
	start := func() *harness.DaemonProcess {
		starts++
		d, err := n.StartDaemonBinary(bin, fmt.Sprintf("vmnicd-%d.log", starts), "--metrics-addr=", "--ovsdb="+n.sw.DB())
		if err != nil {
			b.Fatal(err)
		}
		return d
	}
	d := start()
	b.Cleanup(func() { _ = d.Stop() })
	o := newOVSCNI(b, n)
	_, vm, peer, _ := peerArms(b, n, o, "br1", "br1")
	seq := 0
	newP := func(a peerArm) *harness.Pod { seq++; return a.pod(seq) }
	// traces are what an arm's plugin has on the node now: its OVS ports,
	// its node-side veths and, for vmnic, its host-local addresses.
	traces := func(a peerArm) [3]int {
		if a.name == vm.name {
			return [3]int{len(n.vmnicPorts(b)), n.nodeVeths(b, "vmn"), len(n.allocated(b, vm.list.Name))}
		}
		return [3]int{len(o.ports(b)), n.nodeVeths(b, "veth"), 0}
	}
	// typical ADD time of each arm, to spread the kill delays over; each
	// ADD must show as one port and one veth more (the counts can see).
	typical := func(a peerArm) time.Duration {
		var t []time.Duration
		for range 5 {
			before := traces(a)
			p := newP(a)
			t0 := time.Now()
			if err := a.add(ctx, p); err != nil {
				b.Fatal(err)
			}
			t = append(t, time.Since(t0))
			if now := traces(a); now[0] != before[0]+1 || now[1] != before[1]+1 {
				b.Fatalf("%s: an ADD shows as ports %d→%d, veths %d→%d", a.name, before[0], now[0], before[1], now[1])
			}
			if err := a.del(ctx, p); err != nil {
				b.Fatal(err)
			}
		}
		return median(t)
	}
	vmT, peerT := typical(vm), typical(peer)
	rng := rand.New(rand.NewPCG(1, 2))
	delay := func(typ time.Duration) time.Duration { return time.Duration(rng.Int64N(int64(typ))) + time.Millisecond }
	// Every count is reported, zero too.
	left := map[string]int{"vmnic-shim-killed-adds": 0, "vmnic-daemon-killed-adds-failed": 0, "ovscni-killed-adds": 0}
	// count adds what appeared since before (the trial's start) under key.
	count := func(key string, a peerArm, before [3]int) {
		now := traces(a)
		left[key+"-ports"] += now[0] - before[0]
		left[key+"-veths"] += now[1] - before[1]
		if a.name == vm.name {
			left[key+"-ips"] += now[2] - before[2]
		}
	}
	// killedAdd runs a's ADD of a new pod with a deadline inside its
	// typical time (libcni SIGKILLs the plugin when it passes), counts it
	// under key when the kill cut it short, then runs the runtime's DEL.
	killedAdd := func(a peerArm, typ time.Duration, key string) *harness.Pod {
		p := newP(a)
		c, cancel := context.WithTimeout(ctx, delay(typ))
		if a.add(c, p) != nil {
			left[key]++
		}
		cancel()
		if err := a.del(ctx, p); err != nil {
			b.Fatalf("%s DEL after a kill: %v", a.name, err)
		}
		return p
	}
	gc := func() {
		if err := n.GC(ctx, vm.list, nil); err != nil {
			b.Fatalf("GC: %v", err)
		}
	}
	b.ResetTimer()
	for range trials {
		// vmnic: the shim killed mid-ADD; the daemon goes on.
		before := traces(vm)
		killedAdd(vm, vmT, "vmnic-shim-killed-adds")
		count("vmnic-shim-killed-after-del", vm, before)
		gc()
		count("vmnic-shim-killed-after-gc", vm, before)

		// vmnic: vmnicd killed mid-ADD and restarted; the shim's ADD
		// fails or reaches the new daemon.
		before = traces(vm)
		p := newP(vm)
		added := make(chan error, 1)
		go func() { added <- vm.add(ctx, p) }()
		time.Sleep(delay(vmT))
		d.Kill()
		<-d.Done()
		d = start()
		if <-added != nil {
			left["vmnic-daemon-killed-adds-failed"]++
		}
		if err := vm.del(ctx, p); err != nil {
			b.Fatalf("vmnic DEL after a killed vmnicd: %v", err)
		}
		count("vmnic-daemon-killed-after-del", vm, before)
		gc()
		count("vmnic-daemon-killed-after-gc", vm, before)

		// ovs-cni killed mid-ADD.
		before = traces(peer)
		p = killedAdd(peer, peerT, "ovscni-killed-adds")
		count("ovscni-killed-after-del", peer, before)
		p.Close() // the sandbox goes, and its veth pair with it
		q := newP(peer)
		if err := peer.add(ctx, q); err != nil {
			b.Fatalf("ovs-cni ADD after a kill: %v", err)
		}
		if err := peer.del(ctx, q); err != nil {
			b.Fatal(err)
		}
		count("ovscni-killed-after-next-add", peer, before)
		// Clean up by hand so that the next trial starts from nothing.
		for _, port := range o.ports(b) {
			n.vsctl(b, "del-port", port)
		}
	}
	b.StopTimer()
	b.ReportMetric(trials, "trials-per-arm")
	for k, v := range left {
		b.ReportMetric(float64(v), k)
	}
}
