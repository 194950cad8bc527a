package cluster

import (
	"context"
	"fmt"
	"strings"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

var sarResource = schema.GroupVersionResource{Group: "authorization.k8s.io", Version: "v1", Resource: "subjectaccessreviews"}

// Access is one authorization question: may User (in Groups) do Verb on
// Resource in Namespace?
type Access struct {
	User   string
	Groups []string
	Verb   string
	// Resource is "resource[.group][/subresource]": "pods", "nodes",
	// "virtualmachineinstances.kubevirt.io", "pods/status".
	Resource string
	// Namespace is empty for cluster-scoped resources (or all namespaces).
	Namespace string
	// Name optionally narrows the question to one object.
	Name string
}

// ServiceAccountUser returns the user name of a service account's tokens.
func ServiceAccountUser(namespace, name string) string {
	return "system:serviceaccount:" + namespace + ":" + name
}

// Can asks the API server's authorizer (a SubjectAccessReview) whether a is
// allowed.
func (c *Cluster) Can(ctx context.Context, a Access) (bool, error) {
	res, sub, _ := strings.Cut(a.Resource, "/")
	res, group, _ := strings.Cut(res, ".")
	groups := make([]any, 0, len(a.Groups))
	for _, g := range a.Groups {
		groups = append(groups, g)
	}
	sar := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "authorization.k8s.io/v1",
		"kind":       "SubjectAccessReview",
		"spec": map[string]any{
			"user":   a.User,
			"groups": groups,
			"resourceAttributes": map[string]any{
				"namespace":   a.Namespace,
				"verb":        a.Verb,
				"group":       group,
				"resource":    res,
				"subresource": sub,
				"name":        a.Name,
			},
		},
	}}
	out, err := c.Dynamic.Resource(sarResource).Create(ctx, sar, metav1.CreateOptions{})
	if err != nil {
		return false, fmt.Errorf("subjectaccessreview %+v: %w", a, err)
	}
	allowed, _, _ := unstructured.NestedBool(out.Object, "status", "allowed")
	return allowed, nil
}

// WaitCan waits (up to 10 s) until a is allowed. RBAC objects reach the
// authorizer's cache a moment after they are written: call it between
// applying Roles/Bindings and acting as their subject.
func (c *Cluster) WaitCan(ctx context.Context, a Access) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	for {
		ok, err := c.Can(ctx, a)
		if ok {
			return nil
		}
		select {
		case <-ctx.Done():
			if err == nil {
				err = fmt.Errorf("%s may not %s %s in %q", a.User, a.Verb, a.Resource, a.Namespace)
			}
			return fmt.Errorf("wait for access: %w (%w)", err, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}
