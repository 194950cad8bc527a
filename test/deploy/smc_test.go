package deploy

import (
	"context"
	"encoding/json"
	"reflect"
	"slices"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"

	"github.com/vmnic/vmnic/test/need"
	"github.com/vmnic/vmnic/test/node"
	"github.com/vmnic/vmnic/test/proc"
	"github.com/vmnic/vmnic/test/spiderpool"
)

var ippoolResource = schema.GroupVersionResource{Group: "spiderpool.spidernet.io", Version: "v2beta1", Resource: "spiderippools"}

// spiderFinalizer is the finalizer Spiderpool's webhook puts on its pools
// (github.com/spidernet-io/spiderpool pkg/constant SpiderFinalizer).
const spiderFinalizer = "spiderpool.spidernet.io"

// TestExamplesSpiderMultusConfig applies every example that holds a
// SpiderMultusConfig, as shipped, to a real node (test/node) where the real
// spiderpool-controller v1.2.2 runs as Spiderpool's chart deploys it (its
// webhooks default and validate the objects on their way in), and checks
// the NetworkAttachmentDefinition the controller makes of each: its config
// is what vmnic expects of that example (the vmnic entry vmnic's own
// parser takes, in the place its mode needs; Spiderpool's IPAM with the
// example's default pools; for cniType custom, the customCNI config as
// is), and the SpiderMultusConfig's annotations the scheduler needs are
// on it.
func TestExamplesSpiderMultusConfig(t *testing.T) {
	crds, err := spiderpool.CRDFiles(t.Context())
	need.NoError(t, err)
	need.NoError(t, node.CheckContainer())
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	// A node: the controller's webhook is a Service whose endpoint the API
	// server dials, which may not be a loopback address. A node container,
	// so that it may run beside test/node's nodes (go test runs packages
	// in parallel).
	n := node.StartT(t, node.Options{Container: true, Aggregation: true})
	c := n.Cluster
	if err := c.InstallKubeVirtCRDs(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c.InstallCRDs(ctx, crds...); err != nil {
		t.Fatal(err)
	}
	spiderpool.StartControllerT(t, c, spiderpool.ControllerOptions{
		Launcher: n.Launcher(), Address: n.IP, Dial: proc.NetnsDialer(n.NetNS), CNIConfDir: n.CNIConfDir,
	})
	applied := 0
	for _, ex := range loadExamples(t) {
		var smcs []*unstructured.Unstructured
		for _, o := range ex.objects {
			if o.obj.GetKind() == "SpiderMultusConfig" {
				smcs = append(smcs, o.obj)
			}
		}
		if len(smcs) == 0 {
			continue
		}
		t.Run(ex.dir, func(t *testing.T) {
			// The example's objects but its VMs and the KubeVirt CR (no
			// KubeVirt runs), into namespace default.
			for _, o := range ex.objects {
				if o.obj.GetAPIVersion() == "kubevirt.io/v1" {
					continue
				}
				obj := o.obj.DeepCopy()
				if obj.GetKind() == "SpiderMultusConfig" || obj.GetKind() == "NetworkAttachmentDefinition" {
					obj.SetNamespace("default")
				}
				j, err := obj.MarshalJSON()
				if err != nil {
					t.Fatal(err)
				}
				if err := c.Apply(ctx, j); err != nil {
					t.Fatalf("%s: %v", o, err)
				}
			}
			// The pools went through the controller's mutating webhook
			// (its failurePolicy is Fail): it adds Spiderpool's
			// finalizer.
			for _, o := range ex.objects {
				if o.obj.GetKind() != "SpiderIPPool" {
					continue
				}
				pool, err := c.Dynamic.Resource(ippoolResource).Get(ctx, o.obj.GetName(), metav1.GetOptions{})
				if err != nil {
					t.Fatal(err)
				}
				if !slices.Contains(pool.GetFinalizers(), spiderFinalizer) {
					t.Errorf("SpiderIPPool %s has finalizers %v: not the %s the controller's webhook adds", pool.GetName(), pool.GetFinalizers(), spiderFinalizer)
				}
			}
			for _, smc := range smcs {
				applied++
				want, err := smcNetwork(smc)
				if err != nil {
					t.Fatalf("SpiderMultusConfig %s: %v", smc.GetName(), err)
				}
				nad := spiderpool.WaitNAD(ctx, t, c, "default", smc.GetName())
				config, _, _ := unstructured.NestedString(nad.Object, "spec", "config")
				got, err := parseNetConfig(config)
				if err != nil {
					t.Fatalf("the NAD spiderpool-controller made of %s: %v\n%s", smc.GetName(), err, config)
				}
				if !reflect.DeepEqual(got, want) {
					t.Errorf("the NAD spiderpool-controller made of %s declares %+v; vmnic expects %+v\n%s", smc.GetName(), *got, *want, config)
				}
				if custom, _, _ := unstructured.NestedString(smc.Object, "spec", "customCNI"); custom != "" && !jsonEqual(custom, config) {
					t.Errorf("the NAD of %s (cniType custom) is not its customCNI as is:\n%s", smc.GetName(), config)
				}
				for k, v := range smc.GetAnnotations() {
					if k == "k8s.v1.cni.cncf.io/resourceName" && nad.GetAnnotations()[k] != v {
						t.Errorf("the NAD of %s has %s=%q, want %q (KubeVirt asks the scheduler for it)", smc.GetName(), k, nad.GetAnnotations()[k], v)
					}
				}
				t.Logf("%s: %s", smc.GetName(), config)
			}
		})
	}
	if applied < 3 {
		t.Errorf("%d SpiderMultusConfigs in the examples, want at least 3 (bridge-ovs, passt-macvlan, passt-ipvlan)", applied)
	}
}

// jsonEqual reports whether a and b are the same JSON value.
func jsonEqual(a, b string) bool {
	var x, y any
	if json.Unmarshal([]byte(a), &x) != nil || json.Unmarshal([]byte(b), &y) != nil {
		return false
	}
	return reflect.DeepEqual(x, y)
}
