package capabilities

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/vmnic/vmnic/pkg/apis/v1alpha1"
	"github.com/vmnic/vmnic/test/cluster"
	"github.com/vmnic/vmnic/test/need"
)

const (
	nodeA = "node-a"
	nodeB = "node-b"
	// daemonUser is who the publisher acts as: RBAC lets it write node-a
	// only, as a per-node grant would.
	daemonUser = "vmnicd-node-a"
)

var crdPath = filepath.Join("..", "..", "deploy", "crds", "vmnic.io_nodenetworkcapabilities.yaml")

// fakeSpiderpoolCRD stands in for Spiderpool's: only its name and version
// matter to the probe.
const fakeSpiderpoolCRD = `apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: spiderippools.spiderpool.spidernet.io
spec:
  group: spiderpool.spidernet.io
  scope: Cluster
  names: {kind: SpiderIPPool, listKind: SpiderIPPoolList, plural: spiderippools, singular: spiderippool}
  versions:
  - name: v2beta1
    served: true
    storage: true
    schema:
      openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}
`

const daemonRBAC = `apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: vmnicd-node-a}
rules:
- apiGroups: [""]
  resources: [nodes]
  resourceNames: [node-a]
  verbs: [get, patch]
- apiGroups: [""]
  resources: [nodes/status]
  resourceNames: [node-a]
  verbs: [patch]
- apiGroups: [vmnic.io]
  resources: [nodenetworkcapabilities, nodenetworkcapabilities/status]
  resourceNames: [node-a]
  verbs: [get, update]
- apiGroups: [vmnic.io]
  resources: [nodenetworkcapabilities]
  verbs: [create]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: vmnicd-node-a}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: vmnicd-node-a}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: vmnicd-node-a}
`

type testCluster struct {
	*cluster.Cluster
	kube kubernetes.Interface
	dyn  dynamic.Interface
}

func startCluster(t *testing.T) *testCluster {
	t.Helper()
	need.Root(t) // the OVS and kernel parts of these tests
	c := cluster.StartT(t)
	ctx := t.Context()
	if err := c.InstallCRDs(ctx, crdPath); err != nil {
		t.Fatal(err)
	}
	if err := c.Apply(ctx, []byte(daemonRBAC)); err != nil {
		t.Fatal(err)
	}
	for _, a := range []cluster.Access{
		{User: daemonUser, Verb: "patch", Resource: "nodes/status", Name: nodeA},
		{User: daemonUser, Verb: "update", Resource: "nodenetworkcapabilities.vmnic.io/status", Name: nodeA},
	} {
		if err := c.WaitCan(ctx, a); err != nil {
			t.Fatal(err)
		}
	}
	return &testCluster{Cluster: c, kube: kubernetes.NewForConfigOrDie(c.Config), dyn: dynamic.NewForConfigOrDie(c.Config)}
}

func (c *testCluster) installSpiderpoolCRD(t *testing.T) {
	t.Helper()
	f := filepath.Join(t.TempDir(), "spiderpool-crd.yaml")
	if err := os.WriteFile(f, []byte(fakeSpiderpoolCRD), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := c.InstallCRDs(t.Context(), f); err != nil {
		t.Fatal(err)
	}
}

func (c *testCluster) createNode(t *testing.T, name string, capacity corev1.ResourceList, labels, annotations map[string]string) {
	t.Helper()
	n := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels, Annotations: annotations},
		Status:     corev1.NodeStatus{Capacity: capacity, Allocatable: capacity},
	}
	if _, err := c.kube.CoreV1().Nodes().Create(t.Context(), n, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

func (c *testCluster) node(t *testing.T, name string) *corev1.Node {
	t.Helper()
	n, err := c.kube.CoreV1().Nodes().Get(t.Context(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// nnc reads a NodeNetworkCapability; nil when it does not exist.
func (c *testCluster) nnc(t *testing.T, name string) *v1alpha1.NodeNetworkCapability {
	t.Helper()
	u, err := c.dyn.Resource(v1alpha1.NodeNetworkCapabilitiesResource).Get(t.Context(), name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	var out v1alpha1.NodeNetworkCapability
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, &out); err != nil {
		t.Fatal(err)
	}
	return &out
}

// eventually polls check every 20ms until it returns "" or timeout passes,
// and returns how long it took.
func eventually(t *testing.T, timeout time.Duration, what string, check func() string) time.Duration {
	t.Helper()
	start := time.Now()
	var last string
	for time.Since(start) < timeout {
		if last = check(); last == "" {
			return time.Since(start)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("%s: not after %v: %s", what, timeout, last)
	return 0
}

func (c *testCluster) nncCondition(t *testing.T, typ string) metav1.Condition {
	t.Helper()
	n := c.nnc(t, nodeA)
	if n == nil {
		return metav1.Condition{}
	}
	return cond(n.Status, typ)
}

func bridgeNames(n *v1alpha1.NodeNetworkCapability) []string {
	if n == nil {
		return nil
	}
	var out []string
	for _, b := range n.Status.OVS.Bridges {
		out = append(out, b.Name)
	}
	return out
}

func ovsResources(n *corev1.Node) []string {
	var out []string
	for name, q := range n.Status.Capacity {
		if strings.HasPrefix(string(name), v1alpha1.OVSBridgeResourcePrefix) {
			out = append(out, string(name)+"="+q.String())
		}
	}
	slices.Sort(out)
	return out
}

func TestPublishToAPIServer(t *testing.T) {
	c := startCluster(t)
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	c.installSpiderpoolCRD(t)
	agent := startAgent(t)
	o := startOVS(t)
	addBridge(t, o, "br1")

	// node-a carries leftovers of an older vmnicd: a label it set (listed
	// in its annotation) and the resource of a bridge that is gone, plus a
	// vmnic.io label of someone else's that must stay.
	capacity := corev1.ResourceList{
		corev1.ResourceCPU:       resource.MustParse("2"),
		"ovs.vmnic.io/gone":      resource.MustParse("1k"),
		"example.com/other-card": resource.MustParse("3"),
	}
	c.createNode(t, nodeA, capacity,
		map[string]string{"vmnic.io/old-mode": "true", "vmnic.io/keep": "yes"},
		map[string]string{AnnotationManagedLabels: "vmnic.io/old-mode,vmnic.io/masquerade"})
	c.createNode(t, nodeB, capacity, map[string]string{"vmnic.io/masquerade": "false"}, nil)
	nodeBBefore := c.node(t, nodeB)

	cfg := c.ConfigAs(daemonUser)
	pub, err := NewPublisherForConfig(cfg, nodeA, quiet())
	if err != nil {
		t.Fatal(err)
	}
	disc, err := discovery.NewDiscoveryClientForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ovsClient := NewOVS(o.DB(), quiet())
	defer ovsClient.Close()
	runner := NewRunner(RunOptions{
		Probe: ProbeOptions{
			OVS:              ovsClient,
			Discovery:        disc,
			SpiderpoolSocket: agent.Socket,
			Log:              quiet(),
		},
		Sink:   pub,
		Resync: time.Hour, // changes must show through events and polls
	})
	done := make(chan error, 1)
	go func() { done <- runner.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}()

	// The object, its conditions, the labels and the resource.
	eventually(t, 20*time.Second, "NodeNetworkCapability node-a with conditions", func() string {
		n := c.nnc(t, nodeA)
		if n == nil || len(n.Status.Conditions) != 4 {
			return fmt.Sprintf("%+v", n)
		}
		return ""
	})
	n := c.nnc(t, nodeA)
	t.Logf("node-a conditions:")
	for _, cd := range n.Status.Conditions {
		t.Logf("  %s=%s %s: %s", cd.Type, cd.Status, cd.Reason, cd.Message)
	}
	if n.Spec.NodeName != nodeA || len(n.OwnerReferences) != 1 || n.OwnerReferences[0].Name != nodeA || n.OwnerReferences[0].UID == "" {
		t.Errorf("object meta/spec: %+v %+v", n.ObjectMeta, n.Spec)
	}
	k := n.Status.Kernel
	if need.InNodeVM() && !k.Ipvlan {
		t.Fatalf("in the node VM the kernel report says no ipvlan: %+v", k)
	}
	wantCond := map[string]metav1.ConditionStatus{
		v1alpha1.ConditionMasqueradeReady:   metav1.ConditionTrue,
		v1alpha1.ConditionPasstMacvlanReady: metav1.ConditionTrue,
		v1alpha1.ConditionPasstIpvlanReady:  map[bool]metav1.ConditionStatus{true: metav1.ConditionTrue, false: metav1.ConditionFalse}[k.Ipvlan],
		v1alpha1.ConditionBridgeOVSReady:    metav1.ConditionTrue,
	}
	for typ, want := range wantCond {
		if got := cond(n.Status, typ); got.Status != want {
			t.Errorf("%s = %s (%s: %s), want %s", typ, got.Status, got.Reason, got.Message, want)
		}
	}
	if !k.Ipvlan && cond(n.Status, v1alpha1.ConditionPasstIpvlanReady).Reason != v1alpha1.ReasonKernelFeatureMissing {
		t.Errorf("ipvlan reason: %+v", cond(n.Status, v1alpha1.ConditionPasstIpvlanReady))
	}
	if sp := n.Status.Spiderpool; !sp.CRDs || !sp.AgentSocket || !sp.Healthy {
		t.Errorf("spiderpool: %+v", sp)
	}
	if got := bridgeNames(n); !slices.Equal(got, []string{"br1"}) {
		t.Errorf("bridges %v", got)
	}

	wantLabels := map[string]string{
		"vmnic.io/masquerade":    "true",
		"vmnic.io/passt-macvlan": "true",
		"vmnic.io/passt-ipvlan":  fmt.Sprint(k.Ipvlan),
		"vmnic.io/bridge-ovs":    "true",
		"vmnic.io/keep":          "yes",
	}
	eventually(t, 10*time.Second, "node-a labels and resources", func() string {
		node := c.node(t, nodeA)
		got := map[string]string{}
		for key, v := range node.Labels {
			if strings.HasPrefix(key, "vmnic.io/") {
				got[key] = v
			}
		}
		res := ovsResources(node)
		if !reflect.DeepEqual(got, wantLabels) || !slices.Equal(res, []string{"ovs.vmnic.io/br1=1k"}) {
			return fmt.Sprintf("labels %v resources %v", got, res)
		}
		return ""
	})
	nodeAState := c.node(t, nodeA)
	if q := nodeAState.Status.Capacity["example.com/other-card"]; q.String() != "3" {
		t.Errorf("someone else's resource changed: %v", nodeAState.Status.Capacity)
	}
	if got := nodeAState.Annotations[AnnotationManagedLabels]; got != "vmnic.io/bridge-ovs,vmnic.io/masquerade,vmnic.io/passt-ipvlan,vmnic.io/passt-macvlan" {
		t.Errorf("managed labels annotation %q", got)
	}

	checkPrinterColumns(t, c.Config, map[string]string{
		"Masquerade": "True", "Passt-Macvlan": "True", "Passt-Ipvlan": string(wantCond[v1alpha1.ConditionPasstIpvlanReady]), "Bridge-OVS": "True",
	})

	// Nothing changes, nothing is written.
	rv := c.nnc(t, nodeA).ResourceVersion
	nodeRV := c.node(t, nodeA).ResourceVersion
	time.Sleep(3 * DefaultPoll)
	if got := c.nnc(t, nodeA).ResourceVersion; got != rv {
		t.Errorf("NodeNetworkCapability rewritten without a change (%s -> %s)", rv, got)
	}
	if got := c.node(t, nodeA).ResourceVersion; got != nodeRV {
		t.Errorf("node rewritten without a change (%s -> %s)", nodeRV, got)
	}

	// A new bridge: how long until the cluster knows? Several samples, each
	// at a random point of the poll period, which decides most of it.
	var samples []time.Duration
	for i := range 5 {
		time.Sleep(rand.N(DefaultPoll))
		name := fmt.Sprintf("brm%d", i)
		if i == 4 {
			name = "br2"
		}
		added := time.Now()
		addBridge(t, o, name)
		eventually(t, 20*time.Second, name+" in the NodeNetworkCapability", func() string {
			if got := bridgeNames(c.nnc(t, nodeA)); !slices.Contains(got, name) {
				return fmt.Sprint(got)
			}
			return ""
		})
		samples = append(samples, time.Since(added).Round(time.Millisecond))
		if name != "br2" {
			if _, err := o.Vsctl("del-br", name); err != nil {
				t.Fatal(err)
			}
		}
	}
	sorted := slices.Sorted(slices.Values(samples))
	t.Logf("MEASURED: ovs-vsctl add-br (waits for ovs-vswitchd) -> NodeNetworkCapability updated: samples %v, median %v, max %v (OVS poll %v)",
		samples, sorted[len(sorted)/2], sorted[len(sorted)-1], DefaultPoll)
	eventually(t, 10*time.Second, "resource of br2", func() string {
		if res := ovsResources(c.node(t, nodeA)); !slices.Equal(res, []string{"ovs.vmnic.io/br1=1k", "ovs.vmnic.io/br2=1k"}) {
			return fmt.Sprint(res)
		}
		return ""
	})

	// br1 goes: its resource goes, without a restart.
	if _, err := o.Vsctl("del-br", "br1"); err != nil {
		t.Fatal(err)
	}
	eventually(t, 20*time.Second, "br1 gone from node-a", func() string {
		res := ovsResources(c.node(t, nodeA))
		br := bridgeNames(c.nnc(t, nodeA))
		if !slices.Equal(res, []string{"ovs.vmnic.io/br2=1k"}) || !slices.Equal(br, []string{"br2"}) {
			return fmt.Sprintf("resources %v bridges %v", res, br)
		}
		return ""
	})

	// The Spiderpool agent stops: passt-macvlan and bridge-ovs go false.
	agent.stop()
	eventually(t, 20*time.Second, "agent loss published", func() string {
		cd := c.nncCondition(t, v1alpha1.ConditionPasstMacvlanReady)
		node := c.node(t, nodeA)
		if cd.Status != metav1.ConditionFalse || cd.Reason != v1alpha1.ReasonSpiderpoolAgentUnavailable ||
			node.Labels[v1alpha1.LabelPasstMacvlan] != "false" || node.Labels[v1alpha1.LabelBridgeOVS] != "false" {
			return fmt.Sprintf("%+v labels %v", cd, node.Labels)
		}
		return ""
	})
	t.Logf("agent stopped: %s", c.nncCondition(t, v1alpha1.ConditionBridgeOVSReady).Message)
	if sp := c.nnc(t, nodeA).Status.Spiderpool; sp.Healthy || sp.AgentSocket {
		t.Errorf("spiderpool after agent stop: %+v", sp)
	}
	// Masquerade did not change, so its transition time did not either.
	if before, after := cond(n.Status, v1alpha1.ConditionMasqueradeReady), c.nncCondition(t, v1alpha1.ConditionMasqueradeReady); !before.LastTransitionTime.Equal(&after.LastTransitionTime) {
		t.Errorf("MasqueradeReady transition time moved: %v -> %v", before.LastTransitionTime, after.LastTransitionTime)
	}

	// Every bridge gone: no ovs.vmnic.io resource left.
	if _, err := o.Vsctl("del-br", "br2"); err != nil {
		t.Fatal(err)
	}
	eventually(t, 20*time.Second, "no bridge resources", func() string {
		if res := ovsResources(c.node(t, nodeA)); len(res) != 0 {
			return fmt.Sprint(res)
		}
		if cd := c.nncCondition(t, v1alpha1.ConditionBridgeOVSReady); cd.Reason != v1alpha1.ReasonNoOVSBridge {
			return fmt.Sprintf("%+v", cd)
		}
		return ""
	})

	// node-b was never touched, and the daemon's user could not have.
	nodeBAfter := c.node(t, nodeB)
	if nodeBAfter.ResourceVersion != nodeBBefore.ResourceVersion {
		t.Errorf("node-b changed: %v -> %v", nodeBBefore, nodeBAfter)
	}
	if c.nnc(t, nodeB) != nil {
		t.Error("a NodeNetworkCapability for node-b exists")
	}
	daemonKube := kubernetes.NewForConfigOrDie(cfg)
	_, err = daemonKube.CoreV1().Nodes().Patch(ctx, nodeB, types.MergePatchType,
		[]byte(`{"metadata":{"labels":{"vmnic.io/masquerade":"true"}}}`), metav1.PatchOptions{})
	if !apierrors.IsForbidden(err) {
		t.Errorf("the daemon's user may patch node-b: %v", err)
	}
	if last, ok := runner.Last(); !ok || len(last.OVS.Bridges) != 0 {
		t.Errorf("runner's last report: %v %+v", ok, last.OVS)
	}
}

// checkPrinterColumns asks the API server for the Table view of node-a (what
// kubectl get shows) and compares the mode columns.
func checkPrinterColumns(t *testing.T, cfg *rest.Config, want map[string]string) {
	t.Helper()
	hc, err := rest.HTTPClientFor(cfg)
	if err != nil {
		t.Fatal(err)
	}
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet,
		cfg.Host+"/apis/vmnic.io/v1alpha1/nodenetworkcapabilities/"+nodeA, nil)
	req.Header.Set("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	var table metav1.Table
	if err := json.Unmarshal(body, &table); err != nil || len(table.Rows) != 1 {
		t.Fatalf("table: %v %s", err, body)
	}
	got := map[string]string{}
	var header []string
	for i, col := range table.ColumnDefinitions {
		header = append(header, col.Name)
		if _, ok := want[col.Name]; ok {
			got[col.Name] = fmt.Sprint(table.Rows[0].Cells[i])
		}
	}
	t.Logf("kubectl get nnc columns: %v = %v", header, table.Rows[0].Cells)
	if !reflect.DeepEqual(got, want) {
		t.Errorf("printer columns %v, want %v", got, want)
	}
	if !slices.Contains(header, "Age") {
		t.Errorf("no Age column: %v", header)
	}
}

// TestSpiderpoolAgainstAPIServer: the CRD check through real discovery, and
// the agent's health through a real socket.
func TestSpiderpoolAgainstAPIServer(t *testing.T) {
	c := startCluster(t)
	disc, err := discovery.NewDiscoveryClientForConfig(c.Config)
	if err != nil {
		t.Fatal(err)
	}
	agent := startAgent(t)
	probe := func() Report {
		return Probe(t.Context(), ProbeOptions{Kernel: allKernel, Discovery: disc, SpiderpoolSocket: agent.Socket, Log: quiet()})
	}
	r := probe()
	if r.Spiderpool.CRDs || !strings.Contains(r.Spiderpool.CRDsError, "does not serve spiderpool.spidernet.io/v2beta1") {
		t.Fatalf("before the CRD: %+v", r.Spiderpool)
	}
	if c := cond(r, v1alpha1.ConditionPasstMacvlanReady); c.Reason != v1alpha1.ReasonSpiderpoolCRDsMissing {
		t.Fatalf("before the CRD: %+v", c)
	}
	c.installSpiderpoolCRD(t)
	r = probe()
	if !r.Spiderpool.CRDs || !r.Spiderpool.Healthy || !Ready(r, v1alpha1.ConditionPasstMacvlanReady) {
		t.Fatalf("with CRD and agent: %+v %+v", r.Spiderpool, cond(r, v1alpha1.ConditionPasstMacvlanReady))
	}
	agent.stop()
	r = probe()
	if r.Spiderpool.Healthy || Ready(r, v1alpha1.ConditionPasstMacvlanReady) ||
		cond(r, v1alpha1.ConditionPasstMacvlanReady).Reason != v1alpha1.ReasonSpiderpoolAgentUnavailable {
		t.Fatalf("agent stopped: %+v %+v", r.Spiderpool, cond(r, v1alpha1.ConditionPasstMacvlanReady))
	}
}
