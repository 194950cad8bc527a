package node

import (
	"context"
	"fmt"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/vmnic/vmnic/test/kvoracle"
)

// VMIResource is KubeVirt's VirtualMachineInstance resource.
var VMIResource = schema.GroupVersionResource{Group: "kubevirt.io", Version: "v1", Resource: "virtualmachineinstances"}

// SchedulableLabel is the label virt-handler puts on nodes that run VMs;
// virt-launcher pods select it.
const SchedulableLabel = "kubevirt.io/schedulable"

// CreateVMI stores vmi (kubevirt.io/v1; KubeVirt's CRDs must be installed)
// and returns it as stored, with its UID.
func (n *Node) CreateVMI(ctx context.Context, vmi *kubevirtv1.VirtualMachineInstance) (*kubevirtv1.VirtualMachineInstance, error) {
	obj, err := runtime.DefaultUnstructuredConverter.ToUnstructured(vmi)
	if err != nil {
		return nil, err
	}
	u := &unstructured.Unstructured{Object: obj}
	u.SetAPIVersion("kubevirt.io/v1")
	u.SetKind("VirtualMachineInstance")
	created, err := n.Cluster.Dynamic.Resource(VMIResource).Namespace(vmi.Namespace).Create(ctx, u, metav1.CreateOptions{})
	if err != nil {
		return nil, fmt.Errorf("create VMI %s/%s: %w", vmi.Namespace, vmi.Name, err)
	}
	out := &kubevirtv1.VirtualMachineInstance{}
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(created.Object, out); err != nil {
		return nil, err
	}
	return out, nil
}

// LauncherPod returns the virt-launcher pod KubeVirt's virt-controller
// creates for vmi (asked of KubeVirt's own code, test/kvoracle), made
// runnable on this node. Everything vmnic and the scheduler read is
// KubeVirt's: metadata (generateName, labels, annotations, the VMI as
// controller owner), node selector, affinity, tolerations, hostname,
// security context. What this node cannot run is replaced: the containers
// become one "compute" container of the pause image (virt-launcher's image
// is not here; the tests boot the guest's QEMU into the pod's netns
// themselves), without the devices.kubevirt.io resources (no KubeVirt device
// plugin runs) and without KubeVirt's volumes and init containers.
func LauncherPod(ctx context.Context, vmi *kubevirtv1.VirtualMachineInstance, kv *kubevirtv1.KubeVirt, nads ...kvoracle.NAD) (*corev1.Pod, error) {
	pod, err := kvoracle.LauncherPod(ctx, kvoracle.LauncherInput{VMI: vmi, KubeVirt: kv, NADs: nads})
	if err != nil {
		return nil, err
	}
	spec := pod.Spec
	pod.Spec = corev1.PodSpec{
		NodeSelector:                  spec.NodeSelector,
		Affinity:                      spec.Affinity,
		Tolerations:                   spec.Tolerations,
		Hostname:                      spec.Hostname,
		Subdomain:                     spec.Subdomain,
		SecurityContext:               spec.SecurityContext,
		TerminationGracePeriodSeconds: ptr(int64(1)),
		AutomountServiceAccountToken:  spec.AutomountServiceAccountToken,
		DNSPolicy:                     spec.DNSPolicy,
		DNSConfig:                     spec.DNSConfig,
		SchedulerName:                 spec.SchedulerName,
		PriorityClassName:             spec.PriorityClassName,
		RestartPolicy:                 spec.RestartPolicy,
		Containers:                    []corev1.Container{{Name: "compute", Image: PauseImage, ImagePullPolicy: corev1.PullNever}},
	}
	return pod, nil
}

func ptr[T any](v T) *T { return &v }

// PlainPod is an ordinary pod of the pause image (imagePullPolicy Never)
// in namespace default.
func PlainPod(name string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default"},
		Spec: corev1.PodSpec{
			TerminationGracePeriodSeconds: ptr(int64(1)),
			Containers:                    []corev1.Container{{Name: "c", Image: PauseImage, ImagePullPolicy: corev1.PullNever}},
		},
	}
}

// LabelSchedulable labels the Node as virt-handler does on a node that can
// run VMs.
func (n *Node) LabelSchedulable(ctx context.Context) error {
	patch := []byte(`{"metadata":{"labels":{"` + SchedulableLabel + `":"true"}}}`)
	_, err := n.Kube.CoreV1().Nodes().Patch(ctx, n.Name, "application/merge-patch+json", patch, metav1.PatchOptions{})
	return err
}

// WaitPodReady waits until the pod is Ready and returns it.
func (n *Node) WaitPodReady(ctx context.Context, namespace, name string, timeout time.Duration) (*corev1.Pod, error) {
	return n.WaitPodReadyEvery(ctx, namespace, name, timeout, 100*time.Millisecond)
}

// WaitPodReadyEvery is WaitPodReady asking every interval (a benchmark
// timing pod starts asks often). On a timeout the error lists the pod's
// events.
func (n *Node) WaitPodReadyEvery(ctx context.Context, namespace, name string, timeout, interval time.Duration) (*corev1.Pod, error) {
	var pod *corev1.Pod
	err := n.poll(ctx, timeout, interval, "pod "+namespace+"/"+name+" Ready", func(ctx context.Context) (bool, string, error) {
		p, err := n.Kube.CoreV1().Pods(namespace).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, err.Error(), nil
		}
		for _, c := range p.Status.Conditions {
			if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
				pod = p
				return true, "", nil
			}
		}
		return false, fmt.Sprintf("phase %s, conditions %+v", p.Status.Phase, p.Status.Conditions), nil
	})
	if err != nil {
		var evs strings.Builder
		for _, e := range n.events(namespace, name) {
			fmt.Fprintf(&evs, "event %s %s: %s\n", e.Type, e.Reason, e.Message)
		}
		return nil, fmt.Errorf("%w\n%s", err, evs.String())
	}
	return pod, nil
}

// DeletePod deletes a pod and waits until it is gone (its sandbox stopped,
// CNI DEL done).
func (n *Node) DeletePod(ctx context.Context, namespace, name string, timeout time.Duration) error {
	if err := n.Kube.CoreV1().Pods(namespace).Delete(ctx, name, metav1.DeleteOptions{GracePeriodSeconds: ptr(int64(1))}); err != nil {
		return err
	}
	return n.poll(ctx, timeout, 100*time.Millisecond, "pod "+namespace+"/"+name+" gone", func(ctx context.Context) (bool, string, error) {
		_, err := n.Kube.CoreV1().Pods(namespace).Get(ctx, name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return true, "", nil
		}
		return false, fmt.Sprint(err), nil
	})
}

// events returns the events about the object namespace/name.
func (n *Node) events(namespace, name string) []corev1.Event {
	evs, err := n.Kube.CoreV1().Events(namespace).List(context.Background(), metav1.ListOptions{FieldSelector: "involvedObject.name=" + name})
	if err != nil {
		return nil
	}
	return evs.Items
}

// Events reports whether the object has an event with the reason.
func (n *Node) Events(namespace, name, reason string) bool {
	for _, e := range n.events(namespace, name) {
		if e.Reason == reason {
			return true
		}
	}
	return false
}

// ReadyWatch samples the Node's Ready condition until Stop.
type ReadyWatch struct {
	stop  chan struct{}
	done  chan struct{}
	worst time.Duration
}

// WatchReady polls the Node every 100 ms and records the longest span in
// which it was not Ready (an API error counts as not Ready only if the
// previous sample was not Ready either).
func (n *Node) WatchReady(ctx context.Context) *ReadyWatch {
	w := &ReadyWatch{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		var since time.Time // start of the current not-Ready span
		for {
			no, err := n.Kube.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
			now := time.Now()
			if err == nil {
				if ready, _ := NodeReady(no); ready {
					since = time.Time{}
				} else if since.IsZero() {
					since = now
				}
			}
			if !since.IsZero() && now.Sub(since) > w.worst {
				w.worst = now.Sub(since)
			}
			select {
			case <-w.stop:
				return
			case <-ctx.Done():
				return
			case <-time.After(100 * time.Millisecond):
			}
		}
	}()
	return w
}

// Stop ends the watch and returns the longest not-Ready span (0: always
// Ready).
func (w *ReadyWatch) Stop() time.Duration {
	close(w.stop)
	<-w.done
	return w.worst
}
