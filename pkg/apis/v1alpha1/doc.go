// Package v1alpha1 is vmnic's Kubernetes API, group vmnic.io, version
// v1alpha1. Its one kind, NodeNetworkCapability, is cluster-scoped and named
// after a node: vmnicd on that node probes what the node can wire (kernel
// features, Open vSwitch, Spiderpool, NICs) and publishes it there, with one
// condition per VM NIC mode saying whether the mode is usable and, when it is
// not, why. The node itself carries the same yes/no answers as labels and one
// extended resource per OVS bridge, so that the scheduler can place VMs; this
// package names those keys too.
//
// The CustomResourceDefinition is deploy/crds/vmnic.io_nodenetworkcapabilities.yaml;
// the DeepCopy methods are written by hand (deepcopy.go).
//
// +groupName=vmnic.io
package v1alpha1
