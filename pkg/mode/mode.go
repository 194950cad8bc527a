// Package mode is the contract between vmnicd and the ways it wires a VM
// NIC (masquerade, bridge, passt: one package each under plugins/). The
// daemon owns one sequence for every request (records, locks, the spool,
// GC, the migration watch); a mode decides what to do with a request and
// does it to the kernel, OVS and nftables. Nothing in the daemon knows a
// mode by name.
//
// A mode's Plan decides from the request alone, touching nothing, so it is
// tested without root; an Attachment's methods act, and are tested as root
// in real namespaces. Optional interfaces (Migrant, SourceGuard,
// TargetWatcher, Sweeper, Statuser, Closer) let a mode take part in live
// migration, GC and STATUS.
package mode

import (
	"context"
	"encoding/json"
	"log/slog"
	"net"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/vmnic/vmnic/pkg/api"
	"github.com/vmnic/vmnic/pkg/dhcp"
	"github.com/vmnic/vmnic/pkg/kubevirt"
	"github.com/vmnic/vmnic/pkg/netconf"
)

// Servers runs the DHCP servers of attachments, keyed by attachment.
type Servers interface {
	Start(ctx context.Context, key string, cfg dhcp.Config) error
	Stop(key string)
	Running(key string) bool
}

// Env is what the daemon gives every mode.
type Env struct {
	Servers Servers
	// OVSDB is the default ovsdb-server endpoint (vmnicd --ovsdb).
	OVSDB string
	// HostNetns is the node's network namespace ("" is the daemon's own).
	HostNetns string
	Log       *slog.Logger
}

// Request is one ADD, DEL or CHECK as the daemon parsed it.
type Request struct {
	Key                                    string // the attachment: state.Key
	ContainerID, Netns, IfName, Args, Path string
	// Config is the network config as the runtime sent it.
	Config []byte
	Conf   *netconf.Conf
	Pod    netconf.PodArgs
	// Facts is the VM behind the pod, for ADD and CHECK.
	Facts *kubevirt.Facts
}

// Mode is one way of wiring a VM NIC.
type Mode interface {
	// Name is the config's "mode".
	Name() string
	// Plan decides, touching nothing, what the mode does for an ADD or
	// CHECK: a nil Attachment (and nil error) passes the request through,
	// its result being prevResult.
	Plan(req *Request) (Attachment, error)
	// Load rebuilds the attachment of a record from its spec.
	Load(spec json.RawMessage) (Attachment, error)
	// Orphan is what a DEL without a record may still have to remove
	// (a daemon killed before it wrote one): the attachment's names
	// follow from the request; nil when nothing can be there.
	Orphan(req *Request) Attachment
}

// Attachment is one NIC a mode wires. It is stored, as JSON, as its
// record's spec: it must marshal to what Load reads back.
type Attachment interface {
	// Add wires it. save persists the attachment as it is now (a mode
	// that learns something half-way, an IPAM address, calls it before
	// creating anything else). On error Add has removed what it created.
	Add(ctx context.Context, key string, save func() error) error
	// Result is the CNI result to return; prev is the previous plugin's
	// (nil for a network's main plugin).
	Result(prev *current.Result) (types.Result, error)
	// Del removes it; what is already gone is fine.
	Del(ctx context.Context, key string) error
	// Check names every piece that drifted from what Add made.
	Check(ctx context.Context, key string) error
	// Restore brings back what runs for it after a daemon restart (its
	// DHCP server); what is gone is left to DEL and GC.
	Restore(ctx context.Context, key string) error
	// View is what vmnicctl shows of it.
	View() View
}

// View is the part of vmnicctl's attachment view a mode knows.
type View struct {
	Tap, Bridge, GuestMAC string
	OVS                   *api.OVSPort
	// PodIPs, GuestIPs: the addresses of the pod interface and of the
	// guest. PodIPsFromResult: the pod interface's are those the record's
	// CNI result gives it (a chained mode's, from the previous plugin).
	PodIPs, GuestIPs []string
	PodIPsFromResult bool
	Held, Silenced   bool
}

// Migrant is an attachment that takes part in live migration: a target is
// wired held (silent), a source is silenced once its VM moved away.
type Migrant interface {
	Attachment
	Held() bool
	Silenced() bool
	// Release ends a target's hold and announces the VM's addresses
	// from it. Held reports afterwards whether the hold is still on.
	Release() error
	// Silence holds a source that handed over.
	Silence() error
}

// SourceGuard is a Migrant whose source must act while KubeVirt prepares
// the target, because the underlay plugin chained before vmnic announces
// the shared addresses for the target before vmnic can hold it.
type SourceGuard interface {
	Migrant
	// Reassert announces the source's IPv4 addresses again, and its IPv6
	// ones too when v6 (the daemon calls it once per migration stage with v6
	// false, and in answer to each claim of the addresses).
	Reassert(v6 bool) error
	// GuardDAD keeps the source from answering the target's DAD probes
	// (on) or lets it answer again; it reports whether anything changed.
	GuardDAD(on bool) (bool, error)
	// WatchClaims calls claimed for every claim of the source's addresses
	// by another MAC, until ctx ends.
	WatchClaims(ctx context.Context, claimed func(from net.HardwareAddr, v6 bool)) error
}

// GuestWatcher is an attachment that sees the traffic its guest sends:
// the daemon measures each live migration's network gap with it, from the
// source's last guest frame to the target's first.
type GuestWatcher interface {
	Attachment
	// WatchGuest calls seen with each frame the guest sends out through
	// this attachment, until seen returns false (nil is returned), ctx
	// ends or the watch breaks (an error).
	WatchGuest(ctx context.Context, seen func(GuestFrame) bool) error
}

// GuestFrame is a frame from the guest's side: when it came, whether it
// carries traffic (TCP, UDP, ICMP) rather than only keeping the guest's
// network working (ARP, QEMU's RARP announcement of a VM that resumed,
// neighbour discovery, multicast reports), and what it is (for logs).
type GuestFrame struct {
	At      time.Time
	Traffic bool
	What    string
}

// TargetWatcher is a Migrant whose held target sees its migrated guest's
// frames (QEMU's announcement of a VM that resumed) before the hold drops
// them, so before the VMI says the migration succeeded.
type TargetWatcher interface {
	Migrant
	GuestWatcher
}

// Sweeper is a mode with resources that can outlive their records (OVS
// ports): Sweep removes those of attachments that are not live, and
// returns what they are (a metrics label, "ovs_port") and how many it
// removed.
type Sweeper interface {
	Sweep(ctx context.Context, sw SweepRequest) (what string, removed int)
}

// SweepRequest is one sweep. Release, when set, is the CNI GC request of
// one network: orphans of that network also have their addresses released
// through its IPAM plugin.
type SweepRequest struct {
	Live    func(key string) bool
	Release *GCRelease
}

// GCRelease is the network and the runtime's variables of a CNI GC.
type GCRelease struct {
	Conf   *netconf.Conf
	Config []byte
	Path   string
}

// Statuser is a mode that can tell whether it can serve ADDs (CNI STATUS);
// a mode without it is always ready.
type Statuser interface {
	Status(ctx context.Context, req *Request) error
}

// Closer is a mode that holds connections to close at daemon shutdown.
type Closer interface {
	Close()
}
