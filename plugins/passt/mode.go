package passt

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/vmnic/vmnic/pkg/kubevirt"
	"github.com/vmnic/vmnic/pkg/mode"
	"github.com/vmnic/vmnic/pkg/netconf"
	"github.com/vmnic/vmnic/pkg/nft"
	"github.com/vmnic/vmnic/pkg/podnet"
)

// Mode is passt as vmnicd serves it (pkg/mode).
type Mode struct{}

// New is the mode; it needs nothing of the daemon's environment.
func New(mode.Env) *Mode { return &Mode{} }

// Name implements mode.Mode.
func (*Mode) Name() string { return netconf.ModePasst }

// Serves decides whether a VM interface is passt's: KubeVirt's passt
// binding (the core passtBinding, or a plugin binding named passt), a
// binding vmnic serves, or a standalone daemon's VM pod (no binding known).
func Serves(f *kubevirt.Facts) bool {
	if f == nil || f.VMName == "" {
		return false
	}
	switch f.Binding {
	case kubevirt.CorePasst, "passt", "":
		return true
	}
	return f.Serve
}

// Plan implements mode.Mode: the result is the underlay plugin's,
// unchanged; a VM's interface gets the migration's part.
func (*Mode) Plan(req *mode.Request) (mode.Attachment, error) {
	if !Serves(req.Facts) {
		return nil, nil
	}
	prev, err := current.NewResultFromResult(req.Conf.PrevResult)
	if err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, "prevResult: "+err.Error(), "")
	}
	s, err := NewSpec(Input{
		ContainerID: req.ContainerID, Netns: req.Netns, IfName: req.IfName, Prev: prev,
		Target: req.Facts.Migration != nil,
		// Only a standalone daemon knows no binding: then no KubeVirt
		// component sets passt's sysctls, and vmnic does.
		SetSysctls: req.Facts.Binding == "",
	})
	if err != nil {
		return nil, err
	}
	return &attachment{s: s}, nil
}

// Load implements mode.Mode.
func (*Mode) Load(spec json.RawMessage) (mode.Attachment, error) {
	s := &Spec{}
	if err := json.Unmarshal(spec, s); err != nil {
		return nil, fmt.Errorf("decode passt spec: %w", err)
	}
	return &attachment{s: s}, nil
}

// Orphan implements mode.Mode: a hold or DAD guard may be left.
func (*Mode) Orphan(req *mode.Request) mode.Attachment {
	s := &Spec{Netns: req.Netns, PodIf: req.IfName, Owner: podnet.Alias(req.ContainerID, req.IfName)}
	// Without a record only the netns tells whether the interface is held
	// (Del then keeps it silent through the DEL).
	s.Held, _ = nft.Held(req.Netns, req.IfName)
	return &attachment{s: s}
}

// attachment is one passt-prepared interface; it is stored as its Spec.
type attachment struct{ s *Spec }

func (a *attachment) MarshalJSON() ([]byte, error) { return json.Marshal(a.s) }

func (a *attachment) Add(context.Context, string, func() error) error { return Add(a.s) }

// Result is prevResult: the interface is the underlay plugin's.
func (a *attachment) Result(prev *current.Result) (types.Result, error) { return prev, nil }

func (a *attachment) Del(context.Context, string) error     { return Del(a.s) }
func (a *attachment) Check(context.Context, string) error   { return Check(a.s) }
func (a *attachment) Restore(context.Context, string) error { return nil } // nothing runs for it

// View: KubeVirt's passt binding serves the guest (its own DHCP, no tap
// from vmnic) with the pod interface's addresses.
func (a *attachment) View() mode.View {
	return mode.View{GuestIPs: a.s.IPs, PodIPsFromResult: true, Held: a.s.Held, Silenced: a.s.Silenced}
}

func (a *attachment) Held() bool     { return a.s.Held }
func (a *attachment) Silenced() bool { return a.s.Silenced }
func (a *attachment) Release() error { return Release(a.s) }
func (a *attachment) Silence() error { return Silence(a.s) }

func (a *attachment) Reassert(v6 bool) error { return Reassert(a.s, v6) }

func (a *attachment) GuardDAD(on bool) (bool, error) { return GuardDAD(a.s, on) }

func (a *attachment) WatchClaims(ctx context.Context, claimed func(from net.HardwareAddr, v6 bool)) error {
	return WatchClaims(ctx, a.s, claimed)
}

// WatchGuest implements mode.GuestWatcher. passt carries the guest's
// traffic on sockets of the pod's network namespace: what the guest sends
// leaves the pod interface as TCP data, UDP datagrams and echo requests
// (passt's ping socket), while the kernel's own packets there (handshakes
// and ACKs of passt's sockets, echo replies, ARP, neighbour discovery)
// carry no payload. A held target's hold
// drops packets before a packet socket sees them, so the first one seen
// there is the first that reached the network.
func (a *attachment) WatchGuest(ctx context.Context, seen func(mode.GuestFrame) bool) error {
	fromGuest := func(f podnet.Frame) bool {
		return f.Outgoing && (podnet.CarriesPayload(f.Data) || podnet.IsEchoRequest(f.Data))
	}
	return podnet.WatchFrames(ctx, a.s.Netns, a.s.PodIf, fromGuest, func(f podnet.Frame, at time.Time) bool {
		return seen(mode.GuestFrame{At: at, Traffic: true, What: podnet.Describe(f.Data)})
	})
}
