package integration

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/vishvananda/netlink"

	"github.com/vmnic/vmnic/pkg/apis/v1alpha1"
	"github.com/vmnic/vmnic/pkg/kubevirt"
	"github.com/vmnic/vmnic/pkg/state"
	"github.com/vmnic/vmnic/test/cluster"
	"github.com/vmnic/vmnic/test/harness"
	"github.com/vmnic/vmnic/test/need"
	"github.com/vmnic/vmnic/test/spiderpool"
)

const testNode = "node-a"

// vmiWith creates a VMI whose pod-network interface uses the given binding
// (a plugin binding name, or "masquerade" for KubeVirt's core one).
func createVMI(ctx context.Context, t testing.TB, c *cluster.Cluster, name, binding string) *kubevirtv1.VirtualMachineInstance {
	t.Helper()
	kv, err := kubevirt.KubeVirtClient(c.Config)
	if err != nil {
		t.Fatal(err)
	}
	mq := true
	vmi := &kubevirtv1.VirtualMachineInstance{
		TypeMeta:   metav1.TypeMeta{APIVersion: "kubevirt.io/v1", Kind: "VirtualMachineInstance"},
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default"},
	}
	vmi.Spec.Networks = []kubevirtv1.Network{{Name: "default", NetworkSource: kubevirtv1.NetworkSource{Pod: &kubevirtv1.PodNetwork{}}}}
	iface := kubevirtv1.Interface{Name: "default", MacAddress: "02:00:00:aa:00:01", Ports: []kubevirtv1.Port{{Name: "ssh", Port: 22}}}
	if binding == "masquerade" {
		iface.Masquerade = &kubevirtv1.InterfaceMasquerade{}
	} else {
		iface.Binding = &kubevirtv1.PluginBinding{Name: binding}
	}
	vmi.Spec.Domain.Devices.Interfaces = []kubevirtv1.Interface{iface}
	vmi.Spec.Domain.Devices.NetworkInterfaceMultiQueue = &mq
	vmi.Spec.Domain.CPU = &kubevirtv1.CPU{Cores: 3}
	out := &kubevirtv1.VirtualMachineInstance{}
	if err := kv.Post().Namespace("default").Resource("virtualmachineinstances").Body(vmi).Do(ctx).Into(out); err != nil {
		t.Fatalf("create VMI %s: %v", name, err)
	}
	return out
}

// createLauncherPod creates the virt-launcher pod object of vmi on testNode.
func createLauncherPod(ctx context.Context, t testing.TB, kube kubernetes.Interface, vmi *kubevirtv1.VirtualMachineInstance, name string) {
	t.Helper()
	createLauncherPodOn(ctx, t, kube, vmi, name, testNode)
}

// createLauncherPodOn creates the virt-launcher pod object of vmi on node.
func createLauncherPodOn(ctx context.Context, t testing.TB, kube kubernetes.Interface, vmi *kubevirtv1.VirtualMachineInstance, name, node string) {
	t.Helper()
	yes := true
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Name: name, Namespace: "default",
			Labels:      map[string]string{"kubevirt.io": "virt-launcher", "kubevirt.io/created-by": string(vmi.UID)},
			Annotations: map[string]string{"kubevirt.io/domain": vmi.Name},
			OwnerReferences: []metav1.OwnerReference{{
				APIVersion: "kubevirt.io/v1", Kind: "VirtualMachineInstance", Name: vmi.Name, UID: vmi.UID, Controller: &yes,
			}},
		},
		Spec: corev1.PodSpec{NodeName: node, Containers: []corev1.Container{{Name: "compute", Image: "virt-launcher"}}},
	}
	if _, err := kube.CoreV1().Pods("default").Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create pod %s: %v", name, err)
	}
}

// TestClusterModeDecision runs the daemon against a real API server: the
// VMI's binding decides. A vmnic binding is wired with the VMI's MAC, ports
// and queues; KubeVirt's core masquerade passes through untouched; a pod
// created after the informers synced is found by the live read.
func TestClusterModeDecision(t *testing.T) {
	ctx, c, kube := kubeVirtCluster(t)
	vmA := createVMI(ctx, t, c, "vm-a", kubevirt.DefaultBinding)
	vmB := createVMI(ctx, t, c, "vm-b", "masquerade")
	createLauncherPod(ctx, t, kube, vmA, "virt-launcher-vm-a-11111")
	createLauncherPod(ctx, t, kube, vmB, "virt-launcher-vm-b-22222")

	node, err := harness.NewNode(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(node.Close)
	startClusterVmnicd(t, node, c, testNode)

	l := list(t, node, harness.NetOptions{Vmnic: true})
	podA := newPod(t, "virt-launcher-vm-a-11111")
	if _, err := node.Add(ctx, l, podA); err != nil {
		t.Fatalf("ADD vm-a: %v", err)
	}
	links := podLinks(t, podA)
	if links["k6t-eth0"] == nil || links["tap0"] == nil {
		t.Fatalf("vm-a (binding vmnic) not wired: links %v", keys(links))
	}
	if tap, ok := links["tap0"].(*netlink.Tuntap); !ok || tap.Flags&netlink.TUNTAP_MULTI_QUEUE == 0 {
		t.Errorf("vm-a asks networkInterfaceMultiqueue with 3 vCPUs: tap0 must be multiqueue")
	}
	rules, err := nftList(t, podA, "ip")
	if err != nil || !strings.Contains(rules, "tcp dport 22 dnat to 10.0.2.2") {
		t.Errorf("vm-a NAT does not forward the VMI's port 22 (%v):\n%s", err, rules)
	}
	if err := node.Check(ctx, l, podA); err != nil {
		t.Errorf("CHECK vm-a: %v", err)
	}

	podB := newPod(t, "virt-launcher-vm-b-22222")
	if _, err := node.Add(ctx, l, podB); err != nil {
		t.Fatalf("ADD vm-b: %v", err)
	}
	if links := podLinks(t, podB); links["k6t-eth0"] != nil || links["tap0"] != nil {
		t.Errorf("vm-b uses KubeVirt's core masquerade and must pass through; links %v", keys(links))
	}

	// Created after the informers synced: the cache may not have it yet.
	vmC := createVMI(ctx, t, c, "vm-c", kubevirt.DefaultBinding)
	createLauncherPod(ctx, t, kube, vmC, "virt-launcher-vm-c-33333")
	podC := newPod(t, "virt-launcher-vm-c-33333")
	start := time.Now()
	if _, err := node.Add(ctx, l, podC); err != nil {
		t.Fatalf("ADD vm-c: %v", err)
	}
	if podLinks(t, podC)["tap0"] == nil {
		t.Error("vm-c not wired")
	}
	t.Logf("ADD of a just-created VM pod took %s", time.Since(start).Round(time.Millisecond))

	// A migration target of vm-a wired after the handoff (a sandbox
	// KubeVirt's runtime made again, say): its record says which
	// migration the pod belongs to, and the stage the VMI showed then.
	kv, err := kubevirt.KubeVirtClient(c.Config)
	if err != nil {
		t.Fatal(err)
	}
	vmim := &kubevirtv1.VirtualMachineInstanceMigration{
		TypeMeta:   metav1.TypeMeta{APIVersion: "kubevirt.io/v1", Kind: "VirtualMachineInstanceMigration"},
		ObjectMeta: metav1.ObjectMeta{Name: "vm-a-mig", Namespace: "default"},
		Spec:       kubevirtv1.VirtualMachineInstanceMigrationSpec{VMIName: "vm-a"},
	}
	created := &kubevirtv1.VirtualMachineInstanceMigration{}
	if err := kv.Post().Namespace("default").Resource("virtualmachineinstancemigrations").Body(vmim).Do(ctx).Into(created); err != nil {
		t.Fatalf("create VMIM: %v", err)
	}
	handoff := fmt.Sprintf(`{"metadata":{"labels":{%q:%q}},"status":{"migrationState":{"migrationUid":%q,"sourceNode":%q,"targetNode":%q,"sourcePod":"virt-launcher-vm-a-11111","targetPod":"virt-launcher-vm-a-target","targetNodeAddress":"192.0.2.2"}}}`,
		kubevirtv1.MigrationTargetNodeNameLabel, testNode, created.UID, testNode, testNode)
	if err := kv.Patch(types.MergePatchType).Namespace("default").Resource("virtualmachineinstances").Name("vm-a").Body([]byte(handoff)).Do(ctx).Error(); err != nil {
		t.Fatalf("VMI migration state: %v", err)
	}
	time.Sleep(2 * time.Second)
	targetName := "virt-launcher-vm-a-target"
	yes := true
	target := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Name: targetName, Namespace: "default",
			Labels:          map[string]string{"kubevirt.io": "virt-launcher", "kubevirt.io/migrationJobUID": string(created.UID)},
			Annotations:     map[string]string{"kubevirt.io/migrationJobName": "vm-a-mig"},
			OwnerReferences: []metav1.OwnerReference{{APIVersion: "kubevirt.io/v1", Kind: "VirtualMachineInstance", Name: "vm-a", UID: vmA.UID, Controller: &yes}},
		},
		Spec: corev1.PodSpec{NodeName: testNode, Containers: []corev1.Container{{Name: "compute", Image: "virt-launcher"}}},
	}
	if _, err := kube.CoreV1().Pods("default").Create(ctx, target, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	podT := newPod(t, targetName)
	if _, err := node.Add(ctx, l, podT); err != nil {
		t.Fatalf("ADD migration target: %v", err)
	}
	rec, err := state.Open(filepath.Join(node.StateDir(), "attachments"))
	if err != nil {
		t.Fatal(err)
	}
	r, err := rec.Get(state.Key(podT.ContainerID, "eth0"))
	if err != nil {
		t.Fatal(err)
	}
	if r.Migration == nil || r.Migration.Job != "vm-a-mig" || r.Migration.UID != string(created.UID) || r.Migration.Phase != "TargetReady" {
		t.Errorf("target's record migration = %+v, want vm-a-mig/%s in TargetReady", r.Migration, created.UID)
	}

	for _, p := range []*harness.Pod{podA, podB, podC, podT} {
		if err := node.Del(ctx, l, p); err != nil {
			t.Errorf("DEL %s: %v", p.Name, err)
		}
	}
	assertClean(t, podA, node.StateDir())
}

func keys[V any](m map[string]V) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

// TestDaemonPublishesCapabilities runs the vmnicd binary against a real API
// server: it publishes its node's NodeNetworkCapability (masquerade ready on
// this kernel, passt-ipvlan not, with the kernel's reason) and labels.
func TestDaemonPublishesCapabilities(t *testing.T) {
	ctx := ctxT(t)
	c := cluster.StartT(t)
	root, err := harness.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	if err := c.InstallCRDs(ctx, filepath.Join(root, "deploy/crds/vmnic.io_nodenetworkcapabilities.yaml")); err != nil {
		t.Fatal(err)
	}
	if err := c.InstallKubeVirtCRDs(ctx); err != nil {
		t.Fatal(err)
	}
	kube, err := kubernetes.NewForConfig(c.Config)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kube.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: testNode}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	node, _ := newNode(t, false)
	node.DaemonInHostNetns = true
	d, err := node.StartDaemonProcess("--kubeconfig", c.Kubeconfig, "--node-name", testNode, "--ovsdb", "")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = d.Stop() })

	var nnc *unstructured.Unstructured
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		nnc, err = c.Dynamic.Resource(v1alpha1.NodeNetworkCapabilitiesResource).Get(ctx, testNode, metav1.GetOptions{})
		if err == nil && len(conditions(nnc)) == 4 {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if err != nil {
		log, _ := os.ReadFile(d.Log)
		t.Fatalf("NodeNetworkCapability %s: %v\n%s", testNode, err, log)
	}
	conds := conditions(nnc)
	if conds["MasqueradeReady"]["status"] != "True" {
		t.Errorf("MasqueradeReady = %v", conds["MasqueradeReady"])
	}
	if cond := conds["PasstIpvlanReady"]; cond["status"] != "False" || cond["reason"] != "KernelFeatureMissing" {
		t.Errorf("PasstIpvlanReady = %v, want False/KernelFeatureMissing on this kernel", cond)
	}
	if cond := conds["BridgeOVSReady"]; cond["status"] != "False" {
		t.Errorf("BridgeOVSReady = %v, want False without OVS", cond)
	}
	n, err := kube.CoreV1().Nodes().Get(ctx, testNode, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if n.Labels["vmnic.io/masquerade"] != "true" || n.Labels["vmnic.io/passt-ipvlan"] != "false" {
		t.Errorf("node labels %v", n.Labels)
	}
}

func conditions(u *unstructured.Unstructured) map[string]map[string]any {
	out := map[string]map[string]any{}
	list, _, _ := unstructured.NestedSlice(u.Object, "status", "conditions")
	for _, c := range list {
		if m, ok := c.(map[string]any); ok {
			out[fmt.Sprint(m["type"])] = m
		}
	}
	return out
}

// TestCapabilitiesFollowSpiderpool: with the real Spiderpool agent running
// the passt-macvlan mode is ready; when the agent stops, the daemon reports
// it unavailable with the reason, without a restart.
func TestCapabilitiesFollowSpiderpool(t *testing.T) {
	need.Root(t)
	ctx := ctxT(t)
	c := cluster.StartT(t)
	root, err := harness.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	if err := c.InstallCRDs(ctx, filepath.Join(root, "deploy/crds/vmnic.io_nodenetworkcapabilities.yaml")); err != nil {
		t.Fatal(err)
	}
	if err := c.InstallKubeVirtCRDs(ctx); err != nil {
		t.Fatal(err)
	}
	agent := spiderpool.StartAgentT(t, c, spiderpool.AgentOptions{NodeName: testNode})
	kube, err := kubernetes.NewForConfig(c.Config)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kube.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: testNode}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	node, _ := newNode(t, false)
	node.DaemonInHostNetns = true
	d, err := node.StartDaemonProcess("--kubeconfig", c.Kubeconfig, "--node-name", testNode, "--ovsdb", "", "--spiderpool-socket", agent.Socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = d.Stop() })
	waitCond := func(typ, status string) map[string]any {
		t.Helper()
		var last map[string]any
		for deadline := time.Now().Add(60 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
			nnc, err := c.Dynamic.Resource(v1alpha1.NodeNetworkCapabilitiesResource).Get(ctx, testNode, metav1.GetOptions{})
			if err != nil {
				continue
			}
			last = conditions(nnc)[typ]
			if last["status"] == status {
				return last
			}
		}
		log, _ := os.ReadFile(d.Log)
		t.Fatalf("condition %s never became %s (last %v)\n%s", typ, status, last, log)
		return nil
	}
	waitCond("PasstMacvlanReady", "True")
	start := time.Now()
	agent.Stop()
	cond := waitCond("PasstMacvlanReady", "False")
	if cond["reason"] != "SpiderpoolAgentUnavailable" {
		t.Errorf("reason %v, want SpiderpoolAgentUnavailable", cond["reason"])
	}
	t.Logf("agent stop reflected in the NodeNetworkCapability after %s", time.Since(start).Round(time.Millisecond))
}
