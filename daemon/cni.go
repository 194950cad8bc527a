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
	"github.com/vmnic/vmnic/pkg/netconf"
	"github.com/vmnic/vmnic/pkg/podnet"
	"github.com/vmnic/vmnic/pkg/proto"
	"github.com/vmnic/vmnic/pkg/spool"
	"github.com/vmnic/vmnic/pkg/state"
	"github.com/vmnic/vmnic/plugins/bridge"
	"github.com/vmnic/vmnic/plugins/masquerade"
	"github.com/vmnic/vmnic/plugins/passt"
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

func (d *Daemon) add(ctx context.Context, req *proto.Request, conf *netconf.Conf) (json.RawMessage, error) {
	if cerr := conf.RequirePrevResult(); cerr != nil {
		return nil, cerr
	}
	if req.Netns == "" {
		return nil, types.NewError(types.ErrInvalidEnvironmentVariables, "CNI_NETNS: required for ADD", "")
	}
	pod, cerr := netconf.ParseArgs(req.Args)
	if cerr != nil {
		return nil, cerr
	}
	facts, err := d.opts.Facts.Lookup(ctx, kubevirt.Query{Pod: pod, IfName: req.IfName, Conf: conf})
	if err != nil {
		return nil, types.NewError(types.ErrTryAgainLater, fmt.Sprintf("look up VM of pod %s/%s: %v", pod.Namespace, pod.Name, err), "")
	}
	switch conf.Mode {
	case netconf.ModeBridge:
		return d.addBridge(ctx, req, conf, pod, facts)
	case netconf.ModePasst:
		return d.addPasst(req, conf, pod, facts)
	}
	if !facts.Serve {
		return marshalResult(conf.PrevResult, conf.CNIVersion)
	}
	prev, err := current.NewResultFromResult(conf.PrevResult)
	if err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, "prevResult: "+err.Error(), "")
	}
	spec, err := masquerade.NewSpec(masquerade.Input{
		ContainerID: req.ContainerID, Netns: req.Netns, IfName: req.IfName,
		Conf: conf, Facts: facts, Prev: prev,
	})
	if err != nil {
		return nil, err
	}

	d.gc.RLock()
	defer d.gc.RUnlock()
	key := state.Key(req.ContainerID, req.IfName)
	defer d.locks.Lock(key)()

	rec := newRecord(req, conf, pod, facts)
	// The record is written before anything is created, so that a daemon
	// killed half-way leaves DEL and GC what they need to clean up.
	if perr := d.putRecord(rec, spec, nil); perr != nil {
		return nil, perr
	}
	if aerr := d.masq.Add(ctx, key, spec); aerr != nil {
		d.dropRecord(key)
		return nil, aerr
	}
	result, err := spec.Result(prev)
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
		if uerr := d.masq.Del(ctx, key, spec); uerr != nil {
			d.log.Error("undo after failed record write", "key", key, "err", uerr)
		}
		d.dropRecord(key)
		return nil, err
	}
	d.log.Info("VM NIC wired", "key", key, "mode", conf.Mode, "pod", pod.Namespace+"/"+pod.Name, "vm", facts.VMName, "bridge", spec.Bridge, "tap", spec.Tap)
	return out, nil
}

// newRecord is the attachment record of an ADD, before anything is wired.
func newRecord(req *proto.Request, conf *netconf.Conf, pod netconf.PodArgs, facts *kubevirt.Facts) *state.Record {
	rec := &state.Record{
		ContainerID: req.ContainerID, IfName: req.IfName, Network: conf.Name,
		Netns: req.Netns, Mode: conf.Mode, CNIVersion: conf.CNIVersion,
		Pod:    state.Pod{Namespace: pod.Namespace, Name: pod.Name, UID: pod.UID},
		VMName: facts.VMName, Created: time.Now().UTC(),
	}
	if m := facts.Migration; m != nil {
		rec.Migration = &state.Migration{Job: m.Job, UID: m.UID, Phase: m.Phase}
	}
	return rec
}

func (d *Daemon) putRecord(rec *state.Record, spec any, result json.RawMessage) error {
	raw, err := json.Marshal(spec)
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

// specOf decodes the spec of a record of mode T (masquerade.Spec,
// bridge.Spec, passt.Spec).
func specOf[T any](rec *state.Record) (*T, error) {
	s := new(T)
	if err := json.Unmarshal(rec.Spec, s); err != nil {
		return nil, fmt.Errorf("decode spec of %s: %w", state.Key(rec.ContainerID, rec.IfName), err)
	}
	return s, nil
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
	// No record: a daemon killed before it wrote one, or a DEL for
	// something never added. Remove whatever carries this attachment's
	// marks; bridge mode also releases the addresses through IPAM.
	if conf.Mode == netconf.ModeBridge {
		spec := d.bridgeSpecForDel(req, conf)
		if spec == nil {
			return nil
		}
		if err := d.bridge.Del(ctx, key, spec); err != nil {
			return fmt.Errorf("remove port %s: %w", key, err)
		}
		return nil
	}
	if conf.Mode == netconf.ModePasst {
		if err := passt.Del(&passt.Spec{Netns: req.Netns, PodIf: req.IfName}); err != nil {
			return fmt.Errorf("remove passt hold %s: %w", key, err)
		}
		return nil
	}
	if req.Netns == "" || len(req.IfName) <= 3 {
		return nil
	}
	spec := &masquerade.Spec{
		Netns: req.Netns, PodIf: req.IfName,
		Bridge: kubevirt.BridgeName(req.IfName), Tap: kubevirt.TapName(req.IfName, req.IfName == kubevirt.PodNetworkInterface),
		Owner: masquerade.Alias(req.ContainerID, req.IfName),
	}
	if err := d.masq.Del(ctx, key, spec); err != nil {
		return fmt.Errorf("remove VM NIC %s: %w", key, err)
	}
	return nil
}

// removeRecorded undoes what the record says was done, then drops the
// record. The caller holds the attachment's lock.
func (d *Daemon) removeRecorded(ctx context.Context, key string, rec *state.Record) error {
	d.unwatch(key)
	switch rec.Mode {
	case netconf.ModeBridge:
		spec, err := specOf[bridge.Spec](rec)
		if err != nil {
			return err
		}
		if err := d.bridge.Del(ctx, key, spec); err != nil {
			return fmt.Errorf("remove port %s: %w", key, err)
		}
	case netconf.ModePasst:
		spec, err := specOf[passt.Spec](rec)
		if err != nil {
			return err
		}
		if err := passt.Del(spec); err != nil {
			return fmt.Errorf("remove passt hold %s: %w", key, err)
		}
	default:
		spec, err := specOf[masquerade.Spec](rec)
		if err != nil {
			return err
		}
		if err := d.masq.Del(ctx, key, spec); err != nil {
			return fmt.Errorf("remove VM NIC %s: %w", key, err)
		}
	}
	d.dropRecord(key)
	d.log.Info("attachment removed", "key", key, "mode", rec.Mode)
	return nil
}

func (d *Daemon) check(ctx context.Context, req *proto.Request, conf *netconf.Conf) error {
	pod, cerr := netconf.ParseArgs(req.Args)
	if cerr != nil {
		return cerr
	}
	if err := podnet.RequireNetns(req.Netns); err != nil {
		return err
	}
	facts, err := d.opts.Facts.Lookup(ctx, kubevirt.Query{Pod: pod, IfName: req.IfName, Conf: conf})
	if err != nil {
		return types.NewError(types.ErrTryAgainLater, fmt.Sprintf("look up VM of pod %s/%s: %v", pod.Namespace, pod.Name, err), "")
	}
	if !facts.Serve && conf.Chained() {
		return nil
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
	switch rec.Mode {
	case netconf.ModeBridge:
		spec, serr := specOf[bridge.Spec](rec)
		if serr != nil {
			return serr
		}
		return d.bridge.Check(ctx, key, spec)
	case netconf.ModePasst:
		spec, serr := specOf[passt.Spec](rec)
		if serr != nil {
			return serr
		}
		return passt.Check(spec)
	}
	spec, err := specOf[masquerade.Spec](rec)
	if err != nil {
		return err
	}
	return d.masq.Check(ctx, key, spec)
}

// gcNetwork removes the attachments of one network that the runtime no
// longer lists as valid. It runs exclusive of ADD and DEL and keeps going
// past errors.
func (d *Daemon) gcNetwork(ctx context.Context, conf *netconf.Conf, req *proto.Request) error {
	raw := req.Config
	valid := map[string]bool{}
	for _, a := range conf.ValidAttachments {
		valid[state.Key(a.ContainerID, a.IfName)] = true
	}
	// libcni also sends the older, misspelled key.
	var legacy struct {
		Attachments []types.GCAttachment `json:"cni.dev/attachments"`
	}
	if err := json.Unmarshal(raw, &legacy); err == nil {
		for _, a := range legacy.Attachments {
			valid[state.Key(a.ContainerID, a.IfName)] = true
		}
	}
	d.gc.Lock()
	defer d.gc.Unlock()
	recs, _, err := d.store.List()
	if err != nil {
		return types.NewError(types.ErrIOFailure, err.Error(), "")
	}
	var errs []error
	for _, rec := range recs {
		key := state.Key(rec.ContainerID, rec.IfName)
		if rec.Network != conf.Name || valid[key] {
			continue
		}
		if err := d.removeRecorded(ctx, key, rec); err != nil {
			errs = append(errs, err)
			continue
		}
		d.Metrics().GCRemoved(GCAttachment)
		d.log.Info("GC removed stale attachment", "key", key, "network", conf.Name)
	}
	d.gcPortsLocked(ctx, &gcRelease{conf: conf, req: req})
	if len(errs) > 0 {
		return fmt.Errorf("GC of network %q: %w", conf.Name, errors.Join(errs...))
	}
	return nil
}

// restore brings back the DHCP servers of the attachments on record.
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
		if err := d.restoreOne(ctx, key, rec); err != nil {
			d.log.Warn("attachment not restored", "key", key, "err", err)
		}
		unlock()
	}
}

func (d *Daemon) restoreOne(ctx context.Context, key string, rec *state.Record) error {
	if rec.Mode == netconf.ModePasst {
		return nil // nothing runs for it: its state is the record and the hold table
	}
	if rec.Mode == netconf.ModeBridge {
		spec, err := specOf[bridge.Spec](rec)
		if err != nil {
			return err
		}
		return d.bridge.Restore(ctx, key, spec)
	}
	spec, err := specOf[masquerade.Spec](rec)
	if err != nil {
		return err
	}
	return d.masq.Restore(ctx, key, spec)
}

// replaySpool runs the DELs the shim spooled while the daemon was away.
func (d *Daemon) replaySpool(ctx context.Context) {
	entries, bad, err := spool.List(d.opts.SpoolDir)
	if err != nil {
		d.log.Error("read spool", "err", err)
		return
	}
	for _, p := range bad {
		d.log.Error("dropping unreadable spool entry", "path", p)
		_ = spool.Remove(p)
	}
	for _, e := range entries {
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
}
