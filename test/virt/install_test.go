package virt_test

import (
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/vmnic/vmnic/test/need"
	"github.com/vmnic/vmnic/test/node"
	"github.com/vmnic/vmnic/test/virt"
)

// startNodes starts the two node containers KubeVirt runs on: node-1 with
// the control plane, node-2 joining it.
func startNodes(t *testing.T) (*node.Node, *node.Node) {
	t.Helper()
	need.NoError(t, node.Check())
	a := node.StartT(t, node.Options{Container: true, Aggregation: true})
	b := node.StartT(t, node.Options{Container: true, Join: a, Name: "node-2", IP: "192.168.200.11"})
	return a, b
}

// TestKubeVirtInstalls installs the real KubeVirt as its users do, the
// operator's manifest and then a KubeVirt CR, on two nodes, and checks that
// KubeVirt's own components run it: the CR becomes Available at the
// version built here, virt-api and virt-controller run, virt-handler runs
// on each node from the image built here and marks its node schedulable
// for VMs.
func TestKubeVirtInstalls(t *testing.T) {
	ctx := t.Context()
	imgs, err := virt.BuildImages(ctx)
	if err != nil {
		t.Fatal(err)
	}
	a, b := startNodes(t)
	start := time.Now()
	if err := virt.Install(ctx, imgs, virt.DefaultCR(), 10*time.Minute, a, b); err != nil {
		t.Fatal(err)
	}
	t.Logf("KubeVirt Available %v after the install began", time.Since(start).Round(time.Millisecond))

	kv, err := virt.Get(ctx, a, virt.Namespace, virt.CRName)
	if err != nil {
		t.Fatal(err)
	}
	if kv.Status.ObservedKubeVirtVersion != virt.Version || kv.Status.TargetKubeVirtRegistry != virt.Registry {
		t.Errorf("KubeVirt deployed %s from %s, want %s from %s", kv.Status.ObservedKubeVirtVersion, kv.Status.TargetKubeVirtRegistry, virt.Version, virt.Registry)
	}
	pods, err := a.Kube.CoreV1().Pods(virt.Namespace).List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	handlers := map[string]bool{}
	running := map[string]int{}
	for _, p := range pods.Items {
		component := p.Labels["kubevirt.io"]
		ready := len(p.Status.ContainerStatuses) > 0
		for _, cs := range p.Status.ContainerStatuses {
			if _, ok := imgs[cs.Image]; !ok && !strings.HasPrefix(cs.Image, virt.Registry+"/") {
				t.Errorf("pod %s runs %s, not an image built here", p.Name, cs.Image)
			}
			ready = ready && cs.Ready
		}
		if ready {
			running[component]++
			if component == "virt-handler" {
				handlers[p.Spec.NodeName] = true
			}
		}
	}
	for _, c := range []string{"virt-operator", "virt-api", "virt-controller", "virt-handler"} {
		if running[c] == 0 {
			t.Errorf("no ready %s pod:\n%s", c, virt.PodsReport(ctx, a))
		}
	}
	for _, n := range []*node.Node{a, b} {
		if !handlers[n.Name] {
			t.Errorf("no ready virt-handler on %s", n.Name)
		}
		no, err := a.Kube.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if no.Labels[node.SchedulableLabel] != "true" {
			t.Errorf("%s: virt-handler did not mark it schedulable: labels %v", n.Name, no.Labels)
		}
	}
}
