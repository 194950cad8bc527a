package bridge

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/vmnic/vmnic/pkg/api"
	ipamexec "github.com/vmnic/vmnic/pkg/ipam"
	"github.com/vmnic/vmnic/pkg/kubevirt"
	"github.com/vmnic/vmnic/pkg/mode"
	"github.com/vmnic/vmnic/pkg/netconf"
	"github.com/vmnic/vmnic/pkg/ovsdb"
	"github.com/vmnic/vmnic/pkg/podnet"
	"github.com/vmnic/vmnic/pkg/state"
)

// Mode is bridge mode as vmnicd serves it (pkg/mode): the network's main
// plugin, so every pod on the network gets a port, a VM's pod the VM
// layout behind it.
type Mode struct {
	env mode.Env
	ovs *ovsClients
	p   *Plugin
}

// New is the mode with the daemon's environment.
func New(env mode.Env) *Mode {
	m := &Mode{env: env, ovs: &ovsClients{log: env.Log}}
	m.p = &Plugin{OVS: m.ovs.get, Servers: env.Servers, Log: env.Log}
	return m
}

// Name implements mode.Mode.
func (*Mode) Name() string { return netconf.ModeBridge }

// Plan implements mode.Mode.
func (m *Mode) Plan(req *mode.Request) (mode.Attachment, error) {
	facts := req.Facts
	if facts != nil && !facts.Serve {
		facts = nil // a plain port: the pod is no VM vmnic serves
	}
	s, err := NewSpec(m.input(req, facts))
	if err != nil {
		return nil, err
	}
	return m.attachment(s), nil
}

func (m *Mode) input(req *mode.Request, facts *kubevirt.Facts) Input {
	return Input{
		ContainerID: req.ContainerID, Netns: req.Netns, IfName: req.IfName,
		Args: req.Args, Path: req.Path, Config: req.Config, HostNetns: m.env.HostNetns,
		Conf: req.Conf, Pod: req.Pod, Facts: facts, OVSDB: m.env.OVSDB,
	}
}

// attachment is a plain port, or a VM NIC that takes part in migration.
func (m *Mode) attachment(s *Spec) mode.Attachment {
	if s.VM {
		return &vmNIC{port{p: m.p, s: s}}
	}
	return &port{p: m.p, s: s}
}

// Load implements mode.Mode.
func (m *Mode) Load(spec json.RawMessage) (mode.Attachment, error) {
	s := &Spec{}
	if err := json.Unmarshal(spec, s); err != nil {
		return nil, fmt.Errorf("decode bridge spec: %w", err)
	}
	return m.attachment(s), nil
}

// Orphan implements mode.Mode: the names follow from the attachment, the
// IPAM call from the DEL's config; the VM layout may be there, its links
// carry the owner mark (and ownedNames covers both tap names).
func (m *Mode) Orphan(req *mode.Request) mode.Attachment {
	s, err := NewSpec(m.input(req, nil))
	if err != nil {
		return nil
	}
	if len(req.IfName) > 3 {
		s.LinuxBridge, s.Tap = kubevirt.BridgeName(req.IfName), kubevirt.TapName(req.IfName, false)
		s.NicIf, _ = kubevirt.NicName(req.IfName)
		s.VM = true
	}
	return &port{p: m.p, s: s}
}

// Close implements mode.Closer: the OVSDB connections.
func (m *Mode) Close() { m.ovs.closeAll() }

// Status implements mode.Statuser: ready when the network's OVS database
// answers, its bridge exists and its IPAM plugin is ready; each failure is
// code 50 naming what is missing.
func (m *Mode) Status(ctx context.Context, req *mode.Request) error {
	conf := req.Conf
	endpoint := conf.OVSDBSocket
	if endpoint == "" {
		endpoint = m.env.OVSDB
	}
	notReady := func(format string, a ...any) error {
		return types.NewError(types.ErrPluginNotAvailable, fmt.Sprintf(format, a...), "")
	}
	c, err := m.ovs.get(ctx, endpoint)
	if err != nil {
		return notReady("ovsdbSocket: OVS database %s unreachable: %v", endpoint, err)
	}
	brs, err := c.Bridges(ctx)
	if err != nil {
		return notReady("list OVS bridges: %v", err)
	}
	if !slices.ContainsFunc(brs, func(b ovsdb.Bridge) bool { return b.Name == conf.Bridge }) {
		return notReady("bridge: OVS bridge %q does not exist on this node", conf.Bridge)
	}
	call := ipamexec.Call{Type: conf.IPAM.Type, Config: req.Config, Path: req.Path}
	return call.Status(ctx)
}

// port is a plain pod's OVS port; it is stored as its Spec.
type port struct {
	p *Plugin
	s *Spec
}

func (a *port) MarshalJSON() ([]byte, error) { return json.Marshal(a.s) }

func (a *port) Add(ctx context.Context, key string, save func() error) error {
	return a.p.Add(ctx, key, a.s, save)
}

func (a *port) Result(*current.Result) (types.Result, error) {
	r := a.s.Result()
	if err := a.s.FillMACs(r); err != nil {
		return nil, err
	}
	return r, nil
}

func (a *port) Del(ctx context.Context, key string) error { return a.p.Del(ctx, key, a.s) }

func (a *port) Check(ctx context.Context, key string) error { return a.p.Check(ctx, key, a.s) }

func (a *port) Restore(ctx context.Context, key string) error { return a.p.Restore(ctx, key, a.s) }

// View: a VM's addresses go to the guest; a plain pod's port keeps them.
func (a *port) View() mode.View {
	s := a.s
	v := mode.View{Tap: s.Tap, Bridge: s.LinuxBridge, GuestMAC: s.GuestMAC, Held: s.Held, Silenced: s.Silenced}
	if s.OVSBridge != "" {
		v.OVS = &api.OVSPort{Bridge: s.OVSBridge, Port: s.HostIf, VLAN: s.VLAN, Trunks: s.Trunks}
	}
	var ips []string
	for _, ipc := range s.ips() {
		ips = append(ips, ipc.Address.String())
	}
	if s.VM {
		v.GuestIPs = ips
	} else {
		v.PodIPs = ips
	}
	return v
}

// vmNIC is a VM's NIC: it takes part in live migration.
type vmNIC struct{ port }

func (a *vmNIC) Held() bool     { return a.s.Held }
func (a *vmNIC) Silenced() bool { return a.s.Silenced }
func (a *vmNIC) Release() error { return a.p.Release(a.s) }
func (a *vmNIC) Silence() error { return a.p.Silence(a.s) }

// WatchGuest implements mode.TargetWatcher.
func (a *vmNIC) WatchGuest(ctx context.Context, seen func(mode.GuestFrame) bool) error {
	return WatchGuest(ctx, a.s, seen)
}

// ovsDialTimeout bounds connecting to an ovsdb-server for one request.
const ovsDialTimeout = 5 * time.Second

// ovsClients keeps one persistent connection (with its monitor cache) per
// ovsdb-server endpoint; each reconnects by itself.
type ovsClients struct {
	mu      sync.Mutex
	clients map[string]*ovsdb.Client
	log     *slog.Logger
}

func (o *ovsClients) get(ctx context.Context, endpoint string) (*ovsdb.Client, error) {
	if endpoint == "" {
		return nil, errors.New("no OVSDB endpoint: set ovsdbSocket in the network config or vmnicd --ovsdb")
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	if c := o.clients[endpoint]; c != nil {
		return c, nil
	}
	// Without the socket there is no server to wait for: fail at once.
	if path, ok := strings.CutPrefix(endpoint, "unix:"); ok {
		if _, err := os.Stat(path); err != nil {
			return nil, fmt.Errorf("no OVS database at %s: %w", endpoint, err)
		}
	}
	dctx, cancel := context.WithTimeout(ctx, ovsDialTimeout)
	defer cancel()
	c, err := ovsdb.Dial(dctx, endpoint, o.log)
	if err != nil {
		return nil, err
	}
	if o.clients == nil {
		o.clients = map[string]*ovsdb.Client{}
	}
	o.clients[endpoint] = c
	return c, nil
}

func (o *ovsClients) closeAll() {
	o.mu.Lock()
	defer o.mu.Unlock()
	for k, c := range o.clients {
		c.Close()
		delete(o.clients, k)
	}
}

func (o *ovsClients) all() []*ovsdb.Client {
	o.mu.Lock()
	defer o.mu.Unlock()
	out := make([]*ovsdb.Client, 0, len(o.clients))
	for _, c := range o.clients {
		out = append(out, c)
	}
	return out
}

// Sweep implements mode.Sweeper: OVS ports vmnic owns whose attachment is
// not live, or whose pod netns is gone, are removed with their node veth.
// Ports without vmnic's owner mark are never touched.
func (m *Mode) Sweep(ctx context.Context, sw mode.SweepRequest) (string, int) {
	log := m.env.Log
	if m.env.OVSDB != "" {
		if _, err := m.ovs.get(ctx, m.env.OVSDB); err != nil {
			log.Debug("OVS GC skipped: database unreachable", "ovsdb", m.env.OVSDB, "err", err)
		}
	}
	removed := 0
	for _, c := range m.ovs.all() {
		ports, err := c.Ports(ctx, map[string]string{OwnerKey: OwnerValue})
		if err != nil {
			log.Warn("OVS GC: list ports", "err", err)
			continue
		}
		for _, o := range orphans(ports, sw.Live, netnsGone) {
			p := o.port
			att := p.ExternalIDs[AttachmentKey]
			owner := map[string]string{OwnerKey: OwnerValue, AttachmentKey: att}
			if err := c.DeletePort(ctx, p.Bridge, p.Name, owner); err != nil {
				log.Warn("OVS GC: delete port", "port", p.Name, "err", err)
				continue
			}
			m.removeHostVeth(p.Name)
			removed++
			log.Info("GC removed stale OVS port", "port", p.Name, "bridge", p.Bridge, "attachment", att, "netnsGone", o.netnsGone)
			if rel := sw.Release; rel != nil && p.ExternalIDs[NetworkKey] == rel.Conf.Name && rel.Conf.IPAM.Type != "" && !o.live {
				m.releaseOrphan(ctx, rel, p.ExternalIDs)
			}
		}
	}
	return "ovs_port", removed
}

// orphan is a port Sweep removes, and why.
type orphan struct {
	port            ovsdb.PortInfo
	live, netnsGone bool
}

// orphans decides which of vmnic's ports go: those whose attachment is not
// live, and those whose pod netns is gone.
func orphans(ports []ovsdb.PortInfo, live func(key string) bool, gone func(path string) bool) []orphan {
	var out []orphan
	for _, p := range ports {
		o := orphan{port: p, live: live(p.ExternalIDs[AttachmentKey])}
		if path := p.ExternalIDs[NetnsKey]; path != "" {
			o.netnsGone = gone(path)
		}
		if o.live && !o.netnsGone {
			continue
		}
		out = append(out, o)
	}
	return out
}

func netnsGone(path string) bool {
	ok, err := podnet.IsNetns(path)
	return err != nil || !ok
}

// releaseOrphan releases the addresses of an attachment known only by its
// port's marks, with the IPAM config the runtime's GC request carries.
func (m *Mode) releaseOrphan(ctx context.Context, rel *mode.GCRelease, ids map[string]string) {
	cid, ifName, ok := strings.Cut(ids[AttachmentKey], "/")
	if !ok {
		return
	}
	args := fmt.Sprintf("IgnoreUnknown=1;K8S_POD_NAMESPACE=%s;K8S_POD_NAME=%s;K8S_POD_INFRA_CONTAINER_ID=%s;K8S_POD_UID=%s",
		ids[PodNSKey], ids[PodNameKey], cid, ids[PodUIDKey])
	call := ipamexec.Call{
		Type: rel.Conf.IPAM.Type, Config: rel.Config, ContainerID: cid,
		Netns: ids[NetnsKey], IfName: ifName, Args: args, Path: rel.Path,
	}
	if err := call.Del(ctx); err != nil {
		m.env.Log.Warn("GC: release addresses of orphan port", "attachment", state.Key(cid, ifName), "err", err)
		return
	}
	m.env.Log.Info("GC released addresses of orphan port", "attachment", state.Key(cid, ifName), "network", rel.Conf.Name)
}

// removeHostVeth deletes the node end of an orphaned port, if it is still
// there and marked by vmnic.
func (m *Mode) removeHostVeth(name string) {
	h, closeH, err := podnet.OpenHost(m.env.HostNetns)
	if err != nil {
		return
	}
	defer closeH()
	l, err := h.LinkByName(name)
	if err != nil {
		return
	}
	if strings.HasPrefix(l.Attrs().Alias, podnet.AliasPrefix) {
		if err := h.LinkDel(l); err != nil {
			m.env.Log.Warn("OVS GC: delete node veth", "link", name, "err", err)
		}
	}
}
