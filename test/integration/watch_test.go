package integration

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/vmnic/vmnic/pkg/ctl"
	"github.com/vmnic/vmnic/pkg/kubevirt"
	"github.com/vmnic/vmnic/pkg/state"
	"github.com/vmnic/vmnic/test/cluster"
	"github.com/vmnic/vmnic/test/harness"
)

// vmnicdWatches are the watches vmnicd opens, by resource: the pods of its
// node, and the VMIs on its node and those migrating to it. No VMIMs.
var vmnicdWatches = map[string]int{"pods": 1, "virtualmachineinstances": 2}

// watchedResources are what vmnicd lists and watches.
var watchedResources = slices.Sorted(maps.Keys(vmnicdWatches))

// apiWatches is the API server's own count of the watches open on each
// resource vmnicd watches.
func apiWatches(ctx context.Context, t *testing.T, c *cluster.Cluster) map[string]int {
	t.Helper()
	counts, err := c.WatchCounts(ctx, watchedResources...)
	if err != nil {
		t.Fatal(err)
	}
	return counts
}

// waitWatches waits up to timeout until vmnicd p says each of its three
// watches is open and the API server counts, on every resource vmnicd
// watches, at least vmnicd's more than base (the count without vmnicd)
// and at least atLeast's. It returns the API server's counts. Which of them are
// vmnicd's shows when it stops (wantWatchesGone).
func waitWatches(ctx context.Context, t *testing.T, c *cluster.Cluster, p *harness.DaemonProcess, base, atLeast map[string]int, timeout time.Duration, when string) map[string]int {
	t.Helper()
	var got map[string]int
	var open []string
	for deadline := time.Now().Add(timeout); ; time.Sleep(500 * time.Millisecond) {
		got, open = apiWatches(ctx, t, c), nil
		sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		st, err := p.Status(sctx)
		cancel()
		if err != nil {
			t.Fatalf("%s: vmnicd status: %v", when, err)
		}
		for _, w := range st.Watches {
			if w.Watching {
				open = append(open, w.Resource)
			}
		}
		ok := len(open) == 3
		for _, r := range watchedResources {
			ok = ok && got[r] >= base[r]+vmnicdWatches[r] && got[r] >= atLeast[r]
		}
		if ok {
			t.Logf("%s: the API server counts watches %v (%v before vmnicd)", when, got, base)
			return got
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: the API server counts watches %v, %v before vmnicd started; vmnicd says open: %v", when, got, base, open)
		}
	}
}

// wantWatchesGone checks, once vmnicd has stopped, that the API server
// counts fewer watches on each resource than with it (with): those were
// vmnicd's.
func wantWatchesGone(ctx context.Context, t *testing.T, c *cluster.Cluster, with map[string]int) {
	t.Helper()
	gone, err := c.WaitFewerWatches(ctx, with, watchedResources, 10*time.Second)
	if err != nil {
		t.Fatalf("vmnicd stopped: %v: they were not vmnicd's", err)
	}
	t.Logf("vmnicd stopped: the API server counts watches %v (with it %v)", gone, with)
}

// within polls cond every 20 ms for up to d and returns how long it took
// to hold; it fails the test if it never did.
func within(t *testing.T, d time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for {
		if cond() {
			took := time.Since(start)
			t.Logf("%s after %s", what, took.Round(time.Millisecond))
			return took
		}
		if time.Since(start) > d {
			t.Fatalf("not within %s: %s", d, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// recordPhase is the migration phase vmnicd recorded for p's attachment.
func recordPhase(t *testing.T, n *ovsNode, p *harness.Pod) string {
	t.Helper()
	st, err := state.Open(filepath.Join(n.StateDir(), "attachments"))
	if err != nil {
		t.Fatal(err)
	}
	rec, err := st.Get(state.Key(p.ContainerID, p.IfName))
	if err != nil || rec.Migration == nil {
		return ""
	}
	return rec.Migration.Phase
}

// readyz is vmnicd's readiness probe: the status code and the body.
func readyz(t *testing.T, p *harness.DaemonProcess) (int, string) {
	t.Helper()
	return vmnicdHTTP(t, p, "/readyz")
}

// vmnicdHTTP GETs path from vmnicd's metrics endpoint.
func vmnicdHTTP(t *testing.T, p *harness.DaemonProcess, path string) (int, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	st, err := p.Status(ctx)
	if err != nil || st.MetricsAddr == "" {
		t.Fatalf("vmnicd status (for its metrics address): %v %+v", err, st)
	}
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+st.MetricsAddr+path, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = resp.Body.Close() }()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// migrate starts a migration of a new VM: its VMI (made after vmnicd is
// ready), the source wired, the VMIM and the target wired held. Each ADD
// waits up to addWait for Spiderpool's agent to see the pod.
func (b *migrationBed) migrate(t *testing.T, name string, addWait time.Duration) (vmi *kubevirtv1.VirtualMachineInstance, m *kubevirtv1.VirtualMachineInstanceMigration, src, dst *harness.Pod) {
	t.Helper()
	return b.migrateVMI(t, createBridgeVMI(b.ctx, t, b.c, name), addWait)
}

// migrateVMI is migrate of a VMI that exists already.
func (b *migrationBed) migrateVMI(t *testing.T, vmi *kubevirtv1.VirtualMachineInstance, addWait time.Duration) (_ *kubevirtv1.VirtualMachineInstance, m *kubevirtv1.VirtualMachineInstanceMigration, src, dst *harness.Pod) {
	t.Helper()
	name := vmi.Name
	src = launcher(b.ctx, t, b.kube, vmi, "virt-launcher-"+name+"-src")
	addRetryFor(b.ctx, t, b.n.Node, b.l, src, addWait)
	m = b.createVMIM(t, "mig-"+name, vmi.Name)
	dst = b.targetPod(t, vmi, m, "virt-launcher-"+name+"-dst")
	addRetryFor(b.ctx, t, b.n.Node, b.l, dst, addWait)
	if !held(t, dst) || held(t, src) {
		t.Fatalf("%s after the target's ADD: target held %v, source held %v; want true, false", name, held(t, dst), held(t, src))
	}
	return vmi, m, src, dst
}

// TestVmnicdWatches runs the vmnicd binary against a real API server and
// judges its watches by the API server's own count and by what vmnicd
// does: changes made after it is ready reach it within 2 s (a VMI that
// existed before it started and moved to another node, out of its
// watches; a VMI made after, migrated through KubeVirt's steps to
// Succeeded; two to Failed, one of them of a VM that existed before
// vmnicd started); 30 s after ready its three watches
// are open; the API server killed for 20 s makes its readiness fail
// naming the watch down, and once the API server is back the watches are
// open again and a migration made then is still released.
func TestVmnicdWatches(t *testing.T) {
	b, pluginDir := newMigrationBedNoDaemon(t, 6*time.Minute)
	ctx := b.ctx
	// Before vmnicd starts: a VM and its launcher pod, and a VM whose
	// migration will fail.
	old := createBridgeVMI(ctx, t, b.c, "vm-old")
	oldSrc := launcher(ctx, t, b.kube, old, "virt-launcher-vm-old-src")
	oldFail := createBridgeVMI(ctx, t, b.c, "vm-oldfail")
	base := apiWatches(ctx, t, b.c)
	b.startNode(t, pluginDir, "--watch-down-threshold", "10s")
	ready := time.Now()

	// The VMI that existed before vmnicd started changes after it is
	// ready: its VM moved to another node, in the one update by which
	// KubeVirt marks the migration completed and labels the VMI with the
	// new node. The VMI leaves this node's watches, which never show it
	// completed: vmnicd reads it once and silences the source.
	addRetry(ctx, t, b.n.Node, b.l, oldSrc)
	if held(t, oldSrc) {
		t.Fatal("vm-old's pod held before its VM moved")
	}
	now := metav1.Now()
	b.updateVMI(t, old.Name, func(v *kubevirtv1.VirtualMachineInstance) {
		v.Status.MigrationState = &kubevirtv1.VirtualMachineInstanceMigrationState{
			MigrationUID: "mig-old-uid", SourceNode: testNode, TargetNode: "node-elsewhere",
			SourcePod: oldSrc.Name, TargetPod: "virt-launcher-vm-old-elsewhere",
			StartTimestamp: &now, EndTimestamp: &now, Completed: true,
		}
		v.Labels[kubevirtv1.NodeNameLabel] = "node-elsewhere"
		v.Status.NodeName = "node-elsewhere"
	})
	within(t, 2*time.Second, "vm-old (made before vmnicd started, changed after) moved to another node: its source silenced", func() bool { return held(t, oldSrc) })

	// A VMI made after ready, migrated through KubeVirt's steps: the
	// target stays held while the VM moves; the completion releases it
	// and silences the source.
	vmi, m, src, dst := b.migrate(t, "vm-new", 10*time.Second)
	b.step(t, m, vmi, src, dst, "Running")
	time.Sleep(300 * time.Millisecond)
	if !held(t, dst) || held(t, src) {
		t.Fatalf("vm-new while its VM moves: target held %v, source held %v; want true, false", held(t, dst), held(t, src))
	}
	b.step(t, m, vmi, src, dst, "Succeeded")
	within(t, 2*time.Second, "vm-new (made after ready) migrated: its target released and its source silenced", func() bool { return !held(t, dst) && held(t, src) })

	// Migrations that fail, of a VM made after ready and of one that
	// existed before vmnicd started: the target stays held, the failure is
	// recorded, the source is untouched.
	vmiF, mf, srcF, dstF := b.migrate(t, "vm-fail", 10*time.Second)
	_, mo, srcO, dstO := b.migrateVMI(t, oldFail, 10*time.Second)
	b.finish(t, mf, vmiF, srcF, dstF, true)
	b.finish(t, mo, oldFail, srcO, dstO, true)
	within(t, 2*time.Second, "migrations failed: the targets of vm-fail and vm-oldfail recorded failed", func() bool {
		return recordPhase(t, b.n, dstF) == "Failed" && recordPhase(t, b.n, dstO) == "Failed"
	})
	for _, p := range [][2]*harness.Pod{{srcF, dstF}, {srcO, dstO}} {
		if !held(t, p[1]) || held(t, p[0]) {
			t.Errorf("after a failed migration of %s: target held %v, source held %v; want true, false", p[0].Name, held(t, p[1]), held(t, p[0]))
		}
	}

	// 30 s after ready, by the API server's count.
	time.Sleep(time.Until(ready.Add(30 * time.Second)))
	during := waitWatches(ctx, t, b.c, b.n.p, base, nil, 0, "30 s after ready")
	if code, body := readyz(t, b.n.p); code != http.StatusOK {
		t.Fatalf("/readyz with the API server up: %d %s", code, body)
	}
	// vmnicd counts what it asks of the API server, and says so too.
	_, metrics := vmnicdHTTP(t, b.n.p, "/metrics")
	var calls []string
	for l := range strings.Lines(metrics) {
		if strings.HasPrefix(l, "vmnic_kube_api_requests_total{") {
			calls = append(calls, strings.TrimSpace(strings.TrimPrefix(l, "vmnic_kube_api_requests_total")))
		}
	}
	for _, r := range watchedResources {
		if !strings.Contains(metrics, `vmnic_kube_api_requests_total{code="2xx",resource="`+r+`",verb="watch"}`) {
			t.Errorf("vmnicd counts no watch on %s:\n%s", r, strings.Join(calls, "\n"))
		}
	}
	t.Logf("vmnicd's API requests in its first 30 s: %s", strings.Join(calls, ", "))

	// The API server goes away for 20 s: past the threshold (10 s here)
	// readiness fails and names the watch; status says degraded.
	restarted := make(chan error, 1)
	killed := time.Now()
	go func() { restarted <- b.c.RestartAPIServer(ctx, 20*time.Second) }()
	var body string
	within(t, 18*time.Second, "/readyz failing with the API server down", func() bool {
		var code int
		code, body = readyz(t, b.n.p)
		return code == http.StatusServiceUnavailable
	})
	if failed := time.Since(killed); failed < 10*time.Second || !strings.Contains(body, "watch on ") || !strings.Contains(body, "down for") {
		t.Errorf("/readyz %s after the API server went: %q; want a watch named as down past 10s", failed.Round(time.Millisecond), body)
	}
	sctx, scancel := context.WithTimeout(ctx, 5*time.Second)
	st, err := b.n.p.Status(sctx)
	scancel()
	if err != nil || !st.Ready || len(st.Watches) != 3 {
		t.Fatalf("status with the API server down: %+v %v", st, err)
	}
	stale := 0
	for _, w := range st.Watches {
		if w.Stale && !w.Watching && w.Synced {
			stale++
		}
	}
	if stale == 0 {
		t.Errorf("status with the API server down %s: no watch reported stale: %+v", time.Since(killed).Round(time.Second), st.Watches)
	}
	code, out := vmnicctl(t, "vmnicctl", "status", "--socket", b.n.Socket())
	if code != ctl.ExitDegraded || !strings.Contains(out, "degraded") || !strings.Contains(out, "DOWN for") {
		t.Errorf("vmnicctl status with the API server down: exit %d\n%s", code, out)
	}
	if err := <-restarted; err != nil {
		t.Fatal(err)
	}
	back := time.Now()
	// client-go's reflector retries with a jittered backoff of up to 60 s;
	// every watcher (vmnicd's and the Spiderpool agent's) back is as many
	// as before the restart.
	again := waitWatches(ctx, t, b.c, b.n.p, base, during, 100*time.Second, "after the API server's restart")
	t.Logf("every watch (vmnicd's and the agent's) open again %s after the API server came back", time.Since(back).Round(time.Millisecond))
	within(t, 30*time.Second, "/readyz ok again", func() bool {
		code, _ := readyz(t, b.n.p)
		return code == http.StatusOK
	})

	// A migration made after the restart is still released. (Spiderpool's
	// agent, behind the same backoff, may take a while to see its pods.)
	vmiR, mr, srcR, dstR := b.migrate(t, "vm-after", 90*time.Second)
	b.finish(t, mr, vmiR, srcR, dstR, false)
	within(t, 2*time.Second, "a migration completed after the API server's restart: the target released", func() bool { return !held(t, dstR) })

	// Those watches were vmnicd's: they go with it.
	if err := b.n.stop(); err != nil {
		t.Fatal(err)
	}
	wantWatchesGone(ctx, t, b.c, again)
}

// TestVmnicdBeforeKubeVirt: vmnicd started before KubeVirt is installed
// (no VMI resource yet) is not ready and says why, one log line
// per wait, naming what it waits for; it does not exit; once KubeVirt's
// CRDs are there it becomes ready by itself, with its watches open.
func TestVmnicdBeforeKubeVirt(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	c := cluster.StartT(t)
	node, _ := newNode(t, false)
	node.DaemonInHostNetns = true
	p, err := node.StartDaemonProcess(append(clusterFlags(c, testNode), "--sync-timeout", "3s")...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.Stop() })
	time.Sleep(8 * time.Second)
	select {
	case <-p.Done():
		t.Fatalf("vmnicd exited while the caches could not sync: %v\n%s", p.Err(), tail(p.Log))
	default:
	}
	if _, err := p.Status(ctx); !errors.Is(err, ctl.ErrStarting) {
		t.Fatalf("status before KubeVirt is installed: %v, want starting", err)
	}
	log, _ := os.ReadFile(p.Log)
	var waits []string
	for l := range strings.Lines(string(log)) {
		if strings.Contains(l, "caches did not sync") {
			waits = append(waits, l)
		}
	}
	if len(waits) < 2 || !strings.Contains(waits[0], "virtualmachineinstances kubevirt.io/nodeName="+testNode+" (list: ") || strings.Contains(waits[0], "pods") {
		t.Fatalf("want a log line per 3 s wait naming the VMI list's error (and not pods, which synced); got %d:\n%s", len(waits), strings.Join(waits, ""))
	}
	t.Logf("%d waits logged, the first: %s", len(waits), strings.TrimSpace(waits[0]))

	if err := c.InstallKubeVirtCRDs(ctx); err != nil {
		t.Fatal(err)
	}
	installed := time.Now()
	// The reflector retries its list with a jittered backoff of up to 60 s.
	if err := p.WaitReady(90 * time.Second); err != nil {
		t.Fatal(err)
	}
	t.Logf("ready %s after KubeVirt's CRDs were installed", time.Since(installed).Round(time.Millisecond))
	with := waitWatches(ctx, t, c, p, map[string]int{}, nil, 10*time.Second, "once ready")
	if err := p.Stop(); err != nil {
		t.Fatal(err)
	}
	wantWatchesGone(ctx, t, c, with)
}

func tail(path string) string {
	b, _ := os.ReadFile(path)
	if len(b) > 4000 {
		b = b[len(b)-4000:]
	}
	return string(b)
}

// vmnicdCounters are what vmnicd p says it received from the API server
// and asked of it.
func vmnicdCounters(t *testing.T, p *harness.DaemonProcess) harness.APICounters {
	t.Helper()
	_, metrics := vmnicdHTTP(t, p, "/metrics")
	return harness.ParseAPICounters(metrics)
}

// TestVmnicdNodeScoped: what vmnicd receives from the API server, and
// what it asks of it, does not grow with the rest of the cluster. 200
// VMIs and their launcher pods on ten other nodes, each migrated between
// them (KubeVirt's labels and migration state), reach it not at all and
// cost it no request; the VMIs and pods of its own node reach it, the
// VMIs migrating to it too.
func TestVmnicdNodeScoped(t *testing.T) {
	ctx, c, kube := kubeVirtCluster(t)
	kv, err := kubevirt.KubeVirtClient(c.Config)
	if err != nil {
		t.Fatal(err)
	}
	node, err := harness.NewNode(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(node.Close)
	p := startClusterVmnicd(t, node, c, testNode)
	before := vmnicdCounters(t, p)

	patchVMI := func(name, patch string) {
		t.Helper()
		if err := kv.Patch(types.MergePatchType).Namespace("default").Resource("virtualmachineinstances").Name(name).Body([]byte(patch)).Do(ctx).Error(); err != nil {
			t.Fatalf("patch VMI %s: %v", name, err)
		}
	}
	// The rest of the cluster: VMIs scheduled on other nodes, each
	// migrated to the next one.
	const elsewhere = 200
	for i := range elsewhere {
		name := fmt.Sprintf("vm-other-%03d", i)
		from, to := fmt.Sprintf("node-o%d", i%10), fmt.Sprintf("node-o%d", (i+1)%10)
		vmi := createVMI(ctx, t, c, name, kubevirt.DefaultBinding)
		createLauncherPodOn(ctx, t, kube, vmi, "virt-launcher-"+name, from)
		patchVMI(name, fmt.Sprintf(`{"metadata":{"labels":{%q:%q}},"status":{"nodeName":%q}}`, kubevirtv1.NodeNameLabel, from, from))
		patchVMI(name, fmt.Sprintf(`{"metadata":{"labels":{%q:%q}},"status":{"migrationState":{"migrationUid":"m-%d","sourceNode":%q,"targetNode":%q}}}`,
			kubevirtv1.MigrationTargetNodeNameLabel, to, i, from, to))
		patchVMI(name, fmt.Sprintf(`{"metadata":{"labels":{%q:%q,%q:null}},"status":{"nodeName":%q,"migrationState":{"completed":true}}}`,
			kubevirtv1.NodeNameLabel, to, kubevirtv1.MigrationTargetNodeNameLabel, to))
	}
	time.Sleep(2 * time.Second)
	after := vmnicdCounters(t, p)
	for sel, n := range after.BySelector {
		if n != before.BySelector[sel] {
			t.Errorf("vmnicd's informer %s received %v objects of other nodes' VMIs and pods (%v before)", sel, n, before.BySelector[sel])
		}
	}
	if after.Requests != before.Requests {
		t.Errorf("vmnicd made %v API requests while %d VMIs elsewhere started and migrated (%v before)", after.Requests-before.Requests, elsewhere, before.Requests)
	}
	t.Logf("%d VMIs and pods on other nodes, %d changes: vmnicd received %v objects, made %v requests before and after", elsewhere, 4*elsewhere, after.BySelector, after.Requests)

	// Its own node: 5 VMIs with their pods, and one VMI migrating here.
	for i := range 5 {
		name := fmt.Sprintf("vm-here-%d", i)
		vmi := createVMI(ctx, t, c, name, kubevirt.DefaultBinding)
		createLauncherPod(ctx, t, kube, vmi, "virt-launcher-"+name)
		patchVMI(name, fmt.Sprintf(`{"metadata":{"labels":{%q:%q}}}`, kubevirtv1.NodeNameLabel, testNode))
	}
	patchVMI("vm-other-000", fmt.Sprintf(`{"metadata":{"labels":{%q:%q}}}`, kubevirtv1.MigrationTargetNodeNameLabel, testNode))
	onNode, incoming := kubevirtv1.NodeNameLabel+"="+testNode, kubevirtv1.MigrationTargetNodeNameLabel+"="+testNode
	within(t, 2*time.Second, "its own node's VMIs, pods and incoming VMI reached vmnicd", func() bool {
		now := vmnicdCounters(t, p).BySelector
		return now[onNode]-after.BySelector[onNode] == 5 && now[incoming]-after.BySelector[incoming] == 1 && now["spec.nodeName="+testNode]-after.BySelector["spec.nodeName="+testNode] == 5
	})
}
