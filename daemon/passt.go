package daemon

import (
	"encoding/json"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/vmnic/vmnic/pkg/failpoint"
	"github.com/vmnic/vmnic/pkg/kubevirt"
	"github.com/vmnic/vmnic/pkg/netconf"
	"github.com/vmnic/vmnic/pkg/proto"
	"github.com/vmnic/vmnic/pkg/state"
	"github.com/vmnic/vmnic/plugins/passt"
)

// servesPasst decides whether a VM interface is passt's: KubeVirt's passt
// binding (the core passtBinding, or a plugin binding named passt), a
// binding vmnic serves, or a standalone daemon's VM pod (no binding known).
func servesPasst(f *kubevirt.Facts) bool {
	if f.VMName == "" {
		return false
	}
	switch f.Binding {
	case kubevirt.CorePasst, "passt", "":
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
	spec, err := passt.NewSpec(passt.Input{
		ContainerID: req.ContainerID, Netns: req.Netns, IfName: req.IfName, Prev: prev,
		Target: facts.Migration != nil,
		// Only a standalone daemon knows no binding: then no KubeVirt
		// component sets passt's sysctls, and vmnic does.
		SetSysctls: facts.Binding == "",
	})
	if err != nil {
		return nil, err
	}
	d.gc.RLock()
	defer d.gc.RUnlock()
	key := state.Key(req.ContainerID, req.IfName)
	defer d.locks.Lock(key)()
	rec := newRecord(req, conf, pod, facts)
	if perr := d.putRecord(rec, spec, nil); perr != nil {
		return nil, perr
	}
	if aerr := passt.Add(spec); aerr != nil {
		d.dropRecord(key)
		return nil, aerr
	}
	perr := failpoint.Hit(conf.Mode, failpoint.Record)
	if perr == nil {
		perr = d.putRecord(rec, spec, out)
	}
	if perr != nil {
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
