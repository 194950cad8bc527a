package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/utils"

	"github.com/vmnic/vmnic/pkg/failpoint"
	"github.com/vmnic/vmnic/pkg/kubevirt"
	"github.com/vmnic/vmnic/pkg/mode"
	"github.com/vmnic/vmnic/pkg/netconf"
	"github.com/vmnic/vmnic/pkg/podnet"
	"github.com/vmnic/vmnic/pkg/proto"
	"github.com/vmnic/vmnic/pkg/spool"
	"github.com/vmnic/vmnic/pkg/state"
)

func errResponse(err error) *proto.Response {
	var te *types.Error
	if errors.As(err, &te) {
		return &proto.Response{Error: te}
	}
	return &proto.Response{Error: types.NewError(types.ErrInternal, err.Error(), "")}
}

func badRequest(err error) error {
	return types.NewError(types.ErrDecodingFailure, "vmnic request: "+err.Error(), "")
}

func encode(w io.Writer, resp *proto.Response) error {
	return proto.Encode(w, resp)
}

// Handle serves one forwarded CNI request.
func (d *Daemon) Handle(ctx context.Context, req *proto.Request) *proto.Response {
	if !d.ready.Load() && !req.Spooled {
		if req.Command == "STATUS" {
			return errResponse(types.NewError(types.ErrPluginNotAvailable, "vmnic daemon is starting or stopping", ""))
		}
		return errResponse(types.NewError(types.ErrTryAgainLater, "vmnic daemon is starting or stopping", ""))
	}
	start := time.Now()
	log := d.log.With("command", req.Command, "container", req.ContainerID, "ifname", req.IfName)
	result, conf, err := d.dispatch(ctx, req)
	d.observe(req, conf, err, time.Since(start))
	if err != nil {
		log.Error("request failed", "err", err, "elapsed", time.Since(start))
		return errResponse(err)
	}
	log.Debug("request done", "elapsed", time.Since(start))
	return &proto.Response{Result: result}
}

// validateIDs applies the spec's rules to CNI_CONTAINERID and CNI_IFNAME
// again in the daemon: they name files in the state dir, and the socket is
// the daemon's trust boundary, not the shim.
func validateIDs(req *proto.Request) error {
	switch req.Command {
	case "ADD", "DEL", "CHECK":
	default:
		return nil
	}
	if err := utils.ValidateContainerID(req.ContainerID); err != nil {
		return types.NewError(types.ErrInvalidEnvironmentVariables, "CNI_CONTAINERID: "+err.Msg, err.Details)
	}
	if err := utils.ValidateInterfaceName(req.IfName); err != nil {
		return types.NewError(types.ErrInvalidEnvironmentVariables, "CNI_IFNAME: "+err.Msg, err.Details)
	}
	return nil
}

// dispatch serves req; it also returns the parsed config (nil when the
// request has none or it is invalid) for observe.
func (d *Daemon) dispatch(ctx context.Context, req *proto.Request) (json.RawMessage, *netconf.Conf, error) {
	if isIntrospect(req.Command) {
		out, err := d.introspect(ctx, req)
		return out, nil, err
	}
	if err := validateIDs(req); err != nil {
		return nil, nil, err
	}
	conf, cerr := netconf.Parse(req.Config)
	if cerr != nil {
		return nil, nil, cerr
	}
	var out json.RawMessage
	var err error
	switch req.Command {
	case "ADD":
		out, err = d.add(ctx, req, conf)
	case "DEL":
		err = d.del(ctx, req, conf)
	case "CHECK":
		err = d.check(ctx, req, conf)
	case "STATUS":
		err = d.networkStatus(ctx, req, conf)
	case "GC":
		err = d.gcNetwork(ctx, conf, req)
	default:
		err = types.NewError(types.ErrInvalidEnvironmentVariables, fmt.Sprintf("CNI_COMMAND: unknown command %q", req.Command), "")
	}
	return out, conf, err
}

func marshalResult(r types.Result, cniVersion string) (json.RawMessage, error) {
	vr, err := r.GetAsVersion(cniVersion)
	if err != nil {
		return nil, types.NewError(types.ErrIncompatibleCNIVersion, fmt.Sprintf("cniVersion: convert result to %s: %v", cniVersion, err), "")
	}
	return json.Marshal(vr)
}

// mode is the registered mode of a network config.
func (d *Daemon) mode(name string) (mode.Mode, error) {
	m := d.modes[name]
	if m == nil {
		return nil, netconf.Invalid("mode", "%q is not served by this vmnicd", name)
	}
	return m, nil
}

// modeRequest is what a mode sees of a request.
func modeRequest(req *proto.Request, conf *netconf.Conf, pod netconf.PodArgs, facts *kubevirt.Facts) *mode.Request {
	return &mode.Request{
		Key: state.Key(req.ContainerID, req.IfName), ContainerID: req.ContainerID, Netns: req.Netns,
		IfName: req.IfName, Args: req.Args, Path: req.Path, Config: req.Config,
		Conf: conf, Pod: pod, Facts: facts,
	}
}

// lookup reads the pod's CNI_ARGS and the VM facts behind the request.
func (d *Daemon) lookup(ctx context.Context, req *proto.Request, conf *netconf.Conf) (netconf.PodArgs, *kubevirt.Facts, error) {
	pod, cerr := netconf.ParseArgs(req.Args)
	if cerr != nil {
		return pod, nil, cerr
	}
	facts, err := d.opts.Facts.Lookup(ctx, kubevirt.Query{Pod: pod, IfName: req.IfName, Conf: conf})
	if err != nil {
		return pod, nil, types.NewError(types.ErrTryAgainLater, fmt.Sprintf("look up VM of pod %s/%s: %v", pod.Namespace, pod.Name, err), "")
	}
	return pod, facts, nil
}

// prevResultOf is the previous plugin's result, nil for a main plugin.
func prevResultOf(conf *netconf.Conf) (*current.Result, error) {
	if conf.PrevResult == nil {
		return nil, nil
	}
	prev, err := current.NewResultFromResult(conf.PrevResult)
	if err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, "prevResult: "+err.Error(), "")
	}
	return prev, nil
}

// add runs one ADD: the mode plans it; the record is written before
// anything is created (a daemon killed half-way leaves DEL and GC what
// they need), the mode wires, the record is written again with the
// result; any failure on the way undoes the wiring and drops the record.
func (d *Daemon) add(ctx context.Context, req *proto.Request, conf *netconf.Conf) (json.RawMessage, error) {
	if cerr := conf.RequirePrevResult(); cerr != nil {
		return nil, cerr
	}
	if req.Netns == "" {
		return nil, types.NewError(types.ErrInvalidEnvironmentVariables, "CNI_NETNS: required for ADD", "")
	}
	m, err := d.mode(conf.Mode)
	if err != nil {
		return nil, err
	}
	pod, facts, err := d.lookup(ctx, req, conf)
	if err != nil {
		return nil, err
	}
	att, err := m.Plan(modeRequest(req, conf, pod, facts))
	if err != nil {
		return nil, err
	}
	if att == nil {
		return marshalResult(conf.PrevResult, conf.CNIVersion)
	}
	prev, err := prevResultOf(conf)
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
	rec := newRecord(req, conf, pod, facts)
	if perr := d.putRecord(rec, att, nil); perr != nil {
		return nil, perr
	}
	save := func() error { return d.putRecord(rec, att, nil) }
	if aerr := att.Add(ctx, key, save); aerr != nil {
		d.dropRecord(key)
		return nil, aerr
	}
	var out json.RawMessage
	res, err := att.Result(prev)
	if err == nil {
		out, err = marshalResult(res, conf.CNIVersion)
	}
	if err == nil {
		err = failpoint.Hit(conf.Mode, failpoint.Record)
	}
	if err == nil {
		err = d.putRecord(rec, att, out)
	}
	if err != nil {
		if uerr := att.Del(context.WithoutCancel(ctx), key); uerr != nil {
			d.log.Error("undo after failed record write", "key", key, "err", uerr)
		}
		d.dropRecord(key)
		return nil, err
	}
	d.wired(key, rec, att)
	v := att.View()
	d.log.Info("VM NIC wired", "key", key, "mode", conf.Mode, "pod", pod.Namespace+"/"+pod.Name, "vm", rec.VMName,
		"linuxBridge", v.Bridge, "tap", v.Tap, "guestMAC", v.GuestMAC, "held", v.Held)
	return out, nil
}

// newRecord is the attachment record of an ADD, before anything is wired.
// The VM facts are kept for a VM's pod.
func newRecord(req *proto.Request, conf *netconf.Conf, pod netconf.PodArgs, facts *kubevirt.Facts) *state.Record {
	rec := &state.Record{
		ContainerID: req.ContainerID, IfName: req.IfName, Network: conf.Name,
		Netns: req.Netns, Mode: conf.Mode, CNIVersion: conf.CNIVersion,
		Pod:     state.Pod{Namespace: pod.Namespace, Name: pod.Name, UID: pod.UID},
		Created: time.Now().UTC(),
	}
	if facts == nil || facts.VMName == "" {
		return rec
	}
	rec.VMName = facts.VMName
	if m := facts.Migration; m != nil {
		rec.Migration = &state.Migration{Job: m.Job, UID: m.UID, Phase: m.Phase}
	}
	return rec
}

func (d *Daemon) putRecord(rec *state.Record, att mode.Attachment, result json.RawMessage) error {
	raw, err := json.Marshal(att)
	if err != nil {
		return fmt.Errorf("encode spec: %w", err)
	}
	rec.Spec = raw
	rec.Result = result
	if err := d.store.Put(rec); err != nil {
		return types.NewError(types.ErrIOFailure, err.Error(), "")
	}
	return nil
}

func (d *Daemon) dropRecord(key string) {
	if err := d.store.Delete(key); err != nil {
		d.log.Error("remove record", "key", key, "err", err)
	}
}

// load rebuilds a record's attachment through its mode.
func (d *Daemon) load(rec *state.Record) (mode.Attachment, error) {
	m, err := d.mode(rec.Mode)
	if err != nil {
		return nil, fmt.Errorf("record %s: %w", state.Key(rec.ContainerID, rec.IfName), err)
	}
	att, err := m.Load(rec.Spec)
	if err != nil {
		return nil, fmt.Errorf("record %s: %w", state.Key(rec.ContainerID, rec.IfName), err)
	}
	return att, nil
}

// del removes an attachment. Without a record (a daemon killed before it
// wrote one, or a DEL for something never added) it still removes whatever
// carries this attachment's owner mark, and succeeds when nothing is there.
func (d *Daemon) del(ctx context.Context, req *proto.Request, conf *netconf.Conf) error {
	d.gc.RLock()
	defer d.gc.RUnlock()
	key := state.Key(req.ContainerID, req.IfName)
	defer d.locks.Lock(key)()
	rec, err := d.store.Get(key)
	switch {
	case err == nil:
		if req.Netns != "" && req.Netns != rec.Netns {
			d.log.Warn("DEL netns differs from ADD's; using ADD's", "key", key, "add", rec.Netns, "del", req.Netns)
		}
		return d.removeRecorded(ctx, key, rec)
	case !errors.Is(err, state.ErrNotFound):
		return types.NewError(types.ErrIOFailure, err.Error(), "")
	}
	m, err := d.mode(conf.Mode)
	if err != nil {
		return err
	}
	pod, _ := netconf.ParseArgs(req.Args)
	orphan := m.Orphan(modeRequest(req, conf, pod, nil))
	if orphan == nil {
		return nil
	}
	if err := orphan.Del(ctx, key); err != nil {
		return fmt.Errorf("remove what %s left without a record: %w", key, err)
	}
	return nil
}

// removeRecorded undoes what the record says was done, then drops the
// record. The caller holds the attachment's lock.
func (d *Daemon) removeRecorded(ctx context.Context, key string, rec *state.Record) error {
	d.unwatchAll(key)
	att, err := d.load(rec)
	if err != nil {
		return err
	}
	if err := att.Del(ctx, key); err != nil {
		return fmt.Errorf("remove %s: %w", key, err)
	}
	d.dropRecord(key)
	d.forgetReasserted(key)
	d.log.Info("attachment removed", "key", key, "mode", rec.Mode)
	return nil
}

func (d *Daemon) check(ctx context.Context, req *proto.Request, conf *netconf.Conf) error {
	if _, cerr := netconf.ParseArgs(req.Args); cerr != nil {
		return cerr
	}
	if err := podnet.RequireNetns(req.Netns); err != nil {
		return err
	}
	m, err := d.mode(conf.Mode)
	if err != nil {
		return err
	}
	pod, facts, err := d.lookup(ctx, req, conf)
	if err != nil {
		return err
	}
	planned, err := m.Plan(modeRequest(req, conf, pod, facts))
	if err != nil {
		return err
	}
	if planned == nil {
		return nil // passed through on ADD
	}
	key := state.Key(req.ContainerID, req.IfName)
	defer d.locks.Lock(key)()
	rec, err := d.store.Get(key)
	if errors.Is(err, state.ErrNotFound) {
		return types.NewError(types.ErrUnknownContainer, fmt.Sprintf("CHECK: vmnic has no attachment for container %s interface %s", req.ContainerID, req.IfName), "")
	}
	if err != nil {
		return types.NewError(types.ErrIOFailure, err.Error(), "")
	}
	if len(rec.Result) == 0 {
		return fmt.Errorf("CHECK: attachment %s was never completed", key)
	}
	att, err := d.load(rec)
	if err != nil {
		return err
	}
	return att.Check(ctx, key)
}

// networkStatus is STATUS for a network: the mode's, when it can tell; a
// mode that cannot is always ready.
func (d *Daemon) networkStatus(ctx context.Context, req *proto.Request, conf *netconf.Conf) error {
	m, err := d.mode(conf.Mode)
	if err != nil {
		return err
	}
	st, ok := m.(mode.Statuser)
	if !ok {
		return nil
	}
	return st.Status(ctx, modeRequest(req, conf, netconf.PodArgs{}, nil))
}

// staleRecords are the records of network that the runtime's GC does not
// list as valid.
func staleRecords(recs []*state.Record, network string, valid map[string]bool) []*state.Record {
	var out []*state.Record
	for _, rec := range recs {
		if rec.Network == network && !valid[state.Key(rec.ContainerID, rec.IfName)] {
			out = append(out, rec)
		}
	}
	return out
}

// validAttachments are the attachments a GC request lists, under the
// spec's key and the older, misspelled one libcni also sends.
func validAttachments(conf *netconf.Conf, raw []byte) map[string]bool {
	valid := map[string]bool{}
	for _, a := range conf.ValidAttachments {
		valid[state.Key(a.ContainerID, a.IfName)] = true
	}
	var legacy struct {
		Attachments []types.GCAttachment `json:"cni.dev/attachments"`
	}
	if err := json.Unmarshal(raw, &legacy); err == nil {
		for _, a := range legacy.Attachments {
			valid[state.Key(a.ContainerID, a.IfName)] = true
		}
	}
	return valid
}

// gcNetwork removes the attachments of one network that the runtime no
// longer lists as valid, then what the modes' sweeps find of that network.
// It runs exclusive of ADD and DEL and keeps going past errors.
func (d *Daemon) gcNetwork(ctx context.Context, conf *netconf.Conf, req *proto.Request) error {
	valid := validAttachments(conf, req.Config)
	d.gc.Lock()
	defer d.gc.Unlock()
	recs, _, err := d.store.List()
	if err != nil {
		return types.NewError(types.ErrIOFailure, err.Error(), "")
	}
	var errs []error
	for _, rec := range staleRecords(recs, conf.Name, valid) {
		key := state.Key(rec.ContainerID, rec.IfName)
		if err := d.removeRecorded(ctx, key, rec); err != nil {
			errs = append(errs, err)
			continue
		}
		d.Metrics().GCRemoved(GCAttachment)
		d.log.Info("GC removed stale attachment", "key", key, "network", conf.Name)
	}
	d.sweepLocked(ctx, &mode.GCRelease{Conf: conf, Config: req.Config, Path: req.Path})
	if len(errs) > 0 {
		return fmt.Errorf("GC of network %q: %w", conf.Name, errors.Join(errs...))
	}
	return nil
}

// sweep runs the modes' sweeps of resources whose attachment has no
// record (or whose pod is gone), exclusive of ADD and DEL.
func (d *Daemon) sweep(ctx context.Context) {
	d.gc.Lock()
	defer d.gc.Unlock()
	d.sweepLocked(ctx, nil)
}

func (d *Daemon) sweepLocked(ctx context.Context, rel *mode.GCRelease) {
	recs, _, err := d.store.List()
	if err != nil {
		d.log.Error("sweep: list records", "err", err)
		return
	}
	live := map[string]bool{}
	for _, r := range recs {
		live[state.Key(r.ContainerID, r.IfName)] = true
	}
	sw := mode.SweepRequest{Live: func(key string) bool { return live[key] }, Release: rel}
	for _, name := range d.modeNames {
		if s, ok := d.modes[name].(mode.Sweeper); ok {
			what, n := s.Sweep(ctx, sw)
			for range n {
				d.Metrics().GCRemoved(what)
			}
		}
	}
}

// restore brings back what runs for the attachments on record (their DHCP
// servers).
func (d *Daemon) restore(ctx context.Context) {
	recs, bad, err := d.store.List()
	if err != nil {
		d.log.Error("list attachment records", "err", err)
		return
	}
	for _, p := range bad {
		d.log.Error("unreadable attachment record left in place", "path", p)
	}
	for _, rec := range recs {
		if len(rec.Result) == 0 {
			continue // an ADD that never finished; DEL or GC removes it
		}
		key := state.Key(rec.ContainerID, rec.IfName)
		unlock := d.locks.Lock(key)
		att, err := d.load(rec)
		if err == nil {
			err = att.Restore(ctx, key)
		}
		if err != nil {
			d.log.Warn("attachment not restored", "key", key, "err", err)
		}
		unlock()
	}
}

// replaySpool runs the DELs the shim spooled while the daemon was away.
func (d *Daemon) replaySpool(ctx context.Context) { d.replay(ctx, false) }

// replayNewSpool runs only the spooled DELs this daemon has not tried yet:
// one the shim spooled while this daemon was starting, after its first
// replay (the old daemon's socket was gone, the new one not yet there), is
// replayed within SpoolPollInterval instead of at the next resync. A DEL
// that failed waits for the resync.
func (d *Daemon) replayNewSpool(ctx context.Context) { d.replay(ctx, true) }

func (d *Daemon) replay(ctx context.Context, onlyNew bool) {
	entries, bad, err := spool.List(d.opts.SpoolDir)
	if err != nil {
		d.log.Error("read spool", "err", err)
		return
	}
	for _, p := range bad {
		d.log.Error("dropping unreadable spool entry", "path", p)
		_ = spool.Remove(p)
	}
	// An entry is known by its path and modification time: the shim
	// rewrites the entry of a repeated DEL under the same name.
	tried := make(map[string]time.Time, len(entries))
	for _, e := range entries {
		tried[e.Path] = e.ModTime
		if prev, ok := d.spoolTried[e.Path]; onlyNew && ok && prev.Equal(e.ModTime) {
			continue
		}
		req := e.Request
		req.Spooled = true
		resp := d.Handle(ctx, &req)
		if resp.Error != nil {
			d.log.Error("spooled DEL failed; kept for the next resync", "container", req.ContainerID, "ifname", req.IfName, "err", resp.Error)
			continue
		}
		if err := spool.Remove(e.Path); err != nil {
			d.log.Error("remove spool entry", "err", err)
		}
		d.log.Info("spooled DEL replayed", "container", req.ContainerID, "ifname", req.IfName)
	}
	d.spoolTried = tried
}
