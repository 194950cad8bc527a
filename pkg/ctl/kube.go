package ctl

import (
	"context"
	"errors"
	"fmt"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/vmnic/vmnic/pkg/apis/v1alpha1"
)

// The resources vmnicctl reads.
var (
	NADResource        = schema.GroupVersionResource{Group: "k8s.cni.cncf.io", Version: "v1", Resource: "network-attachment-definitions"}
	SpiderIPPoolRes    = schema.GroupVersionResource{Group: "spiderpool.spidernet.io", Version: "v2beta1", Resource: "spiderippools"}
	SpiderMultusRes    = schema.GroupVersionResource{Group: "spiderpool.spidernet.io", Version: "v2beta1", Resource: "spidermultusconfigs"}
	KubeVirtResource   = schema.GroupVersionResource{Group: "kubevirt.io", Version: "v1", Resource: "kubevirts"}
	CapabilityResource = v1alpha1.NodeNetworkCapabilitiesResource
)

// ErrNoCluster means no kubeconfig was found and vmnicctl is not in a pod.
var ErrNoCluster = errors.New("no cluster configured: no kubeconfig (--kubeconfig, KUBECONFIG, ~/.kube/config) and not running in a pod")

// RestConfig loads the client config the way kubectl does: --kubeconfig,
// else KUBECONFIG, else ~/.kube/config, else the in-cluster config;
// context overrides the current context.
func RestConfig(kubeconfig, kubeContext string) (*rest.Config, error) {
	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	if kubeconfig != "" {
		rules.ExplicitPath = kubeconfig
	}
	overrides := &clientcmd.ConfigOverrides{CurrentContext: kubeContext}
	cfg, err := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, overrides).ClientConfig()
	if err != nil {
		if clientcmd.IsEmptyConfig(err) {
			return nil, ErrNoCluster
		}
		return nil, fmt.Errorf("load kubeconfig: %w", err)
	}
	cfg = rest.CopyConfig(cfg)
	if cfg.UserAgent == "" {
		cfg.UserAgent = "vmnicctl/" + Version()
	}
	return cfg, nil
}

// Reader is what vmnicctl reads from the API server; a fake serves the
// tests of the decisions.
type Reader interface {
	// Served reports whether the API server serves the resource.
	Served(ctx context.Context, gvr schema.GroupVersionResource) (bool, error)
	// List returns the objects of the resource in every namespace.
	List(ctx context.Context, gvr schema.GroupVersionResource) ([]unstructured.Unstructured, error)
	// Get returns one cluster-scoped object.
	Get(ctx context.Context, gvr schema.GroupVersionResource, name string) (*unstructured.Unstructured, error)
}

// ClusterReader reads a real API server through discovery and a dynamic
// client.
type ClusterReader struct {
	Discovery discovery.DiscoveryInterface
	Dynamic   dynamic.Interface
	// Host is the API server's URL, for messages.
	Host string
}

// NewClusterReader builds a ClusterReader for cfg.
func NewClusterReader(cfg *rest.Config) (*ClusterReader, error) {
	disc, err := discovery.NewDiscoveryClientForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("discovery client: %w", err)
	}
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("dynamic client: %w", err)
	}
	return &ClusterReader{Discovery: disc, Dynamic: dyn, Host: cfg.Host}, nil
}

// Served asks discovery for the resource's group version.
func (c *ClusterReader) Served(_ context.Context, gvr schema.GroupVersionResource) (bool, error) {
	list, err := c.Discovery.ServerResourcesForGroupVersion(gvr.GroupVersion().String())
	if apierrors.IsNotFound(err) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("discover %s: %w", gvr.GroupVersion(), err)
	}
	for _, r := range list.APIResources {
		if r.Name == gvr.Resource {
			return true, nil
		}
	}
	return false, nil
}

// List lists the resource in all namespaces (all pages).
func (c *ClusterReader) List(ctx context.Context, gvr schema.GroupVersionResource) ([]unstructured.Unstructured, error) {
	var out []unstructured.Unstructured
	opts := metav1.ListOptions{Limit: 500}
	for {
		l, err := c.Dynamic.Resource(gvr).List(ctx, opts)
		if err != nil {
			return nil, fmt.Errorf("list %s: %w", gvr.GroupResource(), err)
		}
		out = append(out, l.Items...)
		if l.GetContinue() == "" {
			return out, nil
		}
		opts.Continue = l.GetContinue()
	}
}

// Get reads one cluster-scoped object.
func (c *ClusterReader) Get(ctx context.Context, gvr schema.GroupVersionResource, name string) (*unstructured.Unstructured, error) {
	u, err := c.Dynamic.Resource(gvr).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("get %s %s: %w", gvr.GroupResource(), name, err)
	}
	return u, nil
}
