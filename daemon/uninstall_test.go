package daemon

import (
	"errors"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
)

// TestRemovalDecision: vmnicd takes itself off the node when its
// DaemonSet is deleted or being deleted, or when the API server denies it
// the read it could make at its start (its release's RBAC or
// ServiceAccount deleted); when the API server cannot be reached, it
// stays chained.
func TestRemovalDecision(t *testing.T) {
	now := metav1.Now()
	ds := func(deleting bool) *appsv1.DaemonSet {
		d := &appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Name: "vmnic", Namespace: "kube-system"}}
		if deleting {
			d.DeletionTimestamp = &now
			d.Finalizers = []string{"foregroundDeletion"}
		}
		return d
	}
	for _, tc := range []struct {
		name    string
		objects []runtime.Object
		getErr  error // the API server's answer to GET instead of the object
		want    bool
	}{
		{name: "DaemonSet there", objects: []runtime.Object{ds(false)}, want: false},
		{name: "DaemonSet being deleted", objects: []runtime.Object{ds(true)}, want: true},
		{name: "DaemonSet gone", want: true},
		{name: "RBAC gone", getErr: apierrors.NewForbidden(schema.GroupResource{Group: "apps", Resource: "daemonsets"}, "vmnic", nil), want: true},
		{name: "ServiceAccount gone", getErr: apierrors.NewUnauthorized("token"), want: true},
		{name: "API server unreachable", objects: []runtime.Object{ds(false)}, getErr: errors.New("dial tcp: connection refused"), want: false},
		{name: "API server overloaded", objects: []runtime.Object{ds(false)}, getErr: apierrors.NewTooManyRequests("later", 1), want: false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			kube := fake.NewClientset(tc.objects...)
			if tc.getErr != nil {
				kube.PrependReactor("get", "daemonsets", func(k8stesting.Action) (bool, runtime.Object, error) {
					return true, nil, tc.getErr
				})
			}
			r := &removal{kube: kube, namespace: "kube-system", name: "vmnic"}
			if got := r.removed(); got != tc.want {
				t.Errorf("removed() = %v, want %v", got, tc.want)
			}
		})
	}
}
