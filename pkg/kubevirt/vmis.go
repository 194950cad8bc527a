package kubevirt

import (
	"context"
	"strconv"
	"sync"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/client-go/tools/cache"
	kubevirtv1 "kubevirt.io/api/core/v1"
)

// How the VMIs of a node reach vmnicd: as they reach virt-handler, through
// two informers selected by the labels KubeVirt keeps on each VMI,
// kubevirt.io/nodeName=<node> (the VMIs that run here) and
// kubevirt.io/migrationTargetNodeName=<node> (those migrating here). A VMI
// whose guest moved away leaves the first at the moment its migration
// completes: virt-handler on the target moves the node label in the same
// update that marks the migration completed, and a watch tells the old
// node only that the VMI no longer matches, with the object as it was
// before. So a VMI that leaves both is read once from the API server and
// kept a while (departed): the source's daemon still has to silence its
// pod and report the guest's last frame.

// departedKeep is how long a departed VMI is kept: longer than KubeVirt
// takes to delete a migration's source pod.
const departedKeep = 10 * time.Minute

// departedReread bounds the re-reads of a departed VMI whose migration
// had not ended when it was read.
const departedReread = 30 * time.Second

type departedVMI struct {
	vmi  *kubevirtv1.VirtualMachineInstance
	read time.Time
}

type departedVMIs struct {
	mu sync.Mutex
	m  map[string]departedVMI
}

func (d *departedVMIs) get(key string, now time.Time) *kubevirtv1.VirtualMachineInstance {
	d.mu.Lock()
	defer d.mu.Unlock()
	e, ok := d.m[key]
	if !ok {
		return nil
	}
	if now.Sub(e.read) > departedKeep {
		delete(d.m, key)
		return nil
	}
	return e.vmi
}

func (d *departedVMIs) put(key string, vmi *kubevirtv1.VirtualMachineInstance, now time.Time) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.m == nil {
		d.m = map[string]departedVMI{}
	}
	for k, e := range d.m {
		if now.Sub(e.read) > departedKeep {
			delete(d.m, k)
		}
	}
	d.m[key] = departedVMI{vmi: vmi, read: now}
}

func (d *departedVMIs) forget(key string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	delete(d.m, key)
}

// newerVMI reports whether a is a later version of the same VMI than b.
// Resource versions are opaque to clients, but the API server's come from
// etcd's revision: compare them as numbers when both are.
func newerVMI(a, b *kubevirtv1.VirtualMachineInstance) bool {
	ra, errA := strconv.ParseUint(a.ResourceVersion, 10, 64)
	rb, errB := strconv.ParseUint(b.ResourceVersion, 10, 64)
	return errA == nil && errB == nil && ra > rb
}

// cachedVMI is the latest version of the VMI key either informer holds.
func (c *Cluster) cachedVMI(key string) *kubevirtv1.VirtualMachineInstance {
	var best *kubevirtv1.VirtualMachineInstance
	for _, inf := range []cache.SharedIndexInformer{c.vmis, c.incoming} {
		obj, ok, err := inf.GetIndexer().GetByKey(key)
		if err != nil || !ok {
			continue
		}
		if v, isVMI := obj.(*kubevirtv1.VirtualMachineInstance); isVMI && (best == nil || newerVMI(v, best)) {
			best = v
		}
	}
	return best
}

// VMI returns the VMI ns/name as this node last saw it: from the
// informers, or as it was read when it left them; nil when unknown.
func (c *Cluster) VMI(ns, name string) *kubevirtv1.VirtualMachineInstance {
	key := ns + "/" + name
	if v := c.cachedVMI(key); v != nil {
		return v
	}
	return c.departed.get(key, time.Now())
}

// vmiEvents keeps the departed VMIs and wakes Changes.
func (c *Cluster) vmiEvents() cache.ResourceEventHandlerFuncs {
	return cache.ResourceEventHandlerFuncs{
		AddFunc: func(obj any) {
			if v, ok := obj.(*kubevirtv1.VirtualMachineInstance); ok {
				c.departed.forget(v.Namespace + "/" + v.Name)
			}
			c.notifyChange()
		},
		UpdateFunc: func(any, any) { c.notifyChange() },
		DeleteFunc: func(obj any) {
			c.left(obj)
			c.notifyChange()
		},
	}
}

// left handles a VMI that one informer no longer holds: deleted, or no
// longer labelled for this node. Unless the other informer still holds it
// or it was being deleted, it is read from the API server.
func (c *Cluster) left(obj any) {
	if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = t.Obj
	}
	last, ok := obj.(*kubevirtv1.VirtualMachineInstance)
	if !ok {
		return
	}
	key := last.Namespace + "/" + last.Name
	if c.cachedVMI(key) != nil || last.DeletionTimestamp != nil {
		return
	}
	go c.readDeparted(c.runCtx(), last)
}

// readDeparted reads a VMI that left this node's informers and keeps it,
// again while the migration it shows involving this node has not ended
// (at most until departedReread).
func (c *Cluster) readDeparted(ctx context.Context, last *kubevirtv1.VirtualMachineInstance) {
	key := last.Namespace + "/" + last.Name
	wait := 250 * time.Millisecond
	deadline := time.Now().Add(departedReread)
	for {
		v, err := c.readVMI(ctx, last.Namespace, last.Name)
		switch {
		case apierrors.IsNotFound(err):
			c.departed.forget(key)
			return
		case err != nil:
			c.opts.Logger.Warn("read a VMI that left this node's watches", "vmi", key, "err", err)
			v = last
		case v.UID != last.UID:
			return // another VMI of the same name
		}
		if c.cachedVMI(key) != nil {
			return // back on this node
		}
		trimmed, _ := trimVMI(v)
		c.departed.put(key, trimmed.(*kubevirtv1.VirtualMachineInstance), time.Now())
		c.notifyChange()
		if !c.migratingHere(v) || time.Now().After(deadline) {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
		wait = min(2*wait, 4*time.Second)
	}
}

// migratingHere reports whether v shows a migration from or to this node
// that has not ended.
func (c *Cluster) migratingHere(v *kubevirtv1.VirtualMachineInstance) bool {
	s := v.Status.MigrationState
	return s != nil && outcome(s) == MigrationRunning && (s.SourceNode == c.opts.NodeName || s.TargetNode == c.opts.NodeName)
}
