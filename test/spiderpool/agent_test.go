package spiderpool_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"

	"github.com/vmnic/vmnic/test/cluster"
	"github.com/vmnic/vmnic/test/need"
	"github.com/vmnic/vmnic/test/spiderpool"
)

var (
	ippoolsGVR   = schema.GroupVersionResource{Group: "spiderpool.spidernet.io", Version: "v2beta1", Resource: "spiderippools"}
	endpointsGVR = schema.GroupVersionResource{Group: "spiderpool.spidernet.io", Version: "v2beta1", Resource: "spiderendpoints"}
	vmisGVR      = schema.GroupVersionResource{Group: "kubevirt.io", Version: "v1", Resource: "virtualmachineinstances"}
)

// Test addresses: 198.18.0.0/15 is reserved for benchmarking (RFC 2544),
// so nothing on the machine routes it.
const (
	poolName   = "pool1"
	poolSubnet = "198.18.10.0/24"
	poolRange  = "198.18.10.10-198.18.10.50"
	vmiName    = "vm1"
	vmiNS      = "default"
)

// TestKubeVirtStaticIP runs the real spiderpool-agent and the real
// `spiderpool` IPAM plugin: the virt-launcher pod of a VMI gets an address
// from a SpiderIPPool, the migration target pod of the same VMI gets the
// same address, and DEL of the source pod keeps it allocated to the VMI;
// once the VMI is gone, DEL of its last pod releases it. The target runs on
// the source's node, or on a second node with its own agent (a real live
// migration).
func TestKubeVirtStaticIP(t *testing.T) {
	need.Root(t) // network namespaces for the pods
	t.Run("same-node", func(t *testing.T) { testKubeVirtStaticIP(t, false) })
	t.Run("two-nodes", func(t *testing.T) { testKubeVirtStaticIP(t, true) })
}

func testKubeVirtStaticIP(t *testing.T, twoNodes bool) {
	c := cluster.StartT(t)
	srcAgent := spiderpool.StartAgentT(t, c, spiderpool.AgentOptions{NodeName: "node-a"})
	dstAgent := srcAgent
	if twoNodes {
		dstAgent = spiderpool.StartAgentT(t, c, spiderpool.AgentOptions{NodeName: "node-b", PodName: "spiderpool-agent-b"})
	}
	pluginDir, err := spiderpool.PluginPath()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()

	// Without spiderpool-controller's webhook nothing defaults ipVersion.
	apply(ctx, t, c, fmt.Sprintf(`
apiVersion: spiderpool.spidernet.io/v2beta1
kind: SpiderIPPool
metadata:
  name: %s
spec:
  ipVersion: 4
  subnet: %s
  ips: [%s]
---
apiVersion: kubevirt.io/v1
kind: VirtualMachineInstance
metadata:
  name: %s
  namespace: %s
spec:
  domain:
    devices: {}
`, poolName, poolSubnet, poolRange, vmiName, vmiNS))
	vmi, err := c.Dynamic.Resource(vmisGVR).Namespace(vmiNS).Get(ctx, vmiName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	// Both pods exist before the first ADD, as they would before the
	// runtime calls CNI: the agent reads pods from its informer cache.
	source := launcherPod(ctx, t, c, srcAgent, vmi, "virt-launcher-vm1-src", "", pluginDir)
	target := launcherPod(ctx, t, c, dstAgent, vmi, "virt-launcher-vm1-dst", "vm1-migration", pluginDir)

	ip := source.add(t)
	if !inRange(ip, "198.18.10.", 10, 50) {
		t.Fatalf("source pod got %s, want an address of %s", ip, poolRange)
	}
	t.Logf("source pod %s on %s got %s", source.name, source.node, ip)
	checkAllocated(ctx, t, c, ip, source)
	checkEndpoint(ctx, t, c, ip, source)

	// The agent reads SpiderEndpoints from its informer. An ADD for the
	// target before the informer has the source's endpoint allocates a new
	// address for the VMI, fails on the endpoint's "already exists", and
	// Spiderpool does not take that address back: give the informer time.
	time.Sleep(2 * time.Second)
	if got := target.add(t); got != ip {
		t.Fatalf("migration target pod on %s got %s, want the VMI's %s", target.node, got, ip)
	}
	checkAllocated(ctx, t, c, ip, target)
	checkEndpoint(ctx, t, c, ip, target)

	// The runtime calls DEL for the migration source while its pod is
	// terminating; for a pod still alive the agent releases nothing
	// anyway, so only a terminating pod reaches the KubeVirt check.
	terminate(ctx, t, c, source)
	source.del(t)
	if log := srcAgent.LogTail(200); !strings.Contains(log, "There is no need to release the IP allocation of kubevirt VM") {
		t.Fatalf("DEL of the source pod did not take the agent's KubeVirt keep path; agent log:\n%s", log)
	}
	checkAllocated(ctx, t, c, ip, target)
	checkEndpoint(ctx, t, c, ip, target)

	// Control: with the VMI (and no VM) gone, DEL of its last pod releases
	// the address and removes the SpiderEndpoint.
	if err := c.Dynamic.Resource(vmisGVR).Namespace(vmiNS).Delete(ctx, vmiName, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	terminate(ctx, t, c, target)
	target.del(t)
	pool, err := c.Dynamic.Resource(ippoolsGVR).Get(ctx, poolName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if raw, _, _ := unstructured.NestedString(pool.Object, "status", "allocatedIPs"); raw != "" && raw != "{}" {
		t.Fatalf("pool %s status.allocatedIPs = %s after the VMI is gone, want none", poolName, raw)
	}
	if _, err := c.Dynamic.Resource(endpointsGVR).Namespace(vmiNS).Get(ctx, vmiName, metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Fatalf("SpiderEndpoint %s/%s after the VMI is gone: %v, want NotFound", vmiNS, vmiName, err)
	}
}

// terminate deletes pd's pod object gracefully: without a kubelet to
// confirm, it stays Terminating (deletionTimestamp set), as it is while the
// kubelet tears the sandbox down and calls CNI DEL.
func terminate(ctx context.Context, t *testing.T, c *cluster.Cluster, pd *pod) {
	t.Helper()
	pods := c.Dynamic.Resource(schema.GroupVersionResource{Version: "v1", Resource: "pods"}).Namespace(vmiNS)
	if err := pods.Delete(ctx, pd.name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	obj, err := pods.Get(ctx, pd.name, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("pod %s after a graceful delete: %v", pd.name, err)
	}
	if obj.GetDeletionTimestamp() == nil {
		t.Fatalf("pod %s has no deletionTimestamp after a graceful delete", pd.name)
	}
}

func apply(ctx context.Context, t *testing.T, c *cluster.Cluster, manifest string) {
	t.Helper()
	if err := c.Apply(ctx, []byte(manifest)); err != nil {
		t.Fatal(err)
	}
}

// pod is a virt-launcher pod object, the netns standing for its sandbox,
// and the IPAM plugin configuration of its node's agent.
type pod struct {
	name, uid, containerID, node string
	netns                        ns.NetNS
	pluginDir                    string
	netconf                      []byte
}

// launcherPod creates a virt-launcher pod of vmi on agent a's node, as
// virt-controller would; migrationJob non-empty makes it a migration target.
func launcherPod(ctx context.Context, t *testing.T, c *cluster.Cluster, a *spiderpool.Agent, vmi *unstructured.Unstructured, name, migrationJob, pluginDir string) *pod {
	t.Helper()
	annotations, migrationLabel := "{}", ""
	if migrationJob != "" {
		annotations = fmt.Sprintf("{kubevirt.io/migrationJobName: %s}", migrationJob)
		migrationLabel = "\n    kubevirt.io/migrationJobUID: " + migrationJob + "-uid"
	}
	apply(ctx, t, c, fmt.Sprintf(`
apiVersion: v1
kind: Pod
metadata:
  name: %s
  namespace: %s
  annotations: %s
  labels:
    kubevirt.io: virt-launcher
    kubevirt.io/created-by: %s%s
  ownerReferences:
  - apiVersion: kubevirt.io/v1
    kind: VirtualMachineInstance
    name: %s
    uid: %s
    controller: true
    blockOwnerDeletion: true
spec:
  nodeName: %s
  containers:
  - name: compute
    image: example.invalid/virt-launcher:1
`, name, vmiNS, annotations, vmi.GetUID(), migrationLabel, vmi.GetName(), vmi.GetUID(), a.NodeName))
	obj, err := c.Dynamic.Resource(schema.GroupVersionResource{Version: "v1", Resource: "pods"}).
		Namespace(vmiNS).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	netns, err := testutils.NewNS()
	if err != nil {
		t.Fatalf("pod netns: %v", err)
	}
	t.Cleanup(func() {
		_ = netns.Close()
		_ = testutils.UnmountNS(netns)
	})
	// What the macvlan plugin (or Multus) hands its IPAM plugin on stdin.
	netconf, err := json.Marshal(map[string]any{
		"cniVersion": "1.0.0",
		"name":       "macvlan-net",
		"type":       "macvlan",
		"ipam":       a.IPAMConfig(poolName),
	})
	if err != nil {
		t.Fatal(err)
	}
	return &pod{
		name: name, uid: string(obj.GetUID()), containerID: "c-" + name, node: a.NodeName,
		netns: netns, pluginDir: pluginDir, netconf: netconf,
	}
}

// run executes the spiderpool IPAM plugin binary for pd as a CNI runtime
// (or the main plugin delegating IPAM) would.
func (pd *pod) try(t *testing.T, command string) ([]byte, error) {
	t.Helper()
	cmd := exec.CommandContext(t.Context(), filepath.Join(pd.pluginDir, spiderpool.PluginName))
	cmd.Env = append(os.Environ(),
		"CNI_COMMAND="+command,
		"CNI_CONTAINERID="+pd.containerID,
		"CNI_NETNS="+pd.netns.Path(),
		"CNI_IFNAME=eth0",
		"CNI_PATH="+pd.pluginDir,
		"CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAMESPACE="+vmiNS+";K8S_POD_NAME="+pd.name+
			";K8S_POD_INFRA_CONTAINER_ID="+pd.containerID+";K8S_POD_UID="+pd.uid,
	)
	cmd.Stdin = bytes.NewReader(pd.netconf)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.Bytes(), fmt.Errorf("spiderpool %s for %s: %w\nstdout: %s\nstderr: %s", command, pd.name, err, stdout.String(), stderr.String())
	}
	return stdout.Bytes(), nil
}

// run runs the IPAM plugin and fails the test on an error.
func (pd *pod) run(t *testing.T, command string) []byte {
	t.Helper()
	out, err := pd.try(t, command)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// add runs ADD and returns the one IPv4 address of the result.
//
// The agent reads the VMI's SpiderEndpoint and the pools from its informer
// caches: an ADD that comes right after another pod of the VMI created the
// endpoint can find the cache behind and fail with "already exists", and one
// right after the pool was created can fail with the pool "not found" (seen
// in CI on a loaded machine). The runtime retries a failed sandbox; so does
// this, for a bounded time, on those two errors only.
func (pd *pod) add(t *testing.T) string {
	t.Helper()
	out, err := pd.try(t, "ADD")
	for deadline := time.Now().Add(15 * time.Second); err != nil && (strings.Contains(err.Error(), "already exists") ||
		strings.Contains(err.Error(), "SpiderIPPool.spiderpool.spidernet.io") && strings.Contains(err.Error(), "not found")) && time.Now().Before(deadline); {
		time.Sleep(250 * time.Millisecond)
		out, err = pd.try(t, "ADD")
	}
	if err != nil {
		t.Fatal(err)
	}
	var res struct {
		CNIVersion string `json:"cniVersion"`
		IPs        []struct {
			Address string `json:"address"`
		} `json:"ips"`
	}
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatalf("ADD result %s: %v", out, err)
	}
	if res.CNIVersion != "1.0.0" || len(res.IPs) != 1 {
		t.Fatalf("ADD result %s: want cniVersion 1.0.0 and one address", out)
	}
	ip, _, _ := strings.Cut(res.IPs[0].Address, "/")
	return ip
}

func (pd *pod) del(t *testing.T) {
	t.Helper()
	if out := pd.run(t, "DEL"); len(bytes.TrimSpace(out)) != 0 {
		t.Fatalf("DEL printed %s", out)
	}
}

func inRange(ip, prefix string, lo, hi int) bool {
	rest, ok := strings.CutPrefix(ip, prefix)
	if !ok {
		return false
	}
	var n int
	if _, err := fmt.Sscanf(rest, "%d", &n); err != nil || fmt.Sprint(n) != rest {
		return false
	}
	return n >= lo && n <= hi
}

// checkAllocated checks that the pool records ip, and only ip, as allocated
// to pd. For a VM pod the record names the SpiderEndpoint, i.e. the VMI
// ("default/vm1"), with the UID of the pod that holds the address now.
func checkAllocated(ctx context.Context, t *testing.T, c *cluster.Cluster, ip string, pd *pod) {
	t.Helper()
	pool, err := c.Dynamic.Resource(ippoolsGVR).Get(ctx, poolName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	raw, _, _ := unstructured.NestedString(pool.Object, "status", "allocatedIPs")
	var allocated map[string]struct {
		NamespacedName string `json:"pod"`
		PodUID         string `json:"podUid"`
	}
	if err := json.Unmarshal([]byte(raw), &allocated); err != nil {
		t.Fatalf("pool %s status.allocatedIPs %q: %v", poolName, raw, err)
	}
	rec, ok := allocated[ip]
	if !ok || len(allocated) != 1 {
		t.Fatalf("pool %s status.allocatedIPs = %s, want only %s", poolName, raw, ip)
	}
	if want := vmiNS + "/" + vmiName; rec.NamespacedName != want || rec.PodUID != pd.uid {
		t.Fatalf("pool %s records %s for %s (uid %s), want %s (uid %s)", poolName, ip, rec.NamespacedName, rec.PodUID, want, pd.uid)
	}
	if n, _, _ := unstructured.NestedInt64(pool.Object, "status", "allocatedIPCount"); n != 1 {
		t.Fatalf("pool %s status.allocatedIPCount = %d, want 1", poolName, n)
	}
}

// checkEndpoint checks the SpiderEndpoint named after the VMI: owned by
// it, holding ip, its current pod pd on pd's node.
func checkEndpoint(ctx context.Context, t *testing.T, c *cluster.Cluster, ip string, pd *pod) {
	t.Helper()
	ep, err := c.Dynamic.Resource(endpointsGVR).Namespace(vmiNS).Get(ctx, vmiName, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("SpiderEndpoint %s/%s: %v", vmiNS, vmiName, err)
	}
	st, _, _ := unstructured.NestedMap(ep.Object, "status")
	kind, _, _ := unstructured.NestedString(st, "ownerControllerType")
	owner, _, _ := unstructured.NestedString(st, "ownerControllerName")
	uid, _, _ := unstructured.NestedString(st, "current", "uid")
	node, _, _ := unstructured.NestedString(st, "current", "node")
	ips, _, _ := unstructured.NestedSlice(st, "current", "ips")
	var got []string
	for _, x := range ips {
		m, _ := x.(map[string]any)
		v4, _ := m["ipv4"].(string)
		pool, _ := m["ipv4Pool"].(string)
		got = append(got, v4+"@"+pool)
	}
	want := ip + "/24@" + poolName
	if kind != "VirtualMachineInstance" || owner != vmiName || uid != pd.uid || node != pd.node || len(got) != 1 || got[0] != want {
		t.Fatalf("SpiderEndpoint %s/%s status = %v; want owner VirtualMachineInstance/%s, current uid %s on %s, ips [%s]",
			vmiNS, vmiName, st, vmiName, pd.uid, pd.node, want)
	}
}

// TestAgentStop checks the harness itself: the agent answers on its socket
// and Stop leaves no process behind.
func TestAgentStop(t *testing.T) {
	c := cluster.StartT(t)
	a, err := spiderpool.StartAgent(t.Context(), c, t.TempDir(), spiderpool.AgentOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Stop()
	hc := a.HTTPClient()
	defer hc.CloseIdleConnections()
	req, err := http.NewRequestWithContext(t.Context(), http.MethodGet, "http://spiderpool/v1/ipam/healthy", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /v1/ipam/healthy: %s", resp.Status)
	}
	pid := a.Pid()
	a.Stop()
	a.Stop()
	if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
		t.Fatalf("spiderpool-agent (pid %d) after Stop: kill 0 = %v, want ESRCH", pid, err)
	}
}
