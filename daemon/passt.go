package daemon

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/vmnic/vmnic/pkg/kubevirt"
	"github.com/vmnic/vmnic/pkg/netconf"
	"github.com/vmnic/vmnic/pkg/proto"
	"github.com/vmnic/vmnic/pkg/state"
	"github.com/vmnic/vmnic/plugins/passt"
)

// servesPasst decides whether a VM interface is passt's: KubeVirt's passt
// binding (the core one, or a plugin binding named passt), a binding vmnic
// serves, or no method the API types know (KubeVirt v1.8's passtBinding
// field decodes to none with the API version vmnic builds against).
func servesPasst(f *kubevirt.Facts) bool {
	if f.VMName == "" {
		return false
	}
	switch f.Binding {
	case "core:passt", "passt", "core:default", "":
		return true
	}
	return f.Serve
}

// addPasst prepares a VM pod's underlay interface for passt: the result is
// the underlay plugin's, unchanged.
func (d *Daemon) addPasst(req *proto.Request, conf *netconf.Conf, pod netconf.PodArgs, facts *kubevirt.Facts) (json.RawMessage, error) {
	out, err := marshalResult(conf.PrevResult, conf.CNIVersion)
	if err != nil || !servesPasst(facts) {
		return out, err
	}
	prev, err := current.NewResultFromResult(conf.PrevResult)
	if err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, "prevResult: "+err.Error(), "")
	}
	spec, err := passt.NewSpec(req.ContainerID, req.Netns, req.IfName, prev, facts.Migration != nil)
	if err != nil {
		return nil, err
	}
	d.gc.RLock()
	defer d.gc.RUnlock()
	key := state.Key(req.ContainerID, req.IfName)
	defer d.locks.Lock(key)()
	rec := &state.Record{
		ContainerID: req.ContainerID, IfName: req.IfName, Network: conf.Name,
		Netns: req.Netns, Mode: conf.Mode, CNIVersion: conf.CNIVersion,
		Pod:    state.Pod{Namespace: pod.Namespace, Name: pod.Name, UID: pod.UID},
		VMName: facts.VMName, Created: time.Now().UTC(),
	}
	if m := facts.Migration; m != nil {
		rec.Migration = &state.Migration{Job: m.Job, UID: m.UID, Phase: m.Phase}
	}
	if perr := d.putRecord(rec, spec, nil); perr != nil {
		return nil, perr
	}
	if aerr := passt.Add(spec); aerr != nil {
		d.dropRecord(key)
		return nil, aerr
	}
	if perr := d.putRecord(rec, spec, out); perr != nil {
		_ = passt.Del(spec)
		d.dropRecord(key)
		return nil, perr
	}
	if spec.Held {
		d.Metrics().MigrationHeld()
	}
	d.log.Info("passt interface prepared", "key", key, "pod", pod.Namespace+"/"+pod.Name, "vm", facts.VMName, "held", spec.Held)
	return out, nil
}

func passtSpecOf(rec *state.Record) (*passt.Spec, error) {
	s := &passt.Spec{}
	if err := json.Unmarshal(rec.Spec, s); err != nil {
		return nil, fmt.Errorf("decode spec of %s: %w", state.Key(rec.ContainerID, rec.IfName), err)
	}
	return s, nil
}

// reconcilePasst is reconcileOne for a passt interface.
func (d *Daemon) reconcilePasst(tr kubevirt.MigrationTracker, key string, rec *state.Record) {
	spec, err := passtSpecOf(rec)
	if err != nil {
		return
	}
	log := d.log.With("key", key, "pod", rec.Pod.Namespace+"/"+rec.Pod.Name, "vm", rec.VMName)
	switch {
	case spec.Held && rec.Migration != nil:
		out := tr.TargetOutcome(rec.Pod.Namespace, rec.VMName, rec.Migration.Job, rec.Pod.Name)
		switch out {
		case kubevirt.MigrationSucceeded:
			start := time.Now()
			if err := passt.Release(spec); err != nil {
				log.Error("migration target: release hold", "err", err)
				if spec.Held {
					return
				}
			}
			rec.Migration.Phase = out.String()
			if err := d.putRecord(rec, spec, rec.Result); err != nil {
				log.Error("migration target: record release", "err", err)
			}
			d.Metrics().MigrationSwitched()
			log.Info("migration target took over: hold released, addresses announced", "job", rec.Migration.Job, "took", time.Since(start))
		case kubevirt.MigrationFailed:
			if rec.Migration.Phase == out.String() {
				return
			}
			rec.Migration.Phase = out.String()
			if err := d.putRecord(rec, spec, rec.Result); err != nil {
				log.Error("migration target: record failure", "err", err)
			}
			d.Metrics().MigrationFailed()
			log.Warn("migration failed or aborted: target stays held, source untouched", "job", rec.Migration.Job)
		}
	case !spec.Held && !spec.Silenced && rec.Migration == nil:
		if tr.MigratedAway(rec.Pod.Namespace, rec.VMName, rec.Pod.Name) {
			d.silencePasst(key, rec, spec, log)
			return
		}
		// The underlay plugin of a migration target announces the shared
		// address when it sets up the target's interface (macvlan sets
		// arp_notify), before vmnic, chained after it, can hold it. The
		// source reasserts the address at every phase of the migration
		// (and again past the neighbour locktime) so the underlay keeps
		// reaching the VM where it runs.
		job, phase, ok := tr.InFlight(rec.Pod.Namespace, rec.VMName)
		if !ok || d.reasserted(key, job+"/"+phase) {
			return
		}
		if err := passt.Announce(spec); err != nil {
			log.Warn("migration source: reassert addresses", "err", err)
			return
		}
		log.Info("migration source: addresses reasserted", "job", job, "phase", phase)
	}
}

// silencePasst holds a source that handed over.
func (d *Daemon) silencePasst(key string, rec *state.Record, spec *passt.Spec, log *slog.Logger) {
	if err := passt.Silence(spec); err != nil {
		log.Error("migration source: silence", "err", err)
		return
	}
	if err := d.putRecord(rec, spec, rec.Result); err != nil {
		log.Error("migration source: record silence", "err", err)
	}
	d.forgetReasserted(key)
	log.Info("migration source handed over: silenced until its DEL", "key", key)
}

// reasserted reports whether the source key already reasserted its
// addresses for this migration phase, and records that it has now.
func (d *Daemon) reasserted(key, phase string) bool {
	d.reassertMu.Lock()
	defer d.reassertMu.Unlock()
	if d.reassert == nil {
		d.reassert = map[string]string{}
	}
	if d.reassert[key] == phase {
		return true
	}
	d.reassert[key] = phase
	return false
}

func (d *Daemon) forgetReasserted(key string) {
	d.reassertMu.Lock()
	defer d.reassertMu.Unlock()
	delete(d.reassert, key)
}
