package v1alpha1

import (
	"maps"
	"slices"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
)

// The DeepCopy methods below are what deepcopy-gen would write; the test
// fills every field and checks that no copy shares memory with its source.

// DeepCopyInto copies in into out.
func (in *NodeNetworkCapability) DeepCopyInto(out *NodeNetworkCapability) {
	*out = *in
	out.TypeMeta = in.TypeMeta
	in.ObjectMeta.DeepCopyInto(&out.ObjectMeta)
	out.Spec = in.Spec
	in.Status.DeepCopyInto(&out.Status)
}

// DeepCopy returns a deep copy, nil for nil.
func (in *NodeNetworkCapability) DeepCopy() *NodeNetworkCapability {
	if in == nil {
		return nil
	}
	out := new(NodeNetworkCapability)
	in.DeepCopyInto(out)
	return out
}

// DeepCopyObject implements runtime.Object.
func (in *NodeNetworkCapability) DeepCopyObject() runtime.Object {
	if c := in.DeepCopy(); c != nil {
		return c
	}
	return nil
}

// DeepCopyInto copies in into out.
func (in *NodeNetworkCapabilityList) DeepCopyInto(out *NodeNetworkCapabilityList) {
	*out = *in
	out.TypeMeta = in.TypeMeta
	in.ListMeta.DeepCopyInto(&out.ListMeta)
	if in.Items != nil {
		out.Items = make([]NodeNetworkCapability, len(in.Items))
		for i := range in.Items {
			in.Items[i].DeepCopyInto(&out.Items[i])
		}
	}
}

// DeepCopy returns a deep copy, nil for nil.
func (in *NodeNetworkCapabilityList) DeepCopy() *NodeNetworkCapabilityList {
	if in == nil {
		return nil
	}
	out := new(NodeNetworkCapabilityList)
	in.DeepCopyInto(out)
	return out
}

// DeepCopyObject implements runtime.Object.
func (in *NodeNetworkCapabilityList) DeepCopyObject() runtime.Object {
	if c := in.DeepCopy(); c != nil {
		return c
	}
	return nil
}

// DeepCopyInto copies in into out.
func (in *NodeNetworkCapabilityStatus) DeepCopyInto(out *NodeNetworkCapabilityStatus) {
	*out = *in
	if in.Conditions != nil {
		out.Conditions = make([]metav1.Condition, len(in.Conditions))
		for i := range in.Conditions {
			in.Conditions[i].DeepCopyInto(&out.Conditions[i])
		}
	}
	in.Kernel.DeepCopyInto(&out.Kernel)
	in.OVS.DeepCopyInto(&out.OVS)
	out.Spiderpool = in.Spiderpool
	out.NICs = slices.Clone(in.NICs)
	in.ObservedAt.DeepCopyInto(&out.ObservedAt)
}

// DeepCopy returns a deep copy, nil for nil.
func (in *NodeNetworkCapabilityStatus) DeepCopy() *NodeNetworkCapabilityStatus {
	if in == nil {
		return nil
	}
	out := new(NodeNetworkCapabilityStatus)
	in.DeepCopyInto(out)
	return out
}

// DeepCopyInto copies in into out.
func (in *KernelFeatures) DeepCopyInto(out *KernelFeatures) {
	*out = *in
	out.Errors = maps.Clone(in.Errors)
}

// DeepCopyInto copies in into out.
func (in *OVSStatus) DeepCopyInto(out *OVSStatus) {
	*out = *in
	out.DatapathTypes = slices.Clone(in.DatapathTypes)
	out.Bridges = slices.Clone(in.Bridges)
}

// DeepCopy returns a deep copy, nil for nil.
func (in *KernelFeatures) DeepCopy() *KernelFeatures {
	if in == nil {
		return nil
	}
	out := new(KernelFeatures)
	in.DeepCopyInto(out)
	return out
}

// DeepCopy returns a deep copy, nil for nil.
func (in *OVSStatus) DeepCopy() *OVSStatus {
	if in == nil {
		return nil
	}
	out := new(OVSStatus)
	in.DeepCopyInto(out)
	return out
}
