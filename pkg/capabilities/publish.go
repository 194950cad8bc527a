package capabilities

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/api/validate/content"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/vmnic/vmnic/pkg/apis/v1alpha1"
)

// AnnotationManagedLabels lists (comma-separated) the node labels the
// publisher set last time: a label is removed only if it is listed there,
// so labels of the same prefix written by anyone else are left alone.
const AnnotationManagedLabels = v1alpha1.GroupName + "/capability-labels"

// publishAttempts bounds the read-modify-write retries of one Publish.
const publishAttempts = 4

// Publisher writes one node's findings: its NodeNetworkCapability, its mode
// labels and its OVS bridge resources. It only ever addresses the node it
// was made for.
//
// It needs, for that node: get and patch on nodes, patch on nodes/status,
// get and update on nodenetworkcapabilities and nodenetworkcapabilities/status,
// and create on nodenetworkcapabilities (RBAC cannot narrow create to a
// name).
type Publisher struct {
	node  string
	nncs  dynamic.ResourceInterface
	nodes nodeClient
	log   *slog.Logger
}

// nodeClient is the part of the typed Nodes client the publisher uses.
type nodeClient interface {
	Get(ctx context.Context, name string, opts metav1.GetOptions) (*corev1.Node, error)
	Patch(ctx context.Context, name string, pt types.PatchType, data []byte, opts metav1.PatchOptions, subresources ...string) (*corev1.Node, error)
}

// PublisherOptions configure NewPublisher.
type PublisherOptions struct {
	// NodeName is this node; required.
	NodeName string
	// Dynamic writes NodeNetworkCapabilities; required.
	Dynamic dynamic.Interface
	// Kube patches the Node; required.
	Kube kubernetes.Interface
	// Log (slog.Default()).
	Log *slog.Logger
}

// NewPublisher returns a publisher for opts.NodeName.
func NewPublisher(opts PublisherOptions) (*Publisher, error) {
	if opts.NodeName == "" {
		return nil, errors.New("capabilities publisher: node name is required")
	}
	if opts.Dynamic == nil || opts.Kube == nil {
		return nil, fmt.Errorf("capabilities publisher for node %q: API clients are required", opts.NodeName)
	}
	if opts.Log == nil {
		opts.Log = slog.Default()
	}
	return &Publisher{
		node:  opts.NodeName,
		nncs:  opts.Dynamic.Resource(v1alpha1.NodeNetworkCapabilitiesResource),
		nodes: opts.Kube.CoreV1().Nodes(),
		log:   opts.Log.With("node", opts.NodeName),
	}, nil
}

// NewPublisherForConfig builds the clients from cfg.
func NewPublisherForConfig(cfg *rest.Config, nodeName string, log *slog.Logger) (*Publisher, error) {
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("capabilities publisher for node %q: %w", nodeName, err)
	}
	kube, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("capabilities publisher for node %q: %w", nodeName, err)
	}
	return NewPublisher(PublisherOptions{NodeName: nodeName, Dynamic: dyn, Kube: kube, Log: log})
}

// NodeName is the node the publisher writes.
func (p *Publisher) NodeName() string { return p.node }

// Publish brings the node's NodeNetworkCapability, labels and bridge
// resources in line with r. It writes only what differs, so calling it again
// with the same report costs three reads.
func (p *Publisher) Publish(ctx context.Context, r Report) error {
	node, err := p.nodes.Get(ctx, p.node, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("get node %q: %w", p.node, err)
	}
	return errors.Join(
		p.publishObject(ctx, node, r),
		p.publishLabels(ctx, node, r),
		p.publishResources(ctx, node, r),
	)
}

// publishObject creates the NodeNetworkCapability if needed and updates its
// status through the status subresource.
func (p *Publisher) publishObject(ctx context.Context, node *corev1.Node, r Report) error {
	var lastErr error
	for range publishAttempts {
		cur, err := p.getOrCreate(ctx, node)
		if err != nil {
			return err
		}
		status := mergeStatus(cur.Status, r, cur.Generation)
		if equalStatus(cur.Status, status) {
			return nil
		}
		cur.Status = status
		obj, err := runtime.DefaultUnstructuredConverter.ToUnstructured(cur)
		if err != nil {
			return fmt.Errorf("encode nodenetworkcapability %q: %w", p.node, err)
		}
		_, err = p.nncs.UpdateStatus(ctx, &unstructured.Unstructured{Object: obj}, metav1.UpdateOptions{})
		if err == nil {
			p.log.Info("published node network capability", "modes", modeSummary(r))
			return nil
		}
		lastErr = fmt.Errorf("update status of nodenetworkcapability %q: %w", p.node, err)
		if !apierrors.IsConflict(err) && !apierrors.IsNotFound(err) {
			return lastErr
		}
	}
	return lastErr
}

func (p *Publisher) getOrCreate(ctx context.Context, node *corev1.Node) (*v1alpha1.NodeNetworkCapability, error) {
	u, err := p.nncs.Get(ctx, p.node, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		nnc := &v1alpha1.NodeNetworkCapability{
			TypeMeta: metav1.TypeMeta{APIVersion: v1alpha1.SchemeGroupVersion.String(), Kind: v1alpha1.KindNodeNetworkCapability},
			ObjectMeta: metav1.ObjectMeta{
				Name: p.node,
				// Goes with the node when the node is deleted.
				OwnerReferences: []metav1.OwnerReference{{
					APIVersion: "v1", Kind: "Node", Name: node.Name, UID: node.UID,
				}},
			},
			Spec: v1alpha1.NodeNetworkCapabilitySpec{NodeName: p.node},
		}
		obj, cerr := runtime.DefaultUnstructuredConverter.ToUnstructured(nnc)
		if cerr != nil {
			return nil, fmt.Errorf("encode nodenetworkcapability %q: %w", p.node, cerr)
		}
		u, err = p.nncs.Create(ctx, &unstructured.Unstructured{Object: obj}, metav1.CreateOptions{})
		if apierrors.IsAlreadyExists(err) {
			u, err = p.nncs.Get(ctx, p.node, metav1.GetOptions{})
		}
		if err == nil {
			p.log.Info("created node network capability object")
		}
	}
	if err != nil {
		return nil, fmt.Errorf("get or create nodenetworkcapability %q: %w", p.node, err)
	}
	var cur v1alpha1.NodeNetworkCapability
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, &cur); err != nil {
		return nil, fmt.Errorf("decode nodenetworkcapability %q: %w", p.node, err)
	}
	return &cur, nil
}

// mergeStatus is r as the object's new status: a condition whose status did
// not change keeps its lastTransitionTime; when nothing but timestamps
// changed, the published observedAt stays too.
func mergeStatus(cur, r Report, generation int64) Report {
	out := *r.DeepCopy()
	for i := range out.Conditions {
		c := &out.Conditions[i]
		c.ObservedGeneration = generation
		for _, old := range cur.Conditions {
			if old.Type == c.Type && old.Status == c.Status {
				c.LastTransitionTime = old.LastTransitionTime
			}
		}
	}
	if Same(cur, out) {
		out.ObservedAt = cur.ObservedAt
	}
	return out
}

// equalStatus compares statuses exactly, timestamps included, at the
// second precision the API stores.
func equalStatus(a, b Report) bool {
	ja, errA := json.Marshal(a)
	jb, errB := json.Marshal(b)
	return errA == nil && errB == nil && string(ja) == string(jb)
}

func modeSummary(r Report) string {
	parts := make([]string, 0, len(r.Conditions))
	for _, c := range r.Conditions {
		parts = append(parts, c.Type+"="+string(c.Status))
	}
	return strings.Join(parts, ",")
}

// Labels are the node labels for r: one per mode, "true" or "false".
func Labels(r Report) map[string]string {
	out := make(map[string]string, len(v1alpha1.ModeLabels))
	for cond, label := range v1alpha1.ModeLabels {
		out[label] = strconv.FormatBool(Ready(r, cond))
	}
	return out
}

// publishLabels sets the mode labels with a merge patch on the node,
// removing labels it set before that are no longer wanted.
func (p *Publisher) publishLabels(ctx context.Context, node *corev1.Node, r Report) error {
	want := Labels(r)
	labels := map[string]any{}
	for k, v := range want {
		if cur, ok := node.Labels[k]; !ok || cur != v {
			labels[k] = v
		}
	}
	for _, k := range strings.Split(node.Annotations[AnnotationManagedLabels], ",") {
		if _, keep := want[k]; !keep && k != "" {
			if _, ok := node.Labels[k]; ok {
				labels[k] = nil
			}
		}
	}
	managed := strings.Join(slices.Sorted(maps.Keys(want)), ",")
	if len(labels) == 0 && node.Annotations[AnnotationManagedLabels] == managed {
		return nil
	}
	patch, err := json.Marshal(map[string]any{"metadata": map[string]any{
		"labels":      labels,
		"annotations": map[string]any{AnnotationManagedLabels: managed},
	}})
	if err != nil {
		return fmt.Errorf("labels patch for node %q: %w", p.node, err)
	}
	if _, err := p.nodes.Patch(ctx, p.node, types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		return fmt.Errorf("patch labels of node %q: %w", p.node, err)
	}
	p.log.Info("node labels updated", "changed", labels)
	return nil
}

// BridgeResources are the node's extended resources for r: one
// ovs.vmnic.io/<bridge> per bridge of a reachable OVS. A bridge whose name
// does not make a valid resource name is left out.
func BridgeResources(r Report) (map[corev1.ResourceName]resource.Quantity, []string) {
	out := map[corev1.ResourceName]resource.Quantity{}
	var skipped []string
	if !r.OVS.Reachable {
		return out, nil
	}
	for _, b := range r.OVS.Bridges {
		name := v1alpha1.OVSBridgeResourcePrefix + b.Name
		if errs := content.IsLabelKey(name); len(errs) > 0 {
			skipped = append(skipped, fmt.Sprintf("%s: %s", b.Name, strings.Join(errs, "; ")))
			continue
		}
		out[corev1.ResourceName(name)] = resource.MustParse(v1alpha1.OVSBridgeCapacity)
	}
	return out, skipped
}

// jsonPatchOp is one RFC 6902 operation.
type jsonPatchOp struct {
	Op    string `json:"op"`
	Path  string `json:"path"`
	Value any    `json:"value,omitempty"`
}

// publishResources sets the bridge resources in the node's status capacity
// with a JSON patch on nodes/status, removing ovs.vmnic.io/ resources of
// bridges that are gone. A patch that fails because the node changed under
// it (a resource removed meanwhile) is retried on a fresh read.
func (p *Publisher) publishResources(ctx context.Context, node *corev1.Node, r Report) error {
	want, skipped := BridgeResources(r)
	if len(skipped) > 0 {
		p.log.Warn("OVS bridges without a valid resource name", "bridges", skipped)
	}
	var lastErr error
	for attempt := range publishAttempts {
		if attempt > 0 {
			var err error
			if node, err = p.nodes.Get(ctx, p.node, metav1.GetOptions{}); err != nil {
				return fmt.Errorf("get node %q: %w", p.node, err)
			}
		}
		ops := resourceOps(node.Status.Capacity, want)
		if len(ops) == 0 {
			return nil
		}
		patch, err := json.Marshal(ops)
		if err != nil {
			return fmt.Errorf("capacity patch for node %q: %w", p.node, err)
		}
		_, err = p.nodes.Patch(ctx, p.node, types.JSONPatchType, patch, metav1.PatchOptions{}, "status")
		if err == nil {
			p.log.Info("node bridge resources updated", "patch", string(patch))
			return nil
		}
		lastErr = fmt.Errorf("patch capacity of node %q: %w", p.node, err)
		if !apierrors.IsInvalid(err) && !apierrors.IsConflict(err) && !apierrors.IsBadRequest(err) {
			return lastErr
		}
	}
	return lastErr
}

// resourceOps are the JSON patch operations that take capacity's
// ovs.vmnic.io/ resources to want, in a stable order.
func resourceOps(capacity corev1.ResourceList, want map[corev1.ResourceName]resource.Quantity) []jsonPatchOp {
	var ops []jsonPatchOp
	if capacity == nil && len(want) > 0 {
		ops = append(ops, jsonPatchOp{Op: "add", Path: "/status/capacity", Value: map[string]string{}})
	}
	for _, name := range slices.Sorted(maps.Keys(capacity)) {
		if _, ok := want[name]; !ok && strings.HasPrefix(string(name), v1alpha1.OVSBridgeResourcePrefix) {
			ops = append(ops, jsonPatchOp{Op: "remove", Path: capacityPath(name)})
		}
	}
	for _, name := range slices.Sorted(maps.Keys(want)) {
		q := want[name]
		if cur, ok := capacity[name]; !ok || cur.Cmp(q) != 0 {
			ops = append(ops, jsonPatchOp{Op: "add", Path: capacityPath(name), Value: q.String()})
		}
	}
	return ops
}

// capacityPath is the JSON pointer to one capacity entry (RFC 6901 escapes
// "~" and "/").
func capacityPath(name corev1.ResourceName) string {
	return "/status/capacity/" + strings.NewReplacer("~", "~0", "/", "~1").Replace(string(name))
}
