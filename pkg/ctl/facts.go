package ctl

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"math/big"
	"net/netip"
	"slices"
	"strings"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"

	"github.com/vmnic/vmnic/pkg/apis/v1alpha1"
)

// Facts is what doctor read from the cluster. Diagnose decides from it
// alone, so the decisions are tested without an API server.
type Facts struct {
	// Host is the API server's URL.
	Host string
	// Served tells which resources the API server serves (by resource
	// name: "network-attachment-definitions", "spiderippools", ...).
	Served map[string]bool
	// ReadErrors are the resources served but not readable (RBAC), by
	// resource name.
	ReadErrors map[string]string
	Pools      map[string]Pool
	Networks   []Network
	// NADs are the NetworkAttachmentDefinitions by namespace/name.
	NADs      map[string]bool
	KubeVirts []KubeVirt
	Nodes     []v1alpha1.NodeNetworkCapability
}

// Pool is a SpiderIPPool.
type Pool struct {
	Name      string
	IPVersion int
	// Total and Allocated count addresses: from the status the
	// spiderpool-controller keeps, else from spec.ips minus excludeIPs.
	Total     int64
	Allocated int64
	Disabled  bool
	// Invalid says why spec.ips could not be counted.
	Invalid string
}

// Free is the number of addresses left.
func (p Pool) Free() int64 { return max(p.Total-p.Allocated, 0) }

// Network is a Multus network whose config names vmnic.
type Network struct {
	// Kind is NetworkAttachmentDefinition or SpiderMultusConfig.
	Kind      string
	Namespace string
	Name      string
	// Mode is vmnic's mode in the config: bridge, passt, masquerade.
	Mode string
	// Link is the plugin vmnic is chained after (passt: macvlan, ipvlan).
	Link string
	// Bridge is the OVS bridge (bridge mode).
	Bridge string
	// IPAM is the ipam type of the plugin holding the addresses.
	IPAM string
	// Pools are the network's default pools (Spiderpool's
	// default_ipv4_ippool / default_ipv6_ippool, or a SpiderMultusConfig's
	// <type>.ippools); empty when each VM names its pools.
	Pools []string
	// ResourceName is the k8s.v1.cni.cncf.io/resourceName annotation.
	ResourceName string
	// Error says why the config could not be read.
	Error string
}

// ID is "namespace/name".
func (n Network) ID() string { return n.Namespace + "/" + n.Name }

// KubeVirt is a KubeVirt CR.
type KubeVirt struct {
	Namespace, Name string
	Bindings        map[string]Binding
	FeatureGates    []string
}

// Binding is a network binding plugin registered in the KubeVirt CR.
type Binding struct {
	DomainAttachmentType string
	// Migration: the binding has a migration block, so VMs using it may
	// live-migrate.
	Migration bool
}

// ResourceNameAnnotation is Multus' annotation naming a device resource the
// pod requests.
const ResourceNameAnnotation = "k8s.v1.cni.cncf.io/resourceName"

// Gather reads what doctor needs. Unreadable resources are noted in
// ReadErrors; only errors that make every check meaningless fail it.
func Gather(ctx context.Context, r Reader) (*Facts, error) {
	f := &Facts{Served: map[string]bool{}, ReadErrors: map[string]string{}, Pools: map[string]Pool{}, NADs: map[string]bool{}}
	if cr, ok := r.(*ClusterReader); ok {
		f.Host = cr.Host
	}
	for _, gvr := range []schema.GroupVersionResource{NADResource, SpiderIPPoolRes, SpiderMultusRes, KubeVirtResource, CapabilityResource} {
		ok, err := r.Served(ctx, gvr)
		if err != nil {
			return nil, err
		}
		f.Served[gvr.Resource] = ok
	}
	list := func(gvr schema.GroupVersionResource) []unstructured.Unstructured {
		if !f.Served[gvr.Resource] {
			return nil
		}
		items, err := r.List(ctx, gvr)
		if err != nil {
			f.ReadErrors[gvr.Resource] = readError(err)
		}
		return items
	}
	for _, u := range list(SpiderIPPoolRes) {
		p := poolOf(&u)
		f.Pools[p.Name] = p
	}
	smcs := map[string]bool{}
	for _, u := range list(SpiderMultusRes) {
		if n, ok := networkOfSMC(&u); ok {
			f.Networks = append(f.Networks, n)
			smcs[n.ID()] = true
		}
	}
	for _, u := range list(NADResource) {
		id := u.GetNamespace() + "/" + u.GetName()
		f.NADs[id] = true
		if smcs[id] {
			continue // generated from the SpiderMultusConfig listed already
		}
		if n, ok := networkOfNAD(&u); ok {
			f.Networks = append(f.Networks, n)
		}
	}
	slices.SortFunc(f.Networks, func(a, b Network) int { return strings.Compare(a.ID(), b.ID()) })
	for _, u := range list(KubeVirtResource) {
		f.KubeVirts = append(f.KubeVirts, kubeVirtOf(&u))
	}
	nodes := list(CapabilityResource)
	for i := range nodes {
		n, err := decodeNNC(&nodes[i])
		if err != nil {
			f.ReadErrors[CapabilityResource.Resource] = err.Error()
			continue
		}
		f.Nodes = append(f.Nodes, *n)
	}
	slices.SortFunc(f.Nodes, func(a, b v1alpha1.NodeNetworkCapability) int { return strings.Compare(a.Name, b.Name) })
	return f, nil
}

func readError(err error) string {
	if apierrors.IsForbidden(err) {
		return "forbidden: your user may not list them"
	}
	var se *apierrors.StatusError
	if errors.As(err, &se) {
		return se.ErrStatus.Message
	}
	return err.Error()
}

func poolOf(u *unstructured.Unstructured) Pool {
	p := Pool{Name: u.GetName()}
	v, _, _ := unstructured.NestedInt64(u.Object, "spec", "ipVersion")
	p.IPVersion = int(v)
	p.Disabled, _, _ = unstructured.NestedBool(u.Object, "spec", "disable")
	ips, _, _ := unstructured.NestedStringSlice(u.Object, "spec", "ips")
	exclude, _, _ := unstructured.NestedStringSlice(u.Object, "spec", "excludeIPs")
	if total, ok, _ := unstructured.NestedInt64(u.Object, "status", "totalIPCount"); ok {
		p.Total = total
	} else {
		n, err := CountIPs(ips, exclude)
		if err != nil {
			p.Invalid = err.Error()
		}
		p.Total = n
	}
	if n, ok, _ := unstructured.NestedInt64(u.Object, "status", "allocatedIPCount"); ok {
		p.Allocated = n
	} else if s, ok, _ := unstructured.NestedString(u.Object, "status", "allocatedIPs"); ok && s != "" {
		var m map[string]json.RawMessage
		if json.Unmarshal([]byte(s), &m) == nil {
			p.Allocated = int64(len(m))
		}
	}
	return p
}

// CountIPs counts the addresses of Spiderpool's ips entries ("10.0.0.5",
// "10.0.0.10-10.0.0.20", IPv6 alike) that excludeIPs does not exclude.
// Counts beyond int64 are capped.
func CountIPs(ips, exclude []string) (int64, error) {
	in, err := intervals(ips)
	if err != nil {
		return 0, err
	}
	ex, err := intervals(exclude)
	if err != nil {
		return 0, fmt.Errorf("excludeIPs: %w", err)
	}
	total := new(big.Int)
	for _, iv := range merge(in) {
		total.Add(total, iv.size())
	}
	for _, e := range merge(ex) {
		for _, iv := range merge(in) {
			total.Sub(total, iv.overlap(e))
		}
	}
	if !total.IsInt64() {
		return math.MaxInt64, nil
	}
	return total.Int64(), nil
}

type interval struct{ lo, hi *big.Int }

func (iv interval) size() *big.Int {
	n := new(big.Int).Sub(iv.hi, iv.lo)
	return n.Add(n, big.NewInt(1))
}

func (iv interval) overlap(o interval) *big.Int {
	lo, hi := iv.lo, iv.hi
	if o.lo.Cmp(lo) > 0 {
		lo = o.lo
	}
	if o.hi.Cmp(hi) < 0 {
		hi = o.hi
	}
	if lo.Cmp(hi) > 0 {
		return new(big.Int)
	}
	return interval{lo, hi}.size()
}

func addrInt(s string) (*big.Int, error) {
	a, err := netip.ParseAddr(strings.TrimSpace(s))
	if err != nil {
		return nil, err
	}
	b := a.As16()
	if a.Is4() {
		return new(big.Int).SetBytes(b[12:]), nil
	}
	return new(big.Int).SetBytes(b[:]), nil
}

func intervals(entries []string) ([]interval, error) {
	var out []interval
	for _, e := range entries {
		lo, hi, isRange := strings.Cut(e, "-")
		if !isRange {
			hi = lo
		}
		a, err := addrInt(lo)
		if err != nil {
			return nil, fmt.Errorf("entry %q: %w", e, err)
		}
		b, err := addrInt(hi)
		if err != nil {
			return nil, fmt.Errorf("entry %q: %w", e, err)
		}
		if a.Cmp(b) > 0 {
			return nil, fmt.Errorf("entry %q: range ends before it starts", e)
		}
		out = append(out, interval{a, b})
	}
	return out, nil
}

// merge sorts intervals and joins overlapping or adjacent ones.
func merge(in []interval) []interval {
	s := slices.Clone(in)
	slices.SortFunc(s, func(a, b interval) int { return a.lo.Cmp(b.lo) })
	var out []interval
	for _, iv := range s {
		if n := len(out); n > 0 {
			next := new(big.Int).Add(out[n-1].hi, big.NewInt(1))
			if iv.lo.Cmp(next) <= 0 {
				if iv.hi.Cmp(out[n-1].hi) > 0 {
					out[n-1].hi = iv.hi
				}
				continue
			}
		}
		out = append(out, interval{iv.lo, iv.hi})
	}
	return out
}

// stringList decodes a JSON string or list of strings.
type stringList []string

func (s *stringList) UnmarshalJSON(b []byte) error {
	var one string
	if json.Unmarshal(b, &one) == nil {
		if one != "" {
			*s = []string{one}
		}
		return nil
	}
	var many []string
	if err := json.Unmarshal(b, &many); err != nil {
		return err
	}
	*s = many
	return nil
}

// cniEntry is one plugin of a network config, as far as doctor reads it.
type cniEntry struct {
	Type   string `json:"type"`
	Mode   string `json:"mode"`
	Bridge string `json:"bridge"`
	IPAM   *struct {
		Type string     `json:"type"`
		V4   stringList `json:"default_ipv4_ippool"`
		V6   stringList `json:"default_ipv6_ippool"`
	} `json:"ipam"`
}

func (c cniEntry) pools() []string {
	if c.IPAM == nil {
		return nil
	}
	return append(slices.Clone([]string(c.IPAM.V4)), c.IPAM.V6...)
}

func (c cniEntry) ipamType() string {
	if c.IPAM == nil {
		return ""
	}
	return c.IPAM.Type
}

// classify fills n from a network config (a single plugin or a conflist)
// and reports whether it names vmnic.
func classify(n *Network, config string) bool {
	var conf struct {
		cniEntry
		Plugins []cniEntry `json:"plugins"`
	}
	if err := json.Unmarshal([]byte(config), &conf); err != nil {
		// Not readable: it may or may not be vmnic's. Say so only when it
		// mentions vmnic at all.
		if strings.Contains(config, `"vmnic"`) {
			n.Error = "config is not valid JSON: " + err.Error()
			return true
		}
		return false
	}
	entries := conf.Plugins
	if len(entries) == 0 {
		entries = []cniEntry{conf.cniEntry}
	}
	for i, e := range entries {
		if e.Type != "vmnic" {
			continue
		}
		n.Mode = e.Mode
		switch {
		case e.Mode == "bridge" || i == 0:
			n.Bridge, n.IPAM, n.Pools = e.Bridge, e.ipamType(), e.pools()
		default:
			prev := entries[i-1]
			n.Link, n.IPAM, n.Pools = prev.Type, prev.ipamType(), prev.pools()
		}
		return true
	}
	return false
}

func networkOfNAD(u *unstructured.Unstructured) (Network, bool) {
	n := Network{Kind: "NetworkAttachmentDefinition", Namespace: u.GetNamespace(), Name: u.GetName(), ResourceName: u.GetAnnotations()[ResourceNameAnnotation]}
	config, _, _ := unstructured.NestedString(u.Object, "spec", "config")
	return n, classify(&n, config)
}

func networkOfSMC(u *unstructured.Unstructured) (Network, bool) {
	n := Network{Kind: "SpiderMultusConfig", Namespace: u.GetNamespace(), Name: u.GetName(), ResourceName: u.GetAnnotations()[ResourceNameAnnotation]}
	cniType, _, _ := unstructured.NestedString(u.Object, "spec", "cniType")
	switch cniType {
	case "custom":
		config, _, _ := unstructured.NestedString(u.Object, "spec", "customCNI")
		return n, classify(&n, config)
	case "macvlan", "ipvlan":
		chain, _, _ := unstructured.NestedStringSlice(u.Object, "spec", "chainCNIJsonData")
		for _, c := range chain {
			var e cniEntry
			if json.Unmarshal([]byte(c), &e) != nil || e.Type != "vmnic" {
				continue
			}
			n.Mode, n.Link, n.IPAM = e.Mode, cniType, "spiderpool"
			v4, _, _ := unstructured.NestedStringSlice(u.Object, "spec", cniType, "ippools", "ipv4")
			v6, _, _ := unstructured.NestedStringSlice(u.Object, "spec", cniType, "ippools", "ipv6")
			n.Pools = append(v4, v6...)
			return n, true
		}
	}
	return n, false
}

func kubeVirtOf(u *unstructured.Unstructured) KubeVirt {
	kv := KubeVirt{Namespace: u.GetNamespace(), Name: u.GetName(), Bindings: map[string]Binding{}}
	bindings, _, _ := unstructured.NestedMap(u.Object, "spec", "configuration", "network", "binding")
	for name, v := range bindings {
		m, _ := v.(map[string]any)
		b := Binding{}
		b.DomainAttachmentType, _ = m["domainAttachmentType"].(string)
		_, b.Migration = m["migration"]
		kv.Bindings[name] = b
	}
	kv.FeatureGates, _, _ = unstructured.NestedStringSlice(u.Object, "spec", "configuration", "developerConfiguration", "featureGates")
	return kv
}
