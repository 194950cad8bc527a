package kubevirt

import (
	"sync"

	kubevirtv1 "kubevirt.io/api/core/v1"
)

// MigrationOutcome is how a live migration stands, as the daemon needs it.
type MigrationOutcome int

const (
	// MigrationRunning: not finished (or not known yet).
	MigrationRunning MigrationOutcome = iota
	// MigrationSucceeded: the target runs the VM.
	MigrationSucceeded
	// MigrationFailed: failed or aborted; the source keeps the VM.
	MigrationFailed
)

func (o MigrationOutcome) String() string {
	switch o {
	case MigrationSucceeded:
		return "Succeeded"
	case MigrationFailed:
		return "Failed"
	}
	return "Running"
}

// MigrationTracker tells how migrations went, from the VMI's
// status.migrationState as KubeVirt's virt-controller and virt-handlers
// write it. The Cluster source is one.
//
// A migration shows on the VMI from its handoff on (virt-controller
// names the target pod and node there, once the target pod runs), so
// before that no daemon knows of it: the target's sandbox is wired
// before anyone is told a migration is coming.
type MigrationTracker interface {
	// TargetOutcome is the outcome of the migration uid (the target
	// pod's label kubevirt.io/migrationJobUID) of the VMI ns/vmi whose
	// target is pod.
	TargetOutcome(ns, vmi, uid, pod string) MigrationOutcome
	// MigratedAway reports whether the VMI ns/vmi completed a migration
	// whose source was pod: the pod no longer runs the VM.
	MigratedAway(ns, vmi, pod string) bool
	// InFlight returns the migration of the VMI ns/vmi that has been
	// handed off and has not ended: its UID and its stage, named as the
	// VMIM phase it matches (PreparingTarget, TargetReady, Running).
	InFlight(ns, vmi string) (uid, stage string, ok bool)
	// Changes is closed (and replaced) when a VMI changes.
	Changes() <-chan struct{}
}

// InFlight implements MigrationTracker.
func (c *Cluster) InFlight(ns, vmi string) (uid, stageName string, ok bool) {
	v := c.VMI(ns, vmi)
	if v == nil {
		return "", "", false
	}
	s := v.Status.MigrationState
	if s == nil || s.MigrationUID == "" || outcome(s) != MigrationRunning {
		return "", "", false
	}
	return string(s.MigrationUID), stage(s), true
}

// stage names how far a migration state has come as the VMIM phase
// virt-controller derives from it: PreparingTarget from the handoff,
// TargetReady once the target's virt-handler gave its address, Running
// once the source started sending the VM, then Succeeded (here already
// when the migrated domain runs on the target, see outcome) or Failed.
func stage(s *kubevirtv1.VirtualMachineInstanceMigrationState) string {
	switch {
	case outcome(s) == MigrationSucceeded:
		return string(kubevirtv1.MigrationSucceeded)
	case outcome(s) == MigrationFailed:
		return string(kubevirtv1.MigrationFailed)
	case s.StartTimestamp != nil:
		return string(kubevirtv1.MigrationRunning)
	case s.TargetNodeAddress != "":
		return string(kubevirtv1.MigrationTargetReady)
	}
	return string(kubevirtv1.MigrationPreparingTarget)
}

// outcome reads a migration state.
//
// A migration succeeded once it completed, or once the target's
// virt-handler saw the migrated domain running there
// (targetNodeDomainReadyTimestamp, which KubeVirt sets as the trigger for
// network plugins to move the VM's address to the new pod): the VM runs
// on the target from then on, and the completion can trail it by tens of
// seconds when virt-handler's work queue backs off. The timestamp counts
// only once the source started sending the VM, so that one left from an
// earlier migration in a reused state does not.
func outcome(s *kubevirtv1.VirtualMachineInstanceMigrationState) MigrationOutcome {
	switch {
	case s == nil:
		return MigrationRunning
	case s.Failed || s.AbortStatus == kubevirtv1.MigrationAbortSucceeded:
		return MigrationFailed
	case s.Completed:
		return MigrationSucceeded
	case s.TargetNodeDomainReadyTimestamp != nil && s.StartTimestamp != nil && !s.TargetNodeDomainReadyTimestamp.Before(s.StartTimestamp):
		return MigrationSucceeded
	}
	return MigrationRunning
}

// TargetOutcome implements MigrationTracker. The VMI's state is that of
// the migration uid, or (a pod without the label) of the one whose target
// pod is pod; a state of another migration, or none, is Running: the
// target stays held.
func (c *Cluster) TargetOutcome(ns, vmi, uid, pod string) MigrationOutcome {
	v := c.VMI(ns, vmi)
	if v == nil || v.Status.MigrationState == nil {
		return MigrationRunning
	}
	s := v.Status.MigrationState
	if uid != "" && string(s.MigrationUID) != uid || uid == "" && s.TargetPod != pod {
		return MigrationRunning
	}
	return outcome(s)
}

// MigratedAway implements MigrationTracker.
func (c *Cluster) MigratedAway(ns, vmi, pod string) bool {
	v := c.VMI(ns, vmi)
	if v == nil {
		return false
	}
	return leftPod(v.Status.MigrationState, pod)
}

// leftPod reports whether a migration state says the VM moved away from
// pod: a migration from it to another pod succeeded.
func leftPod(s *kubevirtv1.VirtualMachineInstanceMigrationState, pod string) bool {
	return s != nil && s.SourcePod == pod && s.TargetPod != pod && outcome(s) == MigrationSucceeded
}

// Changes implements MigrationTracker.
func (c *Cluster) Changes() <-chan struct{} {
	c.changeMu.Lock()
	defer c.changeMu.Unlock()
	if c.changed == nil {
		c.changed = make(chan struct{})
	}
	return c.changed
}

func (c *Cluster) notifyChange() {
	c.changeMu.Lock()
	defer c.changeMu.Unlock()
	if c.changed != nil {
		close(c.changed)
	}
	c.changed = make(chan struct{})
}

// changeState is embedded in Cluster.
type changeState struct {
	changeMu sync.Mutex
	changed  chan struct{}
}
