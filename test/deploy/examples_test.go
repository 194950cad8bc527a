package deploy

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	cnitypes "github.com/containernetworking/cni/pkg/types"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	k8stypes "k8s.io/apimachinery/pkg/types"
	kubevirtv1 "kubevirt.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"github.com/vmnic/vmnic/pkg/kubevirt"
	"github.com/vmnic/vmnic/pkg/netconf"
	"github.com/vmnic/vmnic/test/cluster"
	"github.com/vmnic/vmnic/test/need"
	"github.com/vmnic/vmnic/test/spiderpool"
)

// examplesDir holds one directory per row of the mode table (see its
// README.md), plus masquerade-conflist.json at the top.
const examplesDir = "deploy/examples"

// ippoolsAnnotation is Spiderpool's per-interface pool choice on a pod
// (github.com/spidernet-io/spiderpool pkg/constant AnnoPodIPPools).
const ippoolsAnnotation = "ipam.spidernet.io/ippools"

// spiderpoolDefaultCNIVersion is the cniVersion spiderpool-controller gives
// the NetworkAttachmentDefinition of a SpiderMultusConfig without the
// multus.spidernet.io/cni-version annotation.
const spiderpoolDefaultCNIVersion = "0.3.1"

// example is one directory of deploy/examples.
type example struct {
	// dir is relative to examplesDir ("." for the top level).
	dir string
	// objects are the objects of its YAML files, in file order.
	objects []exampleObject
	// conflists are its JSON files (primary CNI conflists), relative to the
	// repository root.
	conflists []string
	// values are its *-values.yaml files: values for a primary CNI's Helm
	// chart (test/node renders that chart with them).
	values []string
}

type exampleObject struct {
	file string // relative to the repository root
	obj  *unstructured.Unstructured
}

// String names the object and its file for messages.
func (o exampleObject) String() string {
	name := o.obj.GetName()
	if ns := o.obj.GetNamespace(); ns != "" {
		name = ns + "/" + name
	}
	return o.file + ": " + o.obj.GetKind() + " " + name
}

// loadExamples reads every file under deploy/examples: YAML manifests,
// JSON conflists and README.md. Any other file fails the test, so that
// nothing there escapes these checks.
func loadExamples(t *testing.T) []*example {
	t.Helper()
	root := repoRoot(t)
	byDir := map[string]*example{}
	err := filepath.WalkDir(filepath.Join(root, examplesDir), func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, err := filepath.Rel(root, path)
		if err != nil {
			return err
		}
		dir, err := filepath.Rel(examplesDir, filepath.Dir(rel))
		if err != nil {
			return err
		}
		ex := byDir[dir]
		if ex == nil {
			ex = &example{dir: dir}
			byDir[dir] = ex
		}
		switch filepath.Ext(path) {
		case ".yaml", ".yml":
			if strings.HasSuffix(path, "-values.yaml") {
				var v map[string]any
				if err := yaml.Unmarshal(readRepoFile(t, rel), &v); err != nil || len(v) == 0 {
					t.Errorf("%s: not a map of Helm values (%v)", rel, err)
				}
				ex.values = append(ex.values, rel)
				return nil
			}
			objs, err := cluster.Objects(readRepoFile(t, rel))
			if err != nil {
				t.Errorf("%s: %v", rel, err)
				return nil
			}
			if len(objs) == 0 {
				t.Errorf("%s: no objects", rel)
			}
			for _, o := range objs {
				ex.objects = append(ex.objects, exampleObject{file: rel, obj: o})
			}
		case ".json":
			ex.conflists = append(ex.conflists, rel)
		case ".md": // README.md; TestExamplesConfig checks that it lists every directory
		default:
			t.Errorf("%s: not YAML, JSON or Markdown: the example tests would not check it", rel)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(byDir) < 2 {
		t.Fatalf("%s holds no example directories", examplesDir)
	}
	var out []*example
	for _, k := range slices.Sorted(maps.Keys(byDir)) {
		out = append(out, byDir[k])
	}
	return out
}

// TestExamplesConfig checks the examples without a cluster: every CNI
// config vmnic appears in, and that the objects of one example fit
// together (pools, networks, bindings, the ippools annotation).
//
// A vmnic entry is checked in two ways. First its shape against the keys
// each mode takes: masquerade and passt are chained after the plugin that
// creates the pod interface and take no ipam or bridge keys; bridge is the
// network's main plugin, names an OVS bridge and an ipam plugin, and has a
// vlan or a trunk list, not both. Then it goes through netconf.Parse, the
// parser the shim and the daemon use, with the name and cniVersion the
// runtime would add. A vmnic build that does not implement a mode yet
// refuses it with code 7 on the mode field ("not available in this vmnic
// version"); that answer is accepted, every other refusal fails the test,
// so a mode's config is parsed in full as soon as the mode is built.
func TestExamplesConfig(t *testing.T) {
	readme := string(readRepoFile(t, filepath.Join(examplesDir, "README.md")))
	for _, ex := range loadExamples(t) {
		name := ex.dir
		if name == "." {
			name = "top"
		}
		t.Run(name, func(t *testing.T) {
			if ex.dir != "." && !strings.Contains(readme, "`"+ex.dir+"/`") {
				t.Errorf("%s/README.md does not list `%s/`", examplesDir, ex.dir)
			}
			for _, f := range ex.conflists {
				if err := checkConflist(readRepoFile(t, f)); err != nil {
					t.Errorf("%s: %v", f, err)
				}
			}
			checkObjects(t, ex)
		})
	}
}

// checkConflist checks a primary CNI conflist as vmnicd's installer leaves
// it: vmnic chained last, once, in masquerade mode.
func checkConflist(data []byte) error {
	var list struct {
		CNIVersion string           `json:"cniVersion"`
		Name       string           `json:"name"`
		Plugins    []map[string]any `json:"plugins"`
	}
	if err := strictJSON(data, &list); err != nil {
		return err
	}
	if list.CNIVersion == "" || list.Name == "" || len(list.Plugins) < 2 {
		return errors.New("want a conflist with cniVersion, name and the primary plugin followed by vmnic")
	}
	var at []int
	for i, p := range list.Plugins {
		if p["type"] == "vmnic" {
			at = append(at, i)
		}
	}
	if len(at) != 1 || at[0] != len(list.Plugins)-1 {
		return fmt.Errorf("vmnic entries at plugins%v, want exactly one, the last", at)
	}
	entry := list.Plugins[at[0]]
	if entry["mode"] != netconf.ModeMasquerade {
		return fmt.Errorf("vmnic entry has mode %v; the installer chains mode %s into the primary conflist", entry["mode"], netconf.ModeMasquerade)
	}
	return checkVmnicEntry(withNetwork(entry, list.Name, list.CNIVersion), true)
}

// withNetwork returns a conflist entry as the runtime passes it to the
// plugin: with the list's name and cniVersion.
func withNetwork(entry map[string]any, name, cniVersion string) map[string]any {
	c := maps.Clone(entry)
	c["name"], c["cniVersion"] = name, cniVersion
	return c
}

// bridgeOnlyKeys are the keys only mode bridge takes.
var bridgeOnlyKeys = []string{"bridge", "vlan", "trunk", "mtu", "ovsdbSocket"}

// checkVmnicEntry checks one vmnic plugin config (name and cniVersion
// included); chained says whether it follows another plugin in its list.
func checkVmnicEntry(conf map[string]any, chained bool) error {
	mode, _ := conf["mode"].(string)
	switch mode {
	case netconf.ModeMasquerade, netconf.ModePasst:
		if !chained {
			return fmt.Errorf("mode %s must be chained after the plugin that creates the pod interface", mode)
		}
		for _, k := range append([]string{"ipam"}, bridgeOnlyKeys...) {
			if _, ok := conf[k]; ok {
				return fmt.Errorf("mode %s takes no %q", mode, k)
			}
		}
	case netconf.ModeBridge:
		if chained {
			return fmt.Errorf("mode %s is the network's main plugin, not a chained one", mode)
		}
		if b, _ := conf["bridge"].(string); b == "" {
			return fmt.Errorf("mode %s needs \"bridge\", the OVS bridge", mode)
		}
		if ipam, _ := conf["ipam"].(map[string]any); ipam == nil || ipam["type"] == nil || ipam["type"] == "" {
			return fmt.Errorf("mode %s needs an ipam block with a type", mode)
		}
		_, vlan := conf["vlan"]
		_, trunk := conf["trunk"]
		if vlan && trunk {
			return errors.New(`"vlan" and "trunk" exclude each other`)
		}
	default:
		return fmt.Errorf("mode %q is not one of %s, %s, %s", mode, netconf.ModeMasquerade, netconf.ModePasst, netconf.ModeBridge)
	}
	data, err := json.Marshal(conf)
	if err != nil {
		return err
	}
	if _, cerr := netconf.Parse(data); cerr != nil && !modeNotBuilt(cerr) {
		return fmt.Errorf("netconf.Parse %s: %w", data, cerr)
	}
	return nil
}

// modeNotBuilt reports whether Parse refused the config only because this
// vmnic build does not implement its mode yet.
func modeNotBuilt(err *cnitypes.Error) bool {
	return err.Code == cnitypes.ErrInvalidNetworkConfig &&
		strings.HasPrefix(err.Msg, "mode: ") &&
		strings.Contains(err.Msg, "not available in this vmnic version")
}

// network is what a NetworkAttachmentDefinition (or the one a
// SpiderMultusConfig generates) declares. checkObjects records a network
// whose config is broken as nil.
type network struct {
	// vmnicModes are the modes of its vmnic entries.
	vmnicModes []string
	// spiderpool: some plugin takes its addresses from Spiderpool.
	spiderpool bool
	// pools are the default pools by IP version.
	pools map[int64][]string
}

// parseNetConfig reads a CNI config (one plugin or a conflist) and checks
// every vmnic entry in it.
func parseNetConfig(config string) (*network, error) {
	var top map[string]any
	if err := strictJSON([]byte(config), &top); err != nil {
		return nil, err
	}
	name, _ := top["name"].(string)
	version, _ := top["cniVersion"].(string)
	if name == "" || version == "" {
		return nil, errors.New("CNI config without name or cniVersion")
	}
	plugins := []map[string]any{top}
	if raw, ok := top["plugins"].([]any); ok {
		plugins = plugins[:0]
		for i, p := range raw {
			m, ok := p.(map[string]any)
			if !ok {
				return nil, fmt.Errorf("plugins[%d] is not an object", i)
			}
			plugins = append(plugins, withNetwork(m, name, version))
		}
	}
	n := &network{pools: map[int64][]string{}}
	for i, p := range plugins {
		if err := n.addPlugin(p, i > 0); err != nil {
			return nil, fmt.Errorf("plugin %d: %w", i, err)
		}
	}
	return n, nil
}

func (n *network) addPlugin(p map[string]any, chained bool) error {
	if t, _ := p["type"].(string); t == "" {
		return errors.New("no type")
	}
	if ipam, ok := p["ipam"].(map[string]any); ok && ipam["type"] == spiderpool.PluginName {
		n.spiderpool = true
		for v, key := range map[int64]string{4: "default_ipv4_ippool", 6: "default_ipv6_ippool"} {
			n.pools[v] = append(n.pools[v], toStrings(ipam[key])...)
		}
	}
	if p["type"] != "vmnic" {
		return nil
	}
	n.vmnicModes = append(n.vmnicModes, fmt.Sprint(p["mode"]))
	return checkVmnicEntry(p, chained)
}

// smcNetwork is the network a SpiderMultusConfig stands for, as
// spiderpool-controller generates it (pkg/multuscniconfig; the real
// controller's NADs are compared with it in TestExamplesSpiderMultusConfig,
// so this needs no cluster): for cniType
// custom the customCNI config as is; otherwise the main plugin with
// Spiderpool IPAM and the type's ippools as default pools, then the
// chainCNIJsonData entries, then the coordinator.
func smcNetwork(obj *unstructured.Unstructured) (*network, error) {
	cniType, _, _ := unstructured.NestedString(obj.Object, "spec", "cniType")
	if cniType == "" || cniType == "custom" {
		custom, _, _ := unstructured.NestedString(obj.Object, "spec", "customCNI")
		if custom == "" {
			return nil, errors.New("cniType custom without customCNI")
		}
		return parseNetConfig(custom)
	}
	n := &network{pools: map[int64][]string{}}
	if disabled, _, _ := unstructured.NestedBool(obj.Object, "spec", "disableIPAM"); !disabled {
		n.spiderpool = true
	}
	for v, key := range map[int64]string{4: "ipv4", 6: "ipv6"} {
		pools, _, _ := unstructured.NestedStringSlice(obj.Object, "spec", cniType, "ippools", key)
		n.pools[v] = pools
	}
	version := obj.GetAnnotations()["multus.spidernet.io/cni-version"]
	if version == "" {
		version = spiderpoolDefaultCNIVersion
	}
	chain, _, _ := unstructured.NestedStringSlice(obj.Object, "spec", "chainCNIJsonData")
	for i, c := range chain {
		var p map[string]any
		if err := strictJSON([]byte(c), &p); err != nil {
			return nil, fmt.Errorf("chainCNIJsonData[%d]: %w", i, err)
		}
		if err := n.addPlugin(withNetwork(p, obj.GetName(), version), true); err != nil {
			return nil, fmt.Errorf("chainCNIJsonData[%d]: %w", i, err)
		}
	}
	return n, nil
}

// checkObjects checks the objects of one example and how they refer to
// each other.
func checkObjects(t *testing.T, ex *example) {
	t.Helper()
	pools := map[string]int64{}
	networks := map[string]*network{}
	var vms []exampleObject
	for _, o := range ex.objects {
		gvk := o.obj.GroupVersionKind()
		switch {
		case gvk.Group == "spiderpool.spidernet.io" && gvk.Kind == "SpiderIPPool":
			v, err := checkPool(o.obj)
			if err != nil {
				t.Errorf("%s: %v", o, err)
			}
			pools[o.obj.GetName()] = v
		case gvk.Group == "spiderpool.spidernet.io" && gvk.Kind == "SpiderMultusConfig":
			n, err := smcNetwork(o.obj)
			if err != nil {
				t.Errorf("%s: %v", o, err)
			}
			networks[o.obj.GetName()] = n
		case gvk.Group == "k8s.cni.cncf.io" && gvk.Kind == "NetworkAttachmentDefinition":
			config, _, _ := unstructured.NestedString(o.obj.Object, "spec", "config")
			n, err := parseNetConfig(config)
			if err != nil {
				t.Errorf("%s: spec.config: %v", o, err)
			}
			networks[o.obj.GetName()] = n
		case gvk.Group == "kubevirt.io" && gvk.Kind == "KubeVirt":
			if err := checkKubeVirt(o.obj); err != nil {
				t.Errorf("%s: %v", o, err)
			}
		case gvk.Group == "kubevirt.io" && gvk.Kind == "VirtualMachine":
			vms = append(vms, o)
		}
	}
	for name, n := range networks {
		if n == nil {
			continue // reported above
		}
		for v, names := range n.pools {
			for _, p := range names {
				if got, ok := pools[p]; !ok || got != v {
					t.Errorf("%s/%s: network %s names IPv%d pool %q, which is not an IPv%d SpiderIPPool of this example", examplesDir, ex.dir, name, v, p, v)
				}
			}
		}
	}
	for _, o := range vms {
		for _, err := range checkVM(o.obj, pools, networks) {
			t.Errorf("%s: %v", o, err)
		}
	}
}

func checkPool(obj *unstructured.Unstructured) (int64, error) {
	v, ok, _ := unstructured.NestedInt64(obj.Object, "spec", "ipVersion")
	if !ok || (v != 4 && v != 6) {
		return 0, errors.New("spec.ipVersion must be set explicitly to 4 or 6")
	}
	subnet, _, _ := unstructured.NestedString(obj.Object, "spec", "subnet")
	_, ipnet, err := net.ParseCIDR(subnet)
	if err != nil {
		return v, fmt.Errorf("spec.subnet: %w", err)
	}
	if (ipnet.IP.To4() != nil) != (v == 4) {
		return v, fmt.Errorf("spec.subnet %s is not IPv%d", subnet, v)
	}
	return v, nil
}

// checkKubeVirt decodes a KubeVirt CR into KubeVirt's API types
// (the test cluster's KubeVirt CRDs have no schema) and checks the vmnic
// binding registration.
func checkKubeVirt(obj *unstructured.Unstructured) error {
	var kv kubevirtv1.KubeVirt
	if err := decodeTyped(obj, &kv); err != nil {
		return err
	}
	var b kubevirtv1.InterfaceBindingPlugin
	if n := kv.Spec.Configuration.NetworkConfiguration; n != nil {
		b = n.Binding[kubevirt.DefaultBinding]
	}
	if b.DomainAttachmentType != kubevirtv1.Tap || b.Migration == nil {
		return fmt.Errorf("spec.configuration.network.binding.%s: want domainAttachmentType tap and migration {}", kubevirt.DefaultBinding)
	}
	return nil
}

// passtBindingField is KubeVirt's core passt binding of a VM interface
// (KubeVirt v1.8), newer than the kubevirt.io/api module vmnic builds with:
// checkVM notes it and strips it before decoding.
const passtBindingField = "passtBinding"

// multusDefaultNetwork is Multus' annotation that replaces a pod's cluster
// network.
const multusDefaultNetwork = "v1.multus-cni.io/default-network"

// checkVM checks a VirtualMachine against KubeVirt's API types and against
// the pools and networks of its example: each interface's binding fits the
// network's vmnic entry, and the ippools annotation names the pod
// interfaces KubeVirt will create and pools that exist.
func checkVM(obj *unstructured.Unstructured, pools map[string]int64, networks map[string]*network) []error {
	obj = obj.DeepCopy()
	passt := map[string]bool{}
	path := []string{"spec", "template", "spec", "domain", "devices", "interfaces"}
	ifaces, found, _ := unstructured.NestedSlice(obj.Object, path...)
	for _, i := range ifaces {
		if m, ok := i.(map[string]any); ok {
			if _, ok := m[passtBindingField]; ok {
				passt[fmt.Sprint(m["name"])] = true
				delete(m, passtBindingField)
			}
		}
	}
	if found {
		if err := unstructured.SetNestedSlice(obj.Object, ifaces, path...); err != nil {
			return []error{err}
		}
	}
	var vm kubevirtv1.VirtualMachine
	if err := decodeTyped(obj, &vm); err != nil {
		return []error{err}
	}
	if vm.Spec.Template == nil {
		return []error{errors.New("no spec.template")}
	}
	spec := vm.Spec.Template.Spec

	var errs []error
	nets := map[string]kubevirtv1.Network{}
	// podIfs maps the pod interfaces KubeVirt creates to their networks.
	podIfs := map[string]*network{}
	// Multus' annotation on the template, which KubeVirt copies to the
	// launcher pod, makes a NetworkAttachmentDefinition the pod network.
	defaultNAD := vm.Spec.Template.ObjectMeta.Annotations[multusDefaultNetwork]
	if _, name, ok := strings.Cut(defaultNAD, "/"); ok {
		defaultNAD = name
	} else if defaultNAD != "" {
		// Multus resolves a name without a namespace in its own
		// namespace (kube-system), not the pod's.
		errs = append(errs, fmt.Errorf("%s %q: give the NetworkAttachmentDefinition's namespace (NAMESPACE/NAME); Multus looks a bare name up in kube-system", multusDefaultNetwork, defaultNAD))
	}
	for _, n := range spec.Networks {
		nets[n.Name] = n
		switch {
		case n.Pod != nil && defaultNAD != "":
			def, ok := networks[defaultNAD]
			if !ok {
				errs = append(errs, fmt.Errorf("network %s: %s names NetworkAttachmentDefinition %q, not defined in this example", n.Name, multusDefaultNetwork, defaultNAD))
			}
			podIfs[kubevirt.PodNetworkInterface] = def
		case n.Pod != nil:
			podIfs[kubevirt.PodNetworkInterface] = nil
		case n.Multus != nil:
			_, nad, _ := strings.Cut(n.Multus.NetworkName, "/")
			if nad == "" {
				nad = n.Multus.NetworkName
			}
			def, ok := networks[nad]
			if !ok {
				errs = append(errs, fmt.Errorf("network %s: NetworkAttachmentDefinition %q is not defined in this example", n.Name, n.Multus.NetworkName))
			}
			if n.Multus.Default {
				podIfs[kubevirt.PodNetworkInterface] = def
			} else {
				podIfs[kubevirt.HashedIfName(n.Name)] = def
			}
		}
	}
	for _, iface := range spec.Domain.Devices.Interfaces {
		n, ok := nets[iface.Name]
		if !ok {
			errs = append(errs, fmt.Errorf("interface %s has no network", iface.Name))
			continue
		}
		var want string
		nad := defaultNAD
		switch {
		case iface.Binding != nil && iface.Binding.Name == kubevirt.DefaultBinding && n.Pod != nil:
			continue // masquerade, chained into the primary conflist by vmnicd
		case iface.Binding != nil && iface.Binding.Name == kubevirt.DefaultBinding:
			want = netconf.ModeBridge
			if n.Multus.Default {
				want = netconf.ModeMasquerade
			}
		case passt[iface.Name]:
			// KubeVirt v1.8.2's admitter (pkg/network/admitter/passt.go):
			// "PasstBinding interface only implemented with pod network".
			if n.Pod == nil {
				errs = append(errs, fmt.Errorf("interface %s: KubeVirt's passt binding serves only the pod network (pod: {}; an underlay becomes it through %s)", iface.Name, multusDefaultNetwork))
				continue
			}
			want = netconf.ModePasst
		default:
			continue
		}
		if n.Multus != nil {
			_, nad, _ = strings.Cut(n.Multus.NetworkName, "/")
			if nad == "" {
				nad = n.Multus.NetworkName
			}
		}
		if nad == "" {
			continue
		}
		if def := networks[nad]; def != nil && !slices.Contains(def.vmnicModes, want) {
			errs = append(errs, fmt.Errorf("interface %s: network %s has vmnic modes %v, want %s", iface.Name, nad, def.vmnicModes, want))
		}
	}
	if len(spec.Domain.Devices.Interfaces) == 0 {
		errs = append(errs, errors.New("no interfaces"))
	}
	if anno, ok := vm.Spec.Template.ObjectMeta.Annotations[ippoolsAnnotation]; ok {
		errs = append(errs, checkIPPoolsAnnotation(anno, podIfs, pools)...)
	}
	return errs
}

// checkIPPoolsAnnotation checks Spiderpool's ippools annotation: one entry
// per pod interface that takes its address from Spiderpool, named as
// KubeVirt names it, with pools of the right IP version.
func checkIPPoolsAnnotation(anno string, podIfs map[string]*network, pools map[string]int64) []error {
	var entries []struct {
		Interface    string   `json:"interface"`
		IPv4         []string `json:"ipv4"`
		IPv6         []string `json:"ipv6"`
		CleanGateway bool     `json:"cleangateway"`
	}
	if err := strictJSON([]byte(anno), &entries); err != nil {
		return []error{fmt.Errorf("annotation %s: %w", ippoolsAnnotation, err)}
	}
	var errs []error
	named := map[string]bool{}
	for i, e := range entries {
		if _, ok := podIfs[e.Interface]; !ok {
			errs = append(errs, fmt.Errorf("annotation %s[%d]: interface %q is none of the pod's interfaces %v", ippoolsAnnotation, i, e.Interface, slices.Sorted(maps.Keys(podIfs))))
		}
		named[e.Interface] = true
		for v, names := range map[int64][]string{4: e.IPv4, 6: e.IPv6} {
			for _, p := range names {
				if got, ok := pools[p]; !ok || got != v {
					errs = append(errs, fmt.Errorf("annotation %s[%d]: %q is not an IPv%d SpiderIPPool of this example", ippoolsAnnotation, i, p, v))
				}
			}
		}
	}
	for ifName, n := range podIfs {
		if n != nil && n.spiderpool && !named[ifName] {
			errs = append(errs, fmt.Errorf("annotation %s: Spiderpool refuses the pod: interface %s takes its address from Spiderpool but is not named", ippoolsAnnotation, ifName))
		}
	}
	return errs
}

// TestExamplesDryRun sends every object of every example to a real
// kube-apiserver with server-side dry-run and strict field validation:
// Spiderpool's and Multus' CRDs (from the Spiderpool v1.2.2 module) check
// the SpiderIPPools, SpiderMultusConfigs and NetworkAttachmentDefinitions
// against their schemas. KubeVirt's kinds are served schema-less here;
// TestExamplesConfig decodes them against KubeVirt's API types instead.
func TestExamplesDryRun(t *testing.T) {
	crds, err := spiderpool.CRDFiles(t.Context())
	need.NoError(t, err)
	examples := loadExamples(t)

	c := cluster.StartT(t)
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	kv := filepath.Join(t.TempDir(), "kubevirt-crd.yaml")
	if err := os.WriteFile(kv, []byte(kubevirtCRD), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := c.InstallKubeVirtCRDs(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c.InstallCRDs(ctx, append(crds, kv)...); err != nil {
		t.Fatal(err)
	}
	// The KubeVirt CR's namespace exists wherever KubeVirt is installed.
	if err := c.CreateNamespace(ctx, "kubevirt"); err != nil {
		t.Fatal(err)
	}
	sent, accepted := 0, 0
	for _, ex := range examples {
		for _, o := range ex.objects {
			sent++
			if err := dryRunApply(ctx, c, o.obj); err != nil {
				t.Errorf("%s: %v", o, err)
				continue
			}
			accepted++
		}
	}
	t.Logf("%d of %d objects of %d examples accepted", accepted, sent, len(examples))
}

// dryRunApply server-side applies obj with dryRun=All and fieldValidation
// Strict: a field the schema does not know fails instead of being pruned.
func dryRunApply(ctx context.Context, c *cluster.Cluster, obj *unstructured.Unstructured) error {
	ri, err := c.ResourceFor(ctx, obj)
	if err != nil {
		return err
	}
	data, err := json.Marshal(obj)
	if err != nil {
		return err
	}
	_, err = ri.Patch(ctx, obj.GetName(), k8stypes.ApplyPatchType, data, metav1.PatchOptions{
		DryRun:          []string{metav1.DryRunAll},
		FieldManager:    cluster.FieldManager,
		Force:           ptr(true),
		FieldValidation: metav1.FieldValidationStrict,
	})
	return err
}

// strictJSON decodes data into v, refusing unknown fields and trailing data.
func strictJSON(data []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if dec.More() {
		return errors.New("trailing data after the JSON value")
	}
	return nil
}

// decodeTyped decodes obj into v and fails when a field of obj does not
// survive the round trip through v's type: a field the type does not have.
// Decoding with unknown fields disallowed is not enough, since
// VirtualMachineInstanceSpec has its own, lenient, UnmarshalJSON.
func decodeTyped(obj *unstructured.Unstructured, v any) error {
	data, err := json.Marshal(obj.Object)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(data, v); err != nil {
		return fmt.Errorf("as %T: %w", v, err)
	}
	back, err := json.Marshal(v)
	if err != nil {
		return err
	}
	var again map[string]any
	if err := json.Unmarshal(back, &again); err != nil {
		return err
	}
	if lost := lostFields(obj.Object, again, ""); len(lost) > 0 {
		return fmt.Errorf("fields unknown to %T: %s", v, strings.Join(lost, ", "))
	}
	return nil
}

// lostFields lists the paths of fields in orig that back lacks. A field
// set to false, 0 or "" may be left out by omitempty and is not counted.
func lostFields(orig, back any, path string) []string {
	var out []string
	switch o := orig.(type) {
	case map[string]any:
		b, _ := back.(map[string]any)
		for _, k := range slices.Sorted(maps.Keys(o)) {
			bv, ok := b[k]
			if !ok && !zero(o[k]) {
				out = append(out, path+"."+k)
				continue
			}
			out = append(out, lostFields(o[k], bv, path+"."+k)...)
		}
	case []any:
		b, _ := back.([]any)
		for i := range o {
			p := fmt.Sprintf("%s[%d]", path, i)
			if i >= len(b) {
				out = append(out, p)
				continue
			}
			out = append(out, lostFields(o[i], b[i], p)...)
		}
	}
	return out
}

func zero(v any) bool {
	switch x := v.(type) {
	case bool:
		return !x
	case string:
		return x == ""
	case int64:
		return x == 0
	case float64:
		return x == 0
	}
	return false
}

func toStrings(v any) []string {
	var out []string
	switch x := v.(type) {
	case string:
		out = append(out, x)
	case []any:
		for _, e := range x {
			if s, ok := e.(string); ok {
				out = append(out, s)
			}
		}
	}
	return out
}
