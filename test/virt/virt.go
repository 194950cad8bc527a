// Package virt runs the real KubeVirt on real nodes for vmnic's tests:
// KubeVirt v1.8.2's own components (virt-operator, virt-api,
// virt-controller, virt-handler, virt-launcher), built from its Go module
// by test/tools/kubevirt, in images test/tools/kubevirt/images.sh builds
// (the launcher's with Debian trixie's libvirt, QEMU and passt), on node
// containers (test/node, Options.Container) that have their own PID and
// mount namespaces, as virt-handler needs.
//
// KubeVirt is installed as its users install it: the operator's manifest
// (made by KubeVirt's own generators, test/kvoracle), then a KubeVirt CR;
// the operator deploys the rest. No registry is reachable, so the images
// are imported into each node's containerd under the references
// virt-operator computes, and pulled IfNotPresent.
package virt

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/vmnic/vmnic/test/cluster"
	"github.com/vmnic/vmnic/test/kvoracle"
	"github.com/vmnic/vmnic/test/node"
)

const (
	// Registry is the registry part of every KubeVirt image reference.
	Registry = "vmnic.test/kubevirt"
	// Version is KubeVirt's release (KUBEVIRT_VERSION, the images' tag).
	Version = "v1.8.2"
	// Namespace is where KubeVirt is installed.
	Namespace = "kubevirt"
	// OperatorImage is VIRT_OPERATOR_IMAGE.
	OperatorImage = Registry + "/virt-operator:" + Version
	// CRName is the KubeVirt CR's name.
	CRName = "kubevirt"
)

// KubeVirtResource is the KubeVirt CR's resource.
var KubeVirtResource = schema.GroupVersionResource{Group: "kubevirt.io", Version: "v1", Resource: "kubevirts"}

// Images are KubeVirt's images as OCI archives, by reference.
type Images map[string]string

// BuildImages builds KubeVirt's images (once per machine: the script keeps
// them under .tools/kubevirt/images) and returns them.
func BuildImages(ctx context.Context) (Images, error) {
	root, err := cluster.RepoRoot()
	if err != nil {
		return nil, err
	}
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, "bash", filepath.Join(root, "test", "tools", "kubevirt", "images.sh"))
	cmd.Dir = root
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err = cmd.Run(); err != nil {
		return nil, fmt.Errorf("test/tools/kubevirt/images.sh: %w: %s", err, stderr.Bytes())
	}
	dir := strings.TrimSpace(stdout.String())
	if !filepath.IsAbs(dir) {
		dir = filepath.Join(root, dir)
	}
	f, err := os.Open(filepath.Join(dir, "images.txt"))
	if err != nil {
		return nil, err
	}
	defer func() { _ = f.Close() }()
	imgs := Images{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		ref, archive, ok := strings.Cut(sc.Text(), " ")
		if !ok {
			return nil, fmt.Errorf("images.txt: bad line %q", sc.Text())
		}
		imgs[ref] = filepath.Join(dir, archive)
	}
	return imgs, sc.Err()
}

// DefaultCR is the KubeVirt CR of the tests: software emulation (the nodes
// have no /dev/kvm), one replica of virt-api and virt-controller (two
// nodes, two cores), images pulled only if not present.
func DefaultCR() *kubevirtv1.KubeVirt {
	one := uint8(1)
	kv := &kubevirtv1.KubeVirt{
		TypeMeta:   metav1.TypeMeta{APIVersion: "kubevirt.io/v1", Kind: "KubeVirt"},
		ObjectMeta: metav1.ObjectMeta{Name: CRName, Namespace: Namespace},
	}
	kv.Spec.ImagePullPolicy = corev1.PullIfNotPresent
	kv.Spec.Infra = &kubevirtv1.ComponentConfig{Replicas: &one}
	kv.Spec.Configuration.DeveloperConfiguration = &kubevirtv1.DeveloperConfiguration{UseEmulation: true}
	return kv
}

// Install installs KubeVirt on the nodes (the first runs the control
// plane) as a user does and waits until the KubeVirt CR is Available:
// imports the images into every node, marks the first node as the control
// plane (virt-operator's Deployment requires one), applies the operator's
// manifest, waits for the operator, then creates kv.
func Install(ctx context.Context, imgs Images, kv *kubevirtv1.KubeVirt, timeout time.Duration, nodes ...*node.Node) error {
	if len(nodes) == 0 {
		return fmt.Errorf("install KubeVirt: no node")
	}
	deadline := time.Now().Add(timeout)
	if err := importImages(ctx, imgs, nodes); err != nil {
		return err
	}
	cp := nodes[0]
	if err := installOperator(ctx, cp, time.Until(deadline)); err != nil {
		return err
	}
	if err := create(ctx, cp, kv); err != nil {
		return err
	}
	return wait(ctx, time.Until(deadline), "KubeVirt Available", func() (bool, string) {
		got, err := Get(ctx, cp, kv.Namespace, kv.Name)
		if err != nil {
			return false, err.Error()
		}
		for _, c := range got.Status.Conditions {
			if c.Type == kubevirtv1.KubeVirtConditionAvailable && c.Status == corev1.ConditionTrue && got.Status.Phase == kubevirtv1.KubeVirtPhaseDeployed {
				return true, ""
			}
		}
		return false, fmt.Sprintf("phase %s, conditions %+v", got.Status.Phase, got.Status.Conditions)
	}, func() string { return PodsReport(ctx, cp) })
}

// importImages imports into every node each image virt-operator's install
// strategy names (KubeVirt's own code says which, test/kvoracle).
func importImages(ctx context.Context, imgs Images, nodes []*node.Node) error {
	want, err := kvoracle.Images(ctx, OperatorImage, Version, Namespace)
	if err != nil {
		return err
	}
	for _, n := range nodes {
		for _, ref := range want.References {
			archive, ok := imgs[ref]
			if !ok {
				if want.Component[ref] == "virt-controller/SIDECAR_SHIM_IMAGE" {
					continue // hook sidecars only
				}
				return fmt.Errorf("virt-operator deploys %s (%s), which was not built", ref, want.Component[ref])
			}
			if err := n.ImportImage(archive); err != nil {
				return fmt.Errorf("import %s into %s: %w", ref, n.Name, err)
			}
		}
	}
	return nil
}

// installOperator marks cp as the control plane (virt-operator's
// Deployment requires one), applies the operator's manifest and waits for
// the operator.
func installOperator(ctx context.Context, cp *node.Node, timeout time.Duration) error {
	patch := []byte(`{"metadata":{"labels":{"node-role.kubernetes.io/control-plane":""}}}`)
	if _, err := cp.Kube.CoreV1().Nodes().Patch(ctx, cp.Name, "application/merge-patch+json", patch, metav1.PatchOptions{}); err != nil {
		return err
	}
	manifest, err := kvoracle.OperatorManifest(ctx, OperatorImage, Version, Namespace)
	if err != nil {
		return err
	}
	if err := cp.Cluster.Apply(ctx, manifest); err != nil {
		return fmt.Errorf("apply KubeVirt's operator manifest: %w", err)
	}
	return wait(ctx, timeout, "virt-operator available", func() (bool, string) {
		d, err := cp.Kube.AppsV1().Deployments(Namespace).Get(ctx, "virt-operator", metav1.GetOptions{})
		if err != nil {
			return false, err.Error()
		}
		return deploymentAvailable(d), fmt.Sprintf("%d/%d available", d.Status.AvailableReplicas, d.Status.Replicas)
	}, func() string { return PodsReport(ctx, cp) })
}

// create stores the KubeVirt CR.
func create(ctx context.Context, cp *node.Node, kv *kubevirtv1.KubeVirt) error {
	obj, err := runtime.DefaultUnstructuredConverter.ToUnstructured(kv)
	if err != nil {
		return err
	}
	u := &unstructured.Unstructured{Object: obj}
	u.SetAPIVersion("kubevirt.io/v1")
	u.SetKind("KubeVirt")
	if _, err := cp.Cluster.Dynamic.Resource(KubeVirtResource).Namespace(kv.Namespace).Create(ctx, u, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("create the KubeVirt CR: %w", err)
	}
	return nil
}

// Get reads a KubeVirt CR.
func Get(ctx context.Context, n *node.Node, namespace, name string) (*kubevirtv1.KubeVirt, error) {
	u, err := n.Cluster.Dynamic.Resource(KubeVirtResource).Namespace(namespace).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return nil, err
	}
	kv := &kubevirtv1.KubeVirt{}
	return kv, runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, kv)
}

func deploymentAvailable(d *appsv1.Deployment) bool {
	for _, c := range d.Status.Conditions {
		if c.Type == appsv1.DeploymentAvailable && c.Status == corev1.ConditionTrue {
			return true
		}
	}
	return false
}

// PodsReport describes KubeVirt's pods (phase, node, container states)
// and the namespace's latest warning events, for a failed wait.
func PodsReport(ctx context.Context, n *node.Node) string {
	var b strings.Builder
	pods, err := n.Kube.CoreV1().Pods(Namespace).List(ctx, metav1.ListOptions{})
	if err != nil {
		return err.Error()
	}
	for _, p := range pods.Items {
		fmt.Fprintf(&b, "pod %s on %q: %s\n", p.Name, p.Spec.NodeName, p.Status.Phase)
		for _, cs := range append(p.Status.InitContainerStatuses, p.Status.ContainerStatuses...) {
			state := "running"
			switch {
			case cs.State.Waiting != nil:
				state = "waiting " + cs.State.Waiting.Reason + ": " + cs.State.Waiting.Message
			case cs.State.Terminated != nil:
				state = fmt.Sprintf("terminated %s (exit %d): %s", cs.State.Terminated.Reason, cs.State.Terminated.ExitCode, cs.State.Terminated.Message)
			}
			fmt.Fprintf(&b, "  %s ready=%t restarts=%d %s\n", cs.Name, cs.Ready, cs.RestartCount, state)
		}
	}
	evs, err := n.Kube.CoreV1().Events(Namespace).List(ctx, metav1.ListOptions{})
	if err == nil {
		items := evs.Items
		if len(items) > 30 {
			items = items[len(items)-30:]
		}
		for _, e := range items {
			if e.Type != corev1.EventTypeNormal {
				fmt.Fprintf(&b, "event %s %s/%s %s: %s\n", e.Type, e.InvolvedObject.Kind, e.InvolvedObject.Name, e.Reason, e.Message)
			}
		}
	}
	return b.String()
}

// wait polls cond every second until it holds, and on a timeout returns an
// error with its last reason and report's output.
func wait(ctx context.Context, timeout time.Duration, what string, cond func() (bool, string), report func() string) error {
	deadline := time.Now().Add(timeout)
	for {
		ok, why := cond()
		if ok {
			return nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("%s: not after %v: %s\n%s", what, timeout.Round(time.Second), why, report())
		}
		select {
		case <-ctx.Done():
		case <-time.After(time.Second):
		}
	}
}
