package oracle

import (
	"fmt"
	"regexp"
	"strings"

	corev1 "k8s.io/api/core/v1"

	"kubevirt.io/kubevirt/pkg/virt-operator/resource/generate/components"
	"kubevirt.io/kubevirt/pkg/virt-operator/resource/generate/rbac"
	"kubevirt.io/kubevirt/tools/util"
)

// operatorStatic is the part of KubeVirt's release manifest
// kubevirt-operator.yaml (manifests/release/kubevirt-operator.yaml.in) that
// is written out in the template rather than generated: the namespace, the
// priority class and the kubevirt.io:operator cluster role.
const operatorStatic = `apiVersion: v1
kind: Namespace
metadata:
  labels:
    kubevirt.io: ""
    pod-security.kubernetes.io/enforce: "privileged"
  name: {{.Namespace}}
---
apiVersion: scheduling.k8s.io/v1
kind: PriorityClass
metadata:
  name: kubevirt-cluster-critical
value: 1000000000
globalDefault: false
description: "This priority class should be used for core kubevirt components only."
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: kubevirt.io:operator
  labels:
    operator.kubevirt.io: ""
    rbac.authorization.k8s.io/aggregate-to-admin: "true"
rules:
  - apiGroups:
      - kubevirt.io
    resources:
      - kubevirts
    verbs:
      - get
      - delete
      - create
      - update
      - patch
      - list
      - watch
      - deletecollection
`

// operatorImageRE is virt-operator's own (pkg/virt-operator/util/config.go).
var operatorImageRE = regexp.MustCompile(`^(.*)/(.*)virt-operator([@:].*)?$`)

// operatorCmd prints KubeVirt's kubevirt-operator.yaml for an operator
// image and version, made as KubeVirt's manifest-templator makes it: the
// template's static part, the KubeVirt CRD, the operator's RBAC and its
// Deployment, from KubeVirt's own generators.
func operatorCmd(args []string) (any, error) {
	fs := newFlagSet("operator")
	image := fs.String("operator-image", "", "virt-operator's image (REGISTRY/[PREFIX]virt-operator:TAG)")
	version := fs.String("version", "", "KubeVirt's version (KUBEVIRT_VERSION)")
	namespace := fs.String("namespace", "kubevirt", "KubeVirt's namespace")
	pullPolicy := fs.String("pull-policy", string(corev1.PullIfNotPresent), "the images' pull policy")
	verbosity := fs.String("verbosity", "2", "the operator's log verbosity")
	fs.required = append(fs.required, "operator-image", "version")
	if err := fs.parse(args); err != nil {
		return nil, err
	}
	m := operatorImageRE.FindStringSubmatch(*image)
	if m == nil {
		return nil, fmt.Errorf("operator image %q is not REGISTRY/[PREFIX]virt-operator[:TAG]", *image)
	}
	registry, prefix := m[1], m[2]
	var b strings.Builder
	b.WriteString(strings.ReplaceAll(operatorStatic, "{{.Namespace}}", *namespace))
	crd, err := components.NewKubeVirtCrd()
	if err != nil {
		return nil, fmt.Errorf("KubeVirt CRD: %w", err)
	}
	objs := []any{crd}
	objs = append(objs, rbac.GetAllOperator(*namespace)...)
	// As manifest-templator: no per-component image overrides, so
	// virt-operator derives every image from its own and the version.
	objs = append(objs, components.NewOperatorDeployment(*namespace, registry, prefix, *version, *verbosity,
		*version, "", "", "", "", "", "", "", "", "", "", "", "", "", *image, corev1.PullPolicy(*pullPolicy)))
	for _, o := range objs {
		b.WriteString("---\n")
		if err := util.MarshallObject(o, &b); err != nil {
			return nil, err
		}
	}
	return struct {
		Manifest string `json:"manifest"`
	}{b.String()}, nil
}
