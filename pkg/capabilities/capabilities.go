// Package capabilities finds out what VM NIC modes this node can wire and
// publishes the answer for the scheduler and for people.
//
// Probe checks the real thing rather than guessing from versions or module
// lists: it creates a veth pair, a bridge, a macvlan and an ipvlan on the veth,
// a tap and an nftables NAT table with a masquerade rule in a throwaway
// network namespace, and records the kernel's error for whatever fails; it
// reads Open vSwitch's state from its database (pkg/ovsdb), asks the API
// server's discovery whether Spiderpool's CRDs are served, and asks the
// Spiderpool agent on its unix socket whether it is healthy. From those it
// derives one condition per mode. Nothing is done by running ip, nft,
// ovs-vsctl or sysctl.
//
// Publisher writes the result for its own node only: the cluster-scoped
// NodeNetworkCapability named after the node (pkg/apis/v1alpha1), one
// vmnic.io/<mode>=true|false label per mode, and one extended resource
// ovs.vmnic.io/<bridge> per OVS bridge in the node's capacity.
//
// Runner keeps it current: a full probe at start, on a trigger and at every
// resync; partial re-probes on host link changes (netlink subscription) and
// on a short poll of the OVS database cache and the Spiderpool agent (the OVS
// client exposes no change notification, so the poll is how OVS changes are
// seen). It publishes only when the findings changed.
package capabilities

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/vmnic/vmnic/pkg/apis/v1alpha1"
)

// Report is one probe's findings, in the form published as the
// NodeNetworkCapability's status.
type Report = v1alpha1.NodeNetworkCapabilityStatus

// Defaults.
const (
	// DefaultSpiderpoolSocket is where spiderpool-agent listens.
	DefaultSpiderpoolSocket = "/var/run/spidernet/spiderpool.sock"
	// DefaultCheckTimeout bounds each check that talks to something else
	// (OVSDB, the API server, the agent).
	DefaultCheckTimeout = 5 * time.Second
)

// ProbeOptions say what to probe and how. The zero value probes the real
// kernel and host links, reports OVS and the Spiderpool CRDs as unavailable
// (nothing configured) and checks the agent at DefaultSpiderpoolSocket.
type ProbeOptions struct {
	// Kernel probes kernel features; nil probes the real kernel in a
	// throwaway network namespace (needs CAP_SYS_ADMIN and CAP_NET_ADMIN).
	Kernel KernelProber
	// OVS reads the switch's state; nil means no OVSDB endpoint is
	// configured (NewOVS returns nil for an empty endpoint).
	OVS OVS
	// Discovery asks the API server which resources it serves; nil means
	// vmnicd runs without an API server.
	Discovery Discovery
	// SpiderpoolSocket is the agent's unix socket (DefaultSpiderpoolSocket).
	SpiderpoolSocket string
	// Links lists the host network namespace's links; nil lists them
	// through netlink in the caller's network namespace.
	Links LinkLister
	// CNIConfDir is the CNI network config dir whose primary config names
	// PrimaryCNI; empty leaves PrimaryCNI empty.
	CNIConfDir string
	// Timeout bounds each remote check (DefaultCheckTimeout).
	Timeout time.Duration
	// Log (slog.Default()).
	Log *slog.Logger
	// Now is the clock (time.Now).
	Now func() time.Time
}

func (o ProbeOptions) withDefaults() ProbeOptions {
	if o.Kernel == nil {
		o.Kernel = NetNSKernelProber{}
	}
	if o.SpiderpoolSocket == "" {
		o.SpiderpoolSocket = DefaultSpiderpoolSocket
	}
	if o.Links == nil {
		o.Links = HostLinks{}
	}
	if o.Timeout <= 0 {
		o.Timeout = DefaultCheckTimeout
	}
	if o.Log == nil {
		o.Log = slog.Default()
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	return o
}

// Probe checks everything and returns the findings with their conditions.
// It does not fail: whatever cannot be checked is reported as missing, with
// the error in the report.
func Probe(ctx context.Context, opts ProbeOptions) Report {
	o := opts.withDefaults()
	var r Report
	r.Kernel = o.Kernel.ProbeKernel(ctx)
	r.OVS = probeOVS(ctx, o.OVS, o.Timeout)
	r.Spiderpool = probeSpiderpool(ctx, o.Discovery, o.SpiderpoolSocket, o.Timeout)
	r.NICs = probeNICs(o.Links, o.Log)
	r.PrimaryCNI = probePrimaryCNI(o.CNIConfDir, o.Log)
	return finish(r, o.Now())
}

// finish stamps the report and derives its conditions.
func finish(r Report, now time.Time) Report {
	r.ObservedAt = metav1.NewTime(now.UTC().Truncate(time.Second))
	r.Conditions = Conditions(r, r.ObservedAt)
	return r
}

// Conditions derives the four mode conditions from the findings:
//
//	MasqueradeReady   = tun && bridge && nftablesNAT
//	PasstMacvlanReady = macvlan && Spiderpool ready
//	PasstIpvlanReady  = ipvlan && Spiderpool ready
//	BridgeOVSReady    = OVS reachable && applied && >= 1 bridge && Spiderpool ready
//
// where Spiderpool ready = CRDs served && agent socket && agent healthy. A
// False condition's reason is its first missing piece; its message lists
// every missing piece, separated by "; ".
func Conditions(r Report, at metav1.Time) []metav1.Condition {
	k := r.Kernel
	var sp []missing
	if !r.Spiderpool.CRDs {
		sp = append(sp, missing{v1alpha1.ReasonSpiderpoolCRDsMissing, withCause("Spiderpool CRDs are not served", r.Spiderpool.CRDsError)})
	}
	if !r.Spiderpool.AgentSocket || !r.Spiderpool.Healthy {
		sp = append(sp, missing{v1alpha1.ReasonSpiderpoolAgentUnavailable, withCause("Spiderpool agent is not available", r.Spiderpool.AgentError)})
	}

	masq := kernelMissing(k, "tun", "bridge", "nftablesNAT")
	macvlan := append(kernelMissing(k, "macvlan"), sp...)
	ipvlan := append(kernelMissing(k, "ipvlan"), sp...)
	ovs := append(ovsMissing(r.OVS), sp...)

	return []metav1.Condition{
		condition(v1alpha1.ConditionMasqueradeReady, masq, "tun, bridge and nftables NAT work", at),
		condition(v1alpha1.ConditionPasstMacvlanReady, macvlan, "macvlan links work and Spiderpool is ready", at),
		condition(v1alpha1.ConditionPasstIpvlanReady, ipvlan, "ipvlan links work and Spiderpool is ready", at),
		condition(v1alpha1.ConditionBridgeOVSReady, ovs, strings.Join(strings.Fields(fmt.Sprintf("OVS %s has %s and Spiderpool is ready", r.OVS.Version, bridgeList(r.OVS.Bridges))), " "), at),
	}
}

// missing is one piece a mode lacks.
type missing struct{ reason, message string }

func condition(typ string, m []missing, okMessage string, at metav1.Time) metav1.Condition {
	c := metav1.Condition{Type: typ, LastTransitionTime: at}
	if len(m) == 0 {
		c.Status, c.Reason, c.Message = metav1.ConditionTrue, v1alpha1.ReasonReady, okMessage
		return c
	}
	msgs := make([]string, len(m))
	for i, p := range m {
		msgs[i] = p.message
	}
	c.Status, c.Reason, c.Message = metav1.ConditionFalse, m[0].reason, strings.Join(msgs, "; ")
	return c
}

// kernelFeatureNames are the features in KernelFeatures, by JSON name.
var kernelFeatureNames = []string{"veth", "bridge", "macvlan", "ipvlan", "tun", "nftablesNAT"}

func kernelHas(k v1alpha1.KernelFeatures, feature string) bool {
	switch feature {
	case "veth":
		return k.Veth
	case "bridge":
		return k.Bridge
	case "macvlan":
		return k.Macvlan
	case "ipvlan":
		return k.Ipvlan
	case "tun":
		return k.Tun
	case "nftablesNAT":
		return k.NftablesNAT
	}
	return false
}

// kernelWhat says what a feature is, for messages.
var kernelWhat = map[string]string{
	"veth":        "veth links cannot be created",
	"bridge":      "bridge links cannot be created",
	"macvlan":     "macvlan links cannot be created",
	"ipvlan":      "ipvlan links cannot be created",
	"tun":         "tun/tap devices cannot be created",
	"nftablesNAT": "nftables NAT (masquerade) cannot be set up",
}

func kernelMissing(k v1alpha1.KernelFeatures, features ...string) []missing {
	var out []missing
	for _, f := range features {
		if kernelHas(k, f) {
			continue
		}
		out = append(out, missing{v1alpha1.ReasonKernelFeatureMissing, withCause(kernelWhat[f], k.Errors[f])})
	}
	return out
}

func ovsMissing(s v1alpha1.OVSStatus) []missing {
	switch {
	case !s.Reachable:
		return []missing{{v1alpha1.ReasonOVSUnavailable, withCause("OVS database is not reachable", s.Error)}}
	case !s.Applied && len(s.Bridges) == 0:
		return []missing{
			{v1alpha1.ReasonOVSNotApplied, "ovs-vswitchd has not applied the latest configuration (down or lagging)"},
			{v1alpha1.ReasonNoOVSBridge, "OVS has no bridge"},
		}
	case !s.Applied:
		return []missing{{v1alpha1.ReasonOVSNotApplied, "ovs-vswitchd has not applied the latest configuration (down or lagging)"}}
	case len(s.Bridges) == 0:
		return []missing{{v1alpha1.ReasonNoOVSBridge, "OVS has no bridge"}}
	}
	return nil
}

func withCause(what, cause string) string {
	if cause == "" {
		return what
	}
	return what + ": " + cause
}

func bridgeList(bs []v1alpha1.OVSBridge) string {
	names := make([]string, len(bs))
	for i, b := range bs {
		names[i] = b.Name
	}
	if len(names) == 1 {
		return "bridge " + names[0]
	}
	return "bridges " + strings.Join(names, ", ")
}

// Ready reports whether the report's condition of type condType is True.
func Ready(r Report, condType string) bool {
	return meta.IsStatusConditionTrue(r.Conditions, condType)
}

// Same reports whether two reports say the same thing: everything but
// ObservedAt and the conditions' timestamps and generations.
func Same(a, b Report) bool {
	return equality.Semantic.DeepEqual(untimed(a), untimed(b))
}

func untimed(r Report) Report {
	c := *r.DeepCopy()
	c.ObservedAt = metav1.Time{}
	for i := range c.Conditions {
		c.Conditions[i].LastTransitionTime = metav1.Time{}
		c.Conditions[i].ObservedGeneration = 0
	}
	return c
}
