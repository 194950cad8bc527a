// Package api is what vmnicctl and vmnicd exchange over the daemon's socket
// besides CNI requests: the proto.Request Command names VMNIC_STATUS or
// VMNIC_ATTACHMENTS, and the proto.Response Result is the JSON of Status or
// Attachments. It has no dependencies, so both sides share the types.
package api

import "time"

// Introspection commands, sent as proto.Request.Command.
const (
	CommandStatus      = "VMNIC_STATUS"
	CommandAttachments = "VMNIC_ATTACHMENTS"
)

// Status is the daemon's answer to VMNIC_STATUS.
type Status struct {
	// Version is vmnicd's build version.
	Version string `json:"version"`
	// Ready: the daemon serves CNI requests. A daemon that is not ready
	// answers every request, this one included, with CNI code 11.
	Ready bool `json:"ready"`
	// Node is the node name vmnicd was given (empty standalone).
	Node string `json:"node,omitempty"`
	// Source is where VM facts come from: "cluster" or "standalone".
	Source   string    `json:"source"`
	Socket   string    `json:"socket"`
	StateDir string    `json:"stateDir"`
	SpoolDir string    `json:"spoolDir"`
	Started  time.Time `json:"started"`
	// Attachments counts the completed attachments by mode; Incomplete
	// those whose ADD never finished (DEL or GC removes them), Unreadable
	// the records that could not be read.
	Attachments map[string]int `json:"attachments"`
	Incomplete  int            `json:"incomplete"`
	Unreadable  int            `json:"unreadable,omitempty"`
	// DHCPServers is the number of attachments whose DHCP servers run.
	DHCPServers int `json:"dhcpServers"`
	// PendingDELs is the number of DELs spooled by the shim and not yet
	// replayed.
	PendingDELs int `json:"pendingDELs"`
	// Requests counts the CNI requests served since start, by verb and
	// result ("ok" or "error"); empty without metrics.
	Requests map[string]map[string]uint64 `json:"requests,omitempty"`
	// MetricsAddr is where Prometheus metrics are served ("" if not).
	MetricsAddr string `json:"metricsAddr,omitempty"`
	// Watches are the daemon's watches on the API server (empty
	// standalone); WatchDownThreshold is how long one may be down before
	// the daemon reports itself not ready on /readyz.
	Watches            []Watch  `json:"watches,omitempty"`
	WatchDownThreshold Duration `json:"watchDownThreshold,omitempty"`
}

// Watch is one informer of vmnicd's: what it lists and watches, whether a
// watch is open now, and when the API server last sent anything on it.
type Watch struct {
	Resource string `json:"resource"`
	// Selector scopes the watch to the node (a field or label selector).
	Selector string `json:"selector,omitempty"`
	// Events counts the objects the API server sent.
	Events   uint64 `json:"events,omitempty"`
	Synced   bool   `json:"synced"`
	Watching bool   `json:"watching"`
	// Down is how long no watch has been open (0 while one is).
	Down Duration `json:"down,omitempty"`
	// LastEvent is when the API server last sent anything: a list, a new
	// watch, an event or a bookmark.
	LastEvent time.Time `json:"lastEvent,omitzero"`
	LastError string    `json:"lastError,omitempty"`
	// Stale: down for longer than the daemon's threshold.
	Stale bool `json:"stale,omitempty"`
}

// Duration is a time.Duration written as a string ("1m30s") in JSON.
type Duration time.Duration

// MarshalText implements encoding.TextMarshaler.
func (d Duration) MarshalText() ([]byte, error) { return []byte(time.Duration(d).String()), nil }

// UnmarshalText implements encoding.TextUnmarshaler.
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	*d = Duration(v)
	return err
}

// TotalAttachments sums Attachments.
func (s *Status) TotalAttachments() int {
	n := 0
	for _, c := range s.Attachments {
		n += c
	}
	return n
}

// Attachments is the daemon's answer to VMNIC_ATTACHMENTS, sorted by pod
// and interface.
type Attachments struct {
	Items []Attachment `json:"items"`
}

// Attachment is one NIC vmnic wired: a container's interface on one network.
type Attachment struct {
	ContainerID string    `json:"containerID"`
	IfName      string    `json:"ifName"`
	Network     string    `json:"network"`
	Mode        string    `json:"mode"`
	Pod         Pod       `json:"pod"`
	VM          string    `json:"vm,omitempty"`
	Netns       string    `json:"netns"`
	Created     time.Time `json:"created"`
	// Complete: ADD finished; an incomplete attachment is one a killed
	// daemon left half-way, for DEL or GC to remove.
	Complete bool `json:"complete"`
	// Tap and Bridge are the VM side in the pod: the tap QEMU uses and the
	// Linux bridge k6t-<if> it is enslaved to (empty for a pod that is no
	// VM on a bridge-mode network).
	Tap    string `json:"tap,omitempty"`
	Bridge string `json:"bridge,omitempty"`
	// OVS is the bridge-mode port.
	OVS *OVSPort `json:"ovs,omitempty"`
	// PodIPs are the addresses the pod interface holds; GuestIPs those
	// handed to the guest by DHCP (masquerade: 10.0.2.2 / fd10:0:2::2
	// behind NAT; bridge: the IPAM addresses, which the pod then lacks).
	PodIPs   []string `json:"podIPs,omitempty"`
	GuestIPs []string `json:"guestIPs,omitempty"`
	// GuestMAC is the only MAC the DHCP servers answer ("" means any).
	GuestMAC string `json:"guestMAC,omitempty"`
	DHCP     DHCP   `json:"dhcp"`
	// Migration names the live migration this pod is the target of.
	Migration *Migration `json:"migration,omitempty"`
	// Held: a migration target kept silent until it takes over;
	// Silenced: a migration source that handed over (bridge mode).
	Held     bool `json:"held,omitempty"`
	Silenced bool `json:"silenced,omitempty"`
}

// Pod identifies the pod of an attachment.
type Pod struct {
	Namespace string `json:"namespace,omitempty"`
	Name      string `json:"name,omitempty"`
	UID       string `json:"uid,omitempty"`
}

// OVSPort is a bridge-mode attachment's Open vSwitch port.
type OVSPort struct {
	Bridge string `json:"bridge"`
	Port   string `json:"port"`
	VLAN   *int   `json:"vlan,omitempty"`
	Trunks []int  `json:"trunks,omitempty"`
}

// DHCP is the state of an attachment's DHCP servers.
type DHCP struct {
	Running bool `json:"running"`
	// V4Lease and V6Lease are the last addresses acknowledged; nil while
	// the guest took none.
	V4Lease *Lease `json:"v4Lease,omitempty"`
	V6Lease *Lease `json:"v6Lease,omitempty"`
	// V4Acks and V6Replies count the leases handed out since the servers
	// (re)started; RAsSent the router advertisements.
	V4Acks    uint64 `json:"v4Acks"`
	V4Naks    uint64 `json:"v4Naks,omitempty"`
	V6Replies uint64 `json:"v6Replies"`
	RAsSent   uint64 `json:"rasSent,omitempty"`
}

// Lease is an address handed to the guest.
type Lease struct {
	IP   string    `json:"ip"`
	MAC  string    `json:"mac,omitempty"`
	Time time.Time `json:"time"`
}

// Migration is the live migration a target pod belongs to.
type Migration struct {
	Job   string `json:"job,omitempty"`
	UID   string `json:"uid,omitempty"`
	Phase string `json:"phase,omitempty"`
}
