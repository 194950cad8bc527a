package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/vmnic/vmnic/pkg/failpoint"
	"github.com/vmnic/vmnic/pkg/ipam"
	"github.com/vmnic/vmnic/pkg/kubevirt"
	"github.com/vmnic/vmnic/pkg/netconf"
	"github.com/vmnic/vmnic/pkg/ovsdb"
	"github.com/vmnic/vmnic/pkg/podnet"
	"github.com/vmnic/vmnic/pkg/proto"
	"github.com/vmnic/vmnic/pkg/state"
	"github.com/vmnic/vmnic/plugins/bridge"
)

// ovsDialTimeout bounds connecting to an ovsdb-server for one request.
const ovsDialTimeout = 5 * time.Second

// ovsClients keeps one persistent connection (with its monitor cache) per
// ovsdb-server endpoint; each reconnects by itself.
type ovsClients struct {
	mu      sync.Mutex
	clients map[string]*ovsdb.Client
	d       *Daemon
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
	c, err := ovsdb.Dial(dctx, endpoint, o.d.log)
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

// addBridge wires a bridge-mode attachment: a plain OVS port for any pod, the
// VM layout for a VM's pod.
func (d *Daemon) addBridge(ctx context.Context, req *proto.Request, conf *netconf.Conf, pod netconf.PodArgs, facts *kubevirt.Facts) (json.RawMessage, error) {
	spec, err := bridge.NewSpec(bridge.Input{
		ContainerID: req.ContainerID, Netns: req.Netns, IfName: req.IfName,
		Args: req.Args, Path: req.Path, Config: req.Config, HostNetns: d.opts.HostNetns,
		Conf: conf, Pod: pod, Facts: facts, OVSDB: d.opts.OVSDB,
	})
	if err != nil {
		return nil, err
	}
	d.gc.RLock()
	defer d.gc.RUnlock()
	key := state.Key(req.ContainerID, req.IfName)
	defer d.locks.Lock(key)()

	// A retried ADD of the same attachment starts from a clean slate.
	if old, gerr := d.store.Get(key); gerr == nil {
		d.log.Info("ADD of an existing attachment: removing the old one first", "key", key)
		if rerr := d.removeRecorded(ctx, key, old); rerr != nil {
			return nil, rerr
		}
	}

	// A plain pod's port has no VM and no migration on record.
	vm := &kubevirt.Facts{}
	if facts.Serve {
		vm = facts
	}
	rec := newRecord(req, conf, pod, vm)
	if perr := d.putRecord(rec, spec, nil); perr != nil {
		return nil, perr
	}
	save := func() error { return d.putRecord(rec, spec, nil) }
	if aerr := d.bridge.Add(ctx, key, spec, save); aerr != nil {
		d.dropRecord(key)
		return nil, aerr
	}
	result := spec.Result()
	err = spec.FillMACs(result)
	var out json.RawMessage
	if err == nil {
		out, err = marshalResult(result, conf.CNIVersion)
	}
	if err == nil {
		err = failpoint.Hit(conf.Mode, failpoint.Record)
	}
	if err == nil {
		err = d.putRecord(rec, spec, out)
	}
	if err != nil {
		if uerr := d.bridge.Del(ctx, key, spec); uerr != nil {
			d.log.Error("undo after failed record write", "key", key, "err", uerr)
		}
		d.dropRecord(key)
		return nil, err
	}
	if spec.Held {
		d.Metrics().MigrationHeld()
		d.watchTarget(key, spec)
	}
	d.log.Info("OVS port wired", "key", key, "vm", spec.VM, "pod", pod.Namespace+"/"+pod.Name,
		"bridge", spec.OVSBridge, "port", spec.HostIf, "guestMAC", spec.GuestMAC)
	return out, nil
}

// networkStatus is STATUS for a network: a chained mode is always ready (the shim
// answers it without the daemon); bridge mode is ready when its OVS
// database answers, its bridge exists and its IPAM plugin is ready. Each
// failure is code 50 naming what is missing.
func (d *Daemon) networkStatus(ctx context.Context, req *proto.Request, conf *netconf.Conf) error {
	if conf.Chained() {
		return nil
	}
	endpoint := conf.OVSDBSocket
	if endpoint == "" {
		endpoint = d.opts.OVSDB
	}
	notReady := func(format string, a ...any) error {
		return types.NewError(types.ErrPluginNotAvailable, fmt.Sprintf(format, a...), "")
	}
	c, err := d.ovs.get(ctx, endpoint)
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
	call := ipam.Call{Type: conf.IPAM.Type, Config: req.Config, Path: req.Path}
	return call.Status(ctx)
}

// bridgeSpecForDel rebuilds what a DEL without record needs from the DEL's
// own config: the names follow from the attachment, the IPAM call from the
// config.
func (d *Daemon) bridgeSpecForDel(req *proto.Request, conf *netconf.Conf) *bridge.Spec {
	pod, _ := netconf.ParseArgs(req.Args)
	s, err := bridge.NewSpec(bridge.Input{
		ContainerID: req.ContainerID, Netns: req.Netns, IfName: req.IfName,
		Args: req.Args, Path: req.Path, Config: req.Config, HostNetns: d.opts.HostNetns,
		Conf: conf, Pod: pod, OVSDB: d.opts.OVSDB,
	})
	if err != nil {
		return nil
	}
	if len(req.IfName) > 3 {
		// The VM layout may exist; its links carry the owner mark (and
		// ownedNames covers both tap names).
		s.LinuxBridge, s.Tap = kubevirt.BridgeName(req.IfName), kubevirt.TapName(req.IfName, false)
		s.NicIf, _ = kubevirt.NicName(req.IfName)
		s.VM = true
	}
	return s
}

// gcPorts removes OVS ports vmnic owns whose attachment has no record, or
// whose pod netns is gone. Ports without vmnic's owner mark are never
// touched. It runs exclusive of ADD and DEL.
func (d *Daemon) gcPorts(ctx context.Context) {
	d.gc.Lock()
	defer d.gc.Unlock()
	d.gcPortsLocked(ctx, nil)
}

// gcRelease is the CNI GC request of one network: orphan ports of that
// network also have their addresses released through its IPAM plugin.
type gcRelease struct {
	conf *netconf.Conf
	req  *proto.Request
}

func (d *Daemon) gcPortsLocked(ctx context.Context, rel *gcRelease) {
	if d.opts.OVSDB != "" {
		if _, err := d.ovs.get(ctx, d.opts.OVSDB); err != nil {
			d.log.Debug("OVS GC skipped: database unreachable", "ovsdb", d.opts.OVSDB, "err", err)
		}
	}
	recs, _, err := d.store.List()
	if err != nil {
		d.log.Error("OVS GC: list records", "err", err)
		return
	}
	live := map[string]bool{}
	for _, r := range recs {
		live[r.ContainerID+"/"+r.IfName] = true
	}
	for _, c := range d.ovs.all() {
		ports, err := c.Ports(ctx, map[string]string{bridge.OwnerKey: bridge.OwnerValue})
		if err != nil {
			d.log.Warn("OVS GC: list ports", "err", err)
			continue
		}
		for _, p := range ports {
			att := p.ExternalIDs[bridge.AttachmentKey]
			netnsPath := p.ExternalIDs[bridge.NetnsKey]
			gone := false
			if netnsPath != "" {
				if ok, serr := podnet.IsNetns(netnsPath); serr != nil || !ok {
					gone = true
				}
			}
			if live[att] && !gone {
				continue
			}
			owner := map[string]string{bridge.OwnerKey: bridge.OwnerValue, bridge.AttachmentKey: att}
			if err := c.DeletePort(ctx, p.Bridge, p.Name, owner); err != nil {
				d.log.Warn("OVS GC: delete port", "port", p.Name, "err", err)
				continue
			}
			d.removeHostVeth(p.Name)
			d.Metrics().GCRemoved(GCOVSPort)
			d.log.Info("GC removed stale OVS port", "port", p.Name, "bridge", p.Bridge, "attachment", att, "netnsGone", gone)
			if rel != nil && p.ExternalIDs[bridge.NetworkKey] == rel.conf.Name && rel.conf.IPAM.Type != "" && !live[att] {
				d.releaseOrphan(ctx, rel, p.ExternalIDs)
			}
		}
	}
}

// releaseOrphan releases the addresses of an attachment known only by its
// port's marks, with the IPAM config the runtime's GC request carries.
func (d *Daemon) releaseOrphan(ctx context.Context, rel *gcRelease, ids map[string]string) {
	cid, ifName, ok := strings.Cut(ids[bridge.AttachmentKey], "/")
	if !ok {
		return
	}
	args := fmt.Sprintf("IgnoreUnknown=1;K8S_POD_NAMESPACE=%s;K8S_POD_NAME=%s;K8S_POD_INFRA_CONTAINER_ID=%s;K8S_POD_UID=%s",
		ids[bridge.PodNSKey], ids[bridge.PodNameKey], cid, ids[bridge.PodUIDKey])
	call := ipam.Call{
		Type: rel.conf.IPAM.Type, Config: rel.req.Config, ContainerID: cid,
		Netns: ids[bridge.NetnsKey], IfName: ifName, Args: args, Path: rel.req.Path,
	}
	if err := call.Del(ctx); err != nil {
		d.log.Warn("GC: release addresses of orphan port", "attachment", cid+"/"+ifName, "err", err)
		return
	}
	d.log.Info("GC released addresses of orphan port", "attachment", cid+"/"+ifName, "network", rel.conf.Name)
}

// removeHostVeth deletes the node end of an orphaned port, if it is still
// there and marked by vmnic.
func (d *Daemon) removeHostVeth(name string) {
	h, closeH, err := podnet.OpenHost(d.opts.HostNetns)
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
			d.log.Warn("OVS GC: delete node veth", "link", name, "err", err)
		}
	}
}
