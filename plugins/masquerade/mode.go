package masquerade

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/vmnic/vmnic/pkg/kubevirt"
	"github.com/vmnic/vmnic/pkg/mode"
	"github.com/vmnic/vmnic/pkg/netconf"
	"github.com/vmnic/vmnic/pkg/podnet"
)

// Mode is masquerade as vmnicd serves it (pkg/mode).
type Mode struct{ p *Plugin }

// New is the mode with the daemon's environment.
func New(env mode.Env) *Mode { return &Mode{p: &Plugin{Servers: env.Servers, Log: env.Log}} }

// Name implements mode.Mode.
func (*Mode) Name() string { return netconf.ModeMasquerade }

// Plan implements mode.Mode: a VM interface vmnic serves gets a NIC; any
// other passes through.
func (m *Mode) Plan(req *mode.Request) (mode.Attachment, error) {
	if req.Facts == nil || !req.Facts.Serve {
		return nil, nil
	}
	prev, err := current.NewResultFromResult(req.Conf.PrevResult)
	if err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, "prevResult: "+err.Error(), "")
	}
	s, err := NewSpec(Input{
		ContainerID: req.ContainerID, Netns: req.Netns, IfName: req.IfName,
		Conf: req.Conf, Facts: req.Facts, Prev: prev,
	})
	if err != nil {
		return nil, err
	}
	return &attachment{p: m.p, s: s}, nil
}

// Load implements mode.Mode.
func (m *Mode) Load(spec json.RawMessage) (mode.Attachment, error) {
	s := &Spec{}
	if err := json.Unmarshal(spec, s); err != nil {
		return nil, fmt.Errorf("decode masquerade spec: %w", err)
	}
	return &attachment{p: m.p, s: s}, nil
}

// Orphan implements mode.Mode: the links of the attachment, by the names
// its interface gives them.
func (m *Mode) Orphan(req *mode.Request) mode.Attachment {
	if req.Netns == "" || len(req.IfName) <= 3 {
		return nil
	}
	return &attachment{p: m.p, s: &Spec{
		Netns: req.Netns, PodIf: req.IfName,
		Bridge: kubevirt.BridgeName(req.IfName), Tap: kubevirt.TapName(req.IfName, req.IfName == kubevirt.PodNetworkInterface),
		Owner: Alias(req.ContainerID, req.IfName),
	}}
}

// attachment is one masquerade NIC; it is stored as its Spec.
type attachment struct {
	p *Plugin
	s *Spec
}

func (a *attachment) MarshalJSON() ([]byte, error) { return json.Marshal(a.s) }

func (a *attachment) Add(ctx context.Context, key string, _ func() error) error {
	return a.p.Add(ctx, key, a.s)
}

func (a *attachment) Result(prev *current.Result) (types.Result, error) { return a.s.Result(prev) }

func (a *attachment) Del(ctx context.Context, key string) error { return a.p.Del(ctx, key, a.s) }

func (a *attachment) Check(ctx context.Context, key string) error { return a.p.Check(ctx, key, a.s) }

func (a *attachment) Restore(ctx context.Context, key string) error {
	return a.p.Restore(ctx, key, a.s)
}

// Addresses masquerade hands the guest.
func (a *attachment) View() mode.View {
	v := mode.View{Tap: a.s.Tap, Bridge: a.s.Bridge, GuestMAC: a.s.GuestMAC, PodIPsFromResult: true}
	if a.s.IPv4 {
		v.GuestIPs = append(v.GuestIPs, Guest4.String())
	}
	if a.s.IPv6 {
		v.GuestIPs = append(v.GuestIPs, Guest6.String())
	}
	return v
}

// ChainEntry is the network config entry the installer chains into the
// node's primary network: masquerade for every VM pod on it.
func ChainEntry() map[string]any {
	return map[string]any{"type": "vmnic", "mode": netconf.ModeMasquerade, "capabilities": map[string]bool{"dns": true}}
}

// WatchGuest implements mode.GuestWatcher: every frame QEMU writes to the
// tap is the guest's (the first on a migration target is its
// self-announcement after the VM resumed there). The guest keeps the MAC
// it has on the source, which is not the target pod's GuestMAC: the frames
// are not filtered by MAC.
func (a *attachment) WatchGuest(ctx context.Context, seen func(mode.GuestFrame) bool) error {
	fromGuest := func(f podnet.Frame) bool { return !f.Outgoing }
	return podnet.WatchFrames(ctx, a.s.Netns, a.s.Tap, fromGuest, func(f podnet.Frame, at time.Time) bool {
		return seen(mode.GuestFrame{At: at, Traffic: podnet.IsTraffic(f.Data), What: podnet.Describe(f.Data)})
	})
}
