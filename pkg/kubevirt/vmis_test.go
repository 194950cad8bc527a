package kubevirt

import (
	"log/slog"
	"strconv"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/cache"
	kubevirtv1 "kubevirt.io/api/core/v1"
)

// testCluster is a Cluster whose VMI informers' caches a test fills; no
// informer runs.
func testCluster(node string) *Cluster {
	inf := func() cache.SharedIndexInformer {
		return cache.NewSharedIndexInformer(&fakeLW{}, &kubevirtv1.VirtualMachineInstance{}, 0, cache.Indexers{})
	}
	return &Cluster{opts: ClusterOptions{NodeName: node, Logger: slog.New(slog.DiscardHandler)}, vmis: inf(), incoming: inf()}
}

// TestMigrationFromVMI: what the daemon learns of a migration from the
// VMI's migration state, at each step KubeVirt v1.8.2 writes, seen from
// the source node and from the target node.
func TestMigrationFromVMI(t *testing.T) {
	src, dst := testCluster("node-a"), testCluster("node-b")
	vmi := &kubevirtv1.VirtualMachineInstance{ObjectMeta: metav1.ObjectMeta{
		Namespace: "ns", Name: "vm", UID: "vmi-uid", ResourceVersion: "10",
		Labels: map[string]string{kubevirtv1.NodeNameLabel: "node-a"},
	}}
	if err := src.vmis.GetIndexer().Add(vmi); err != nil {
		t.Fatal(err)
	}
	// Before the handoff the VMI shows nothing: the target pod is wired
	// and held, and nobody knows of a migration in flight.
	if _, _, ok := src.InFlight("ns", "vm"); ok {
		t.Error("in flight before the handoff")
	}
	if got := dst.TargetOutcome("ns", "vm", "mig-1", "launcher-dst"); got != MigrationRunning {
		t.Errorf("target outcome before the target sees the VMI: %v", got)
	}
	// Each step is a new version of the VMI, as virt-controller and the
	// two virt-handlers write it.
	rv := 10
	step := func(change func(v *kubevirtv1.VirtualMachineInstance)) *kubevirtv1.VirtualMachineInstance {
		rv++
		v := vmi.DeepCopy()
		v.ResourceVersion = strconv.Itoa(rv)
		change(v)
		vmi = v
		return v
	}
	put := func(c *Cluster, inf cache.SharedIndexInformer, v *kubevirtv1.VirtualMachineInstance) {
		t.Helper()
		if err := inf.GetIndexer().Update(v); err != nil {
			t.Fatal(err)
		}
	}
	// The handoff: virt-controller names the target and labels the VMI
	// for the target node, whose second informer now holds it.
	v := step(func(v *kubevirtv1.VirtualMachineInstance) {
		v.Status.MigrationState = &kubevirtv1.VirtualMachineInstanceMigrationState{
			MigrationUID: "mig-1", SourceNode: "node-a", TargetNode: "node-b", SourcePod: "launcher-src", TargetPod: "launcher-dst",
		}
		v.Labels[kubevirtv1.MigrationTargetNodeNameLabel] = "node-b"
	})
	put(src, src.vmis, v)
	put(dst, dst.incoming, v)
	wantStage := func(want string) {
		t.Helper()
		uid, st, ok := src.InFlight("ns", "vm")
		if !ok || uid != "mig-1" || st != want {
			t.Errorf("source: in flight %v, %q, %q; want mig-1 at %s", ok, uid, st, want)
		}
		if got := dst.TargetOutcome("ns", "vm", "mig-1", "launcher-dst"); got != MigrationRunning {
			t.Errorf("target outcome at %s: %v", want, got)
		}
	}
	wantStage("PreparingTarget")
	if !src.RunsIn("ns", "vm", "launcher-src") || src.RunsIn("ns", "vm", "launcher-dst") {
		t.Error("while in flight the guest runs in the source pod")
	}
	v = step(func(v *kubevirtv1.VirtualMachineInstance) { v.Status.MigrationState.TargetNodeAddress = "10.0.0.2" })
	put(src, src.vmis, v)
	put(dst, dst.incoming, v)
	wantStage("TargetReady")
	v = step(func(v *kubevirtv1.VirtualMachineInstance) {
		now := metav1.Now()
		v.Status.MigrationState.StartTimestamp = &now
	})
	put(src, src.vmis, v)
	put(dst, dst.incoming, v)
	wantStage("Running")
	// The target's virt-handler sees the migrated domain running, KubeVirt's
	// trigger for network plugins to move the address; its ack of the
	// completion may trail it by tens of seconds.
	v = step(func(v *kubevirtv1.VirtualMachineInstance) {
		now := metav1.Now()
		v.Status.MigrationState.TargetNodeDomainDetected, v.Status.MigrationState.TargetNodeDomainReadyTimestamp = true, &now
	})
	put(src, src.vmis, v)
	put(dst, dst.incoming, v)
	if got := dst.TargetOutcome("ns", "vm", "mig-1", "launcher-dst"); got != MigrationSucceeded {
		t.Errorf("target outcome once the domain runs on the target: %v", got)
	}
	if !src.MigratedAway("ns", "vm", "launcher-src") || src.RunsIn("ns", "vm", "launcher-src") {
		t.Error("once the domain runs on the target the guest still runs in the source pod")
	}
	// A ready time without a start (left in a reused state) says nothing.
	stale := v.DeepCopy()
	stale.Status.MigrationState.StartTimestamp = nil
	if got := outcome(stale.Status.MigrationState); got != MigrationRunning {
		t.Errorf("outcome of a ready time without a start: %v", got)
	}
	// The target's virt-handler acknowledges the completion: node label
	// and completed in one update. The target's first informer gets it
	// too; the source's loses it and keeps what it read afterwards.
	done := step(func(v *kubevirtv1.VirtualMachineInstance) {
		now := metav1.Now()
		v.Status.MigrationState.EndTimestamp = &now
		v.Status.MigrationState.Completed = true
		v.Labels[kubevirtv1.NodeNameLabel] = "node-b"
		v.Status.NodeName = "node-b"
	})
	put(dst, dst.vmis, done)
	if got := dst.TargetOutcome("ns", "vm", "mig-1", "launcher-dst"); got != MigrationSucceeded {
		t.Errorf("target outcome once completed (its newer version in the other informer): %v", got)
	}
	if err := src.vmis.GetIndexer().Delete(v); err != nil {
		t.Fatal(err)
	}
	if src.VMI("ns", "vm") != nil || src.MigratedAway("ns", "vm", "launcher-src") {
		t.Error("the source knows the VMI after it left its informer, before reading it")
	}
	src.departed.put("ns/vm", done, time.Now())
	if !src.MigratedAway("ns", "vm", "launcher-src") || !src.MovedAway("ns", "vm", "launcher-src", "mig-1") || src.MovedAway("ns", "vm", "launcher-src", "mig-0") {
		t.Error("the departed VMI does not say the guest moved away from the source pod")
	}
	if _, _, ok := src.InFlight("ns", "vm"); ok {
		t.Error("in flight after completion")
	}
	if got := dst.TargetOutcome("ns", "vm", "mig-0", "launcher-dst"); got != MigrationRunning {
		t.Errorf("target outcome of another migration's pod: %v", got)
	}
	// A departed VMI is kept for departedKeep.
	if src.departed.get("ns/vm", time.Now().Add(departedKeep+time.Second)) != nil || len(src.departed.m) != 0 {
		t.Error("a departed VMI outlived departedKeep")
	}
}

// TestMigrationFailedFromVMI: a migration the source marks failed leaves
// the target held and the source at home.
func TestMigrationFailedFromVMI(t *testing.T) {
	dst := testCluster("node-b")
	now := metav1.Now()
	v := &kubevirtv1.VirtualMachineInstance{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "vm", UID: types.UID("u"), ResourceVersion: "5"}}
	v.Status.MigrationState = &kubevirtv1.VirtualMachineInstanceMigrationState{
		MigrationUID: "mig-2", SourcePod: "launcher-src", TargetPod: "launcher-dst", Failed: true, EndTimestamp: &now,
	}
	if err := dst.incoming.GetIndexer().Add(v); err != nil {
		t.Fatal(err)
	}
	if got := dst.TargetOutcome("ns", "vm", "mig-2", "launcher-dst"); got != MigrationFailed {
		t.Errorf("target outcome of a failed migration: %v", got)
	}
	if got := dst.TargetOutcome("ns", "vm", "", "launcher-dst"); got != MigrationFailed {
		t.Errorf("target outcome, pod without the UID label: %v", got)
	}
	if dst.MigratedAway("ns", "vm", "launcher-src") || !dst.RunsIn("ns", "vm", "launcher-src") {
		t.Error("after a failure the guest still runs in the source pod")
	}
	if _, _, ok := dst.InFlight("ns", "vm"); ok {
		t.Error("a failed migration in flight")
	}
}
