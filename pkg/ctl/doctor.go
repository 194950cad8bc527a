package ctl

import (
	"context"
	"flag"
	"fmt"
	"io"
	"slices"
	"strings"

	"k8s.io/apimachinery/pkg/api/meta"

	"github.com/vmnic/vmnic/pkg/apis/v1alpha1"
	"github.com/vmnic/vmnic/pkg/netconf"
)

// CheckStatus is a check's outcome.
type CheckStatus string

// Outcomes. Only Fail makes a mode not ready.
const (
	OK   CheckStatus = "ok"
	Warn CheckStatus = "warn"
	Fail CheckStatus = "fail"
)

// Check is one prerequisite.
type Check struct {
	// ID names the check: "multus-crd", "spiderpool-crds",
	// "spiderpool-pools", "spiderpool-agent", "kubevirt-binding",
	// "kubevirt-passt", "nodes", "networks", and per network
	// "network/<ns>/<name>", "pools/<ns>/<name>", "ovs-bridge/<ns>/<name>",
	// "resource/<ns>/<name>", "nodes/<ns>/<name>".
	ID      string      `json:"id"`
	Status  CheckStatus `json:"status"`
	Message string      `json:"message"`
	// Fix is a one-line remedy for a failure or warning.
	Fix string `json:"fix,omitempty"`
}

// ModeReport is one mode's checks.
type ModeReport struct {
	Mode string `json:"mode"`
	// Counted: the mode was asked for (--mode) or is in use (masquerade,
	// and every mode with a network), so its failures make doctor fail.
	Counted bool `json:"counted"`
	// Why says why an uncounted mode is not counted.
	Why    string  `json:"why,omitempty"`
	Ready  bool    `json:"ready"`
	Note   string  `json:"note,omitempty"`
	Checks []Check `json:"checks"`
}

// Report is doctor's answer.
type Report struct {
	Cluster string       `json:"cluster,omitempty"`
	Ready   bool         `json:"ready"`
	Modes   []ModeReport `json:"modes"`
}

// Failures lists the failed checks of the counted modes.
func (r *Report) Failures() []Check {
	var out []Check
	for _, m := range r.Modes {
		if !m.Counted {
			continue
		}
		for _, c := range m.Checks {
			if c.Status == Fail {
				out = append(out, c)
			}
		}
	}
	return out
}

// DoctorOptions tune Diagnose.
type DoctorOptions struct {
	// Modes to count: masquerade, bridge, passt. Empty: masquerade and
	// every mode some network uses.
	Modes []string
	// Binding is the KubeVirt binding name vmnic serves (vmnicd
	// --bindings); default "vmnic".
	Binding string
	// Implemented are the modes this vmnic build wires (default: those
	// its config parser accepts); the others get a note.
	Implemented []string
}

// ImplementedModes are the modes this build's network config parser
// accepts: a mode not implemented yet is refused as "not available in this
// vmnic version".
func ImplementedModes() []string {
	var out []string
	for _, m := range doctorModes {
		_, err := netconf.Parse([]byte(`{"cniVersion":"1.0.0","name":"probe","type":"vmnic","mode":"` + m + `"}`))
		if err == nil || !strings.Contains(err.Msg, "not available") {
			out = append(out, m)
		}
	}
	return out
}

// Modes doctor knows, in report order.
var doctorModes = []string{netconf.ModeMasquerade, netconf.ModeBridge, netconf.ModePasst}

// Diagnose decides every mode's readiness from the facts.
func Diagnose(f *Facts, o DoctorOptions) *Report {
	if o.Binding == "" {
		o.Binding = "vmnic"
	}
	if o.Implemented == nil {
		o.Implemented = ImplementedModes()
	}
	d := diag{f: f, o: o}
	rep := &Report{Cluster: f.Host, Ready: true}
	for _, mode := range doctorModes {
		m := ModeReport{Mode: mode}
		switch mode {
		case netconf.ModeMasquerade:
			m.Checks = d.masquerade()
		case netconf.ModeBridge:
			m.Checks = d.bridge()
		case netconf.ModePasst:
			m.Checks = d.passt()
		}
		if len(o.Modes) > 0 {
			m.Counted = slices.Contains(o.Modes, mode)
			m.Why = "not asked for"
		} else {
			m.Counted = mode == netconf.ModeMasquerade || len(d.networks(mode)) > 0
			m.Why = "no network uses it"
		}
		if m.Counted {
			m.Why = ""
		}
		if !slices.Contains(o.Implemented, mode) {
			m.Note = fmt.Sprintf("planned: this vmnic build refuses mode %q (CNI error 7)", mode)
		}
		m.Ready = true
		for _, c := range m.Checks {
			if c.Status == Fail {
				m.Ready = false
			}
		}
		if m.Counted && !m.Ready {
			rep.Ready = false
		}
		rep.Modes = append(rep.Modes, m)
	}
	return rep
}

type diag struct {
	f *Facts
	o DoctorOptions
}

func (d diag) networks(mode string) []Network {
	var out []Network
	for _, n := range d.f.Networks {
		if n.Mode == mode {
			out = append(out, n)
		}
	}
	return out
}

func ok(id, msg string) Check           { return Check{ID: id, Status: OK, Message: msg} }
func fail(id, msg, fix string) Check    { return Check{ID: id, Status: Fail, Message: msg, Fix: fix} }
func warning(id, msg, fix string) Check { return Check{ID: id, Status: Warn, Message: msg, Fix: fix} }

// unreadable is the check for a resource that could not be listed.
func (d diag) unreadable(id, resource string) (Check, bool) {
	if e, bad := d.f.ReadErrors[resource]; bad {
		return fail(id, fmt.Sprintf("cannot list %s: %s", resource, e), "grant your user list on "+resource+" (or run doctor as a cluster admin)"), true
	}
	return Check{}, false
}

func (d diag) masquerade() []Check {
	return []Check{d.vmnicBinding(), d.nodes("nodes", v1alpha1.ConditionMasqueradeReady, "masquerade", false)}
}

func (d diag) bridge() []Check {
	checks := []Check{d.multusCRD()}
	checks = append(checks, d.spiderpool()...)
	checks = append(checks, d.vmnicBinding(), d.nodes("nodes", v1alpha1.ConditionBridgeOVSReady, "bridge (OVS)", true))
	nets := d.networks(netconf.ModeBridge)
	checks = append(checks, d.networksCheck(netconf.ModeBridge, nets,
		`create a NetworkAttachmentDefinition (or a SpiderMultusConfig of cniType custom) with {"type":"vmnic","mode":"bridge","bridge":"br1","ipam":{"type":"spiderpool"}}: deploy/examples/bridge-ovs/multus.yaml`))
	for _, n := range nets {
		checks = append(checks, d.networkChecks(n)...)
	}
	return checks
}

func (d diag) passt() []Check {
	checks := []Check{d.multusCRD()}
	checks = append(checks, d.spiderpool()...)
	checks = append(checks, d.passtBinding())
	nets := d.networks(netconf.ModePasst)
	checks = append(checks, d.networksCheck(netconf.ModePasst, nets,
		`create a SpiderMultusConfig of cniType macvlan (or ipvlan) with chainCNIJsonData ['{"type":"vmnic","mode":"passt"}']: deploy/examples/passt-macvlan/multus.yaml`))
	for _, n := range nets {
		checks = append(checks, d.networkChecks(n)...)
	}
	return checks
}

func (d diag) multusCRD() Check {
	if d.f.Served[NADResource.Resource] {
		return ok("multus-crd", "Multus: NetworkAttachmentDefinition CRD installed")
	}
	return fail("multus-crd", "Multus is not installed: the API server does not serve network-attachment-definitions.k8s.cni.cncf.io/v1",
		"install Multus CNI (thick plugin); it brings the NetworkAttachmentDefinition CRD")
}

// spiderpool checks the CRDs, the pools and the agents on the nodes.
func (d diag) spiderpool() []Check {
	if !d.f.Served[SpiderIPPoolRes.Resource] {
		return []Check{fail("spiderpool-crds", "Spiderpool is not installed: the API server does not serve spiderippools.spiderpool.spidernet.io/v2beta1",
			"install Spiderpool v1.2 (Helm chart spiderpool) with ipam.enableKubevirtStaticIP=true, so VMs keep their addresses")}
	}
	checks := []Check{ok("spiderpool-crds", "Spiderpool CRDs installed")}
	if c, bad := d.unreadable("spiderpool-pools", SpiderIPPoolRes.Resource); bad {
		checks = append(checks, c)
	} else if len(d.f.Pools) == 0 {
		checks = append(checks, fail("spiderpool-pools", "no SpiderIPPool exists",
			"create a SpiderIPPool per subnet with spec.ipVersion, subnet, ips and gateway: deploy/examples/bridge-ovs/ippool.yaml"))
	} else {
		checks = append(checks, ok("spiderpool-pools", fmt.Sprintf("%d SpiderIPPool(s)", len(d.f.Pools))))
	}
	if len(d.f.Nodes) == 0 {
		return checks // the nodes check says why nothing is known
	}
	var healthy, sick []string
	for _, n := range d.f.Nodes {
		if n.Status.Spiderpool.Healthy {
			healthy = append(healthy, n.Name)
		} else {
			sick = append(sick, n.Name+cause(n.Status.Spiderpool.AgentError))
		}
	}
	agentFix := "check the spiderpool-agent DaemonSet on those nodes (kubectl -n kube-system get pods -o wide | grep spiderpool-agent) and its log"
	switch {
	case len(healthy) == 0:
		checks = append(checks, fail("spiderpool-agent", "spiderpool-agent is healthy on no node: "+strings.Join(sick, "; "), agentFix))
	case len(sick) > 0:
		checks = append(checks, warning("spiderpool-agent", fmt.Sprintf("spiderpool-agent healthy on %s, not on %s", strings.Join(healthy, ", "), strings.Join(sick, "; ")), agentFix))
	default:
		checks = append(checks, ok("spiderpool-agent", "spiderpool-agent healthy on "+strings.Join(healthy, ", ")))
	}
	return checks
}

// kubeVirtCR returns the CRs, or a failed check when there is none.
func (d diag) kubeVirtCR(id string) (Check, bool) {
	if !d.f.Served[KubeVirtResource.Resource] {
		return fail(id, "KubeVirt is not installed: the API server does not serve kubevirts.kubevirt.io/v1",
			"install KubeVirt (v1.6 or later) with its operator"), false
	}
	if c, bad := d.unreadable(id, KubeVirtResource.Resource); bad {
		return c, false
	}
	if len(d.f.KubeVirts) == 0 {
		return fail(id, "no KubeVirt CR exists: the KubeVirt operator has nothing to deploy",
			"create the KubeVirt CR (kubevirt/kubevirt) as KubeVirt's install guide says"), false
	}
	return Check{}, true
}

func (d diag) vmnicBinding() Check {
	const id = "kubevirt-binding"
	if c, found := d.kubeVirtCR(id); !found {
		return c
	}
	b := d.o.Binding
	patch := fmt.Sprintf(`'{"spec":{"configuration":{"network":{"binding":{%q:{"domainAttachmentType":"tap","migration":{}}}}}}}'`, b)
	var problems []Check
	for _, kv := range d.f.KubeVirts {
		where := "KubeVirt CR " + kv.Namespace + "/" + kv.Name
		fix := fmt.Sprintf("kubectl -n %s patch kubevirts.kubevirt.io %s --type=merge -p %s", kv.Namespace, kv.Name, patch)
		bind, has := kv.Bindings[b]
		switch {
		case !has:
			problems = append(problems, fail(id, fmt.Sprintf("%s has no network binding %q", where, b), fix))
		case bind.DomainAttachmentType != "tap":
			problems = append(problems, fail(id, fmt.Sprintf("%s: binding %q has domainAttachmentType %q, vmnic needs \"tap\"", where, b, bind.DomainAttachmentType), fix))
		case !bind.Migration:
			return warning(id, fmt.Sprintf("binding %q registered in %s, without migration: VMs using it cannot live-migrate", b, where), fix)
		default:
			return ok(id, fmt.Sprintf("binding %q registered in %s (domainAttachmentType tap, migration allowed)", b, where))
		}
	}
	return problems[0]
}

// passtBinding: passt VMs use KubeVirt's core passt binding, behind the
// PasstBinding feature gate.
func (d diag) passtBinding() Check {
	const id = "kubevirt-passt"
	if c, found := d.kubeVirtCR(id); !found {
		return c
	}
	for _, kv := range d.f.KubeVirts {
		if slices.Contains(kv.FeatureGates, "PasstBinding") {
			return ok(id, "feature gate PasstBinding enabled in KubeVirt CR "+kv.Namespace+"/"+kv.Name)
		}
	}
	kv := d.f.KubeVirts[0]
	return fail(id, "KubeVirt's passt binding (passtBinding: {}) needs feature gate PasstBinding, not enabled in KubeVirt CR "+kv.Namespace+"/"+kv.Name,
		"add PasstBinding to spec.configuration.developerConfiguration.featureGates of the KubeVirt CR (KubeVirt v1.8 or later)")
}

// nodes checks that some node is ready for a mode. Without any
// NodeNetworkCapability that is unknown: a failure when required (bridge
// VMs are scheduled by the resources vmnicd publishes), a warning else.
func (d diag) nodes(id, cond, what string, required bool) Check {
	if len(d.f.Nodes) == 0 {
		msg := "no node publishes a NodeNetworkCapability: vmnicd is not running, or runs with daemon.nodeNetworkCapability=false"
		fix := "install vmnic (helm install vmnic deploy/chart/vmnic -n kube-system) and check its pods: kubectl -n kube-system get pods -l app.kubernetes.io/name=vmnic"
		if !d.f.Served[CapabilityResource.Resource] {
			msg = "vmnic's NodeNetworkCapability CRD is not installed: vmnic is not deployed"
		} else if c, bad := d.unreadable(id, CapabilityResource.Resource); bad {
			return c
		}
		if required {
			return fail(id, msg, fix)
		}
		return warning(id, msg+"; cannot tell which nodes can wire "+what, fix)
	}
	var ready, not []string
	for _, n := range d.f.Nodes {
		c := meta.FindStatusCondition(n.Status.Conditions, cond)
		if c != nil && c.Status == "True" {
			ready = append(ready, n.Name)
			continue
		}
		reason := "not reported"
		if c != nil {
			reason = c.Reason + ": " + c.Message
		}
		not = append(not, n.Name+" ("+reason+")")
	}
	fix := "kubectl describe nnc <node> lists what each node lacks"
	switch {
	case len(ready) == 0:
		return fail(id, "no node can wire "+what+": "+strings.Join(not, "; "), fix)
	case len(not) > 0:
		return warning(id, fmt.Sprintf("%d of %d nodes can wire %s; not: %s", len(ready), len(d.f.Nodes), what, strings.Join(not, "; ")), fix)
	}
	if len(ready) == 1 {
		return ok(id, fmt.Sprintf("the only node, %s, can wire %s", ready[0], what))
	}
	return ok(id, fmt.Sprintf("all %d nodes can wire %s (%s)", len(ready), what, strings.Join(ready, ", ")))
}

func (d diag) networksCheck(mode string, nets []Network, fix string) Check {
	const id = "networks"
	if !d.f.Served[NADResource.Resource] {
		return fail(id, "no "+mode+" network: NetworkAttachmentDefinitions are not served (Multus missing)", fix)
	}
	for _, r := range []string{NADResource.Resource, SpiderMultusRes.Resource} {
		if c, bad := d.unreadable(id, r); bad {
			return c
		}
	}
	if len(nets) == 0 {
		return fail(id, fmt.Sprintf("no network config names vmnic mode %q", mode), fix)
	}
	names := make([]string, len(nets))
	for i, n := range nets {
		names[i] = n.ID()
	}
	return ok(id, fmt.Sprintf("%d %s network(s): %s", len(nets), mode, strings.Join(names, ", ")))
}

// networkChecks are one network's own prerequisites.
func (d diag) networkChecks(n Network) []Check {
	id := n.ID()
	label := n.Kind + " " + id
	if n.Error != "" {
		return []Check{fail("network/"+id, label+": "+n.Error, "fix the network config's JSON")}
	}
	var checks []Check
	_, nadsUnreadable := d.f.ReadErrors[NADResource.Resource]
	if n.Kind == "SpiderMultusConfig" && !d.f.NADs[id] && !nadsUnreadable {
		checks = append(checks, fail("network/"+id, label+" has no NetworkAttachmentDefinition: spiderpool-controller generates it, Multus reads only that",
			"check spiderpool-controller's log and kubectl describe spidermultusconfig -n "+n.Namespace+" "+n.Name))
	}
	checks = append(checks, d.poolChecks(n)...)
	switch n.Mode {
	case netconf.ModeBridge:
		checks = append(checks, d.ovsBridge(n)...)
	case netconf.ModePasst:
		cond, what := v1alpha1.ConditionPasstMacvlanReady, "passt on macvlan"
		if n.Link == "ipvlan" {
			cond, what = v1alpha1.ConditionPasstIpvlanReady, "passt on ipvlan"
		}
		if n.Link != "macvlan" && n.Link != "ipvlan" {
			checks = append(checks, fail("network/"+id, fmt.Sprintf("%s chains vmnic passt after %q; it must follow macvlan or ipvlan", label, dash(n.Link)),
				"chain vmnic after the macvlan or ipvlan plugin: deploy/examples/passt-macvlan/multus.yaml"))
		} else if len(d.f.Nodes) > 0 {
			checks = append(checks, d.nodes("nodes/"+id, cond, what, true))
		}
	}
	return checks
}

func (d diag) poolChecks(n Network) []Check {
	id := "pools/" + n.ID()
	if n.IPAM != "" && n.IPAM != "spiderpool" {
		return []Check{warning(id, fmt.Sprintf("%s takes addresses from IPAM %q, not Spiderpool: VMs do not keep them across restarts and migrations", n.ID(), n.IPAM),
			`use "ipam": {"type": "spiderpool"}`)}
	}
	if len(n.Pools) == 0 {
		return []Check{ok(id, n.ID()+" names no default pool: each VM names its pools (ipam.spidernet.io/ippools annotation)")}
	}
	if !d.f.Served[SpiderIPPoolRes.Resource] {
		return nil // the spiderpool-crds check failed already
	}
	if c, bad := d.unreadable(id, SpiderIPPoolRes.Resource); bad {
		return []Check{c}
	}
	var checks []Check
	var good []string
	for _, name := range n.Pools {
		p, exists := d.f.Pools[name]
		switch {
		case !exists:
			checks = append(checks, fail(id, fmt.Sprintf("pool %q named by %s does not exist", name, n.ID()),
				fmt.Sprintf("create SpiderIPPool %s (%s) or fix the network's default pools", name, poolExample(n))))
		case p.Disabled:
			checks = append(checks, fail(id, fmt.Sprintf("pool %q of %s is disabled", name, n.ID()),
				fmt.Sprintf("kubectl patch spiderippool %s --type=merge -p '{\"spec\":{\"disable\":false}}'", name)))
		case p.Invalid != "":
			checks = append(checks, fail(id, fmt.Sprintf("pool %q of %s: spec.ips cannot be read: %s", name, n.ID(), p.Invalid),
				"fix spec.ips of SpiderIPPool "+name))
		case p.Free() == 0:
			checks = append(checks, fail(id, fmt.Sprintf("pool %q of %s has no free address (%d of %d allocated)", name, n.ID(), p.Allocated, p.Total),
				"add addresses to spec.ips of SpiderIPPool "+name+", or add another pool to the network"))
		default:
			good = append(good, fmt.Sprintf("%s (%d of %d free)", name, p.Free(), p.Total))
		}
	}
	if len(checks) == 0 {
		checks = append(checks, ok(id, "pools of "+n.ID()+": "+strings.Join(good, ", ")))
	}
	return checks
}

// ovsBridge checks that the network's OVS bridge exists on some node ready
// for bridge mode, and that the network requests the bridge's resource so
// VMs land only there.
func (d diag) ovsBridge(n Network) []Check {
	id := n.ID()
	if n.Bridge == "" {
		return []Check{fail("ovs-bridge/"+id, n.ID()+" names no OVS bridge (\"bridge\" is required)", `add "bridge": "<ovs bridge>" to the vmnic entry`)}
	}
	var checks []Check
	if len(d.f.Nodes) > 0 {
		var ready, have []string
		for _, node := range d.f.Nodes {
			if !slices.ContainsFunc(node.Status.OVS.Bridges, func(b v1alpha1.OVSBridge) bool { return b.Name == n.Bridge }) {
				continue
			}
			c := meta.FindStatusCondition(node.Status.Conditions, v1alpha1.ConditionBridgeOVSReady)
			if c != nil && c.Status == "True" {
				ready = append(ready, node.Name)
			} else {
				reason := "not reported"
				if c != nil {
					reason = c.Reason + ": " + c.Message
				}
				have = append(have, node.Name+" ("+reason+")")
			}
		}
		bridgeFix := fmt.Sprintf("on the nodes that carry the VLANs: ovs-vsctl add-br %s, then ovs-vsctl add-port %s <uplink>", n.Bridge, n.Bridge)
		switch {
		case len(ready) > 0:
			checks = append(checks, ok("ovs-bridge/"+id, fmt.Sprintf("OVS bridge %q of %s on %s", n.Bridge, id, strings.Join(ready, ", "))))
		case len(have) > 0:
			checks = append(checks, fail("ovs-bridge/"+id, fmt.Sprintf("OVS bridge %q of %s exists only on nodes not ready for bridge mode: %s", n.Bridge, id, strings.Join(have, "; ")),
				"kubectl describe nnc <node> lists what each node lacks"))
		default:
			checks = append(checks, fail("ovs-bridge/"+id, fmt.Sprintf("no node has OVS bridge %q of %s", n.Bridge, id), bridgeFix))
		}
	}
	want := v1alpha1.OVSBridgeResourcePrefix + n.Bridge
	annotate := fmt.Sprintf("kubectl -n %s annotate %s %s %s=%s --overwrite", n.Namespace, kindResource(n.Kind), n.Name, ResourceNameAnnotation, want)
	switch n.ResourceName {
	case want:
		checks = append(checks, ok("resource/"+id, fmt.Sprintf("%s requests %s: VMs are scheduled where the bridge is", id, want)))
	case "":
		checks = append(checks, warning("resource/"+id, fmt.Sprintf("%s has no %s annotation: VMs may be scheduled on nodes without OVS bridge %q", id, ResourceNameAnnotation, n.Bridge), annotate))
	default:
		checks = append(checks, warning("resource/"+id, fmt.Sprintf("%s requests %s, but its bridge is %q (resource %s)", id, n.ResourceName, n.Bridge, want), annotate))
	}
	return checks
}

func poolExample(n Network) string {
	if n.Mode == netconf.ModePasst {
		return "deploy/examples/passt-macvlan/ippool.yaml"
	}
	return "deploy/examples/bridge-ovs/ippool.yaml"
}

func kindResource(kind string) string {
	if kind == "SpiderMultusConfig" {
		return "spidermultusconfigs.spiderpool.spidernet.io"
	}
	return "network-attachment-definitions.k8s.cni.cncf.io"
}

type doctorOpts struct {
	modes   string
	binding string
}

func doctorFlags(fs *flag.FlagSet) runner {
	o := &doctorOpts{}
	fs.StringVar(&o.modes, "mode", "", "comma-separated modes that must be ready: masquerade, bridge, passt (default: masquerade and every mode a network uses)")
	fs.StringVar(&o.binding, "binding", "vmnic", "the KubeVirt binding name vmnic serves (vmnicd --bindings)")
	return func(ctx context.Context, e *env, args []string) int { return runDoctor(ctx, e, o, args) }
}

func runDoctor(ctx context.Context, e *env, o *doctorOpts, args []string) int {
	if len(args) > 0 {
		e.errorf("doctor takes no arguments (got %q)", args)
		return ExitUsage
	}
	var modes []string
	for m := range strings.SplitSeq(o.modes, ",") {
		if m = strings.TrimSpace(m); m == "" {
			continue
		}
		if !slices.Contains(doctorModes, m) {
			e.errorf("--mode %q: want masquerade, bridge or passt", m)
			return ExitUsage
		}
		modes = append(modes, m)
	}
	cfg, err := RestConfig(e.common.kubeconfig, e.common.context)
	if err != nil {
		e.errorf("%v", err)
		return ExitFailed
	}
	r, err := NewClusterReader(cfg)
	if err != nil {
		e.errorf("%v", err)
		return ExitFailed
	}
	rep, err := Doctor(ctx, r, DoctorOptions{Modes: modes, Binding: o.binding})
	if err != nil {
		e.errorf("%v", err)
		return ExitFailed
	}
	if e.common.json() {
		if c := e.printJSON(rep); c != ExitOK {
			return c
		}
	} else {
		PrintDoctor(e.stdout, rep)
	}
	if !rep.Ready {
		return ExitFailed
	}
	return ExitOK
}

// Doctor gathers the facts and diagnoses them.
func Doctor(ctx context.Context, r Reader, o DoctorOptions) (*Report, error) {
	f, err := Gather(ctx, r)
	if err != nil {
		return nil, err
	}
	return Diagnose(f, o), nil
}

// PrintDoctor writes the report for people.
func PrintDoctor(w io.Writer, rep *Report) {
	if rep.Cluster != "" {
		printf(w, "vmnic doctor: cluster %s\n", rep.Cluster)
	}
	for _, m := range rep.Modes {
		state := "READY"
		if !m.Ready {
			state = "NOT READY"
		}
		var notes []string
		if !m.Counted {
			notes = append(notes, m.Why+": not counted; --mode "+m.Mode+" requires it")
		}
		if m.Note != "" {
			notes = append(notes, m.Note)
		}
		line := fmt.Sprintf("\n%s: %s", m.Mode, state)
		if len(notes) > 0 {
			line += " (" + strings.Join(notes, "; ") + ")"
		}
		printLine(w, line)
		for _, c := range m.Checks {
			mark := map[CheckStatus]string{OK: "  ok   ", Warn: "  warn ", Fail: "  FAIL "}[c.Status]
			printf(w, "%s%s\n", mark, c.Message)
			if c.Fix != "" && c.Status != OK {
				printf(w, "         fix: %s\n", c.Fix)
			}
		}
	}
	printLine(w)
	if rep.Ready {
		var counted []string
		for _, m := range rep.Modes {
			if m.Counted {
				counted = append(counted, m.Mode)
			}
		}
		printf(w, "ready: every prerequisite of %s exists\n", strings.Join(counted, ", "))
		return
	}
	printf(w, "not ready: %d required prerequisite(s) missing\n", len(rep.Failures()))
}
