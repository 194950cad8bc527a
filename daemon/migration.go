package daemon

import (
	"context"
	"net"
	"sync"
	"time"

	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/vmnic/vmnic/pkg/kubevirt"
	"github.com/vmnic/vmnic/pkg/mode"
	"github.com/vmnic/vmnic/pkg/state"
)

// watchers are the per-attachment goroutines of migrations: a held target
// watching for its migrated guest, a source watching for claims of its
// addresses.
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

// wired is called once an ADD wired att: a held migration target is
// counted, and a target whose mode sees its guest is watched for the
// guest's frames (watchTargetFrames).
func (d *Daemon) wired(key string, rec *state.Record, att mode.Attachment) {
	if m, ok := att.(mode.Migrant); ok && m.Held() {
		d.Metrics().MigrationHeld()
	}
	if gw, ok := att.(mode.GuestWatcher); ok && rec.Migration != nil {
		d.watchTargetFrames(key, gw)
	}
}

// claimReassertGap bounds how often a source answers claims of its
// addresses: the claimant announces in a burst.
const claimReassertGap = 100 * time.Millisecond

// watchClaims makes a source whose VM migrates answer every claim of its
// addresses by another MAC (the target's underlay plugin announces them
// when it brings the target's interface up, before vmnic can hold it) with
// its own announcement, so the underlay reaches the VM where it runs.
func (d *Daemon) watchClaims(key string, sg mode.SourceGuard) {
	d.watch(key, func(ctx context.Context) {
		last := map[bool]time.Time{}
		err := sg.WatchClaims(ctx, func(from net.HardwareAddr, v6 bool) {
			if time.Since(last[v6]) < claimReassertGap {
				return
			}
			last[v6] = time.Now()
			if err := sg.Reassert(v6); err != nil {
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

// migrationResync re-reads the migrations even without an informer event.
const migrationResync = 2 * time.Second

// watchMigrations drives the live-migration part of the attachments whose
// mode takes part (mode.Migrant) from the VMIs' migration state: a held
// target is released (and announces the guest's addresses) when its
// migration succeeded, and stays held when it failed; a source whose VM
// moved away is silenced until its DEL. The state lives in the attachment
// records, so a restarted daemon picks up where it was.
func (d *Daemon) watchMigrations(ctx context.Context) {
	tr, ok := d.opts.Facts.(kubevirt.MigrationTracker)
	if !ok {
		return
	}
	for {
		changed := tr.Changes()
		d.reconcileMigrations(ctx, tr)
		select {
		case <-ctx.Done():
			return
		case <-changed:
		case <-time.After(migrationResync):
		}
	}
}

func (d *Daemon) reconcileMigrations(ctx context.Context, tr kubevirt.MigrationTracker) {
	d.gc.RLock()
	defer d.gc.RUnlock()
	recs, _, err := d.store.List()
	if err != nil {
		d.log.Error("migrations: list records", "err", err)
		return
	}
	gx, _ := tr.(kubevirt.GapExchange)
	for _, rec := range recs {
		if len(rec.Result) == 0 || rec.VMName == "" {
			continue
		}
		key := state.Key(rec.ContainerID, rec.IfName)
		d.reconcileOne(tr, key)
		d.reconcileGap(tr, gx, key)
	}
	if gx != nil {
		d.publishSourceGaps(ctx, tr, gx)
	}
}

// migrationFacts is what planMigration decides from: the attachment's
// state and what the migration tracker says of its VM.
type migrationFacts struct {
	held, silenced bool
	// target: the record names the migration the pod is the target of;
	// recorded is the outcome it already acted on ("" for none).
	target   bool
	recorded string
	// outcome of the target's migration (held targets).
	outcome kubevirt.MigrationOutcome
	// migratedAway: the VM completed a migration away from this pod.
	migratedAway bool
	// inFlight, stage: a migration of the VM was handed off and has not
	// ended, at this stage (MigrationTracker.InFlight); reasserted: the
	// source already reasserted for this stage.
	inFlight   bool
	stage      string
	reasserted bool
	// guards: the mode's source takes part while the target is prepared
	// (mode.SourceGuard).
	guards bool
}

// migrationPlan is what the watch does for one attachment.
type migrationPlan struct {
	release    bool   // lift a held target's hold: its migration succeeded
	watchGuest bool   // keep watching a held target for its guest
	failed     bool   // record that a held target's migration failed
	silence    bool   // hold a source whose VM moved away
	guard      bool   // a source that guards: apply dadGuard, claims, reassert
	dadGuard   bool   // a source's DAD guard, on or off (guards only)
	claims     bool   // answer claims of a source's addresses (guards only)
	reassert   bool   // reassert a source's addresses once for this stage
	phase      string // the outcome to record (release, failed)
}

// planMigration decides, from the facts alone, what the migration watch
// does for one attachment.
func planMigration(f migrationFacts) migrationPlan {
	var p migrationPlan
	switch {
	case f.held && f.target:
		switch f.outcome {
		case kubevirt.MigrationRunning:
			p.watchGuest = true
		case kubevirt.MigrationSucceeded:
			p.release, p.phase = true, f.outcome.String()
		case kubevirt.MigrationFailed:
			if f.recorded != f.outcome.String() {
				p.failed, p.phase = true, f.outcome.String()
			}
		}
	case !f.held && !f.silenced:
		if f.migratedAway {
			p.silence = true
			return p
		}
		if !f.guards {
			return p
		}
		// The next migration's target is wired before KubeVirt tells
		// anyone it is coming (the VMI shows a migration from its
		// handoff on, once the target pod runs): its underlay plugin
		// runs DAD for the address the VM holds here, and announces the
		// addresses, at any time. So the VM's home never answers DAD for
		// its own address (Spiderpool gives it to this VM alone) and
		// answers every claim at once, except while the VM's memory
		// moves: the target is held then, and the next claim from it is
		// its switchover, which must not be contested.
		p.guard = true
		p.dadGuard = true
		p.claims = !f.inFlight || !memoryMoves(f.stage)
		p.reassert = f.inFlight && !f.reasserted
	}
	return p
}

// memoryMoves reports whether a migration in flight has started sending
// the VM (stage Running).
func memoryMoves(stage string) bool {
	return kubevirtv1.VirtualMachineInstanceMigrationPhase(stage) == kubevirtv1.MigrationRunning
}

// reconcileOne acts on one attachment under its lock, from a fresh read of
// its record (a DEL may have come first).
func (d *Daemon) reconcileOne(tr kubevirt.MigrationTracker, key string) {
	defer d.locks.Lock(key)()
	rec, err := d.store.Get(key)
	if err != nil || len(rec.Result) == 0 {
		return
	}
	att, err := d.load(rec)
	if err != nil {
		return
	}
	m, ok := att.(mode.Migrant)
	if !ok {
		return
	}
	sg, guards := att.(mode.SourceGuard)
	f := migrationFacts{held: m.Held(), silenced: m.Silenced(), target: rec.Migration != nil, guards: guards}
	switch {
	case f.held && f.target:
		f.recorded = rec.Migration.Phase
		f.outcome = tr.TargetOutcome(rec.Pod.Namespace, rec.VMName, rec.Migration.UID, rec.Pod.Name)
	case !f.held && !f.silenced:
		f.migratedAway = tr.MigratedAway(rec.Pod.Namespace, rec.VMName, rec.Pod.Name)
		var uid string
		uid, f.stage, f.inFlight = tr.InFlight(rec.Pod.Namespace, rec.VMName)
		if guards && f.inFlight {
			f.reasserted = d.wasReasserted(key, uid+"/"+f.stage)
		}
	}
	p := planMigration(f)
	log := d.log.With("key", key, "pod", rec.Pod.Namespace+"/"+rec.Pod.Name, "vm", rec.VMName)
	save := func(what string) {
		if err := d.putRecord(rec, att, rec.Result); err != nil {
			log.Error("migration: record "+what, "err", err)
		}
	}
	switch {
	case p.watchGuest:
		if gw, ok := att.(mode.GuestWatcher); ok {
			d.watchTargetFrames(key, gw)
		}
	case p.release:
		// The frame watch goes on: the first frame after the hold is
		// the target's side of the network gap.
		d.releaseTarget(key, rec, m, p.phase, "migration target took over")
	case p.failed:
		d.unwatch(targetWatch(key))
		rec.Migration.Phase = p.phase
		save("failure")
		d.Metrics().MigrationFailed()
		log.Warn("migration failed or aborted: target stays held, source untouched", "job", rec.Migration.Job)
	case p.silence:
		if err := m.Silence(); err != nil {
			log.Error("migration source: silence", "err", err)
			return
		}
		save("silence")
		d.forgetReasserted(key)
		d.unwatch(key)
		log.Info("migration source handed over: silenced until its DEL")
	case p.guard:
		d.guardSource(key, sg, p, log, save)
	}
}

// guardSource applies a source's part while its VM migrates.
func (d *Daemon) guardSource(key string, sg mode.SourceGuard, p migrationPlan, log logger, save func(string)) {
	changed, err := sg.GuardDAD(p.dadGuard)
	switch {
	case err != nil:
		log.Error("migration source: DAD guard", "on", p.dadGuard, "err", err)
	case changed:
		save("DAD guard")
		log.Info("migration source: DAD guard", "on", p.dadGuard)
	}
	if p.claims {
		d.watchClaims(key, sg)
	} else {
		d.unwatch(key)
	}
	if !p.reassert {
		return
	}
	if err := sg.Reassert(false); err != nil {
		log.Warn("migration source: reassert addresses", "err", err)
		d.forgetReasserted(key) // try again
		return
	}
	log.Info("migration source: addresses reasserted")
}

// logger is what guardSource logs with.
type logger interface {
	Info(msg string, args ...any)
	Warn(msg string, args ...any)
	Error(msg string, args ...any)
}

// wasReasserted reports whether the source key already reasserted its
// addresses for this migration stage, and records that it has now.
func (d *Daemon) wasReasserted(key, phase string) bool {
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
