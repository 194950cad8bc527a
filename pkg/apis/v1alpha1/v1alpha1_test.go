package v1alpha1

import (
	"encoding/json"
	"os"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
)

const crdFile = "../../../deploy/crds/vmnic.io_nodenetworkcapabilities.yaml"

func full() *NodeNetworkCapability {
	now := metav1.NewTime(time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC))
	return &NodeNetworkCapability{
		TypeMeta: metav1.TypeMeta{APIVersion: SchemeGroupVersion.String(), Kind: KindNodeNetworkCapability},
		ObjectMeta: metav1.ObjectMeta{
			Name:            "node-a",
			Labels:          map[string]string{"a": "b"},
			OwnerReferences: []metav1.OwnerReference{{APIVersion: "v1", Kind: "Node", Name: "node-a", UID: "u"}},
		},
		Spec: NodeNetworkCapabilitySpec{NodeName: "node-a"},
		Status: NodeNetworkCapabilityStatus{
			Conditions: []metav1.Condition{{
				Type: ConditionMasqueradeReady, Status: metav1.ConditionTrue,
				Reason: ReasonReady, Message: "m", LastTransitionTime: now,
			}},
			Kernel: KernelFeatures{
				NftablesNAT: true, Tun: true, Bridge: true, Macvlan: true, Veth: true,
				Errors: map[string]string{"ipvlan": "operation not supported"},
			},
			OVS: OVSStatus{
				Endpoint: "unix:/x", Reachable: true, Version: "3.1.0", Applied: true,
				DatapathTypes: []string{"netdev", "system"},
				Bridges:       []OVSBridge{{Name: "br1", DatapathType: "netdev"}},
			},
			Spiderpool: SpiderpoolStatus{SocketPath: "/s", CRDsError: "e", AgentError: "f"},
			NICs:       []NIC{{Name: "eth0", Type: "device", MTU: 1500, OperState: "up"}},
			PrimaryCNI: "calico",
			ObservedAt: now,
		},
	}
}

// TestDeepCopyShares fills every field, copies, scribbles over every part of
// the copy that holds memory, and checks the original did not change.
func TestDeepCopyShares(t *testing.T) {
	orig := full()
	c := orig.DeepCopy()
	if !reflect.DeepEqual(orig, c) {
		t.Fatalf("copy differs:\n%+v\n%+v", orig, c)
	}
	c.Labels["a"] = "x"
	c.OwnerReferences[0].Name = "x"
	c.Status.Conditions[0].Message = "x"
	c.Status.Kernel.Errors["ipvlan"] = "x"
	c.Status.OVS.DatapathTypes[0] = "x"
	c.Status.OVS.Bridges[0].Name = "x"
	c.Status.NICs[0].Name = "x"
	if !reflect.DeepEqual(orig, full()) {
		t.Fatalf("original changed through the copy: %+v", orig)
	}

	list := &NodeNetworkCapabilityList{Items: []NodeNetworkCapability{*full()}}
	lc := list.DeepCopyObject().(*NodeNetworkCapabilityList)
	lc.Items[0].Status.NICs[0].MTU = 1
	if list.Items[0].Status.NICs[0].MTU != 1500 {
		t.Fatal("list copy shares items")
	}
	var nilObj *NodeNetworkCapability
	if nilObj.DeepCopy() != nil {
		t.Fatal("DeepCopy of nil is not nil")
	}
}

func TestScheme(t *testing.T) {
	s := runtime.NewScheme()
	if err := AddToScheme(s); err != nil {
		t.Fatal(err)
	}
	gvks, _, err := s.ObjectKinds(&NodeNetworkCapability{})
	if err != nil || len(gvks) != 1 || gvks[0] != SchemeGroupVersion.WithKind(KindNodeNetworkCapability) {
		t.Fatalf("ObjectKinds = %v, %v", gvks, err)
	}
	if _, err := s.New(SchemeGroupVersion.WithKind(ListKindNodeNetworkCapabilityList)); err != nil {
		t.Fatal(err)
	}
}

// TestCRDMatchesTypes keeps the hand-written CRD and the Go types in step:
// every JSON field of the types has a schema property and vice versa.
func TestCRDMatchesTypes(t *testing.T) {
	data, err := os.ReadFile(crdFile)
	if err != nil {
		t.Fatal(err)
	}
	js, err := utilyaml.ToJSON(data)
	if err != nil {
		t.Fatal(err)
	}
	var crd struct {
		Spec struct {
			Group string
			Scope string
			Names struct{ Kind, Plural, ListKind string }
			// Versions carry the schema.
			Versions []struct {
				Name   string
				Schema struct {
					OpenAPIV3Schema jsonSchema `json:"openAPIV3Schema"`
				}
			}
		}
	}
	if err := json.Unmarshal(js, &crd); err != nil {
		t.Fatal(err)
	}
	s := crd.Spec
	if s.Group != GroupName || s.Scope != "Cluster" || s.Names.Kind != KindNodeNetworkCapability ||
		s.Names.Plural != ResourceNodeNetworkCapabilities || s.Names.ListKind != ListKindNodeNetworkCapabilityList ||
		len(s.Versions) != 1 || s.Versions[0].Name != Version {
		t.Fatalf("CRD names do not match the package: %+v", s)
	}
	root := s.Versions[0].Schema.OpenAPIV3Schema
	compare(t, "spec", reflect.TypeFor[NodeNetworkCapabilitySpec](), root.Properties["spec"])
	compare(t, "status", reflect.TypeFor[NodeNetworkCapabilityStatus](), root.Properties["status"])
}

type jsonSchema struct {
	Type                 string
	Properties           map[string]*jsonSchema
	Items                *jsonSchema
	AdditionalProperties *jsonSchema
}

var opaque = []reflect.Type{reflect.TypeFor[metav1.Time](), reflect.TypeFor[metav1.Condition]()}

func compare(t *testing.T, path string, typ reflect.Type, s *jsonSchema) {
	t.Helper()
	if s == nil {
		t.Errorf("%s: no schema", path)
		return
	}
	if slices.Contains(opaque, typ) {
		return
	}
	want := map[reflect.Kind]string{
		reflect.Bool: "boolean", reflect.String: "string", reflect.Int: "integer",
		reflect.Struct: "object", reflect.Map: "object", reflect.Slice: "array",
	}[typ.Kind()]
	if s.Type != want {
		t.Errorf("%s: schema type %q, Go %s", path, s.Type, typ)
		return
	}
	switch typ.Kind() {
	case reflect.Slice:
		compare(t, path+"[]", typ.Elem(), s.Items)
	case reflect.Map:
		compare(t, path+"{}", typ.Elem(), s.AdditionalProperties)
	case reflect.Struct:
		seen := map[string]bool{}
		for f := range typ.Fields() {
			name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
			if name == "" || name == "-" {
				t.Errorf("%s.%s: no json name", path, f.Name)
				continue
			}
			seen[name] = true
			compare(t, path+"."+name, f.Type, s.Properties[name])
		}
		for name := range s.Properties {
			if !seen[name] {
				t.Errorf("%s.%s: in the CRD, not in the Go type", path, name)
			}
		}
	}
}
