package kubevirt

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	kubevirtv1 "kubevirt.io/api/core/v1"
)

// ClusterOptions configure the API-server-backed Source.
type ClusterOptions struct {
	Config   *rest.Config
	NodeName string
	// Bindings are the KubeVirt binding names vmnic serves (default vmnic).
	Bindings []string
	// LiveReadTimeout bounds the direct read made on a cache miss.
	LiveReadTimeout time.Duration
	Resync          time.Duration
	Logger          *slog.Logger
}

// Cluster answers Lookup from informers scoped to its node, as
// virt-handler's are: the pods of this node (field selector), the VMIs
// that run on it and those migrating to it (KubeVirt's node labels), all
// trimmed to what vmnic reads, with a bounded live read when the cache
// has not seen an object yet (a pod created a moment ago, a VMI not yet
// scheduled). It watches no VMIM: VMIMs carry no node, and the VMI's
// status.migrationState says all vmnic needs of a migration. What one
// daemon receives and keeps grows with its own node, not with the cluster.
type Cluster struct {
	opts ClusterOptions
	kube kubernetes.Interface
	kv   rest.Interface
	pods cache.SharedIndexInformer
	// vmis: label kubevirt.io/nodeName=<node>; incoming: label
	// kubevirt.io/migrationTargetNodeName=<node>.
	vmis, incoming cache.SharedIndexInformer
	// departed are VMIs that left both (vmis.go).
	departed departedVMIs
	// trackers see each informer's lists and watches (Health).
	trackers []*watchTracker
	start    sync.Once
	ctx      context.Context
	changeState
}

// Scheme knows the KubeVirt types vmnic reads.
var Scheme = func() *runtime.Scheme {
	s := runtime.NewScheme()
	if err := kubevirtv1.AddToScheme(s); err != nil {
		panic(err)
	}
	metav1.AddToGroupVersion(s, kubevirtv1.SchemeGroupVersion)
	return s
}()

// KubeVirtClient is a REST client for kubevirt.io/v1.
func KubeVirtClient(cfg *rest.Config) (rest.Interface, error) {
	c := rest.CopyConfig(cfg)
	c.GroupVersion = &kubevirtv1.SchemeGroupVersion
	c.APIPath = "/apis"
	c.NegotiatedSerializer = serializer.NewCodecFactory(Scheme).WithoutConversion()
	if c.UserAgent == "" {
		c.UserAgent = "vmnicd"
	}
	return rest.RESTClientFor(c)
}

// NewCluster builds the source; Start runs its informers.
func NewCluster(opts ClusterOptions) (*Cluster, error) {
	if opts.NodeName == "" {
		return nil, errors.New("node name is required (--node-name or NODE_NAME)")
	}
	if len(opts.Bindings) == 0 {
		opts.Bindings = []string{DefaultBinding}
	}
	if opts.LiveReadTimeout == 0 {
		opts.LiveReadTimeout = 3 * time.Second
	}
	if opts.Resync == 0 {
		opts.Resync = 10 * time.Minute
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	kube, err := kubernetes.NewForConfig(opts.Config)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	kv, err := KubeVirtClient(opts.Config)
	if err != nil {
		return nil, fmt.Errorf("kubevirt client: %w", err)
	}
	c := &Cluster{opts: opts, kube: kube, kv: kv}
	onNode := fields.OneTermEqualSelector("spec.nodeName", opts.NodeName).String()
	if c.pods, err = c.informer(kube.CoreV1().RESTClient(), "pods", onNode, "", &corev1.Pod{}, trimPod); err != nil {
		return nil, err
	}
	runsHere := labels.Set{kubevirtv1.NodeNameLabel: opts.NodeName}.String()
	if c.vmis, err = c.informer(kv, "virtualmachineinstances", "", runsHere, &kubevirtv1.VirtualMachineInstance{}, trimVMI); err != nil {
		return nil, err
	}
	comesHere := labels.Set{kubevirtv1.MigrationTargetNodeNameLabel: opts.NodeName}.String()
	if c.incoming, err = c.informer(kv, "virtualmachineinstances", "", comesHere, &kubevirtv1.VirtualMachineInstance{}, trimVMI); err != nil {
		return nil, err
	}
	for _, inf := range []cache.SharedIndexInformer{c.vmis, c.incoming} {
		if _, err := inf.AddEventHandler(c.vmiEvents()); err != nil {
			return nil, err
		}
	}
	return c, nil
}

// informer builds the informer of resource (all namespaces) selected by
// fieldSel and labelSel through client, with a tracker between it and its
// ListWatch.
func (c *Cluster) informer(client rest.Interface, resource, fieldSel, labelSel string, obj runtime.Object, trim cache.TransformFunc) (cache.SharedIndexInformer, error) {
	lw := cache.NewFilteredListWatchFromClient(client, resource, metav1.NamespaceAll, func(o *metav1.ListOptions) {
		o.FieldSelector, o.LabelSelector = fieldSel, labelSel
	})
	t := newWatchTracker(lw, resource, client)
	t.selector = fieldSel + labelSel
	inf := cache.NewSharedIndexInformer(t, obj, c.opts.Resync,
		cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc})
	if err := inf.SetTransform(trim); err != nil {
		return nil, err
	}
	t.synced = inf.HasSynced
	c.trackers = append(c.trackers, t)
	return inf, nil
}

// Start runs the informers until ctx ends, which must be when the daemon
// ends: the caches are what migrations are decided on, long after the
// first sync. It does not wait; WaitForSync does. A second Start does
// nothing.
func (c *Cluster) Start(ctx context.Context) {
	c.start.Do(func() {
		c.changeMu.Lock()
		c.ctx = ctx
		c.changeMu.Unlock()
		for _, t := range c.trackers {
			t.started()
		}
		for _, inf := range []cache.SharedIndexInformer{c.pods, c.vmis, c.incoming} {
			go inf.Run(ctx.Done())
		}
	})
}

// runCtx is the context Start was given.
func (c *Cluster) runCtx() context.Context {
	c.changeMu.Lock()
	defer c.changeMu.Unlock()
	if c.ctx == nil {
		return context.Background()
	}
	return c.ctx
}

// WaitForSync waits up to timeout (or until ctx ends) for the informers'
// first sync. Its error names each informer not synced and the last error
// its list or watch met; the informers keep trying either way.
func (c *Cluster) WaitForSync(ctx context.Context, timeout time.Duration) error {
	wctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if cache.WaitForCacheSync(wctx.Done(), c.pods.HasSynced, c.vmis.HasSynced, c.incoming.HasSynced) {
		return nil
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	var missing []string
	for _, h := range c.Health() {
		if h.Synced {
			continue
		}
		m := h.Resource + " " + h.Selector
		if h.LastError != "" {
			m += " (" + h.LastError + ")"
		}
		missing = append(missing, m)
	}
	return fmt.Errorf("not synced within %s: %s", timeout, strings.Join(missing, "; "))
}

// Health reports each informer: pods, the VMIs on this node, the VMIs
// migrating to it.
func (c *Cluster) Health() []WatchHealth {
	out := make([]WatchHealth, 0, len(c.trackers))
	for _, t := range c.trackers {
		out = append(out, t.health())
	}
	return out
}

// Lookup implements Source.
func (c *Cluster) Lookup(ctx context.Context, q Query) (*Facts, error) {
	if !q.Pod.IsLauncherPod() {
		return &Facts{}, nil
	}
	pod, err := c.pod(ctx, q.Pod.Namespace, q.Pod.Name)
	if err != nil {
		return nil, err
	}
	vmiName := LauncherVMI(pod)
	if vmiName == "" {
		return &Facts{}, nil
	}
	vmi, err := c.vmi(ctx, pod.Namespace, vmiName)
	if err != nil {
		return nil, err
	}
	f, err := Resolve(pod, vmi, q.IfName, c.opts.Bindings)
	if err != nil {
		// An interface KubeVirt did not ask for is not vmnic's to wire.
		c.opts.Logger.Info("pod interface not mapped to a VMI interface; passing through", "pod", q.Pod.Namespace+"/"+q.Pod.Name, "ifname", q.IfName, "reason", err)
		return &Facts{}, nil
	}
	if m := f.Migration; m != nil {
		if s := vmi.Status.MigrationState; s != nil && m.UID != "" && string(s.MigrationUID) == m.UID {
			m.Phase = stage(s)
		}
	}
	return f, nil
}

func (c *Cluster) pod(ctx context.Context, ns, name string) (*corev1.Pod, error) {
	if obj, ok, err := c.pods.GetIndexer().GetByKey(ns + "/" + name); err == nil && ok {
		return obj.(*corev1.Pod), nil
	}
	ctx, cancel := context.WithTimeout(ctx, c.opts.LiveReadTimeout)
	defer cancel()
	pod, err := c.kube.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("read pod %s/%s: %w", ns, name, err)
	}
	return pod, nil
}

// vmi is the VMI of a launcher pod on this node: cached, or read at once
// (KubeVirt labels a VMI with its node, and with its migration target's,
// only once the launcher pod runs, after its sandbox is wired).
func (c *Cluster) vmi(ctx context.Context, ns, name string) (*kubevirtv1.VirtualMachineInstance, error) {
	if v := c.cachedVMI(ns + "/" + name); v != nil {
		return v, nil
	}
	vmi, err := c.readVMI(ctx, ns, name)
	if apierrors.IsNotFound(err) {
		return nil, fmt.Errorf("VMI %s/%s of the launcher pod does not exist: %w", ns, name, err)
	}
	if err != nil {
		return nil, fmt.Errorf("read VMI %s/%s: %w", ns, name, err)
	}
	return vmi, nil
}

// readVMI reads the VMI ns/name from the API server.
func (c *Cluster) readVMI(ctx context.Context, ns, name string) (*kubevirtv1.VirtualMachineInstance, error) {
	ctx, cancel := context.WithTimeout(ctx, c.opts.LiveReadTimeout)
	defer cancel()
	vmi := &kubevirtv1.VirtualMachineInstance{}
	if err := c.kv.Get().Namespace(ns).Resource("virtualmachineinstances").Name(name).Do(ctx).Into(vmi); err != nil {
		return nil, err
	}
	return vmi, nil
}

// trimPod keeps what vmnic reads, so that the cache of a node's pods stays
// small.
func trimPod(obj any) (any, error) {
	pod, ok := obj.(*corev1.Pod)
	if !ok {
		return obj, nil
	}
	ann := map[string]string{}
	for k, v := range pod.Annotations {
		if strings.HasPrefix(k, "kubevirt.io/") || strings.HasPrefix(k, "k8s.v1.cni.cncf.io/") || strings.HasPrefix(k, "v1.multus-cni.io/") || strings.HasPrefix(k, "ipam.spidernet.io/") {
			ann[k] = v
		}
	}
	lbl := map[string]string{}
	for k, v := range pod.Labels {
		if strings.HasPrefix(k, "kubevirt.io") || strings.HasPrefix(k, "vm.kubevirt.io/") {
			lbl[k] = v
		}
	}
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Name: pod.Name, Namespace: pod.Namespace, UID: pod.UID, ResourceVersion: pod.ResourceVersion,
			Labels: lbl, Annotations: ann, OwnerReferences: pod.OwnerReferences,
		},
		Spec:   corev1.PodSpec{NodeName: pod.Spec.NodeName},
		Status: corev1.PodStatus{Phase: pod.Status.Phase, PodIPs: pod.Status.PodIPs},
	}, nil
}

// trimVMI keeps the interfaces, networks, CPU, migration state and the
// sources' last-frame reports.
func trimVMI(obj any) (any, error) {
	vmi, ok := obj.(*kubevirtv1.VirtualMachineInstance)
	if !ok {
		return obj, nil
	}
	out := &kubevirtv1.VirtualMachineInstance{
		ObjectMeta: metav1.ObjectMeta{
			Name: vmi.Name, Namespace: vmi.Namespace, UID: vmi.UID, ResourceVersion: vmi.ResourceVersion,
			Labels: vmi.Labels, Annotations: lastFrameAnnotations(vmi.Annotations),
			DeletionTimestamp: vmi.DeletionTimestamp,
		},
	}
	out.Spec.Networks = vmi.Spec.Networks
	out.Spec.Domain.CPU = vmi.Spec.Domain.CPU
	out.Spec.Domain.Devices.Interfaces = vmi.Spec.Domain.Devices.Interfaces
	out.Spec.Domain.Devices.NetworkInterfaceMultiQueue = vmi.Spec.Domain.Devices.NetworkInterfaceMultiQueue
	out.Status.NodeName = vmi.Status.NodeName
	out.Status.Phase = vmi.Status.Phase
	out.Status.MigrationState = vmi.Status.MigrationState
	out.Status.Interfaces = vmi.Status.Interfaces
	return out, nil
}
