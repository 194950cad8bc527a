package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"sync/atomic"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"

	"github.com/vmnic/vmnic/daemon/install"
)

// removal tells whether this vmnicd's DaemonSet is being removed (helm
// uninstall, kubectl delete daemonset) rather than rolled or restarted. Then
// vmnicd, on SIGTERM, takes itself off the node: it unchains its entry and
// removes the shim it installed, so that the node's CNI is what it was
// before the install. On a rollout, a restart or a deleted pod the
// DaemonSet stays, and so do the chain and the shim: VM pods wait for the
// next vmnicd instead of starting unwired.
//
// An informer on the DaemonSet, started with vmnicd, sees its deletion as it
// happens: by the time the kubelet stops the pod, helm has also deleted the
// RBAC and the ServiceAccount, and vmnicd can no longer ask.
type removal struct {
	kube      kubernetes.Interface
	namespace string
	name      string // the DaemonSet
	gone      atomic.Bool
}

// watchRemoval finds the DaemonSet that controls pod namespace/name and
// watches it. It returns nil when the pod has no DaemonSet (vmnicd run by
// hand or by another controller).
func watchRemoval(ctx context.Context, cfg *rest.Config, namespace, name string) (*removal, error) {
	kube, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, err
	}
	pod, err := kube.CoreV1().Pods(namespace).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("own pod %s/%s: %w", namespace, name, err)
	}
	ref := metav1.GetControllerOf(pod)
	if ref == nil || ref.Kind != "DaemonSet" {
		return nil, nil
	}
	r := &removal{kube: kube, namespace: namespace, name: ref.Name}
	lw := cache.NewListWatchFromClient(kube.AppsV1().RESTClient(), "daemonsets", namespace, fields.OneTermEqualSelector("metadata.name", ref.Name))
	inf := cache.NewSharedIndexInformer(lw, &appsv1.DaemonSet{}, 0, cache.Indexers{})
	mark := func(obj any) {
		if ds, ok := obj.(*appsv1.DaemonSet); ok && ds.DeletionTimestamp != nil {
			r.gone.Store(true)
		}
	}
	if _, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    mark,
		UpdateFunc: func(_, obj any) { mark(obj) },
		DeleteFunc: func(any) { r.gone.Store(true) },
	}); err != nil {
		return nil, err
	}
	go inf.Run(ctx.Done())
	return r, nil
}

// removed reports whether the DaemonSet is deleted or being deleted: what
// the informer saw, else what the API server says now. When neither can
// tell (the API denies the question), the answer is no: staying chained is
// the safe side.
func (r *removal) removed() bool {
	if r.gone.Load() {
		return true
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	ds, err := r.kube.AppsV1().DaemonSets(r.namespace).Get(ctx, r.name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return true
	}
	return err == nil && ds.DeletionTimestamp != nil
}

// uninstall takes vmnic off the node: its entry out of the CNI configs,
// then the shim it installed out of the bin dir.
func uninstall(opts install.Options, log *slog.Logger) error {
	changed, err := install.Unchain(opts)
	if err != nil {
		return fmt.Errorf("unchain: %w", err)
	}
	removed, err := install.RemoveBinary(opts)
	if err != nil {
		return err
	}
	log.Info("DaemonSet removed: vmnic taken off the node", "unchained", changed, "shim removed", removed)
	return nil
}
