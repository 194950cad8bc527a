// Package kvoracle lets vmnic's tests ask KubeVirt what it does instead of
// deciding it themselves: it runs kubevirt-oracle, a command built from the
// test/kubevirt module around KubeVirt's own code at a pinned release
// (kubevirt.io/kubevirt v1.8.2), and decodes its answers. The command lives in
// a module of its own because KubeVirt pins the Kubernetes libraries to
// other versions than vmnic's; JSON is the wire format between the two.
package kvoracle

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/vmnic/vmnic/test/cluster"
)

// BinaryName is the oracle's name for test/tools/build.sh.
const BinaryName = "kubevirt-oracle"

var (
	binMu   sync.Mutex
	binPath string
)

// Bin returns the path of the kubevirt-oracle binary, building it through
// test/tools/build.sh into the repository's .tools/bin when it is missing or
// stale (about 4 minutes on 2 cores with a cold Go build cache, seconds with
// a warm one, well under a second when up to date). Build progress goes to
// os.Stderr.
func Bin(ctx context.Context) (string, error) {
	binMu.Lock()
	defer binMu.Unlock()
	if binPath != "" {
		return binPath, nil
	}
	paths, err := cluster.Binaries(ctx, BinaryName)
	if err != nil {
		return "", fmt.Errorf("build %s: %w", BinaryName, err)
	}
	binPath = paths[0]
	return binPath, nil
}

// DomainInput is what the domain question needs: the pod's network
// namespace as vmnic wired it, the VMI, and the binding plugins as the
// KubeVirt CR registers them (spec.configuration.network.binding).
type DomainInput struct {
	Netns    string
	VMI      *kubevirtv1.VirtualMachineInstance
	Bindings map[string]kubevirtv1.InterfaceBindingPlugin
}

// DomainInterface is one interface of the libvirt domain virt-launcher
// defines for a tap-attached NIC. Name is the VMI interface; PodInterface
// the pod interface KubeVirt found for its network ("" when none).
type DomainInterface struct {
	Name         string `json:"name"`
	PodInterface string `json:"podInterface"`
	Type         string `json:"type"`
	MAC          string `json:"mac"`
	Target       string `json:"target"`
	// Source is a vhost-user interface's device (passt's pod interface).
	Source    string `json:"source,omitempty"`
	MTU       int    `json:"mtu"`
	Model     string `json:"model"`
	Queues    uint   `json:"queues"`
	LinkState string `json:"linkState"`
}

// Domain returns the domain interfaces virt-launcher derives from the pod
// network namespace in.Netns. Only binding plugins are in scope: a VMI
// with core masquerade or bridge interfaces is an error.
func Domain(ctx context.Context, in DomainInput) ([]DomainInterface, error) {
	var out struct {
		Interfaces []DomainInterface `json:"interfaces"`
	}
	bindings := in.Bindings
	if bindings == nil {
		bindings = map[string]kubevirtv1.InterfaceBindingPlugin{}
	}
	err := run(ctx, "domain", []input{{"vmi", in.VMI}, {"bindings", bindings}}, &out, "-netns", in.Netns)
	return out.Interfaces, err
}

// NetworkNames are the names KubeVirt derives for one VMI network in its
// hashed and ordinal pod interface naming schemes.
type NetworkNames struct {
	Network       string `json:"network"`
	Hashed        string `json:"hashed"`
	Ordinal       string `json:"ordinal"`
	TapHashed     string `json:"tapHashed"`
	TapOrdinal    string `json:"tapOrdinal"`
	BridgeHashed  string `json:"bridgeHashed"`
	NicHashed     string `json:"nicHashed"`
	BridgeOrdinal string `json:"bridgeOrdinal"`
	NicOrdinal    string `json:"nicOrdinal"`
	// Secondary: a Multus network that is not the default network.
	Secondary bool `json:"secondary"`
}

// Names returns KubeVirt's names for each of the VMI's networks, in order.
func Names(ctx context.Context, vmi *kubevirtv1.VirtualMachineInstance) ([]NetworkNames, error) {
	var out struct {
		Networks []NetworkNames `json:"networks"`
	}
	err := run(ctx, "names", []input{{"vmi", vmi}}, &out)
	return out.Networks, err
}

// NAD is a NetworkAttachmentDefinition (k8s.cni.cncf.io/v1) as the oracle
// reads it; its annotations carry the device plugin resource name.
type NAD struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              NADSpec `json:"spec"`
}

// NADSpec is a NetworkAttachmentDefinition's spec.
type NADSpec struct {
	Config string `json:"config,omitempty"`
}

// LauncherInput is what the launcher pod question needs. KubeVirt is the
// KubeVirt CR whose spec.configuration virt-controller runs with (an empty
// configuration when nil); NADs are the NetworkAttachmentDefinitions of
// the VMI's Multus networks, which virt-controller looks up.
type LauncherInput struct {
	VMI      *kubevirtv1.VirtualMachineInstance
	KubeVirt *kubevirtv1.KubeVirt
	NADs     []NAD
}

// LauncherPod returns the virt-launcher pod virt-controller creates for
// the VMI, as posted to the API server (name still to be generated from
// generateName).
func LauncherPod(ctx context.Context, in LauncherInput) (*corev1.Pod, error) {
	var pod corev1.Pod
	inputs := append([]input{{"vmi", in.VMI}}, clusterInputs(in.KubeVirt, in.NADs)...)
	if err := run(ctx, "launcher-pod", inputs, &pod); err != nil {
		return nil, err
	}
	return &pod, nil
}

// TargetInput is what the migration target pod question needs. The VMI
// must be Running with status.nodeName and status.selinuxContext set; the
// VMIM must have a UID and its phase unset or Pending; SourcePod is the
// VMI's virt-launcher pod on status.nodeName (see the oracle's package doc
// in test/kubevirt/oracle for the whole list).
type TargetInput struct {
	VMI       *kubevirtv1.VirtualMachineInstance
	VMIM      *kubevirtv1.VirtualMachineInstanceMigration
	SourcePod *corev1.Pod
	// Node is the VMI's node; a bare Node of that name when nil.
	Node     *corev1.Node
	KubeVirt *kubevirtv1.KubeVirt
	NADs     []NAD
}

// TargetPod returns the migration target pod KubeVirt's migration
// controller creates for in.VMIM.
func TargetPod(ctx context.Context, in TargetInput) (*corev1.Pod, error) {
	inputs := []input{{"vmi", in.VMI}, {"vmim", in.VMIM}, {"source-pod", in.SourcePod}}
	if in.Node != nil {
		inputs = append(inputs, input{"node", in.Node})
	}
	inputs = append(inputs, clusterInputs(in.KubeVirt, in.NADs)...)
	var pod corev1.Pod
	if err := run(ctx, "target-pod", inputs, &pod); err != nil {
		return nil, err
	}
	return &pod, nil
}

func clusterInputs(kv *kubevirtv1.KubeVirt, nads []NAD) []input {
	var in []input
	if kv != nil {
		in = append(in, input{"kubevirt", kv})
	}
	if len(nads) > 0 {
		in = append(in, input{"nads", nads})
	}
	return in
}

// input is one JSON input file, passed as -flag FILE.
type input struct {
	flag  string
	value any
}

// run runs one oracle subcommand with its inputs written to files and
// decodes its stdout into out.
func run(ctx context.Context, sub string, inputs []input, out any, extraArgs ...string) error {
	bin, err := Bin(ctx)
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "kvoracle-")
	if err != nil {
		return fmt.Errorf("oracle %s: input directory: %w", sub, err)
	}
	defer func() { _ = os.RemoveAll(dir) }()
	args := []string{sub}
	for _, in := range inputs {
		data, err := json.Marshal(in.value)
		if err != nil {
			return fmt.Errorf("oracle %s: encode -%s: %w", sub, in.flag, err)
		}
		path := filepath.Join(dir, in.flag+".json")
		if err := os.WriteFile(path, data, 0o600); err != nil {
			return fmt.Errorf("oracle %s: write -%s: %w", sub, in.flag, err)
		}
		args = append(args, "-"+in.flag, path)
	}
	args = append(args, extraArgs...)
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("oracle %s: %w: %s", sub, err, lastLines(stderr.String(), 20))
	}
	if err := json.Unmarshal(stdout.Bytes(), out); err != nil {
		return fmt.Errorf("oracle %s: decode its answer %q: %w", sub, stdout.String(), err)
	}
	return nil
}

// lastLines keeps the tail of a log that may be long (KubeVirt's).
func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// OperatorManifest returns KubeVirt's kubevirt-operator.yaml for the
// operator image and version, as KubeVirt's manifest-templator makes it:
// the namespace, the KubeVirt CRD, the operator's RBAC and Deployment.
func OperatorManifest(ctx context.Context, operatorImage, version, namespace string) ([]byte, error) {
	var out struct {
		Manifest string `json:"manifest"`
	}
	if err := run(ctx, "operator", nil, &out, "-operator-image", operatorImage, "-version", version, "-namespace", namespace); err != nil {
		return nil, err
	}
	return []byte(out.Manifest), nil
}

// OperatorImages are the image references virt-operator's install strategy
// names for an operator image and version, and the component each is for.
type OperatorImages struct {
	References []string          `json:"references"`
	Component  map[string]string `json:"component"`
}

// Images asks KubeVirt's install strategy which images virt-operator
// deploys for the operator image and version.
func Images(ctx context.Context, operatorImage, version, namespace string) (*OperatorImages, error) {
	var out OperatorImages
	if err := run(ctx, "images", nil, &out, "-operator-image", operatorImage, "-version", version, "-namespace", namespace); err != nil {
		return nil, err
	}
	return &out, nil
}
