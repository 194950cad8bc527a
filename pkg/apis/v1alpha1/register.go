package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// GroupName is the API group of vmnic's kinds.
const GroupName = "vmnic.io"

// Version is this package's API version.
const Version = "v1alpha1"

// SchemeGroupVersion is group vmnic.io, version v1alpha1.
var SchemeGroupVersion = schema.GroupVersion{Group: GroupName, Version: Version}

// Resource names and the kind.
const (
	KindNodeNetworkCapability         = "NodeNetworkCapability"
	ResourceNodeNetworkCapabilities   = "nodenetworkcapabilities"
	SingularNodeNetworkCapability     = "nodenetworkcapability"
	ShortNameNodeNetworkCapability    = "nnc"
	ListKindNodeNetworkCapabilityList = "NodeNetworkCapabilityList"
)

// NodeNetworkCapabilitiesResource is the resource for dynamic clients.
var NodeNetworkCapabilitiesResource = SchemeGroupVersion.WithResource(ResourceNodeNetworkCapabilities)

var (
	// SchemeBuilder registers this package's kinds.
	SchemeBuilder = runtime.NewSchemeBuilder(addKnownTypes)
	// AddToScheme adds this package's kinds to a scheme.
	AddToScheme = SchemeBuilder.AddToScheme
)

func addKnownTypes(s *runtime.Scheme) error {
	s.AddKnownTypes(SchemeGroupVersion, &NodeNetworkCapability{}, &NodeNetworkCapabilityList{})
	metav1.AddToGroupVersion(s, SchemeGroupVersion)
	return nil
}
