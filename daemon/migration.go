package daemon

import (
	"context"
	"net"
	"sync"
	"time"

	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/vmnic/vmnic/pkg/kubevirt"
	"github.com/vmnic/vmnic/pkg/netconf"
	"github.com/vmnic/vmnic/pkg/state"
	"github.com/vmnic/vmnic/plugins/bridge"
	"github.com/vmnic/vmnic/plugins/passt"
)

// watchers are the per-attachment goroutines of migrations: a held bridge
// target watching its tap for the migrated guest, a passt source watching
// for claims of its address.
type watchers struct {
	mu   sync.Mutex
	m    map[string]*watcher
	next uint64
}

type watcher struct {
	id     uint64
	cancel context.CancelFunc
}

// watch runs run for key until unwatch(key), the daemon's end or run's
// own return; a second watch of the same key is a no-op.
func (d *Daemon) watch(key string, run func(ctx context.Context)) {
	w := &d.watchers
	w.mu.Lock()
	defer w.mu.Unlock()
	if _, ok := w.m[key]; ok || d.runCtx == nil {
		return
	}
	if w.m == nil {
		w.m = map[string]*watcher{}
	}
	ctx, cancel := context.WithCancel(d.runCtx)
	w.next++
	me := &watcher{id: w.next, cancel: cancel}
	w.m[key] = me
	go func() {
		defer func() {
			w.mu.Lock()
			defer w.mu.Unlock()
			cancel()
			// A watcher started after an unwatch is not this one's.
			if cur := w.m[key]; cur != nil && cur.id == me.id {
				delete(w.m, key)
			}
		}()
		run(ctx)
	}()
}

func (d *Daemon) unwatch(key string) {
	w := &d.watchers
	w.mu.Lock()
	defer w.mu.Unlock()
	if cur, ok := w.m[key]; ok {
		cur.cancel()
		delete(w.m, key)
	}
}

// watchTarget watches a held target's tap: the first frame the guest sends
// there (QEMU announces a VM that resumed after migration) releases the
// hold at once, ahead of the VMIM status, which can trail the resume by
// hundreds of milliseconds. Only a guest that runs on this side sends on
// this tap, and it runs here only once the migration has succeeded.
func (d *Daemon) watchTarget(key string, spec *bridge.Spec) {
	d.watch(key, func(ctx context.Context) {
		if err := bridge.WaitGuest(ctx, spec); err != nil {
			if ctx.Err() == nil {
				d.log.Warn("migration target: watching the tap ended", "key", key, "err", err)
			}
			return
		}
		d.targetActive(key)
	})
}

// preparingTarget reports whether a migration in flight is still before
// the VM's memory moves (VMIM phases up to TargetReady).
func preparingTarget(phase string) bool {
	switch kubevirtv1.VirtualMachineInstanceMigrationPhase(phase) {
	case kubevirtv1.MigrationRunning, kubevirtv1.MigrationSucceeded, kubevirtv1.MigrationFailed:
		return false
	}
	return true
}

// claimReassertGap bounds how often a passt source answers claims of its
// address: the claimant announces in a burst.
const claimReassertGap = 100 * time.Millisecond

// watchClaims makes a passt source whose VM migrates answer every claim of
// its addresses by another MAC (the target's macvlan announces them when it
// brings the target's interface up, a second or more before vmnic can hold
// it when it waits for IPv6 DAD) with its own announcement, so the underlay
// reaches the VM where it runs.
func (d *Daemon) watchClaims(key string, spec *passt.Spec) {
	d.watch(key, func(ctx context.Context) {
		last := map[bool]time.Time{}
		err := passt.WatchClaims(ctx, spec, func(from net.HardwareAddr, v6 bool) {
			if time.Since(last[v6]) < claimReassertGap {
				return
			}
			last[v6] = time.Now()
			if err := passt.Reassert(spec, v6); err != nil {
				d.log.Warn("migration source: answer a claim of its address", "key", key, "claimant", from.String(), "ipv6", v6, "err", err)
				return
			}
			d.log.Info("migration source: another MAC claimed the VM's address; reasserted", "key", key, "claimant", from.String(), "ipv6", v6)
		})
		if err != nil && ctx.Err() == nil {
			d.log.Warn("migration source: watching for claims ended", "key", key, "err", err)
		}
	})
}

// targetActive releases a held target whose guest has started sending.
func (d *Daemon) targetActive(key string) {
	d.gc.RLock()
	defer d.gc.RUnlock()
	defer d.locks.Lock(key)()
	rec, err := d.store.Get(key)
	if err != nil || rec.Migration == nil {
		return
	}
	spec, err := specOf[bridge.Spec](rec)
	if err != nil || !spec.Held || rec.Migration.Phase == kubevirt.MigrationFailed.String() {
		return
	}
	start := time.Now()
	if err := d.bridge.Release(spec); err != nil {
		d.log.Error("migration target: release hold", "key", key, "err", err)
		if spec.Held {
			return
		}
	}
	rec.Migration.Phase = "TargetActive"
	d.Metrics().MigrationSwitched()
	if err := d.putRecord(rec, spec, rec.Result); err != nil {
		d.log.Error("migration target: record release", "key", key, "err", err)
	}
	d.log.Info("migration target's guest resumed: hold released, addresses announced", "key", key,
		"pod", rec.Pod.Namespace+"/"+rec.Pod.Name, "vm", rec.VMName, "job", rec.Migration.Job, "took", time.Since(start))
}

// migrationResync re-reads the migrations even without an informer event.
const migrationResync = 2 * time.Second

// watchMigrations drives the live-migration holds of bridge-mode VM NICs
// from the VMIM and VMI objects: a held target is released (and announces
// the guest's addresses) when its migration succeeded, and stays held when
// it failed; a source whose VM moved away is silenced until its DEL. The
// state lives in the attachment records, so a restarted daemon picks up
// where it was.
func (d *Daemon) watchMigrations(ctx context.Context) {
	tr, ok := d.opts.Facts.(kubevirt.MigrationTracker)
	if !ok {
		return
	}
	for {
		changed := tr.Changes()
		d.reconcileMigrations(tr)
		select {
		case <-ctx.Done():
			return
		case <-changed:
		case <-time.After(migrationResync):
		}
	}
}

func (d *Daemon) reconcileMigrations(tr kubevirt.MigrationTracker) {
	d.gc.RLock()
	defer d.gc.RUnlock()
	recs, _, err := d.store.List()
	if err != nil {
		d.log.Error("migrations: list records", "err", err)
		return
	}
	for _, rec := range recs {
		if (rec.Mode != netconf.ModeBridge && rec.Mode != netconf.ModePasst) || len(rec.Result) == 0 || rec.VMName == "" {
			continue
		}
		d.reconcileOne(tr, state.Key(rec.ContainerID, rec.IfName))
	}
}

// migrant is what the migration watch needs of an attachment, whatever
// its mode.
type migrant struct {
	spec     any // stored back into the record
	held     bool
	silenced bool
	release  func() error // lift a target's hold and announce its addresses
	silence  func() error // hold a source that handed over
	// reassert announces a source's addresses again; nil for a mode whose
	// target announces nothing before it is held.
	reassert func() error
	// guardDAD keeps a source from answering the target's DAD probes while
	// its VM migrates (on), or lets it answer again; it reports a change.
	// nil for a mode whose pod side runs no IPv6.
	guardDAD func(on bool) (bool, error)
	// watchClaims answers claims of a source's address while its VM
	// migrates; nil for a mode whose target claims nothing before it is
	// held.
	watchClaims func()
	// running is called while the target waits for the outcome.
	running func()
	// heldNow reads the hold after release (it stays on when the hold
	// could not be lifted).
	heldNow func() bool
}

func (d *Daemon) migrantOf(key string, rec *state.Record) (*migrant, bool) {
	switch rec.Mode {
	case netconf.ModeBridge:
		spec, err := specOf[bridge.Spec](rec)
		if err != nil || !spec.VM {
			return nil, false
		}
		return &migrant{
			spec: spec, held: spec.Held, silenced: spec.Silenced,
			release: func() error { return d.bridge.Release(spec) },
			silence: func() error { return d.bridge.Silence(spec) },
			running: func() { d.watchTarget(key, spec) },
			heldNow: func() bool { return spec.Held },
		}, true
	case netconf.ModePasst:
		spec, err := specOf[passt.Spec](rec)
		if err != nil {
			return nil, false
		}
		return &migrant{
			spec: spec, held: spec.Held, silenced: spec.Silenced,
			release:     func() error { return passt.Release(spec) },
			silence:     func() error { return passt.Silence(spec) },
			reassert:    func() error { return passt.Reassert(spec, false) },
			guardDAD:    func(on bool) (bool, error) { return passt.GuardDAD(spec, on) },
			watchClaims: func() { d.watchClaims(key, spec) },
			running:     func() {},
			heldNow:     func() bool { return spec.Held },
		}, true
	}
	return nil, false
}

// reconcileOne acts on one attachment under its lock, from a fresh read of
// its record (a DEL may have come first).
func (d *Daemon) reconcileOne(tr kubevirt.MigrationTracker, key string) {
	defer d.locks.Lock(key)()
	rec, err := d.store.Get(key)
	if err != nil || len(rec.Result) == 0 {
		return
	}
	m, ok := d.migrantOf(key, rec)
	if !ok {
		return
	}
	log := d.log.With("key", key, "pod", rec.Pod.Namespace+"/"+rec.Pod.Name, "vm", rec.VMName)
	switch {
	case m.held && rec.Migration != nil:
		out := tr.TargetOutcome(rec.Pod.Namespace, rec.VMName, rec.Migration.Job, rec.Pod.Name)
		switch out {
		case kubevirt.MigrationRunning:
			m.running()
		case kubevirt.MigrationSucceeded:
			d.unwatch(key)
			start := time.Now()
			if err := m.release(); err != nil {
				log.Error("migration target: release hold", "err", err)
				if m.heldNow() {
					return
				}
			}
			rec.Migration.Phase = out.String()
			if err := d.putRecord(rec, m.spec, rec.Result); err != nil {
				log.Error("migration target: record release", "err", err)
			}
			d.Metrics().MigrationSwitched()
			log.Info("migration target took over: hold released, addresses announced", "job", rec.Migration.Job, "took", time.Since(start))
		case kubevirt.MigrationFailed:
			d.unwatch(key)
			if rec.Migration.Phase == out.String() {
				return
			}
			rec.Migration.Phase = out.String()
			if err := d.putRecord(rec, m.spec, rec.Result); err != nil {
				log.Error("migration target: record failure", "err", err)
			}
			d.Metrics().MigrationFailed()
			log.Warn("migration failed or aborted: target stays held, source untouched", "job", rec.Migration.Job)
		}
	case !m.held && !m.silenced:
		if tr.MigratedAway(rec.Pod.Namespace, rec.VMName, rec.Pod.Name) {
			if err := m.silence(); err != nil {
				log.Error("migration source: silence", "err", err)
				return
			}
			if err := d.putRecord(rec, m.spec, rec.Result); err != nil {
				log.Error("migration source: record silence", "err", err)
			}
			d.forgetReasserted(key)
			d.unwatch(key)
			log.Info("migration source handed over: silenced until its DEL")
			return
		}
		job, phase, inFlight := tr.InFlight(rec.Pod.Namespace, rec.VMName)
		if m.watchClaims != nil {
			// Claims come from the target's underlay plugin while KubeVirt
			// prepares the target; once the VM's memory moves the target
			// is held, and the next claim from it is its switchover, which
			// the source must not contest.
			if inFlight && preparingTarget(phase) {
				m.watchClaims()
			} else {
				d.unwatch(key)
			}
		}
		// The target's underlay plugin runs DAD for the IPv6 address the
		// source holds while it sets the target up: the source does not
		// hear those probes while its VM migrates.
		if m.guardDAD != nil {
			changed, err := m.guardDAD(inFlight)
			if err != nil {
				log.Error("migration source: DAD guard", "on", inFlight, "err", err)
			} else if changed {
				if err := d.putRecord(rec, m.spec, rec.Result); err != nil {
					log.Error("migration source: record DAD guard", "err", err)
				}
				log.Info("migration source: DAD guard", "on", inFlight, "job", job)
			}
		}
		if m.reassert == nil {
			return
		}
		// The underlay plugin of a migration target announces the shared
		// address when it sets up the target's interface (macvlan sets
		// arp_notify), before vmnic, chained after it, can hold it. The
		// source reasserts the address at every phase of the migration
		// (and again past the neighbour locktime) so the underlay keeps
		// reaching the VM where it runs.
		if !inFlight || d.reasserted(key, job+"/"+phase) {
			return
		}
		if err := m.reassert(); err != nil {
			log.Warn("migration source: reassert addresses", "err", err)
			return
		}
		log.Info("migration source: addresses reasserted", "job", job, "phase", phase)
	}
}
