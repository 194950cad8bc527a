package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

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
// It asks once, on SIGTERM, and keeps no watch: a watch of the DaemonSet
// would be a fourth per node, beside the three scoped to the node, for an
// answer needed once. By the time the kubelet stops the pod of a release
// being uninstalled, helm has deleted the DaemonSet and then, at once, the
// release's RBAC and ServiceAccount, so the answer is often a denial: a
// question the daemon could ask when it started (findRemoval read its
// DaemonSet then) and may no longer ask means its release is gone.
type removal struct {
	kube      kubernetes.Interface
	namespace string
	name      string // the DaemonSet
}

// findRemoval finds the DaemonSet that controls pod namespace/name and
// reads it once, which proves vmnicd may. It returns nil when the pod has
// no DaemonSet (vmnicd run by hand or by another controller).
func findRemoval(ctx context.Context, cfg *rest.Config, namespace, name string) (*removal, error) {
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
	if _, err := kube.AppsV1().DaemonSets(namespace).Get(ctx, ref.Name, metav1.GetOptions{}); err != nil {
		return nil, fmt.Errorf("own DaemonSet %s/%s: %w", namespace, ref.Name, err)
	}
	return &removal{kube: kube, namespace: namespace, name: ref.Name}, nil
}

// removed reports whether the DaemonSet is deleted or being deleted, or
// whether the API server now denies vmnicd the read that findRemoval made
// (its ServiceAccount or RBAC deleted with the release). When the API
// server cannot be reached the answer is no: staying chained is the safe
// side.
func (r *removal) removed() bool {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	ds, err := r.kube.AppsV1().DaemonSets(r.namespace).Get(ctx, r.name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err), apierrors.IsUnauthorized(err), apierrors.IsForbidden(err):
		return true
	case err != nil:
		return false
	}
	return ds.DeletionTimestamp != nil
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
