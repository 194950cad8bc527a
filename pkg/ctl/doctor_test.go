package ctl

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"

	"github.com/vmnic/vmnic/pkg/apis/v1alpha1"
)

// fakeReader serves objects from memory; a resource is served when it is
// in served.
type fakeReader struct {
	served    map[string]bool
	objects   map[string][]unstructured.Unstructured
	forbidden map[string]bool
}

func newFake() *fakeReader {
	return &fakeReader{served: map[string]bool{}, objects: map[string][]unstructured.Unstructured{}, forbidden: map[string]bool{}}
}

func (f *fakeReader) Served(_ context.Context, gvr schema.GroupVersionResource) (bool, error) {
	return f.served[gvr.Resource], nil
}

func (f *fakeReader) List(_ context.Context, gvr schema.GroupVersionResource) ([]unstructured.Unstructured, error) {
	if f.forbidden[gvr.Resource] {
		return nil, apierrors.NewForbidden(gvr.GroupResource(), "", fmt.Errorf("no"))
	}
	return f.objects[gvr.Resource], nil
}

func (f *fakeReader) Get(_ context.Context, gvr schema.GroupVersionResource, name string) (*unstructured.Unstructured, error) {
	for _, o := range f.objects[gvr.Resource] {
		if o.GetName() == name {
			return &o, nil
		}
	}
	return nil, apierrors.NewNotFound(gvr.GroupResource(), name)
}

var resourceOfKind = map[string]string{
	"NetworkAttachmentDefinition": NADResource.Resource, "SpiderIPPool": SpiderIPPoolRes.Resource,
	"SpiderMultusConfig": SpiderMultusRes.Resource, "KubeVirt": KubeVirtResource.Resource,
	"NodeNetworkCapability": CapabilityResource.Resource,
}

// add decodes YAML documents (files under deploy/examples, or inline) into
// the fake; namespaced kinds default to "default".
func (f *fakeReader) add(t *testing.T, yamlDocs string) {
	t.Helper()
	dec := utilyaml.NewYAMLOrJSONDecoder(strings.NewReader(yamlDocs), 4096)
	for {
		var m map[string]any
		if err := dec.Decode(&m); err != nil {
			if err.Error() == "EOF" {
				return
			}
			t.Fatal(err)
		}
		if m == nil {
			continue
		}
		u := unstructured.Unstructured{Object: m}
		res := resourceOfKind[u.GetKind()]
		if res == "" {
			t.Fatalf("fake: unknown kind %s", u.GetKind())
		}
		if u.GetNamespace() == "" && u.GetKind() != "SpiderIPPool" && u.GetKind() != "NodeNetworkCapability" {
			u.SetNamespace("default")
		}
		f.objects[res] = append(f.objects[res], u)
	}
}

func (f *fakeReader) addFile(t *testing.T, path string) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "..", path))
	if err != nil {
		t.Fatal(err)
	}
	f.add(t, string(b))
}

func (f *fakeReader) addNode(t *testing.T, name string, st v1alpha1.NodeNetworkCapabilityStatus) {
	t.Helper()
	n := &v1alpha1.NodeNetworkCapability{
		TypeMeta:   metav1.TypeMeta{APIVersion: "vmnic.io/v1alpha1", Kind: "NodeNetworkCapability"},
		ObjectMeta: metav1.ObjectMeta{Name: name}, Status: st,
	}
	m, err := runtime.DefaultUnstructuredConverter.ToUnstructured(n)
	if err != nil {
		t.Fatal(err)
	}
	f.objects[CapabilityResource.Resource] = append(f.objects[CapabilityResource.Resource], unstructured.Unstructured{Object: m})
}

func cond(typ string, ok bool, reason, msg string) metav1.Condition {
	s := metav1.ConditionFalse
	if ok {
		s = metav1.ConditionTrue
	}
	return metav1.Condition{Type: typ, Status: s, Reason: reason, Message: msg}
}

// bridgeNode is a node with OVS bridge br1, ready for masquerade and
// bridge mode.
func bridgeNode(bridges ...string) v1alpha1.NodeNetworkCapabilityStatus {
	st := v1alpha1.NodeNetworkCapabilityStatus{
		Conditions: []metav1.Condition{
			cond(v1alpha1.ConditionMasqueradeReady, true, "Ready", ""),
			cond(v1alpha1.ConditionPasstMacvlanReady, true, "Ready", ""),
			cond(v1alpha1.ConditionPasstIpvlanReady, false, "KernelFeatureMissing", "ipvlan links cannot be created: operation not supported"),
			cond(v1alpha1.ConditionBridgeOVSReady, true, "Ready", ""),
		},
		Spiderpool: v1alpha1.SpiderpoolStatus{CRDs: true, AgentSocket: true, Healthy: true},
	}
	for _, b := range bridges {
		st.OVS.Bridges = append(st.OVS.Bridges, v1alpha1.OVSBridge{Name: b, DatapathType: "system"})
	}
	return st
}

// generatedNAD is what spiderpool-controller makes of the bridge-ovs
// example's SpiderMultusConfig.
const generatedNAD = `
apiVersion: k8s.cni.cncf.io/v1
kind: NetworkAttachmentDefinition
metadata:
  name: ovs-vlan100
  annotations: {k8s.v1.cni.cncf.io/resourceName: ovs.vmnic.io/br1}
  ownerReferences: [{apiVersion: spiderpool.spidernet.io/v2beta1, kind: SpiderMultusConfig, name: ovs-vlan100, uid: x}]
spec:
  config: '{"cniVersion":"1.0.0","name":"ovs-vlan100","plugins":[{"type":"vmnic","mode":"bridge","bridge":"br1","vlan":100,"ipam":{"type":"spiderpool","default_ipv4_ippool":["vlan100-v4"]}}]}'
`

// readyBridgeCluster has every prerequisite of bridge mode, from the
// deploy/examples/bridge-ovs files.
func readyBridgeCluster(t *testing.T) *fakeReader {
	f := newFake()
	for _, r := range []string{NADResource.Resource, SpiderIPPoolRes.Resource, SpiderMultusRes.Resource, KubeVirtResource.Resource, CapabilityResource.Resource} {
		f.served[r] = true
	}
	f.addFile(t, "deploy/examples/bridge-ovs/ippool.yaml")
	f.addFile(t, "deploy/examples/bridge-ovs/multus.yaml")
	f.addFile(t, "deploy/examples/bridge-ovs/kubevirt-binding.yaml")
	f.add(t, generatedNAD)
	f.addNode(t, "node-a", bridgeNode("br1"))
	f.addNode(t, "node-b", bridgeNode())
	return f
}

func diagnose(t *testing.T, f *fakeReader, o DoctorOptions) *Report {
	t.Helper()
	rep, err := Doctor(context.Background(), f, o)
	if err != nil {
		t.Fatal(err)
	}
	return rep
}

func (r *Report) mode(m string) ModeReport {
	for _, mr := range r.Modes {
		if mr.Mode == m {
			return mr
		}
	}
	return ModeReport{}
}

func (m ModeReport) check(id string) (Check, bool) {
	for _, c := range m.Checks {
		if c.ID == id {
			return c, true
		}
	}
	return Check{}, false
}

func (m ModeReport) failed() []string {
	var ids []string
	for _, c := range m.Checks {
		if c.Status == Fail {
			ids = append(ids, c.ID)
		}
	}
	return ids
}

func TestDoctorReadyBridge(t *testing.T) {
	rep := diagnose(t, readyBridgeCluster(t), DoctorOptions{})
	var out bytes.Buffer
	PrintDoctor(&out, rep)
	if !rep.Ready {
		t.Fatalf("ready cluster not ready:\n%s", out.String())
	}
	b := rep.mode("bridge")
	if !b.Counted || !b.Ready {
		t.Errorf("bridge mode in use must be counted and ready: %+v", b)
	}
	if rep.mode("passt").Counted {
		t.Error("passt has no network: not counted")
	}
	c, _ := b.check("ovs-bridge/default/ovs-vlan100")
	if c.Status != OK || !strings.Contains(c.Message, "node-a") || strings.Contains(c.Message, "node-b") {
		t.Errorf("ovs bridge check = %+v", c)
	}
	c, _ = b.check("pools/default/ovs-vlan100")
	if c.Status != OK || !strings.Contains(c.Message, "vlan100-v4 (100 of 100 free)") {
		t.Errorf("pools check = %+v", c)
	}
	c, _ = b.check("networks")
	if c.Status != OK || !strings.Contains(c.Message, "default/ovs-vlan100") {
		t.Errorf("networks check = %+v (the generated NAD must not count twice)", c)
	}
	if !strings.Contains(out.String(), "ready: every prerequisite of masquerade, bridge exists") {
		t.Errorf("output:\n%s", out.String())
	}
}

// TestDoctorEmptyCluster: a bare API server misses everything; each
// missing piece is one failure with a fix.
func TestDoctorEmptyCluster(t *testing.T) {
	rep := diagnose(t, newFake(), DoctorOptions{Modes: []string{"bridge"}})
	if rep.Ready {
		t.Fatal("empty cluster ready")
	}
	b := rep.mode("bridge")
	want := []string{"multus-crd", "spiderpool-crds", "kubevirt-binding", "nodes", "networks"}
	if got := b.failed(); strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("failed checks %v, want %v", got, want)
	}
	for _, c := range b.Checks {
		if c.Status == Fail && c.Fix == "" {
			t.Errorf("check %s fails without a fix", c.ID)
		}
	}
	if rep.mode("masquerade").Counted {
		t.Error("--mode bridge: masquerade must not count")
	}
	if got := len(rep.Failures()); got != 5 {
		t.Errorf("failures %d", got)
	}
}

func TestDoctorDecisions(t *testing.T) {
	for _, tc := range []struct {
		name   string
		change func(t *testing.T, f *fakeReader)
		opts   DoctorOptions
		mode   string
		// failed are the failing checks of mode; warned one warning check.
		failed []string
		warned string
		fixHas string
	}{
		{
			name:   "no pool",
			change: func(_ *testing.T, f *fakeReader) { f.objects[SpiderIPPoolRes.Resource] = nil },
			mode:   "bridge", failed: []string{"spiderpool-pools", "pools/default/ovs-vlan100"},
			fixHas: "create SpiderIPPool vlan100-v4",
		},
		{
			name: "pool full",
			change: func(t *testing.T, f *fakeReader) {
				p := &f.objects[SpiderIPPoolRes.Resource][0]
				if err := unstructured.SetNestedField(p.Object, int64(100), "status", "allocatedIPCount"); err != nil {
					t.Fatal(err)
				}
			},
			mode: "bridge", failed: []string{"pools/default/ovs-vlan100"}, fixHas: "add addresses to spec.ips",
		},
		{
			name: "pool full by allocatedIPs, controller's total",
			change: func(t *testing.T, f *fakeReader) {
				p := &f.objects[SpiderIPPoolRes.Resource][0]
				_ = unstructured.SetNestedField(p.Object, int64(2), "status", "totalIPCount")
				_ = unstructured.SetNestedField(p.Object, `{"10.100.0.100":{"pod":"a"},"10.100.0.101":{"pod":"b"}}`, "status", "allocatedIPs")
			},
			mode: "bridge", failed: []string{"pools/default/ovs-vlan100"}, fixHas: "SpiderIPPool vlan100-v4",
		},
		{
			name:   "SpiderMultusConfig without its NAD",
			change: func(_ *testing.T, f *fakeReader) { f.objects[NADResource.Resource] = nil },
			mode:   "bridge", failed: []string{"network/default/ovs-vlan100"}, fixHas: "spiderpool-controller",
		},
		{
			name: "bridge on no node",
			change: func(t *testing.T, f *fakeReader) {
				f.objects[CapabilityResource.Resource] = nil
				f.addNode(t, "node-a", bridgeNode("br0"))
			},
			mode: "bridge", failed: []string{"ovs-bridge/default/ovs-vlan100"}, fixHas: "ovs-vsctl add-br br1",
		},
		{
			name: "bridge only on a node not ready",
			change: func(t *testing.T, f *fakeReader) {
				f.objects[CapabilityResource.Resource] = nil
				st := bridgeNode("br1")
				st.Conditions[3] = cond(v1alpha1.ConditionBridgeOVSReady, false, "OVSNotApplied", "ovs-vswitchd has not applied")
				f.addNode(t, "node-a", st)
				f.addNode(t, "node-b", bridgeNode())
			},
			mode: "bridge", failed: []string{"ovs-bridge/default/ovs-vlan100"}, fixHas: "kubectl describe nnc",
		},
		{
			name: "spiderpool agent down everywhere",
			change: func(t *testing.T, f *fakeReader) {
				f.objects[CapabilityResource.Resource] = nil
				st := bridgeNode("br1")
				st.Spiderpool.Healthy, st.Spiderpool.AgentError = false, "connection refused"
				f.addNode(t, "node-a", st)
			},
			mode: "bridge", failed: []string{"spiderpool-agent"}, fixHas: "spiderpool-agent",
		},
		{
			name: "binding not registered",
			change: func(_ *testing.T, f *fakeReader) {
				delete(f.objects[KubeVirtResource.Resource][0].Object, "spec")
			},
			mode: "bridge", failed: []string{"kubevirt-binding"}, fixHas: `kubectl -n kubevirt patch kubevirts.kubevirt.io kubevirt --type=merge`,
		},
		{
			name: "binding without migration",
			change: func(_ *testing.T, f *fakeReader) {
				_ = unstructured.SetNestedMap(f.objects[KubeVirtResource.Resource][0].Object, map[string]any{"domainAttachmentType": "tap"}, "spec", "configuration", "network", "binding", "vmnic")
			},
			mode: "masquerade", warned: "kubevirt-binding", fixHas: `"migration":{}`,
		},
		{
			name: "binding as managedTap",
			change: func(_ *testing.T, f *fakeReader) {
				_ = unstructured.SetNestedMap(f.objects[KubeVirtResource.Resource][0].Object, map[string]any{"domainAttachmentType": "managedTap"}, "spec", "configuration", "network", "binding", "vmnic")
			},
			mode: "masquerade", failed: []string{"kubevirt-binding"}, fixHas: `"domainAttachmentType":"tap"`,
		},
		{
			name:   "other binding name",
			opts:   DoctorOptions{Binding: "vmnic-x"},
			mode:   "masquerade",
			failed: []string{"kubevirt-binding"}, fixHas: `"vmnic-x"`,
		},
		{
			name:   "no resourceName annotation",
			change: func(_ *testing.T, f *fakeReader) { f.objects[SpiderMultusRes.Resource][0].SetAnnotations(nil) },
			mode:   "bridge", warned: "resource/default/ovs-vlan100", fixHas: "k8s.v1.cni.cncf.io/resourceName=ovs.vmnic.io/br1",
		},
		{
			name:   "NADs not readable",
			change: func(_ *testing.T, f *fakeReader) { f.forbidden[NADResource.Resource] = true },
			opts:   DoctorOptions{Modes: []string{"bridge"}},
			mode:   "bridge", failed: []string{"networks"}, fixHas: "grant your user list",
		},
		{
			name: "vmnicd publishes nothing",
			change: func(_ *testing.T, f *fakeReader) {
				f.objects[CapabilityResource.Resource] = nil
			},
			mode: "bridge", failed: []string{"nodes"}, fixHas: "helm install vmnic",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := readyBridgeCluster(t)
			if tc.change != nil {
				tc.change(t, f)
			}
			rep := diagnose(t, f, tc.opts)
			m := rep.mode(tc.mode)
			var out bytes.Buffer
			PrintDoctor(&out, rep)
			if got := m.failed(); strings.Join(got, " ") != strings.Join(tc.failed, " ") {
				t.Errorf("failed %v, want %v\n%s", got, tc.failed, out.String())
			}
			if len(tc.failed) > 0 && rep.Ready {
				t.Errorf("report ready with failures")
			}
			if len(tc.failed) == 0 && !rep.Ready {
				t.Errorf("report not ready:\n%s", out.String())
			}
			if tc.warned != "" {
				if c, _ := m.check(tc.warned); c.Status != Warn {
					t.Errorf("check %s = %+v, want a warning", tc.warned, c)
				}
			}
			if !strings.Contains(out.String(), tc.fixHas) {
				t.Errorf("output lacks %q:\n%s", tc.fixHas, out.String())
			}
		})
	}
}

// TestDoctorPasst: passt networks make passt count; its prerequisites
// are the underlay's kernel support and KubeVirt's passt binding.
func TestDoctorPasst(t *testing.T) {
	f := readyBridgeCluster(t)
	f.addFile(t, "deploy/examples/passt-macvlan/multus.yaml")
	f.addFile(t, "deploy/examples/passt-ipvlan/multus.yaml")
	rep := diagnose(t, f, DoctorOptions{Implemented: []string{"masquerade", "bridge"}})
	p := rep.mode("passt")
	var out bytes.Buffer
	PrintDoctor(&out, rep)
	if !p.Counted || p.Ready || rep.Ready {
		t.Fatalf("passt networks exist: passt must count and fail here:\n%s", out.String())
	}
	// No NADs generated (no spiderpool-controller), no ipvlan in the
	// nodes' kernels, the macvlan network's pool missing.
	want := []string{"kubevirt-passt", "network/default/ipvlan-passt", "nodes/default/ipvlan-passt", "network/default/macvlan-passt", "pools/default/macvlan-passt"}
	if got := p.failed(); strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("failed %v, want %v\n%s", got, want, out.String())
	}
	if !strings.Contains(p.Note, "planned") || !strings.Contains(out.String(), "passt: NOT READY") ||
		!strings.Contains(out.String(), "create SpiderIPPool passt-macvlan-v4 (deploy/examples/passt-macvlan/ippool.yaml)") {
		t.Errorf("passt note %q\n%s", p.Note, out.String())
	}
	c, _ := p.check("nodes/default/ipvlan-passt")
	if !strings.Contains(c.Message, "ipvlan links cannot be created") {
		t.Errorf("ipvlan nodes check = %+v", c)
	}
}

func TestDoctorJSON(t *testing.T) {
	rep := diagnose(t, newFake(), DoctorOptions{})
	b, err := json.Marshal(rep)
	if err != nil {
		t.Fatal(err)
	}
	var back Report
	if err := json.Unmarshal(b, &back); err != nil || len(back.Modes) != 3 || back.Ready {
		t.Errorf("round trip: %v %+v", err, back)
	}
	// masquerade is always counted; an empty cluster has no KubeVirt.
	if m := back.mode("masquerade"); !m.Counted || m.Ready {
		t.Errorf("masquerade = %+v", m)
	}
}

func TestCountIPs(t *testing.T) {
	for _, tc := range []struct {
		ips, exclude []string
		want         int64
		err          bool
	}{
		{ips: []string{"10.0.0.1"}, want: 1},
		{ips: []string{"10.0.0.100-10.0.0.199"}, want: 100},
		{ips: []string{"10.0.0.1-10.0.0.10", "10.0.0.5-10.0.0.20", "10.0.0.21"}, want: 21},
		{ips: []string{"10.0.0.1-10.0.0.10"}, exclude: []string{"10.0.0.1", "10.0.0.9-10.0.0.30"}, want: 7},
		{ips: []string{"fd00::1-fd00::ff"}, want: 255},
		{ips: []string{"fd00::-fd00::ffff:ffff:ffff:ffff"}, want: 1<<63 - 1},
		{ips: []string{"10.0.0.9-10.0.0.1"}, err: true},
		{ips: []string{"x"}, err: true},
		{ips: nil, want: 0},
	} {
		got, err := CountIPs(tc.ips, tc.exclude)
		if (err != nil) != tc.err || (!tc.err && got != tc.want) {
			t.Errorf("CountIPs(%v, %v) = %d, %v; want %d (error %v)", tc.ips, tc.exclude, got, err, tc.want, tc.err)
		}
	}
}

func TestClassify(t *testing.T) {
	for _, tc := range []struct {
		config string
		vmnic  bool
		want   Network
	}{
		{
			config: `{"type":"vmnic","mode":"bridge","bridge":"br1","ipam":{"type":"spiderpool","default_ipv4_ippool":"p4","default_ipv6_ippool":["p6"]}}`, vmnic: true,
			want: Network{Mode: "bridge", Bridge: "br1", IPAM: "spiderpool", Pools: []string{"p4", "p6"}},
		},
		{
			config: `{"plugins":[{"type":"macvlan","master":"eth1","ipam":{"type":"spiderpool","default_ipv4_ippool":["m4"]}},{"type":"vmnic","mode":"passt"},{"type":"coordinator"}]}`, vmnic: true,
			want: Network{Mode: "passt", Link: "macvlan", IPAM: "spiderpool", Pools: []string{"m4"}},
		},
		{config: `{"plugins":[{"type":"calico"},{"type":"vmnic","mode":"masquerade"}]}`, vmnic: true, want: Network{Mode: "masquerade", Link: "calico"}},
		{config: `{"type":"ovs","bridge":"br1"}`},
		{config: `{"type":"vmnic",`, vmnic: true, want: Network{Error: "config is not valid JSON: unexpected end of JSON input"}},
		{config: `not json`},
	} {
		var n Network
		if got := classify(&n, tc.config); got != tc.vmnic || fmt.Sprint(n) != fmt.Sprint(tc.want) {
			t.Errorf("classify(%s) = %v %+v, want %v %+v", tc.config, got, n, tc.vmnic, tc.want)
		}
	}
}

func TestImplementedModes(t *testing.T) {
	got := ImplementedModes()
	if len(got) < 2 || got[0] != "masquerade" || got[1] != "bridge" {
		t.Errorf("implemented modes %v: masquerade and bridge are built", got)
	}
}

func TestPrintCapability(t *testing.T) {
	f := newFake()
	f.served[CapabilityResource.Resource] = true
	st := bridgeNode("br1")
	st.Kernel = v1alpha1.KernelFeatures{Veth: true, Bridge: true, Tun: true, NftablesNAT: true, Macvlan: true, Errors: map[string]string{"ipvlan": "operation not supported"}}
	st.OVS.Endpoint, st.OVS.Reachable, st.OVS.Applied, st.OVS.Version = "unix:/run/openvswitch/db.sock", true, true, "3.1.0"
	st.NICs = []v1alpha1.NIC{{Name: "eth0", Type: "device", MTU: 1500, OperState: "up"}}
	st.PrimaryCNI = "calico"
	f.addNode(t, "node-a", st)
	f.addNode(t, "node-b", bridgeNode())
	n, err := Capability(context.Background(), f, "node-a")
	if err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	PrintCapability(&b, n.Status, time.Now())
	for _, w := range []string{
		"passt-ipvlan   no     KernelFeatureMissing", "bridge-ovs     yes", "missing: ipvlan (operation not supported)",
		"version 3.1.0, configuration applied, bridges br1 (system)", "primary CNI:  calico", "eth0 (device, mtu 1500, up)",
	} {
		if !strings.Contains(b.String(), w) {
			t.Errorf("capability output lacks %q:\n%s", w, b.String())
		}
	}
	list, err := CapabilityList(context.Background(), f)
	if err != nil {
		t.Fatal(err)
	}
	b.Reset()
	PrintCapabilityTable(&b, list, time.Now())
	lines := strings.Split(strings.TrimSpace(b.String()), "\n")
	if len(lines) != 3 || !strings.Contains(lines[0], "BRIDGE-OVS") || !strings.Contains(lines[1], "br1") || !strings.Contains(lines[2], "node-b") {
		t.Errorf("table:\n%s", b.String())
	}
	if _, err := Capability(context.Background(), f, "node-c"); err == nil {
		t.Error("missing node: no error")
	}
}
