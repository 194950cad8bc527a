package kubevirt

import (
	"sync"

	"k8s.io/client-go/tools/cache"
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

// MigrationTracker tells how migrations went. The Cluster source is one.
type MigrationTracker interface {
	// TargetOutcome is the outcome of migration job (a VMIM name) of the
	// VMI ns/vmi whose target is pod.
	TargetOutcome(ns, vmi, job, pod string) MigrationOutcome
	// MigratedAway reports whether the VMI ns/vmi completed a migration
	// whose source was pod: the pod no longer runs the VM.
	MigratedAway(ns, vmi, pod string) bool
	// InFlight returns a migration of the VMI ns/vmi that has not ended:
	// its VMIM name and phase.
	InFlight(ns, vmi string) (job, phase string, ok bool)
	// Changes is closed (and replaced) when a VMI or VMIM changes.
	Changes() <-chan struct{}
}

// InFlight implements MigrationTracker.
func (c *Cluster) InFlight(ns, vmi string) (job, phase string, ok bool) {
	objs, err := c.vmims.GetIndexer().ByIndex(cache.NamespaceIndex, ns)
	if err != nil {
		return "", "", false
	}
	for _, o := range objs {
		m, isM := o.(*kubevirtv1.VirtualMachineInstanceMigration)
		if !isM || m.Spec.VMIName != vmi {
			continue
		}
		switch m.Status.Phase {
		case kubevirtv1.MigrationSucceeded, kubevirtv1.MigrationFailed:
			continue
		}
		return m.Name, string(m.Status.Phase), true
	}
	return "", "", false
}

// outcome reads a migration state.
func outcome(s *kubevirtv1.VirtualMachineInstanceMigrationState) MigrationOutcome {
	switch {
	case s == nil:
		return MigrationRunning
	case s.Failed || s.AbortStatus == kubevirtv1.MigrationAbortSucceeded:
		return MigrationFailed
	case s.Completed:
		return MigrationSucceeded
	}
	return MigrationRunning
}

// TargetOutcome implements MigrationTracker: the VMIM's phase decides; the
// VMI's migration state for this target pod decides when it says more.
func (c *Cluster) TargetOutcome(ns, vmi, job, pod string) MigrationOutcome {
	out := MigrationRunning
	if m := c.Migration(ns, job); m != nil {
		switch m.Status.Phase {
		case kubevirtv1.MigrationSucceeded:
			out = MigrationSucceeded
		case kubevirtv1.MigrationFailed:
			out = MigrationFailed
		}
		if out == MigrationRunning && m.Status.MigrationState != nil && m.Status.MigrationState.TargetPod == pod {
			out = outcome(m.Status.MigrationState)
		}
	}
	if out != MigrationRunning {
		return out
	}
	if v := c.VMI(ns, vmi); v != nil {
		if s := v.Status.MigrationState; s != nil && s.TargetPod == pod {
			return outcome(s)
		}
	}
	return MigrationRunning
}

// MigratedAway implements MigrationTracker.
func (c *Cluster) MigratedAway(ns, vmi, pod string) bool {
	v := c.VMI(ns, vmi)
	if v == nil {
		return false
	}
	s := v.Status.MigrationState
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

// watchChanges wakes Changes on every VMI and VMIM event.
func (c *Cluster) watchChanges() error {
	h := cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { c.notifyChange() },
		UpdateFunc: func(any, any) { c.notifyChange() },
		DeleteFunc: func(any) { c.notifyChange() },
	}
	for _, inf := range []cache.SharedIndexInformer{c.vmis, c.vmims} {
		if _, err := inf.AddEventHandler(h); err != nil {
			return err
		}
	}
	return nil
}

// changeState is embedded in Cluster.
type changeState struct {
	changeMu sync.Mutex
	changed  chan struct{}
}
