package integration

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/kubernetes"

	"github.com/vmnic/vmnic/pkg/ctl"
	"github.com/vmnic/vmnic/pkg/failpoint"
	"github.com/vmnic/vmnic/pkg/netconf"
	"github.com/vmnic/vmnic/plugins/bridge"
	"github.com/vmnic/vmnic/plugins/masquerade"
	"github.com/vmnic/vmnic/plugins/passt"
	"github.com/vmnic/vmnic/test/cluster"
	"github.com/vmnic/vmnic/test/harness"
	"github.com/vmnic/vmnic/test/spiderpool"
)

// faultBed is one mode on one node, driven through a vmnicd process built
// with the failpoints tag.
type faultBed struct {
	mode  string
	node  *harness.Node
	bin   string   // vmnicd -tags failpoints
	flags []string // vmnicd flags beyond the node's dirs
	// list is the network; readyTimeout "" is the default.
	list func(t *testing.T, readyTimeout string) *libcni.NetworkConfigList
	// pod makes the i-th VM pod.
	pod func(t *testing.T, i int) *harness.Pod
	// clean asserts that nothing of p is left anywhere.
	clean func(t *testing.T, p *harness.Pod)
	// beforeDel, if set, runs before the runtime's DEL (the pod object
	// being deleted, say).
	beforeDel func(t *testing.T, p *harness.Pod)
	// transient, if set, says whether an ADD's error is the IPAM's own
	// passing failure, which the runtime meets by DEL and a retry later
	// (kubelet's sandbox retry), not a fault of vmnic's.
	transient func(error) bool
	pods      int
}

// failpointDaemon builds vmnicd with the failpoints tag once per test.
func failpointDaemon(t *testing.T) string {
	t.Helper()
	bin, err := harness.BuildDaemon(t.TempDir(), "failpoints")
	if err != nil {
		t.Fatal(err)
	}
	return bin
}

// start runs the daemon; at is "" or "<step>=<kill|error>" of the bed's
// mode.
func (b *faultBed) start(t *testing.T, at, logName string) *harness.DaemonProcess {
	t.Helper()
	b.node.DaemonEnv = nil
	if at != "" {
		b.node.DaemonEnv = []string{"VMNIC_FAILPOINT=" + b.mode + "/" + at}
	}
	d, err := b.node.StartDaemonBinary(b.bin, logName, append([]string{"--metrics-addr="}, b.flags...)...)
	b.node.DaemonEnv = nil
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			out, _ := os.ReadFile(d.Log)
			t.Logf("%s:\n%s", logName, out)
		}
	})
	return d
}

// killedBySIGKILL reports whether the process ended by SIGKILL.
func killedBySIGKILL(err error) bool {
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		return false
	}
	ws, ok := ee.Sys().(syscall.WaitStatus)
	return ok && ws.Signaled() && ws.Signal() == syscall.SIGKILL
}

// killAt SIGKILLs the daemon right after step of an ADD. With giveUp the
// runtime's ADD fails (the daemon comes back after the shim's readyTimeout)
// and the runtime DELs; otherwise the shim's retry reaches the restarted
// daemon, the ADD succeeds and CHECK passes, then the pod goes. Either way,
// after DEL (twice) and a GC, nothing of the pod is left.
func (b *faultBed) killAt(t *testing.T, step string, giveUp bool, i int) {
	ctx := ctxT(t)
	d := b.start(t, step+"=kill", fmt.Sprintf("vmnicd-%s-%d.log", step, i))
	timeout := ""
	if giveUp {
		timeout = "1s"
	}
	l := b.list(t, timeout)
	p := b.pod(t, i)
	added := make(chan error, 1)
	go func() { _, err := b.node.Add(ctx, l, p); added <- err }()
	select {
	case <-d.Done():
	case err := <-added:
		_ = d.Stop()
		t.Fatalf("ADD returned (%v) and the daemon was not killed after %s", err, step)
	case <-time.After(60 * time.Second):
		t.Fatalf("the daemon was not killed after %s", step)
	}
	if err := d.Err(); !killedBySIGKILL(err) {
		t.Fatalf("daemon exit %v, want SIGKILL after %s", err, step)
	}
	var addErr error
	if giveUp {
		addErr = <-added
		var e *types.Error
		if !errors.As(addErr, &e) || e.Code != types.ErrTryAgainLater {
			t.Fatalf("ADD with the daemon gone = %v, want code %d", addErr, types.ErrTryAgainLater)
		}
	}
	d = b.start(t, "", fmt.Sprintf("vmnicd-%s-%d-after.log", step, i))
	defer func() { _ = d.Stop() }()
	if !giveUp {
		if addErr = <-added; addErr != nil {
			if b.transient == nil || !b.transient(addErr) {
				t.Fatalf("ADD retried by the shim after the kill: %v", addErr)
			}
			b.retryAsRuntime(ctx, t, l, p, addErr)
		}
		if err := b.node.Check(ctx, l, p); err != nil {
			t.Errorf("CHECK of the retried ADD: %v", err)
		}
	}
	if b.beforeDel != nil {
		b.beforeDel(t, p)
	}
	for range 2 {
		if err := b.node.Del(ctx, l, p); err != nil {
			t.Fatalf("DEL: %v", err)
		}
	}
	if err := b.node.GC(ctx, l, nil); err != nil {
		t.Fatalf("GC: %v", err)
	}
	b.clean(t, p)
	b.assertDaemonEmpty(ctx, t)
}

// retryAsRuntime does what kubelet does after a failed ADD: DEL, then ADD
// again a little later (up to three times); each DEL must succeed and the
// last ADD too.
func (b *faultBed) retryAsRuntime(ctx context.Context, t *testing.T, l *libcni.NetworkConfigList, p *harness.Pod, first error) {
	t.Helper()
	t.Logf("the ADD failed in the IPAM (%v); DEL and ADD again, as the runtime does", first)
	err := first
	for try := 1; err != nil; try++ {
		if try > 3 || !b.transient(err) {
			t.Fatalf("ADD retried by the runtime (try %d): %v", try, err)
		}
		if derr := b.node.Del(ctx, l, p); derr != nil {
			t.Fatalf("DEL after the failed ADD: %v", derr)
		}
		time.Sleep(time.Second)
		_, err = b.node.Add(ctx, l, p)
	}
}

// errorAt makes the daemon fail the ADD after step; the runtime then DELs.
func (b *faultBed) errorAt(t *testing.T, step string, i int) {
	ctx := ctxT(t)
	d := b.start(t, step+"=error", fmt.Sprintf("vmnicd-%s-%d-error.log", step, i))
	defer func() { _ = d.Stop() }()
	l := b.list(t, "")
	p := b.pod(t, i)
	if _, err := b.node.Add(ctx, l, p); err == nil || !strings.Contains(err.Error(), "injected failure after "+b.mode+"/"+step) {
		t.Fatalf("ADD = %v, want the injected failure", err)
	}
	b.clean(t, p)
	if b.beforeDel != nil {
		b.beforeDel(t, p)
	}
	if err := b.node.Del(ctx, l, p); err != nil {
		t.Fatalf("DEL: %v", err)
	}
	b.clean(t, p)
	b.assertDaemonEmpty(ctx, t)
}

// assertDaemonEmpty: no record, no DHCP server, nothing spooled.
func (b *faultBed) assertDaemonEmpty(ctx context.Context, t *testing.T) {
	t.Helper()
	st, err := ctl.Status(ctx, b.node.Socket())
	if err != nil {
		t.Fatal(err)
	}
	if st.DHCPServers != 0 || st.PendingDELs != 0 {
		t.Errorf("daemon after DEL: %d DHCP servers, %d spooled DELs", st.DHCPServers, st.PendingDELs)
	}
	if recs, bad, _ := stateList(t, b.node); len(recs)+len(bad) != 0 {
		t.Errorf("%d records left (%d unreadable)", len(recs), len(bad))
	}
}

// run drives every step of the bed's mode, killed both ways and failing.
func (b *faultBed) run(t *testing.T, steps []string) {
	steps = append(slices.Clone(steps), failpoint.Record)
	for _, step := range steps {
		t.Run(step, func(t *testing.T) {
			t.Run("kill-retried", func(t *testing.T) { b.killAt(t, step, false, b.next()) })
			t.Run("kill-given-up", func(t *testing.T) { b.killAt(t, step, true, b.next()) })
			t.Run("error", func(t *testing.T) { b.errorAt(t, step, b.next()) })
		})
	}
}

func (b *faultBed) next() int { b.pods++; return b.pods }

// hostLocalIPs lists host-local's allocations under dir (all networks).
func hostLocalIPs(t *testing.T, dir string) []string {
	t.Helper()
	var ips []string
	err := filepath.WalkDir(dir, func(path string, e fs.DirEntry, err error) error {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if err != nil {
			return err
		}
		if !e.IsDir() && net.ParseIP(e.Name()) != nil {
			ips = append(ips, e.Name())
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return ips
}

// TestKillAtEachStep SIGKILLs vmnicd after every named step of a
// masquerade, bridge and passt ADD (and makes it fail there instead), then
// runs the runtime's DEL and a GC: no link, OVS port, nft table, DHCP
// server, record, spooled DEL or host-local address is left. A killed ADD
// that the shim retries succeeds against the restarted daemon.
func TestKillAtEachStep(t *testing.T) {
	bin := failpointDaemon(t)

	t.Run(netconf.ModeMasquerade, func(t *testing.T) {
		node, _ := newNode(t, false)
		b := &faultBed{mode: netconf.ModeMasquerade, node: node, bin: bin}
		b.list = func(t *testing.T, rt string) *libcni.NetworkConfigList {
			return list(t, node, harness.NetOptions{Vmnic: true, VM: vm1, ReadyTimeout: rt})
		}
		b.pod = func(t *testing.T, i int) *harness.Pod { return newPod(t, fmt.Sprintf("virt-launcher-k%d-x", i)) }
		b.clean = func(t *testing.T, p *harness.Pod) {
			assertClean(t, p, node.StateDir())
			if links := podLinks(t, p); len(links) > 2 { // lo and the primary's eth0
				t.Errorf("links left in the pod: %v", keys(links))
			}
		}
		b.run(t, masquerade.Steps)
		// The primary's DELs released its addresses too.
		if ips := hostLocalIPs(t, filepath.Join(node.Dir, "host-local")); len(ips) != 0 {
			t.Errorf("primary addresses left: %v", ips)
		}
	})

	t.Run(netconf.ModeBridge, func(t *testing.T) {
		n := newOVSNodeBare(t)
		b := &faultBed{mode: netconf.ModeBridge, node: n.Node, bin: bin, flags: []string{"--ovsdb=" + n.sw.DB()}}
		b.list = func(t *testing.T, rt string) *libcni.NetworkConfigList {
			keys := map[string]any{"vlan": 100}
			if rt != "" {
				keys["readyTimeout"] = rt
			}
			return n.bridgeList(t, "kill", keys, n.hostLocal("10.100.0.10", "10.100.0.50"))
		}
		b.pod = func(t *testing.T, i int) *harness.Pod {
			p := newPod(t, fmt.Sprintf("virt-launcher-k%d-x", i))
			p.IfName = "net1"
			return p
		}
		b.clean = func(t *testing.T, p *harness.Pod) { n.assertNoTrace(t, "kill", p) }
		b.run(t, bridge.Steps)
	})

	t.Run(netconf.ModePasst, func(t *testing.T) {
		node, _ := newNode(t, false)
		underlay(t, node)
		ipamDir := filepath.Join(node.Dir, "ipam")
		b := &faultBed{mode: netconf.ModePasst, node: node, bin: bin}
		ipam := map[string]any{
			"type": "host-local", "dataDir": ipamDir,
			"ranges": []any{[]any{map[string]any{"subnet": "10.50.0.0/24", "rangeStart": "10.50.0.10", "rangeEnd": "10.50.0.50"}}},
		}
		b.list = func(t *testing.T, rt string) *libcni.NetworkConfigList {
			extra := map[string]any{}
			if rt != "" {
				extra["readyTimeout"] = rt
			}
			return underlayList(t, node, "macvlan", "1.1.0", ipam, nil, extra)
		}
		b.pod = func(t *testing.T, i int) *harness.Pod { return newPod(t, fmt.Sprintf("virt-launcher-k%d-x", i)) }
		b.clean = func(t *testing.T, p *harness.Pod) {
			if out, _ := exec.Command("nsenter", "--net="+p.NS.Path(), "nft", "list", "tables").CombinedOutput(); strings.Contains(string(out), "vmnic") {
				t.Errorf("nft tables left: %s", out)
			}
		}
		// The hold is only taken on a migration target, which needs the
		// cluster: TestPasstMigrationHold fails an ADD right after it.
		b.run(t, slices.DeleteFunc(slices.Clone(passt.Steps), func(s string) bool { return s == "hold" }))
		if ips := hostLocalIPs(t, ipamDir); len(ips) != 0 {
			t.Errorf("underlay addresses left: %v", ips)
		}
	})
}

var ippoolsGVR = schema.GroupVersionResource{Group: "spiderpool.spidernet.io", Version: "v2beta1", Resource: "spiderippools"}

// poolAllocated is a SpiderIPPool's status.allocatedIPs (IP → pod) and
// allocatedIPCount.
func poolAllocated(ctx context.Context, t *testing.T, c *cluster.Cluster, pool string) (map[string]string, int64) {
	t.Helper()
	obj, err := c.Dynamic.Resource(ippoolsGVR).Get(ctx, pool, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	raw, _, _ := unstructured.NestedString(obj.Object, "status", "allocatedIPs")
	count, _, _ := unstructured.NestedInt64(obj.Object, "status", "allocatedIPCount")
	out := map[string]string{}
	if raw != "" {
		var m map[string]struct {
			Pod string `json:"pod"`
		}
		if err := json.Unmarshal([]byte(raw), &m); err != nil {
			t.Fatalf("pool %s status.allocatedIPs %q: %v", pool, raw, err)
		}
		for ip, a := range m {
			out[ip] = a.Pod
		}
	}
	return out, count
}

// TestKillAtEachStepSpiderpool is the bridge mode's kill at each step with
// addresses from the real Spiderpool agent: after the runtime's DEL, the
// SpiderIPPool's status holds no address of the pod.
func TestKillAtEachStepSpiderpool(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	t.Cleanup(cancel)
	bin := failpointDaemon(t)
	c := cluster.StartT(t)
	agent := spiderpool.StartAgentT(t, c, spiderpool.AgentOptions{NodeName: testNode})
	pluginDir, err := spiderpool.PluginPath()
	if err != nil {
		t.Fatal(err)
	}
	const pool = "kill-v4"
	applyPool(ctx, t, c, pool, "10.100.0.0/24", "10.100.0.20-10.100.0.40", "10.100.0.1")
	kube, err := kubernetes.NewForConfig(c.Config)
	if err != nil {
		t.Fatal(err)
	}
	n := newOVSNodeBare(t)
	n.cniVersion = "1.0.0" // Spiderpool's IPAM plugin speaks up to 1.0.0
	n.CNI = libcni.NewCNIConfigWithCacheDir([]string{n.BinDir, pluginDir}, filepath.Join(n.Dir, "cni-cache"), nil)
	b := &faultBed{mode: netconf.ModeBridge, node: n.Node, bin: bin, flags: []string{"--ovsdb=" + n.sw.DB()}}
	b.list = func(t *testing.T, rt string) *libcni.NetworkConfigList {
		keys := map[string]any{"vlan": 100}
		if rt != "" {
			keys["readyTimeout"] = rt
		}
		return n.bridgeList(t, "vlan100", keys, agent.IPAMConfig(pool))
	}
	// The agent reads a pod's SpiderEndpoint from its informer cache on
	// ADD. When the shim's retry follows the killed ADD that created it
	// faster than the cache catches up (a loaded machine), the agent
	// creates it again and fails with "already exists"; kubelet's retry
	// then succeeds.
	b.transient = func(err error) bool {
		return strings.Contains(err.Error(), "failed to patch IP allocation results to Endpoint") && strings.Contains(err.Error(), "already exists")
	}
	// The pods exist in the API server (Spiderpool reads them) before the
	// steps run, so that the agent's cache has them.
	const pods = 3 * 7
	for i := 1; i <= pods; i++ {
		_, err := kube.CoreV1().Pods("default").Create(ctx, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{
				Name: fmt.Sprintf("virt-launcher-sk%d-x", i), Namespace: "default",
				Annotations: map[string]string{"k8s.v1.cni.cncf.io/networks": `[{"interface":"net1","name":"vlan100","namespace":"default"}]`},
			},
			Spec: corev1.PodSpec{NodeName: testNode, Containers: []corev1.Container{{Name: "compute", Image: "virt-launcher"}}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(2 * time.Second)
	b.pod = func(t *testing.T, i int) *harness.Pod {
		if i > pods {
			t.Fatalf("pod %d: only %d created", i, pods)
		}
		name := fmt.Sprintf("virt-launcher-sk%d-x", i)
		obj, err := kube.CoreV1().Pods("default").Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		p := newPod(t, name)
		p.IfName, p.UID = "net1", string(obj.UID)
		return p
	}
	// Spiderpool keeps a live pod's address through DEL (for the pod's
	// next sandbox) and releases it once the pod is terminating, as the
	// kubelet's DEL of a deleted pod finds it. So: at most the one address
	// of a live pod, none of a terminating one.
	terminating := map[string]bool{}
	b.beforeDel = func(t *testing.T, p *harness.Pod) {
		if err := kube.CoreV1().Pods("default").Delete(ctx, p.Name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		terminating[p.Name] = true
	}
	b.clean = func(t *testing.T, p *harness.Pod) {
		n.assertNoTrace(t, "vlan100", p)
		var ips []string
		var count int64
		for range 50 { // the agent writes the pool's status as it releases
			var alloc map[string]string
			alloc, count = poolAllocated(ctx, t, c, pool)
			ips = ips[:0]
			for ip, owner := range alloc {
				if owner != "default/"+p.Name || terminating[p.Name] {
					ips = append(ips, ip+" "+owner)
				}
			}
			own := int64(len(alloc) - len(ips))
			if len(ips) == 0 && count == own && own <= 1 {
				return
			}
			time.Sleep(200 * time.Millisecond)
		}
		t.Errorf("pool %s with %s %s: allocatedIPCount %d, addresses that should be free: %v",
			pool, p.Name, map[bool]string{true: "terminating", false: "alive"}[terminating[p.Name]], count, ips)
	}
	b.run(t, bridge.Steps)
}
