package daemon

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/vmnic/vmnic/pkg/kubevirt"
	"github.com/vmnic/vmnic/pkg/mode"
	"github.com/vmnic/vmnic/pkg/state"
)

// A live migration's network gap is the time from the last frame the
// guest sent on the source node to the first it sent on the target, as
// each node's vmnicd saw them (mode.GuestWatcher): the time the VM was
// off the network. The source's daemon watches its guest while the
// migration runs, and once the VM moved away writes the time of the last
// frame on the VMI (kubevirt.LastFrameAnnotationPrefix). The target's
// daemon records the first frame its guest sends once no hold drops it,
// and with the source's report observes the gap
// (vmnic_migration_network_gap_seconds) and writes it in an Event on the
// VMI. The two times come from two nodes' clocks: the gap is as good as
// their synchronisation.

// Gap timing.
const (
	// gapSourceKeep: a source's last frame of a migration that ended
	// waits this long for the VMI's status to say the VM moved away.
	gapSourceKeep = 30 * time.Second
	// gapSourceWait: a target waits this long after its first frame for
	// the source's report.
	gapSourceWait = 2 * time.Minute
	// gapPublishTries: attempts to write a source's report.
	gapPublishTries = 3
)

// gapSources are the sources whose guests this daemon watches while they
// migrate away, by attachment key.
type gapSources struct {
	mu sync.Mutex
	m  map[string]*gapSource
}

type gapSource struct {
	ns, vmi, pod, ifName, uid string
	// last is the guest's last frame seen, zero for none yet; lastWhat
	// what it was.
	last     time.Time
	lastWhat string
	// ended is when the migration was first seen no longer in flight;
	// published that the last frame was reported.
	ended     time.Time
	published bool
}

// sourceWatch and targetWatch name a key's frame watches among d.watch's.
func sourceWatch(key string) string { return "source-frames:" + key }
func targetWatch(key string) string { return "target-frames:" + key }

// unwatchAll ends every watch of an attachment.
func (d *Daemon) unwatchAll(key string) {
	d.unwatch(key)
	d.unwatch(sourceWatch(key))
	d.unwatch(targetWatch(key))
}

// watchTargetFrames watches a migration target's guest. While the target
// is held, a frame of a mode that sees them (mode.TargetWatcher: QEMU
// announces the VM that resumed here) releases the hold at once, ahead of
// the VMI's migration state, which can trail the resume by hundreds of
// milliseconds. The first frame of the guest's traffic once nothing holds
// the target (mode.GuestFrame: not ARP, neighbour discovery or QEMU's
// announcement) is the target's side of the network gap.
func (d *Daemon) watchTargetFrames(key string, gw mode.GuestWatcher) {
	d.watch(targetWatch(key), func(ctx context.Context) {
		err := gw.WatchGuest(ctx, func(f mode.GuestFrame) bool { return d.targetFrame(key, f) })
		if err != nil && ctx.Err() == nil {
			d.log.Warn("migration target: watching for the guest ended", "key", key, "err", err)
		}
	})
}

// targetFrame acts on a frame the guest sent on a migration target, and
// reports whether to watch for more.
func (d *Daemon) targetFrame(key string, f mode.GuestFrame) bool {
	d.gc.RLock()
	defer d.gc.RUnlock()
	defer d.locks.Lock(key)()
	rec, err := d.store.Get(key)
	if err != nil || rec.Migration == nil || !rec.Migration.FirstFrame.IsZero() ||
		rec.Migration.Phase == kubevirt.MigrationFailed.String() {
		return false
	}
	att, err := d.load(rec)
	if err != nil {
		return false
	}
	if m, ok := att.(mode.Migrant); ok && m.Held() {
		if _, sees := att.(mode.TargetWatcher); sees {
			// The hold drops this frame: not yet the target's first.
			d.releaseTarget(key, rec, m, "TargetActive", "migration target's guest resumed")
			return true
		}
		// A mode whose hold drops frames before its watch sees them
		// (passt's, on the pod interface's way out): a frame seen has
		// left, so the hold is gone, though the record that says so may
		// not be written yet (the release announces the addresses
		// first).
	}
	if !f.Traffic {
		// The guest's ARP or neighbour discovery, QEMU's announcement:
		// the source's last frame is traffic, so is the target's first.
		return true
	}
	rec.Migration.FirstFrame = f.At
	if err := d.putRecord(rec, att, rec.Result); err != nil {
		d.log.Error("migration target: record the guest's first frame", "key", key, "err", err)
	}
	d.log.Info("migration target: the guest's first frame", "key", key, "vm", rec.VMName, "job", rec.Migration.Job, "frame", f.What, "at", f.At)
	return false
}

// releaseTarget lifts a held target's hold (which announces its
// addresses) and records the release as phase; why ends the log line. The
// caller holds the attachment's lock.
func (d *Daemon) releaseTarget(key string, rec *state.Record, m mode.Migrant, phase, why string) {
	start := time.Now()
	if err := m.Release(); err != nil {
		d.log.Error("migration target: release hold", "key", key, "err", err)
		if m.Held() {
			return
		}
	}
	rec.Migration.Phase = phase
	if err := d.putRecord(rec, m, rec.Result); err != nil {
		d.log.Error("migration target: record release", "key", key, "err", err)
	}
	d.Metrics().MigrationSwitched()
	d.log.Info(why+": hold released, addresses announced", "key", key,
		"pod", rec.Pod.Namespace+"/"+rec.Pod.Name, "vm", rec.VMName, "job", rec.Migration.Job, "took", time.Since(start))
}

// reconcileGap does an attachment's part in measuring gaps: a target
// watches for its guest's first frame and reports the gap once the source
// reported; a source whose VM migrates watches its guest. Without gx (a
// tracker that cannot pass reports) a target is still watched, for its
// release.
func (d *Daemon) reconcileGap(tr kubevirt.MigrationTracker, gx kubevirt.GapExchange, key string) {
	defer d.locks.Lock(key)()
	rec, err := d.store.Get(key)
	if err != nil || len(rec.Result) == 0 || rec.VMName == "" {
		return
	}
	att, err := d.load(rec)
	if err != nil {
		return
	}
	gw, ok := att.(mode.GuestWatcher)
	if !ok {
		return
	}
	m, migrant := att.(mode.Migrant)
	switch mg := rec.Migration; {
	case mg != nil && mg.FirstFrame.IsZero() && mg.Phase != kubevirt.MigrationFailed.String():
		// A restarted daemon watches again.
		d.watchTargetFrames(key, gw)
	case mg != nil && !mg.FirstFrame.IsZero() && !mg.GapReported && gx != nil:
		d.unwatch(targetWatch(key))
		if d.reportGap(gx, rec) {
			mg.GapReported = true
			if err := d.putRecord(rec, att, rec.Result); err != nil {
				d.log.Error("migration target: record the gap's report", "key", key, "err", err)
			}
		}
	}
	if gx == nil {
		return
	}
	uid, _, inFlight := tr.InFlight(rec.Pod.Namespace, rec.VMName)
	if !inFlight || rec.Migration != nil && rec.Migration.UID == uid || migrant && (m.Held() || m.Silenced()) ||
		!gx.RunsIn(rec.Pod.Namespace, rec.VMName, rec.Pod.Name) {
		return
	}
	// A source: its VM migrates away.
	d.gapSrc.mu.Lock()
	if d.gapSrc.m == nil {
		d.gapSrc.m = map[string]*gapSource{}
	}
	s := d.gapSrc.m[key]
	if s == nil || s.uid != uid {
		s = &gapSource{ns: rec.Pod.Namespace, vmi: rec.VMName, pod: rec.Pod.Name, ifName: rec.IfName, uid: uid}
		d.gapSrc.m[key] = s
	}
	published := s.published
	d.gapSrc.mu.Unlock()
	if published {
		return
	}
	d.watch(sourceWatch(key), func(ctx context.Context) {
		err := gw.WatchGuest(ctx, func(f mode.GuestFrame) bool {
			d.gapSrc.mu.Lock()
			defer d.gapSrc.mu.Unlock()
			s := d.gapSrc.m[key]
			if s == nil || s.published {
				return false
			}
			if f.Traffic {
				s.last, s.lastWhat = f.At, f.What
			}
			return true
		})
		if err != nil && ctx.Err() == nil {
			d.log.Debug("migration source: watching the guest ended", "key", key, "err", err)
		}
	})
}

// publishSourceGaps writes the last frame of each source whose VM moved
// away on its VMI, and forgets sources whose migration ended. A source
// whose pod is gone (DEL) is published all the same.
func (d *Daemon) publishSourceGaps(ctx context.Context, tr kubevirt.MigrationTracker, gx kubevirt.GapExchange) {
	now := time.Now()
	d.gapSrc.mu.Lock()
	defer d.gapSrc.mu.Unlock()
	for key, s := range d.gapSrc.m {
		if !s.published && gx.MovedAway(s.ns, s.vmi, s.pod, s.uid) {
			s.published = true
			d.unwatch(sourceWatch(key))
			go d.publishLastFrame(ctx, gx, key, *s)
		}
		if uid, _, inFlight := tr.InFlight(s.ns, s.vmi); inFlight && uid == s.uid {
			continue
		}
		if s.ended.IsZero() {
			s.ended = now
		}
		// Unpublished, it waits for the VMI's status to say the VM moved.
		if s.published || now.Sub(s.ended) > gapSourceKeep {
			delete(d.gapSrc.m, key)
			d.unwatch(sourceWatch(key))
		}
	}
}

func (d *Daemon) publishLastFrame(ctx context.Context, gx kubevirt.GapExchange, key string, s gapSource) {
	var err error
	for try := 0; try < gapPublishTries && ctx.Err() == nil; try++ {
		if err = gx.PublishLastFrame(ctx, s.ns, s.vmi, s.ifName, s.uid, s.last); err == nil {
			d.log.Info("migration source: guest's last frame reported", "key", key, "vm", s.vmi, "migration", s.uid, "last", s.last, "frame", s.lastWhat)
			return
		}
		time.Sleep(time.Duration(try+1) * 200 * time.Millisecond)
	}
	d.log.Warn("migration source: could not report the guest's last frame: the target measures no gap", "key", key, "vm", s.vmi, "err", err)
}

// reportGap reports a target's gap once the source's report is there, or
// once it waited long enough for it; it reports whether it did.
func (d *Daemon) reportGap(gx kubevirt.GapExchange, rec *state.Record) bool {
	mg := rec.Migration
	last, ok := gx.SourceLastFrame(rec.Pod.Namespace, rec.VMName, rec.IfName, mg.UID)
	waited := time.Since(mg.FirstFrame)
	if !ok && waited < gapSourceWait {
		return false
	}
	note, gap, measured := gapNote(rec, last, ok)
	if measured {
		d.Metrics().MigrationGap(rec.Mode, gap)
	}
	d.log.Info("migration network gap", "key", state.Key(rec.ContainerID, rec.IfName), "vm", rec.VMName, "job", mg.Job,
		"mode", rec.Mode, "gap", gap, "measured", measured)
	d.opts.Observe.Events.enqueue(gapNotice{
		pod:  eventPod{namespace: rec.Pod.Namespace, name: rec.Pod.Name, uid: rec.Pod.UID},
		note: note, observed: time.Now(),
	})
	return true
}

// gapNote words a target's gap for its Event, from the source's last
// frame (reported: the source wrote one; zero last: it saw none); measured
// reports whether gap is one to count.
func gapNote(rec *state.Record, last time.Time, reported bool) (note string, gap time.Duration, measured bool) {
	mg := rec.Migration
	what := fmt.Sprintf("live migration %s, interface %s (network %q, mode %s)", mg.Job, rec.IfName, rec.Network, rec.Mode)
	first := mg.FirstFrame.UTC().Format(time.RFC3339Nano)
	switch {
	case !reported:
		return fmt.Sprintf("%s: the source node's vmnic did not report the guest's last frame within %s; the guest's first frame here was at %s: no gap measured",
			what, gapSourceWait, first), 0, false
	case last.IsZero():
		return fmt.Sprintf("%s: the guest sent nothing on the source while it migrated; its first frame here was at %s: no gap measured",
			what, first), 0, false
	}
	gap = mg.FirstFrame.Sub(last)
	if gap < 0 {
		return fmt.Sprintf("%s: the guest's first frame here (%s) is %s before its last on the source (%s): the nodes' clocks disagree, no gap measured",
			what, first, -gap, last.UTC().Format(time.RFC3339Nano)), gap, false
	}
	return fmt.Sprintf("%s: network gap %s, from the guest's last frame on the source (%s) to its first here (%s)",
		what, gap.Round(time.Millisecond), last.UTC().Format(time.RFC3339Nano), first), gap, true
}
