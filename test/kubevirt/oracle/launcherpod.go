package oracle

import (
	"fmt"

	v1 "kubevirt.io/api/core/v1"
)

func launcherPodCmd(args []string) (any, error) {
	fs := newFlagSet("launcher-pod")
	vmiPath := fs.file("vmi", "VirtualMachineInstance JSON `file`", true)
	in := fs.clusterInputs()
	if err := fs.parse(args); err != nil {
		return nil, err
	}
	var vmi v1.VirtualMachineInstance
	if err := readJSON(*vmiPath, &vmi); err != nil {
		return nil, fmt.Errorf("VMI: %w", err)
	}
	c, err := in.cluster()
	if err != nil {
		return nil, err
	}
	// Labels, annotations (the Multus ones from the network annotations
	// generator), generateName and the controller ownerReference all come
	// from RenderLaunchManifest.
	pod, err := c.templateService(emptyStore(), emptyStore(), emptyStore()).RenderLaunchManifest(&vmi)
	if err != nil {
		return nil, fmt.Errorf("render the launcher pod of VMI %s/%s: %w", vmi.Namespace, vmi.Name, err)
	}
	// The VMI controller's (private) createPod posts the pod to the VMI's
	// namespace.
	pod.Namespace = vmi.Namespace
	return pod, nil
}
