package deploy

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"

	"github.com/vmnic/vmnic/test/cluster"
)

const (
	nodeA = "node-a"
	nodeB = "node-b"
)

var (
	nncGVR      = schema.GroupVersionResource{Group: "vmnic.io", Version: "v1alpha1", Resource: "nodenetworkcapabilities"}
	vmiGVR      = schema.GroupVersionResource{Group: "kubevirt.io", Version: "v1", Resource: "virtualmachineinstances"}
	kubevirtGVR = schema.GroupVersionResource{Group: "kubevirt.io", Version: "v1", Resource: "kubevirts"}
)

// daemonUser is the user of the daemon's tokens for the default release.
var daemonUser = cluster.ServiceAccountUser(defaultNamespace, fullname)

// daemonGroups are the groups the API server gives a service-account token.
var daemonGroups = []string{"system:serviceaccounts", "system:serviceaccounts:" + defaultNamespace, "system:authenticated"}

// TestManifestDryRun sends every object of the committed manifest, of a
// render with non-default values into another namespace (its
// ServiceMonitor against Prometheus Operator's CRD), and of a render with
// metrics off, to a real kube-apiserver v1.36 with server-side dry-run and
// strict field validation: schema validation, defaulting and admission,
// nothing stored.
func TestManifestDryRun(t *testing.T) {
	c := cluster.StartT(t)
	ctx := t.Context()
	dryRunStrict(ctx, t, c, manifestPath, readRepoFile(t, manifestPath))
	if err := c.CreateNamespace(ctx, "vmnic-system"); err != nil {
		t.Fatal(err)
	}
	if err := c.InstallCRDs(ctx, serviceMonitorCRD(t)); err != nil {
		t.Fatal(err)
	}
	dryRunStrict(ctx, t, c, "non-default values", render(t, "rel", "vmnic-system", nonDefault...))
	dryRunStrict(ctx, t, c, "metrics off", render(t, defaultRelease, defaultNamespace, "metrics.enabled=false"))
}

// dryRunStrict sends every object of manifest to the API server as
// dryRunApply does (dryRun=All, fieldValidation Strict).
func dryRunStrict(ctx context.Context, t *testing.T, c *cluster.Cluster, what string, manifest []byte) {
	t.Helper()
	objs, err := cluster.Objects(manifest)
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	for _, o := range objs {
		if err := dryRunApply(ctx, c, o); err != nil {
			t.Errorf("%s: %s %s: %v", what, o.GetKind(), o.GetName(), err)
		}
	}
}

// TestDaemonIdentity installs the chart with helm into a real API server
// and acts as vmnicd on node-a does: with a service-account token bound to
// a pod on node-a (no kubelet runs; the pod object is enough). RBAC grants
// what the daemon does and nothing more; the admission policy keeps it to
// node-a's Node and NodeNetworkCapability.
func TestDaemonIdentity(t *testing.T) {
	c := cluster.StartT(t)
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()

	notes := string(helm(t, "install", defaultRelease, chartDir, "--namespace", defaultNamespace,
		"--kubeconfig", c.Kubeconfig, "--set", "kubevirt.binding.register=true"))
	if err := c.InstallKubeVirtCRDs(ctx); err != nil {
		t.Fatal(err)
	}
	// helm installed the chart's crds/ and waited for them; discovery may
	// lag a moment.
	if _, err := c.RESTMapping(ctx, schema.GroupVersionKind{Group: "vmnic.io", Version: "v1alpha1", Kind: "NodeNetworkCapability"}); err != nil {
		t.Fatal(err)
	}
	admin := kubernetes.NewForConfigOrDie(c.Config)
	for _, n := range []string{nodeA, nodeB} {
		if _, err := admin.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: n}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	pod := daemonPod(ctx, t, admin, nodeA)

	token := podBoundToken(ctx, t, admin, pod)
	cfg := c.ConfigWithToken(token)
	sa := kubernetes.NewForConfigOrDie(cfg)
	saDyn := dynamic.NewForConfigOrDie(cfg)

	t.Run("token", func(t *testing.T) {
		// The API server itself says who the token is: the chart's
		// service account, on node-a.
		rev, err := sa.AuthenticationV1().SelfSubjectReviews().Create(ctx, &authnv1.SelfSubjectReview{}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		u := rev.Status.UserInfo
		if u.Username != daemonUser || len(u.Extra[nodeNameKey]) != 1 || u.Extra[nodeNameKey][0] != nodeA {
			t.Fatalf("token user %q extra %v, want %q with %s=[%s]", u.Username, u.Extra, daemonUser, nodeNameKey, nodeA)
		}
	})

	// RBAC reaches the authorizer's cache, and the policy the admission
	// plugin, a moment after they are written. (The policy's type-checking
	// status is written by kube-controller-manager, which does not run
	// here; an expression that does not compile or names a missing field
	// fails at admission, and failurePolicy Fail turns that into a denial
	// the "own" cases below would hit.)
	if err := c.WaitCan(ctx, cluster.Access{User: daemonUser, Groups: daemonGroups, Verb: "patch", Resource: "nodes"}); err != nil {
		t.Fatal(err)
	}
	waitPolicyEnforced(ctx, t, sa)

	t.Run("own node", func(t *testing.T) {
		if err := patchLabel(ctx, sa, nodeA); err != nil {
			t.Errorf("patch node %s labels: %v", nodeA, err)
		}
		if err := patchCapacity(ctx, sa, nodeA); err != nil {
			t.Errorf("patch node %s status: %v", nodeA, err)
		}
	})
	t.Run("other node", func(t *testing.T) {
		wantPolicyDenied(t, patchLabel(ctx, sa, nodeB), "patch node "+nodeB+" labels")
		wantPolicyDenied(t, patchCapacity(ctx, sa, nodeB), "patch node "+nodeB+" status")
		// An administrator is not subject to the policy.
		if err := patchLabel(ctx, admin, nodeB); err != nil {
			t.Errorf("admin: patch node %s labels: %v", nodeB, err)
		}
	})
	t.Run("own NodeNetworkCapability", func(t *testing.T) {
		nnc, err := saDyn.Resource(nncGVR).Create(ctx, newNNC(nodeA), metav1.CreateOptions{})
		if err != nil {
			t.Fatalf("create NodeNetworkCapability %s: %v", nodeA, err)
		}
		if err := unstructured.SetNestedSlice(nnc.Object, []any{map[string]any{
			"type": "MasqueradeReady", "status": "True", "reason": "Probed", "message": "",
			"lastTransitionTime": time.Now().UTC().Format(time.RFC3339),
		}}, "status", "conditions"); err != nil {
			t.Fatal(err)
		}
		if _, err := saDyn.Resource(nncGVR).UpdateStatus(ctx, nnc, metav1.UpdateOptions{}); err != nil {
			t.Errorf("update NodeNetworkCapability %s status: %v", nodeA, err)
		}
	})
	t.Run("other NodeNetworkCapability", func(t *testing.T) {
		_, err := saDyn.Resource(nncGVR).Create(ctx, newNNC(nodeB), metav1.CreateOptions{})
		wantPolicyDenied(t, err, "create NodeNetworkCapability "+nodeB)
		// One made by someone else stays out of reach too.
		other, err := c.Dynamic.Resource(nncGVR).Create(ctx, newNNC(nodeB), metav1.CreateOptions{})
		if err != nil {
			t.Fatalf("admin: create NodeNetworkCapability %s: %v", nodeB, err)
		}
		_, err = saDyn.Resource(nncGVR).Patch(ctx, nodeB, types.MergePatchType, []byte(`{"metadata":{"labels":{"x":"y"}}}`), metav1.PatchOptions{})
		wantPolicyDenied(t, err, "patch NodeNetworkCapability "+nodeB)
		_, err = saDyn.Resource(nncGVR).UpdateStatus(ctx, other, metav1.UpdateOptions{})
		wantPolicyDenied(t, err, "update NodeNetworkCapability "+nodeB+" status")
	})
	t.Run("VMI last-frame report", func(t *testing.T) {
		// A VMI that migrated away from node-a, one from node-b, one
		// that never migrated.
		fromA := newVMI(ctx, t, c, "from-a", nodeA)
		fromB := newVMI(ctx, t, c, "from-b", nodeB)
		never := newVMI(ctx, t, c, "never", "")
		patch := func(name, body string) error {
			_, err := saDyn.Resource(vmiGVR).Namespace(defaultNamespace).Patch(ctx, name, types.MergePatchType, []byte(body), metav1.PatchOptions{})
			return err
		}
		report := `{"metadata":{"annotations":{"vmnic.io/last-frame.eth0":"uid 2026-12-07T10:00:00.123456789Z"}}}`
		if err := patch(fromA, report); err != nil {
			t.Errorf("report the last frame on VMI %s (migrated away from %s): %v", fromA, nodeA, err)
		}
		wantPolicyDenied(t, patch(fromB, report), "report on VMI "+fromB+" (migrated away from "+nodeB+")")
		wantPolicyDenied(t, patch(never, report), "report on VMI "+never+" (never migrated)")
		wantPolicyDenied(t, patch(fromA, `{"metadata":{"annotations":{"other":"x"}}}`), "another annotation on VMI "+fromA)
		wantPolicyDenied(t, patch(fromA, `{"metadata":{"annotations":{"vmnic.io/last-frame.eth0":null,"kubevirt.io/x":"y"}}}`), "report swapped for another annotation on VMI "+fromA)
		wantPolicyDenied(t, patch(fromA, `{"metadata":{"labels":{"x":"y"}}}`), "a label on VMI "+fromA)
		wantPolicyDenied(t, patch(fromA, `{"spec":{"x":"y"}}`), "the spec of VMI "+fromA)
		// KubeVirt's VMI has no status subresource: a patch of the object
		// could change its status.
		wantPolicyDenied(t, patch(fromA, `{"status":{"migrationState":{"completed":false}}}`), "the status of VMI "+fromA)
		wantPolicyDenied(t, patch(fromA, `{"status":{"phase":"Failed"}}`), "the phase of VMI "+fromA)
	})
	t.Run("reads", func(t *testing.T) {
		pods, err := sa.CoreV1().Pods("").List(ctx, metav1.ListOptions{FieldSelector: "spec.nodeName=" + nodeA})
		if err != nil || len(pods.Items) != 1 || pods.Items[0].Name != pod.Name {
			t.Errorf("list pods on %s: %v (%d pods)", nodeA, err, podCount(pods))
		}
		if _, err := saDyn.Resource(vmiGVR).List(ctx, metav1.ListOptions{}); err != nil {
			t.Errorf("list virtualmachineinstances: %v", err)
		}
		if _, err := sa.CoreV1().Nodes().Get(ctx, nodeB, metav1.GetOptions{}); err != nil {
			t.Errorf("get node %s: %v", nodeB, err)
		}
	})
	t.Run("RBAC denies", func(t *testing.T) {
		err := sa.CoreV1().Nodes().Delete(ctx, nodeA, metav1.DeleteOptions{})
		if !apierrors.IsForbidden(err) || !strings.Contains(err.Error(), "cannot delete resource") {
			t.Errorf("delete own node: %v, want forbidden by RBAC", err)
		}
		if _, err := sa.CoreV1().Secrets(defaultNamespace).List(ctx, metav1.ListOptions{}); !apierrors.IsForbidden(err) {
			t.Errorf("list secrets: %v, want forbidden", err)
		}
	})
	t.Run("RBAC matrix", func(t *testing.T) {
		// Its own DaemonSet only, read only (it watches for its removal).
		for _, tc := range []struct {
			verb, name string
			want       bool
		}{{"get", fullname, true}, {"watch", fullname, false}, {"list", fullname, false}, {"get", "other", false}, {"update", fullname, false}, {"delete", fullname, false}} {
			ok, err := c.Can(ctx, cluster.Access{User: daemonUser, Groups: daemonGroups, Verb: tc.verb, Resource: "daemonsets.apps", Namespace: defaultNamespace, Name: tc.name})
			if err != nil {
				t.Fatal(err)
			}
			if ok != tc.want {
				t.Errorf("%s daemonset %s: allowed %v, want %v", tc.verb, tc.name, ok, tc.want)
			}
		}
		for _, tc := range []struct {
			verb, resource string
			want           bool
		}{
			{"watch", "pods", true},
			{"watch", "virtualmachineinstances.kubevirt.io", true},
			// Migrations are read from the VMI's status.
			{"watch", "virtualmachineinstancemigrations.kubevirt.io", false},
			{"get", "virtualmachineinstancemigrations.kubevirt.io", false},
			{"list", "spiderendpoints.spiderpool.spidernet.io", true},
			{"watch", "spiderippools.spiderpool.spidernet.io", true},
			{"create", "events", true},
			{"update", "nodenetworkcapabilities.vmnic.io/status", true},
			{"create", "pods", false},
			{"delete", "pods", false},
			{"update", "pods/status", false},
			// A source's last-frame report (the policy limits it).
			{"patch", "virtualmachineinstances.kubevirt.io", true},
			{"update", "virtualmachineinstances.kubevirt.io", false},
			{"delete", "virtualmachineinstances.kubevirt.io", false},
			{"patch", "virtualmachineinstancemigrations.kubevirt.io", false},
			{"update", "spiderippools.spiderpool.spidernet.io", false},
			{"delete", "nodenetworkcapabilities.vmnic.io", false},
			{"create", "nodes", false},
			{"update", "nodes", false},
			{"get", "secrets", false},
			{"get", "configmaps", false},
		} {
			ok, err := c.Can(ctx, cluster.Access{User: daemonUser, Groups: daemonGroups, Verb: tc.verb, Resource: tc.resource})
			if err != nil {
				t.Fatal(err)
			}
			if ok != tc.want {
				t.Errorf("%s %s: allowed %v, want %v", tc.verb, tc.resource, ok, tc.want)
			}
		}
	})
	t.Run("token without node", func(t *testing.T) {
		// A token not bound to a pod has no node claim: the policy denies
		// every write rather than allowing all.
		tr, err := admin.CoreV1().ServiceAccounts(defaultNamespace).CreateToken(ctx, fullname,
			&authnv1.TokenRequest{Spec: authnv1.TokenRequestSpec{ExpirationSeconds: ptr(int64(600))}}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		unbound := kubernetes.NewForConfigOrDie(c.ConfigWithToken(tr.Status.Token))
		err = patchLabel(ctx, unbound, nodeA)
		wantPolicyDenied(t, err, "patch node "+nodeA+" with an unbound token")
		if err != nil && !strings.Contains(err.Error(), "bound to a pod") {
			t.Errorf("denial %q does not say the token lacks a node", err)
		}
	})
	t.Run("KubeVirt binding notes", func(t *testing.T) {
		checkBindingNotes(ctx, t, c, notes)
	})
}

// daemonPod creates a pod like the DaemonSet's on node (its service
// account, spec.nodeName set as the scheduler would). No kubelet runs it.
func daemonPod(ctx context.Context, t *testing.T, kube kubernetes.Interface, node string) *corev1.Pod {
	t.Helper()
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "vmnic-" + node, Namespace: defaultNamespace},
		Spec: corev1.PodSpec{
			ServiceAccountName: fullname,
			NodeName:           node,
			HostNetwork:        true,
			Containers:         []corev1.Container{{Name: "vmnicd", Image: "vmnic:dev"}},
		},
	}
	pod, err := kube.CoreV1().Pods(defaultNamespace).Create(ctx, pod, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return pod
}

// podBoundToken requests a token for the chart's service account bound to
// pod, as kubelet does for the projected token it mounts: the API server
// adds the pod's node to it.
func podBoundToken(ctx context.Context, t *testing.T, kube kubernetes.Interface, pod *corev1.Pod) string {
	t.Helper()
	tr, err := kube.CoreV1().ServiceAccounts(pod.Namespace).CreateToken(ctx, pod.Spec.ServiceAccountName, &authnv1.TokenRequest{
		Spec: authnv1.TokenRequestSpec{
			ExpirationSeconds: ptr(int64(600)),
			BoundObjectRef:    &authnv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("token request bound to pod %s: %v", pod.Name, err)
	}
	return tr.Status.Token
}

func ptr[T any](v T) *T { return &v }

// newVMI creates a (schema-less) VMI whose status says it migrated away
// from source ("" for one that never migrated), and returns its name.
func newVMI(ctx context.Context, t *testing.T, c *cluster.Cluster, name, source string) string {
	t.Helper()
	vmi := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
		"metadata": map[string]any{"name": name, "namespace": defaultNamespace, "annotations": map[string]any{"kept": "yes"}},
		"spec":     map[string]any{"domain": map[string]any{"devices": map[string]any{}}},
	}}
	made, err := c.Dynamic.Resource(vmiGVR).Namespace(defaultNamespace).Create(ctx, vmi, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create VMI %s: %v", name, err)
	}
	if source == "" {
		return name
	}
	made.Object["status"] = map[string]any{"migrationState": map[string]any{"sourceNode": source, "targetNode": "elsewhere", "completed": true}}
	if _, err := c.Dynamic.Resource(vmiGVR).Namespace(defaultNamespace).Update(ctx, made, metav1.UpdateOptions{}); err != nil {
		t.Fatalf("set VMI %s status: %v", name, err)
	}
	return name
}

func podCount(l *corev1.PodList) int {
	if l == nil {
		return 0
	}
	return len(l.Items)
}

func patchLabel(ctx context.Context, kube kubernetes.Interface, node string) error {
	_, err := kube.CoreV1().Nodes().Patch(ctx, node, types.MergePatchType,
		[]byte(`{"metadata":{"labels":{"vmnic.io/test":"`+strconv.FormatInt(time.Now().UnixNano(), 10)+`"}}}`), metav1.PatchOptions{})
	return err
}

// patchCapacity sets an extended resource in the node's status, as the
// daemon does per OVS bridge.
func patchCapacity(ctx context.Context, kube kubernetes.Interface, node string) error {
	_, err := kube.CoreV1().Nodes().Patch(ctx, node, types.MergePatchType,
		[]byte(`{"status":{"capacity":{"vmnic.io/test-bridge":"1k"}}}`), metav1.PatchOptions{}, "status")
	return err
}

func newNNC(node string) *unstructured.Unstructured {
	return &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "vmnic.io/v1alpha1",
		"kind":       "NodeNetworkCapability",
		"metadata":   map[string]any{"name": node},
		"spec":       map[string]any{"nodeName": node},
	}}
}

// wantPolicyDenied fails the test unless err is the admission policy's
// denial.
func wantPolicyDenied(t *testing.T, err error, what string) {
	t.Helper()
	if !isPolicyDenial(err) {
		t.Errorf("%s: %v, want denied by ValidatingAdmissionPolicy %s", what, err, policyName)
	}
}

func isPolicyDenial(err error) bool {
	return apierrors.IsForbidden(err) && strings.Contains(err.Error(), "ValidatingAdmissionPolicy '"+policyName+"'")
}

// waitPolicyEnforced waits until the admission plugin enforces the policy:
// the daemon's patch of another node's labels is denied. Until then that
// patch succeeds, which changes nothing that matters here.
func waitPolicyEnforced(ctx context.Context, t *testing.T, sa kubernetes.Interface) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		err := patchLabel(ctx, sa, nodeB)
		if isPolicyDenial(err) {
			return
		}
		if err != nil && !apierrors.IsForbidden(err) {
			t.Fatalf("patch node %s as vmnicd: %v", nodeB, err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("policy %s not enforced after 30s (last: %v)", policyName, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// kubevirtCRD stands in for the KubeVirt operator's CRD: only the kind and
// the schema-less spec matter to the patch.
const kubevirtCRD = `apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: kubevirts.kubevirt.io
spec:
  group: kubevirt.io
  scope: Namespaced
  names: {kind: KubeVirt, listKind: KubeVirtList, plural: kubevirts, singular: kubevirt}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}
`

var patchCommand = regexp.MustCompile(`kubectl -n (\S+) patch kubevirts\.kubevirt\.io (\S+) --type=merge -p '([^']+)'`)

// checkBindingNotes runs the KubeVirt registration the install notes print
// against a KubeVirt CR with an empty configuration, and checks the binding
// it leaves there.
func checkBindingNotes(ctx context.Context, t *testing.T, c *cluster.Cluster, notes string) {
	t.Helper()
	m := patchCommand.FindStringSubmatch(notes)
	if m == nil {
		t.Fatalf("install notes lack the kubectl patch of the KubeVirt CR:\n%s", notes)
	}
	ns, name, patch := m[1], m[2], m[3]
	if ns != "kubevirt" || name != "kubevirt" {
		t.Errorf("notes patch kubevirt %s/%s, want kubevirt/kubevirt", ns, name)
	}
	f := filepath.Join(t.TempDir(), "kubevirt-crd.yaml")
	if err := os.WriteFile(f, []byte(kubevirtCRD), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := c.InstallCRDs(ctx, f); err != nil {
		t.Fatal(err)
	}
	if err := c.CreateNamespace(ctx, ns); err != nil {
		t.Fatal(err)
	}
	kv := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "kubevirt.io/v1", "kind": "KubeVirt",
		"metadata": map[string]any{"name": name, "namespace": ns},
		"spec":     map[string]any{"configuration": map[string]any{"developerConfiguration": map[string]any{"featureGates": []any{}}}},
	}}
	if _, err := c.Dynamic.Resource(kubevirtGVR).Namespace(ns).Create(ctx, kv, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	out, err := c.Dynamic.Resource(kubevirtGVR).Namespace(ns).Patch(ctx, name, types.MergePatchType, []byte(patch), metav1.PatchOptions{})
	if err != nil {
		t.Fatalf("apply the notes' patch %s: %v", patch, err)
	}
	binding, _, _ := unstructured.NestedMap(out.Object, "spec", "configuration", "network", "binding", "vmnic")
	got, _ := json.Marshal(binding)
	if string(got) != `{"domainAttachmentType":"tap","migration":{}}` {
		t.Errorf("binding vmnic after the patch: %s", got)
	}
	if _, ok, _ := unstructured.NestedMap(out.Object, "spec", "configuration", "developerConfiguration"); !ok {
		t.Error("the patch dropped the rest of the KubeVirt configuration")
	}
}
