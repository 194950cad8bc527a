package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Condition types: one per VM NIC mode. Status True means the node can wire
// that mode now; False carries a Reason and a Message naming every missing
// piece.
const (
	ConditionMasqueradeReady   = "MasqueradeReady"
	ConditionPasstMacvlanReady = "PasstMacvlanReady"
	ConditionPasstIpvlanReady  = "PasstIpvlanReady"
	ConditionBridgeOVSReady    = "BridgeOVSReady"
)

// Condition reasons. A False condition's Reason is its first missing piece,
// in the order the mode needs them (kernel, then OVS, then Spiderpool); the
// Message lists all of them.
const (
	// ReasonReady: everything the mode needs is there.
	ReasonReady = "Ready"
	// ReasonKernelFeatureMissing: a link type or nftables NAT could not be
	// created in a throwaway network namespace; the message has the
	// kernel's error ("ipvlan links cannot be created: operation not
	// supported").
	ReasonKernelFeatureMissing = "KernelFeatureMissing"
	// ReasonOVSUnavailable: no OVSDB endpoint configured, or the database
	// does not answer.
	ReasonOVSUnavailable = "OVSUnavailable"
	// ReasonOVSNotApplied: ovs-vswitchd has not applied the database's
	// latest configuration (it is down or lagging).
	ReasonOVSNotApplied = "OVSNotApplied"
	// ReasonNoOVSBridge: OVS works but has no bridge to attach VMs to.
	ReasonNoOVSBridge = "NoOVSBridge"
	// ReasonSpiderpoolCRDsMissing: the API server does not serve
	// spiderippools.spiderpool.spidernet.io/v2beta1 (or vmnicd runs without
	// an API server).
	ReasonSpiderpoolCRDsMissing = "SpiderpoolCRDsMissing"
	// ReasonSpiderpoolAgentUnavailable: the agent's unix socket is absent
	// or GET /v1/ipam/healthy on it does not answer 200.
	ReasonSpiderpoolAgentUnavailable = "SpiderpoolAgentUnavailable"
)

// Node labels, "true" or "false", mirroring the four conditions.
const (
	LabelMasquerade   = GroupName + "/masquerade"
	LabelPasstMacvlan = GroupName + "/passt-macvlan"
	LabelPasstIpvlan  = GroupName + "/passt-ipvlan"
	LabelBridgeOVS    = GroupName + "/bridge-ovs"
)

// ModeLabels maps each condition type to its node label.
var ModeLabels = map[string]string{
	ConditionMasqueradeReady:   LabelMasquerade,
	ConditionPasstMacvlanReady: LabelPasstMacvlan,
	ConditionPasstIpvlanReady:  LabelPasstIpvlan,
	ConditionBridgeOVSReady:    LabelBridgeOVS,
}

// OVSBridgeResourcePrefix prefixes the node's extended resource for each OVS
// bridge: "ovs.vmnic.io/br1". A VM NIC on an OVS bridge requests one, so it
// lands only on nodes that have the bridge. Everything under this prefix in a
// node's capacity belongs to vmnicd.
const OVSBridgeResourcePrefix = "ovs." + GroupName + "/"

// OVSBridgeCapacity is each bridge resource's capacity: enough for any
// number of VM NICs a node can run, as ovs-cni does.
const OVSBridgeCapacity = "1k"

// NodeNetworkCapability is what one node can wire, published by vmnicd on
// that node. It is cluster-scoped and named after the node.
type NodeNetworkCapability struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   NodeNetworkCapabilitySpec   `json:"spec,omitempty"`
	Status NodeNetworkCapabilityStatus `json:"status,omitempty"`
}

// NodeNetworkCapabilitySpec only names the node; everything else is status.
type NodeNetworkCapabilitySpec struct {
	// NodeName is the node this object describes (also its name).
	NodeName string `json:"nodeName,omitempty"`
}

// NodeNetworkCapabilityStatus is one probe's findings.
type NodeNetworkCapabilityStatus struct {
	// Conditions has one entry per mode: MasqueradeReady,
	// PasstMacvlanReady, PasstIpvlanReady, BridgeOVSReady.
	//
	// +listType=map
	// +listMapKey=type
	Conditions []metav1.Condition `json:"conditions,omitempty" patchStrategy:"merge" patchMergeKey:"type"`

	// Kernel is what the kernel could create in a throwaway network
	// namespace.
	Kernel KernelFeatures `json:"kernel"`
	// OVS is the Open vSwitch seen through its database.
	OVS OVSStatus `json:"ovs"`
	// Spiderpool is the IPAM that passt and bridge modes need.
	Spiderpool SpiderpoolStatus `json:"spiderpool"`
	// NICs are the node's uplink-like links in the host network namespace
	// (devices, bonds, VLANs, macvlans, and veths whose peer is in the host
	// namespace too; not pods' veths), sorted by name.
	NICs []NIC `json:"nics,omitempty"`
	// PrimaryCNI is the type of the first plugin of the node's primary CNI
	// network config ("calico", "cilium-cni", "flannel"); empty when
	// vmnicd was given no config dir or found none.
	PrimaryCNI string `json:"primaryCNI,omitempty"`
	// ObservedAt is when the probe that found this ran.
	ObservedAt metav1.Time `json:"observedAt,omitempty"`
}

// KernelFeatures says which kernel objects could be created.
type KernelFeatures struct {
	// NftablesNAT: an ip nat table with a masquerade rule.
	NftablesNAT bool `json:"nftablesNAT"`
	// Tun: a tap device through /dev/net/tun.
	Tun bool `json:"tun"`
	// Bridge: a Linux bridge.
	Bridge bool `json:"bridge"`
	// Macvlan: a macvlan link on a veth.
	Macvlan bool `json:"macvlan"`
	// Ipvlan: an ipvlan link on a veth.
	Ipvlan bool `json:"ipvlan"`
	// Veth: a veth pair.
	Veth bool `json:"veth"`
	// Errors maps each missing feature (the field names above:
	// "nftablesNAT", "ipvlan", …) to the error that creating it returned.
	Errors map[string]string `json:"errors,omitempty"`
}

// OVSStatus is Open vSwitch as its database shows it.
type OVSStatus struct {
	// Endpoint is the OVSDB endpoint vmnicd uses; empty when none is
	// configured.
	Endpoint string `json:"endpoint,omitempty"`
	// Reachable: the database answers.
	Reachable bool `json:"reachable"`
	// Version is ovs_version ("3.1.0").
	Version string `json:"version,omitempty"`
	// Applied: ovs-vswitchd has applied the latest configuration
	// (cur_cfg == next_cfg).
	Applied bool `json:"applied"`
	// DatapathTypes are the datapaths the switch supports ("netdev",
	// "system").
	DatapathTypes []string `json:"datapathTypes,omitempty"`
	// Bridges are the bridges, sorted by name.
	Bridges []OVSBridge `json:"bridges,omitempty"`
	// Error is why the database could not be read.
	Error string `json:"error,omitempty"`
}

// OVSBridge is one OVS bridge.
type OVSBridge struct {
	Name string `json:"name"`
	// DatapathType is "system" (kernel module) or "netdev" (userspace);
	// OVS stores "" for system, reported here as "system".
	DatapathType string `json:"datapathType"`
}

// SpiderpoolStatus is Spiderpool as this node sees it.
type SpiderpoolStatus struct {
	// CRDs: the API server serves spiderippools.spiderpool.spidernet.io
	// in v2beta1.
	CRDs bool `json:"crds"`
	// AgentSocket: the agent's unix socket exists.
	AgentSocket bool `json:"agentSocket"`
	// Healthy: GET /v1/ipam/healthy on the socket answered 200.
	Healthy bool `json:"healthy"`
	// SocketPath is the socket checked.
	SocketPath string `json:"socketPath,omitempty"`
	// CRDsError is why CRDs is false.
	CRDsError string `json:"crdsError,omitempty"`
	// AgentError is why AgentSocket or Healthy is false.
	AgentError string `json:"agentError,omitempty"`
}

// NIC is one link of the host network namespace.
type NIC struct {
	Name string `json:"name"`
	// Type is the netlink link kind: "device", "bond", "vlan", "macvlan",
	// "veth".
	Type string `json:"type"`
	MTU  int    `json:"mtu"`
	// OperState is the RFC 2863 state as netlink names it: "up", "down",
	// "lower-layer-down", "unknown", …
	OperState string `json:"operState"`
}

// NodeNetworkCapabilityList is a list of NodeNetworkCapability.
type NodeNetworkCapabilityList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`

	Items []NodeNetworkCapability `json:"items"`
}
