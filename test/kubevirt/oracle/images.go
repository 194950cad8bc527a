package oracle

import (
	"fmt"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	v1 "kubevirt.io/api/core/v1"

	"kubevirt.io/kubevirt/pkg/virt-operator/resource/generate/install"
	operatorutil "kubevirt.io/kubevirt/pkg/virt-operator/util"
)

// Images is every image reference virt-operator's install strategy names
// for one operator image and version: the containers and init containers of
// the Deployments and DaemonSets it creates, and the images it hands on in
// their environment (virt-launcher's, virt-exportserver's, ...). Component
// maps each reference to the component it came from ("virt-handler",
// "virt-handler/VIRT_LAUNCHER_IMAGE", ...).
type Images struct {
	Operator   string            `json:"operator"`
	References []string          `json:"references"`
	Component  map[string]string `json:"component"`
}

func imagesCmd(args []string) (any, error) {
	fs := newFlagSet("images")
	operatorImage := fs.String("operator-image", "", "virt-operator's own image (VIRT_OPERATOR_IMAGE)")
	version := fs.String("version", "", "KUBEVIRT_VERSION")
	namespace := fs.String("namespace", "kubevirt", "the KubeVirt CR's namespace")
	fs.required = append(fs.required, "operator-image", "version")
	if err := fs.parse(args); err != nil {
		return nil, err
	}
	return operatorImages(*operatorImage, *version, *namespace)
}

func operatorImages(operatorImage, version, namespace string) (*Images, error) {
	// KubeVirt's own map-backed EnvVarManager: the computation reads only
	// these variables, not this process's environment.
	env := &operatorutil.EnvVarManagerMock{}
	_ = env.Setenv(operatorutil.VirtOperatorImageEnvName, operatorImage)
	_ = env.Setenv(operatorutil.KubeVirtVersionEnvName, version)
	kv := &v1.KubeVirt{}
	kv.Namespace = namespace
	config := operatorutil.GetTargetConfigFromKVWithEnvVarManager(kv, env)
	strategy, err := install.GenerateCurrentInstallStrategy(config, "", namespace)
	if err != nil {
		return nil, fmt.Errorf("install strategy: %w", err)
	}
	out := &Images{Operator: operatorImage, Component: map[string]string{}}
	add := func(ref, from string) {
		if ref == "" {
			return
		}
		if _, ok := out.Component[ref]; !ok {
			out.Component[ref] = from
			out.References = append(out.References, ref)
		}
	}
	add(operatorImage, "virt-operator")
	pod := func(owner string, spec corev1.PodSpec) {
		for _, c := range slices.Concat(spec.InitContainers, spec.Containers) {
			add(c.Image, owner)
			for _, e := range c.Env {
				if strings.HasSuffix(e.Name, "_IMAGE") {
					add(e.Value, owner+"/"+e.Name)
				}
			}
		}
	}
	for _, d := range strategy.Deployments() {
		pod(d.Name, d.Spec.Template.Spec)
	}
	for _, d := range strategy.DaemonSets() {
		pod(d.Name, d.Spec.Template.Spec)
	}
	slices.Sort(out.References)
	return out, nil
}
