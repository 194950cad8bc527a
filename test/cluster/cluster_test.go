package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	kubevirtv1 "kubevirt.io/api/core/v1"
)

var (
	podsGVR       = schema.GroupVersionResource{Version: "v1", Resource: "pods"}
	configMapsGVR = schema.GroupVersionResource{Version: "v1", Resource: "configmaps"}
	nodesGVR      = schema.GroupVersionResource{Version: "v1", Resource: "nodes"}
	vmisGVR       = kubevirtv1.SchemeGroupVersion.WithResource("virtualmachineinstances")
)

const testNS = "vmnic-test"

// TestCluster starts a real etcd + kube-apiserver and checks what the other
// tests rely on: the kubeconfig, pods in a fresh namespace, KubeVirt objects
// through kubevirt.io/api types, RBAC (impersonation and service-account
// tokens), server-side dry-run, and that Stop leaves no process behind.
func TestCluster(t *testing.T) {
	begin := time.Now()
	c := StartT(t)
	t.Logf("cluster up in %v (kube-apiserver /readyz after %v) at %s", time.Since(begin).Round(time.Millisecond), c.ReadyAfter.Round(time.Millisecond), c.URL)
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()

	t.Run("kubeconfig", func(t *testing.T) {
		cfg, err := clientcmd.BuildConfigFromFlags("", c.Kubeconfig)
		if err != nil {
			t.Fatal(err)
		}
		hc, err := rest.HTTPClientFor(cfg) // verifies the serving certificate
		if err != nil {
			t.Fatal(err)
		}
		var v struct{ GitVersion string }
		if err := getJSON(ctx, hc, c.URL+"/version", &v); err != nil {
			t.Fatal(err)
		}
		t.Logf("server version %s", v.GitVersion)
	})

	t.Run("pod", func(t *testing.T) {
		err := c.Apply(ctx, []byte(`
apiVersion: v1
kind: Namespace
metadata:
  name: `+testNS+`
---
apiVersion: v1
kind: Pod
metadata:
  name: p1
  namespace: `+testNS+`
spec:
  containers:
  - name: c
    image: example.invalid/none:1
`))
		if err != nil {
			t.Fatal(err)
		}
		pod, err := c.Dynamic.Resource(podsGVR).Namespace(testNS).Get(ctx, "p1", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		sa, _, _ := unstructured.NestedString(pod.Object, "spec", "serviceAccountName")
		phase, _, _ := unstructured.NestedString(pod.Object, "status", "phase")
		if sa != "default" || phase != "Pending" {
			t.Fatalf("pod: serviceAccountName %q phase %q, want default, Pending", sa, phase)
		}
	})

	t.Run("kubevirt", func(t *testing.T) {
		if err := c.InstallKubeVirtCRDs(ctx); err != nil {
			t.Fatal(err)
		}
		testKubeVirt(ctx, t, c)
	})

	t.Run("rbac-impersonation", func(t *testing.T) {
		err := c.Apply(ctx, []byte(`
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: node-getter}
rules:
- {apiGroups: [""], resources: [nodes], verbs: [get]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: alice-node-getter}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: node-getter}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: alice}
`))
		if err != nil {
			t.Fatal(err)
		}
		if err = c.WaitCan(ctx, Access{User: "alice", Verb: "get", Resource: "nodes"}); err != nil {
			t.Fatal(err)
		}
		allowed, err := c.Can(ctx, Access{User: "alice", Verb: "create", Resource: "configmaps", Namespace: testNS})
		if allowed || err != nil {
			t.Fatalf("alice may create configmaps: %v, %v", allowed, err)
		}
		alice := dynamicFor(t, c.ConfigAs("alice"))
		// Allowed: the node does not exist, so 404, not 403.
		if _, err = alice.Resource(nodesGVR).Get(ctx, "n1", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
			t.Fatalf("alice get node: %v, want NotFound", err)
		}
		_, err = alice.Resource(configMapsGVR).Namespace(testNS).Create(ctx, configMap("by-alice"), metav1.CreateOptions{})
		wantForbidden(t, "alice create configmap", err)
	})

	t.Run("rbac-serviceaccount-token", func(t *testing.T) {
		err := c.Apply(ctx, []byte(`
apiVersion: v1
kind: ServiceAccount
metadata: {name: reader, namespace: `+testNS+`}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: cm-reader, namespace: `+testNS+`}
rules:
- {apiGroups: [""], resources: [configmaps], verbs: [get]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: reader, namespace: `+testNS+`}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: cm-reader}
subjects:
- {kind: ServiceAccount, name: reader, namespace: `+testNS+`}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: cm1, namespace: `+testNS+`}
data: {k: v}
`))
		if err != nil {
			t.Fatal(err)
		}
		if err = c.WaitCan(ctx, Access{User: ServiceAccountUser(testNS, "reader"), Verb: "get", Resource: "configmaps", Namespace: testNS}); err != nil {
			t.Fatal(err)
		}
		// A token signed with the generated service-account key.
		tr := &unstructured.Unstructured{Object: map[string]any{
			"apiVersion": "authentication.k8s.io/v1",
			"kind":       "TokenRequest",
			"metadata":   map[string]any{"name": "reader", "namespace": testNS},
			"spec":       map[string]any{"expirationSeconds": int64(600)},
		}}
		out, err := c.Dynamic.Resource(schema.GroupVersionResource{Version: "v1", Resource: "serviceaccounts"}).
			Namespace(testNS).Create(ctx, tr, metav1.CreateOptions{}, "token")
		if err != nil {
			t.Fatal(err)
		}
		token, _, _ := unstructured.NestedString(out.Object, "status", "token")
		if token == "" {
			t.Fatalf("no token in %v", out.Object)
		}
		reader := dynamicFor(t, c.ConfigWithToken(token))
		cm, err := reader.Resource(configMapsGVR).Namespace(testNS).Get(ctx, "cm1", metav1.GetOptions{})
		if err != nil {
			t.Fatalf("reader get configmap: %v", err)
		}
		if v, _, _ := unstructured.NestedString(cm.Object, "data", "k"); v != "v" {
			t.Fatalf("configmap data: %v", cm.Object["data"])
		}
		_, err = reader.Resource(configMapsGVR).Namespace(testNS).Create(ctx, configMap("by-reader"), metav1.CreateOptions{})
		wantForbidden(t, "reader create configmap", err)
	})

	t.Run("dry-run", func(t *testing.T) {
		ds := []byte(`{"apiVersion":"apps/v1","kind":"DaemonSet","metadata":{"name":"priv","namespace":"` + testNS + `"},
"spec":{"selector":{"matchLabels":{"app":"priv"}},"template":{"metadata":{"labels":{"app":"priv"}},
"spec":{"hostNetwork":true,"containers":[{"name":"c","image":"example.invalid/none:1","securityContext":{"privileged":true}}]}}}}`)
		if err := c.ApplyDryRun(ctx, ds); err != nil {
			t.Fatal(err)
		}
		_, err := c.Dynamic.Resource(schema.GroupVersionResource{Group: "apps", Version: "v1", Resource: "daemonsets"}).
			Namespace(testNS).Get(ctx, "priv", metav1.GetOptions{})
		if !apierrors.IsNotFound(err) {
			t.Fatalf("dry-run stored the DaemonSet: %v", err)
		}
		bad := []byte(`{"apiVersion":"v1","kind":"Pod","metadata":{"name":"bad","namespace":"` + testNS + `"},"spec":{"containers":[]}}`)
		if err := c.ApplyDryRun(ctx, bad); !apierrors.IsInvalid(err) {
			t.Fatalf("dry-run of an invalid pod: %v, want Invalid", err)
		}
	})

	t.Run("stop", func(t *testing.T) {
		etcdPid, apiPid := c.Pids()
		c.Stop()
		for _, pid := range []int{etcdPid, apiPid} {
			if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
				t.Errorf("pid %d still exists after Stop (kill 0: %v)", pid, err)
			}
		}
		if _, err := os.Stat(filepath.Join(c.Dir, "kube-apiserver.log")); err != nil {
			t.Error(err)
		}
	})
}

// testKubeVirt writes a VMI built from kubevirt.io/api types and reads it
// back, through the dynamic client and as plain JSON over HTTP.
func testKubeVirt(ctx context.Context, t *testing.T, c *Cluster) {
	vmi := &kubevirtv1.VirtualMachineInstance{
		TypeMeta:   metav1.TypeMeta{APIVersion: kubevirtv1.SchemeGroupVersion.String(), Kind: "VirtualMachineInstance"},
		ObjectMeta: metav1.ObjectMeta{Name: "vm1", Namespace: testNS, Labels: map[string]string{"app": "vm1"}},
		Spec: kubevirtv1.VirtualMachineInstanceSpec{
			Domain: kubevirtv1.DomainSpec{Devices: kubevirtv1.Devices{Interfaces: []kubevirtv1.Interface{
				{Name: "default", InterfaceBindingMethod: kubevirtv1.InterfaceBindingMethod{Masquerade: &kubevirtv1.InterfaceMasquerade{}}},
				{Name: "blue", Binding: &kubevirtv1.PluginBinding{Name: "vmnic"}, MacAddress: "02:00:00:00:00:42"},
			}}},
			Networks: []kubevirtv1.Network{
				{Name: "default", NetworkSource: kubevirtv1.NetworkSource{Pod: &kubevirtv1.PodNetwork{}}},
				{Name: "blue", NetworkSource: kubevirtv1.NetworkSource{Multus: &kubevirtv1.MultusNetwork{NetworkName: "blue-net"}}},
			},
		},
	}
	obj, err := runtime.DefaultUnstructuredConverter.ToUnstructured(vmi)
	if err != nil {
		t.Fatal(err)
	}
	u := &unstructured.Unstructured{Object: obj}
	delete(u.Object, "status")
	manifest, err := u.MarshalJSON()
	if err != nil {
		t.Fatal(err)
	}
	if err = c.Apply(ctx, manifest); err != nil {
		t.Fatal(err)
	}

	// Status with the object (KubeVirt's VMI has no status subresource),
	// as virt-controller writes it.
	ri := c.Dynamic.Resource(vmisGVR).Namespace(testNS)
	cur, err := ri.Get(ctx, "vm1", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	status, err := runtime.DefaultUnstructuredConverter.ToUnstructured(&kubevirtv1.VirtualMachineInstanceStatus{
		Phase:    kubevirtv1.Running,
		NodeName: "node-a",
		MigrationState: &kubevirtv1.VirtualMachineInstanceMigrationState{
			SourceNode: "node-a", TargetNode: "node-b", TargetPod: "virt-launcher-vm1-xyz", MigrationUID: "mig-1",
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	cur.Object["status"] = status
	if _, err = ri.Update(ctx, cur, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}

	check := func(how string, got *kubevirtv1.VirtualMachineInstance) {
		t.Helper()
		ifs := got.Spec.Domain.Devices.Interfaces
		switch {
		case got.UID == "" || got.Name != "vm1":
			t.Errorf("%s: metadata %+v", how, got.ObjectMeta)
		case len(ifs) != 2 || ifs[0].Masquerade == nil || ifs[1].Binding == nil || ifs[1].Binding.Name != "vmnic" || ifs[1].MacAddress != "02:00:00:00:00:42":
			t.Errorf("%s: interfaces %+v", how, ifs)
		case len(got.Spec.Networks) != 2 || got.Spec.Networks[1].Multus == nil || got.Spec.Networks[1].Multus.NetworkName != "blue-net":
			t.Errorf("%s: networks %+v", how, got.Spec.Networks)
		case got.Status.Phase != kubevirtv1.Running || got.Status.MigrationState == nil || got.Status.MigrationState.TargetNode != "node-b":
			t.Errorf("%s: status %+v", how, got.Status)
		}
	}

	back, err := ri.Get(ctx, "vm1", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var viaDynamic kubevirtv1.VirtualMachineInstance
	if err = runtime.DefaultUnstructuredConverter.FromUnstructured(back.Object, &viaDynamic); err != nil {
		t.Fatal(err)
	}
	check("dynamic", &viaDynamic)

	hc, err := rest.HTTPClientFor(c.Config)
	if err != nil {
		t.Fatal(err)
	}
	var viaJSON kubevirtv1.VirtualMachineInstance
	if err = getJSON(ctx, hc, c.URL+"/apis/kubevirt.io/v1/namespaces/"+testNS+"/virtualmachineinstances/vm1", &viaJSON); err != nil {
		t.Fatal(err)
	}
	check("json", &viaJSON)

	// The other two kinds are served too (short names as in KubeVirt).
	if err = c.Apply(ctx, []byte(`
apiVersion: kubevirt.io/v1
kind: VirtualMachineInstanceMigration
metadata: {name: mig1, namespace: `+testNS+`}
spec: {vmiName: vm1}
---
apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata: {name: vm1, namespace: `+testNS+`}
spec: {runStrategy: Always, template: {spec: {domain: {devices: {}}}}}
`)); err != nil {
		t.Fatal(err)
	}
	m, err := c.RESTMapping(ctx, kubevirtv1.VirtualMachineInstanceMigrationGroupVersionKind)
	if err != nil {
		t.Fatal(err)
	}
	got, err := c.Dynamic.Resource(m.Resource).Namespace(testNS).Get(ctx, "mig1", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var vmim kubevirtv1.VirtualMachineInstanceMigration
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(got.Object, &vmim); err != nil || vmim.Spec.VMIName != "vm1" {
		t.Fatalf("vmim: %+v, %v", vmim.Spec, err)
	}
}

func TestObjects(t *testing.T) {
	objs, err := Objects([]byte(`
# leading comment
---
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: ConfigMap, metadata: {name: a}, data: {n: "1"}}
- {apiVersion: v1, kind: ConfigMap, metadata: {name: b}}
---
---
apiVersion: v1
kind: Secret
metadata: {name: s, namespace: x}
`))
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, o := range objs {
		got = append(got, describe(o))
	}
	want := []string{"v1 ConfigMap a", "v1 ConfigMap b", "v1 Secret x/s"}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("got %q, want %q", got, want)
	}
	if _, err := Objects([]byte("kind: [")); err == nil {
		t.Fatal("bad YAML decoded")
	}
}

func dynamicFor(t *testing.T, cfg *rest.Config) *dynamic.DynamicClient {
	t.Helper()
	d, err := dynamic.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func configMap(name string) *unstructured.Unstructured {
	return &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "v1", "kind": "ConfigMap", "metadata": map[string]any{"name": name},
	}}
}

func wantForbidden(t *testing.T, what string, err error) {
	t.Helper()
	var status apierrors.APIStatus
	if !apierrors.IsForbidden(err) || !errors.As(err, &status) || status.Status().Code != http.StatusForbidden {
		t.Fatalf("%s: %v, want 403 Forbidden", what, err)
	}
}

func getJSON(ctx context.Context, hc *http.Client, url string, into any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return fmt.Errorf("GET %s: %w", url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("GET %s: %w", url, err)
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s: %s", url, resp.Status, b)
	}
	if err := json.Unmarshal(b, into); err != nil {
		return fmt.Errorf("GET %s: decode: %w", url, err)
	}
	return nil
}
