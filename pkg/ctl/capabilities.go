package ctl

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/discovery"

	"github.com/vmnic/vmnic/pkg/apis/v1alpha1"
	"github.com/vmnic/vmnic/pkg/capabilities"
)

// modeConditions are the conditions of a NodeNetworkCapability, in table
// order, with the short mode names of the node labels.
var modeConditions = []struct{ cond, mode string }{
	{v1alpha1.ConditionMasqueradeReady, "masquerade"},
	{v1alpha1.ConditionPasstMacvlanReady, "passt-macvlan"},
	{v1alpha1.ConditionPasstIpvlanReady, "passt-ipvlan"},
	{v1alpha1.ConditionBridgeOVSReady, "bridge-ovs"},
}

type capabilitiesOpts struct {
	local      bool
	ovsdb      string
	spiderSock string
	cniConfDir string
}

func capabilitiesFlags(fs *flag.FlagSet) runner {
	o := &capabilitiesOpts{}
	fs.BoolVar(&o.local, "local", false, "probe this machine instead of reading the cluster (needs root)")
	fs.StringVar(&o.ovsdb, "ovsdb", "unix:/var/run/openvswitch/db.sock", "OVSDB endpoint of the local probe (empty: no OVS)")
	fs.StringVar(&o.spiderSock, "spiderpool-socket", capabilities.DefaultSpiderpoolSocket, "Spiderpool agent socket of the local probe")
	fs.StringVar(&o.cniConfDir, "cni-conf-dir", "/etc/cni/net.d", "CNI config dir of the local probe (primary CNI)")
	return func(ctx context.Context, e *env, args []string) int { return runCapabilities(ctx, e, o, args) }
}

// Capability reads NODE's NodeNetworkCapability.
func Capability(ctx context.Context, r Reader, node string) (*v1alpha1.NodeNetworkCapability, error) {
	u, err := r.Get(ctx, CapabilityResource, node)
	if err != nil {
		return nil, err
	}
	return decodeNNC(u)
}

// CapabilityList reads every node's NodeNetworkCapability, sorted by name.
func CapabilityList(ctx context.Context, r Reader) ([]v1alpha1.NodeNetworkCapability, error) {
	items, err := r.List(ctx, CapabilityResource)
	if err != nil {
		return nil, err
	}
	out := make([]v1alpha1.NodeNetworkCapability, 0, len(items))
	for i := range items {
		n, err := decodeNNC(&items[i])
		if err != nil {
			return nil, err
		}
		out = append(out, *n)
	}
	slices.SortFunc(out, func(a, b v1alpha1.NodeNetworkCapability) int { return strings.Compare(a.Name, b.Name) })
	return out, nil
}

func decodeNNC(u *unstructured.Unstructured) (*v1alpha1.NodeNetworkCapability, error) {
	n := &v1alpha1.NodeNetworkCapability{}
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, n); err != nil {
		return nil, fmt.Errorf("decode NodeNetworkCapability %s: %w", u.GetName(), err)
	}
	return n, nil
}

// LocalProbe probes this machine as vmnicd would (kernel features in a
// throwaway netns, OVS, the Spiderpool agent, the primary CNI, NICs). With
// disc the Spiderpool CRDs are checked too.
func LocalProbe(ctx context.Context, disc capabilities.Discovery, ovsdb, spiderSock, confDir string) capabilities.Report {
	log := slog.New(slog.DiscardHandler)
	opts := capabilities.ProbeOptions{Discovery: disc, SpiderpoolSocket: spiderSock, CNIConfDir: confDir, Log: log}
	if o := capabilities.NewOVS(ovsdb, log); o != nil {
		defer o.Close()
		opts.OVS = o
	}
	return capabilities.Probe(ctx, opts)
}

func runCapabilities(ctx context.Context, e *env, capOpts *capabilitiesOpts, args []string) int {
	if len(args) > 1 {
		e.errorf("capabilities takes at most one NODE (got %q)", args)
		return ExitUsage
	}
	cfg, err := RestConfig(e.common.kubeconfig, e.common.context)
	local := capOpts.local || (len(args) == 0 && errors.Is(err, ErrNoCluster))
	if local {
		if len(args) == 1 {
			e.errorf("--local probes this machine: give no NODE")
			return ExitUsage
		}
		var disc capabilities.Discovery
		if err == nil {
			if d, derr := discovery.NewDiscoveryClientForConfig(cfg); derr == nil {
				disc = d
			}
		}
		rep := LocalProbe(ctx, disc, capOpts.ovsdb, capOpts.spiderSock, capOpts.cniConfDir)
		if e.common.json() {
			return e.printJSON(rep)
		}
		printLine(e.stdout, "this machine (local probe)")
		PrintCapability(e.stdout, rep, time.Now())
		return ExitOK
	}
	if err != nil {
		e.errorf("%v", err)
		return ExitFailed
	}
	r, err := NewClusterReader(cfg)
	if err != nil {
		e.errorf("%v", err)
		return ExitFailed
	}
	if len(args) == 1 {
		n, gerr := Capability(ctx, r, args[0])
		if gerr != nil {
			e.errorf("%v", gerr)
			return ExitFailed
		}
		if e.common.json() {
			return e.printJSON(n)
		}
		printf(e.stdout, "node %s\n", n.Name)
		PrintCapability(e.stdout, n.Status, time.Now())
		return ExitOK
	}
	list, err := CapabilityList(ctx, r)
	if err != nil {
		e.errorf("%v", err)
		return ExitFailed
	}
	if e.common.json() {
		return e.printJSON(list)
	}
	PrintCapabilityTable(e.stdout, list, time.Now())
	return ExitOK
}

// yesNo renders a condition's status.
func yesNo(conds []metav1.Condition, cond string) string {
	c := meta.FindStatusCondition(conds, cond)
	switch {
	case c == nil:
		return "?"
	case c.Status == "True":
		return "yes"
	}
	return "no"
}

// PrintCapabilityTable writes one line per node.
func PrintCapabilityTable(w io.Writer, list []v1alpha1.NodeNetworkCapability, now time.Time) {
	if len(list) == 0 {
		printLine(w, "No NodeNetworkCapability: vmnicd runs on no node, or publishes nothing (daemon.nodeNetworkCapability=false).")
		return
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	defer func() { _ = tw.Flush() }()
	head := []string{"NODE"}
	for _, m := range modeConditions {
		head = append(head, strings.ToUpper(m.mode))
	}
	head = append(head, "OVS BRIDGES", "SPIDERPOOL", "OBSERVED")
	printLine(tw, strings.Join(head, "\t"))
	for _, n := range list {
		row := []string{n.Name}
		for _, m := range modeConditions {
			row = append(row, yesNo(n.Status.Conditions, m.cond))
		}
		var bridges []string
		for _, b := range n.Status.OVS.Bridges {
			bridges = append(bridges, b.Name)
		}
		sp := "healthy"
		if !n.Status.Spiderpool.Healthy {
			sp = "unavailable"
		}
		if !n.Status.Spiderpool.CRDs {
			sp = "no CRDs"
		}
		row = append(row, dash(strings.Join(bridges, ",")), sp, age(now, n.Status.ObservedAt.Time)+" ago")
		printLine(tw, strings.Join(row, "\t"))
	}
}

// PrintCapability writes one node's report: the mode conditions, then the
// findings behind them.
func PrintCapability(w io.Writer, r capabilities.Report, now time.Time) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	printLine(tw, "MODE\tREADY\tREASON\tMESSAGE")
	for _, m := range modeConditions {
		c := meta.FindStatusCondition(r.Conditions, m.cond)
		if c == nil {
			printf(tw, "%s\t?\t-\tnot reported\n", m.mode)
			continue
		}
		ready := "no"
		if c.Status == "True" {
			ready = "yes"
		}
		printf(tw, "%s\t%s\t%s\t%s\n", m.mode, ready, c.Reason, c.Message)
	}
	_ = tw.Flush()
	printLine(w)

	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	defer func() { _ = tw.Flush() }()
	row := func(k, v string) { printf(tw, "%s:\t%s\n", k, v) }
	row("observed", fmt.Sprintf("%s (%s ago)", r.ObservedAt.UTC().Format(time.RFC3339), age(now, r.ObservedAt.Time)))
	row("kernel", kernelSummary(r.Kernel))
	row("OVS", ovsSummary(r.OVS))
	row("Spiderpool", spiderpoolSummary(r.Spiderpool))
	row("primary CNI", dash(r.PrimaryCNI))
	var nics []string
	for _, n := range r.NICs {
		nics = append(nics, fmt.Sprintf("%s (%s, mtu %d, %s)", n.Name, n.Type, n.MTU, n.OperState))
	}
	row("NICs", dash(strings.Join(nics, ", ")))
}

func kernelSummary(k v1alpha1.KernelFeatures) string {
	have := []struct {
		name string
		ok   bool
	}{{"veth", k.Veth}, {"bridge", k.Bridge}, {"macvlan", k.Macvlan}, {"ipvlan", k.Ipvlan}, {"tun", k.Tun}, {"nftablesNAT", k.NftablesNAT}}
	var ok, missing []string
	for _, h := range have {
		if h.ok {
			ok = append(ok, h.name)
			continue
		}
		m := h.name
		if e := k.Errors[h.name]; e != "" {
			m += " (" + e + ")"
		}
		missing = append(missing, m)
	}
	s := strings.Join(ok, " ")
	if len(missing) > 0 {
		s += "; missing: " + strings.Join(missing, ", ")
	}
	return s
}

func ovsSummary(o v1alpha1.OVSStatus) string {
	if o.Endpoint == "" {
		return "not configured"
	}
	if !o.Reachable {
		return fmt.Sprintf("%s not reachable: %s", o.Endpoint, dash(o.Error))
	}
	s := fmt.Sprintf("%s, version %s", o.Endpoint, dash(o.Version))
	if o.Applied {
		s += ", configuration applied"
	} else {
		s += ", ovs-vswitchd has NOT applied the configuration"
	}
	var bs []string
	for _, b := range o.Bridges {
		bs = append(bs, b.Name+" ("+b.DatapathType+")")
	}
	if len(bs) == 0 {
		return s + ", no bridge"
	}
	return s + ", bridges " + strings.Join(bs, ", ")
}

func spiderpoolSummary(s v1alpha1.SpiderpoolStatus) string {
	var parts []string
	if s.CRDs {
		parts = append(parts, "CRDs served")
	} else {
		parts = append(parts, "CRDs not served"+cause(s.CRDsError))
	}
	switch {
	case s.Healthy:
		parts = append(parts, "agent "+s.SocketPath+" healthy")
	case s.AgentSocket:
		parts = append(parts, "agent "+s.SocketPath+" unhealthy"+cause(s.AgentError))
	default:
		parts = append(parts, "no agent at "+s.SocketPath+cause(s.AgentError))
	}
	return strings.Join(parts, ", ")
}

func cause(s string) string {
	if s == "" {
		return ""
	}
	return " (" + s + ")"
}
