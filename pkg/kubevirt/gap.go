package kubevirt

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	k8stypes "k8s.io/apimachinery/pkg/types"
)

// LastFrameAnnotationPrefix starts the annotation (then the pod interface
// name) in which the source node's vmnicd writes, on the VMI, the time of
// the last frame the guest sent there during a live migration:
// "<migration UID> <RFC 3339 time>", or "<migration UID> none" when the
// guest sent nothing while the migration ran. The target node's vmnicd
// reads it to measure the migration's network gap.
const LastFrameAnnotationPrefix = "vmnic.io/last-frame."

// lastFrameNone is the time part of a report without a frame.
const lastFrameNone = "none"

// GapExchange passes a migration's last source frame from the source
// node's daemon to the target's. The Cluster source is one.
type GapExchange interface {
	// RunsIn reports whether pod is the launcher pod the VMI's guest runs
	// in (the source, while a migration is in flight).
	RunsIn(ns, vmi, pod string) bool
	// MovedAway reports whether the VMI's migration uid completed, with
	// pod as its source.
	MovedAway(ns, vmi, pod, uid string) bool
	// PublishLastFrame writes the source's report for the pod interface
	// ifName of migration uid; last is zero when the guest sent nothing.
	PublishLastFrame(ctx context.Context, ns, vmi, ifName, uid string, last time.Time) error
	// SourceLastFrame reads that report: ok is false until the source
	// wrote one for migration uid; last is zero when it saw no frame.
	SourceLastFrame(ns, vmi, ifName, uid string) (last time.Time, ok bool)
}

// FormatLastFrame is an annotation value.
func FormatLastFrame(uid string, last time.Time) string {
	if last.IsZero() {
		return uid + " " + lastFrameNone
	}
	return uid + " " + last.UTC().Format(time.RFC3339Nano)
}

// ParseLastFrame reads an annotation value of migration uid.
func ParseLastFrame(value, uid string) (last time.Time, ok bool) {
	got, at, found := strings.Cut(value, " ")
	if !found || got != uid || uid == "" {
		return time.Time{}, false
	}
	if at == lastFrameNone {
		return time.Time{}, true
	}
	t, err := time.Parse(time.RFC3339Nano, at)
	if err != nil {
		return time.Time{}, false
	}
	return t, true
}

// RunsIn implements GapExchange from the VMI's migration state: the
// target of the last migration that completed, else its source (a
// migration in flight, failed or aborted), else (never migrated) any pod.
func (c *Cluster) RunsIn(ns, vmi, pod string) bool {
	v := c.VMI(ns, vmi)
	if v == nil {
		return false
	}
	s := v.Status.MigrationState
	if s == nil {
		return true
	}
	if outcome(s) == MigrationSucceeded {
		return s.TargetPod == pod
	}
	return s.SourcePod == pod
}

// MovedAway implements GapExchange.
func (c *Cluster) MovedAway(ns, vmi, pod, uid string) bool {
	v := c.VMI(ns, vmi)
	if v == nil || uid == "" {
		return false
	}
	s := v.Status.MigrationState
	return s != nil && string(s.MigrationUID) == uid && leftPod(s, pod)
}

// PublishLastFrame implements GapExchange with a merge patch of the one
// annotation: the reports of a VM's other interfaces stay.
func (c *Cluster) PublishLastFrame(ctx context.Context, ns, vmi, ifName, uid string, last time.Time) error {
	patch, err := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": map[string]string{
		LastFrameAnnotationPrefix + ifName: FormatLastFrame(uid, last),
	}}})
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, c.opts.LiveReadTimeout)
	defer cancel()
	err = c.kv.Patch(k8stypes.MergePatchType).Namespace(ns).Resource("virtualmachineinstances").Name(vmi).Body(patch).Do(ctx).Error()
	if err != nil {
		return fmt.Errorf("annotate VMI %s/%s with its last frame on %s: %w", ns, vmi, ifName, err)
	}
	return nil
}

// SourceLastFrame implements GapExchange from the VMI cache.
func (c *Cluster) SourceLastFrame(ns, vmi, ifName, uid string) (time.Time, bool) {
	v := c.VMI(ns, vmi)
	if v == nil {
		return time.Time{}, false
	}
	value, ok := v.Annotations[LastFrameAnnotationPrefix+ifName]
	if !ok {
		return time.Time{}, false
	}
	return ParseLastFrame(value, uid)
}

// lastFrameAnnotations are the annotations of a VMI that trimVMI keeps.
func lastFrameAnnotations(all map[string]string) map[string]string {
	var out map[string]string
	for k, v := range all {
		if strings.HasPrefix(k, LastFrameAnnotationPrefix) {
			if out == nil {
				out = map[string]string{}
			}
			out[k] = v
		}
	}
	return out
}
