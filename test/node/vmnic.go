package node

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/vmnic/vmnic/test/cluster"
)

// Vmnic's release on the node.
const (
	// Release is the Helm release name; the DaemonSet is called so too.
	Release = "vmnic"
	// Namespace is the release's namespace.
	Namespace = "kube-system"
)

// VmnicRunDir and VmnicStateDir are the chart's node.runDir and
// node.stateDir on this node (private, under Dir).
func (n *Node) VmnicRunDir() string   { return filepath.Join(n.Dir, "vmnic", "run") }
func (n *Node) VmnicStateDir() string { return filepath.Join(n.Dir, "vmnic", "state") }

// OVSRunDir and SpiderpoolSocketDir are the chart's openvswitch.runDir and
// spiderpool.socketDir on this node.
func (n *Node) OVSRunDir() string           { return filepath.Join(n.Dir, "openvswitch") }
func (n *Node) SpiderpoolSocketDir() string { return filepath.Join(n.Dir, "spidernet") }

// ChartValues are the --set values that use the image img (imported,
// imagePullPolicy Never) and the CNI and pod netns directories as
// containerd names them, and put the chart's other host paths under Dir. A
// node container has a /run and /var/lib of its own, where the chart's
// defaults go, and its CNI and netns directories at the same paths on
// every node container: its values serve one release for all of them.
func (n *Node) ChartValues(img *VmnicImage) []string {
	bin, conf := n.RuntimeCNIDirs()
	vals := []string{
		"image.repository=" + img.Repository,
		"image.tag=" + img.Tag,
		"image.pullPolicy=Never",
		"cni.binDir=" + bin,
		"cni.confDir=" + conf,
		"cni.netnsDirs={" + n.RuntimeNetnsDir() + "}",
		"daemon.logLevel=debug",
	}
	if n.initPid == 0 {
		vals = append(vals,
			"node.runDir="+n.VmnicRunDir(),
			"node.stateDir="+n.VmnicStateDir(),
			"openvswitch.runDir="+n.OVSRunDir(),
			"spiderpool.socketDir="+n.SpiderpoolSocketDir(),
		)
	}
	return vals
}

// Helm runs helm against the node's API server (from inside the node
// namespace), with its caches and config under Dir.
func (n *Node) Helm(ctx context.Context, args ...string) (string, error) {
	home := filepath.Join(n.Dir, "helm")
	if err := os.MkdirAll(home, 0o755); err != nil {
		return "", err
	}
	env := []string{"HELM_CACHE_HOME=" + home + "/cache", "HELM_CONFIG_HOME=" + home + "/config", "HELM_DATA_HOME=" + home + "/data"}
	full := append([]string{"netns", "exec", filepath.Base(n.NetNS), "env"}, env...)
	full = append(full, n.Bin["helm"], "--kubeconfig", n.Cluster.Kubeconfig)
	return runCtx(ctx, "ip", append(full, args...)...)
}

// Chart is the path of the repository's chart.
func Chart() (string, error) {
	root, err := cluster.RepoRoot()
	if err != nil {
		return "", err
	}
	return filepath.Join(root, "deploy", "chart", "vmnic"), nil
}

// InstallVmnic imports img into containerd and runs `helm install` of the
// chart with ChartValues (plus extra --set values), as a user installs
// vmnic. It returns once helm has returned; WaitDaemonSet waits for the
// rollout.
func (n *Node) InstallVmnic(ctx context.Context, img *VmnicImage, extra ...string) error {
	return n.helmVmnic(ctx, "install", img, extra...)
}

// UpgradeVmnic imports img and runs `helm upgrade` to it.
func (n *Node) UpgradeVmnic(ctx context.Context, img *VmnicImage, extra ...string) error {
	return n.helmVmnic(ctx, "upgrade", img, extra...)
}

func (n *Node) helmVmnic(ctx context.Context, verb string, img *VmnicImage, extra ...string) error {
	if err := n.ImportImage(img.Archive); err != nil {
		return err
	}
	chart, err := Chart()
	if err != nil {
		return err
	}
	args := []string{verb, Release, chart, "--namespace", Namespace}
	for _, v := range append(n.ChartValues(img), extra...) {
		args = append(args, "--set", v)
	}
	_, err = n.Helm(ctx, args...)
	return err
}

// WaitDaemonSet waits until vmnic's DaemonSet has rolled out: its pods are
// all updated to the current template, available and ready.
func (n *Node) WaitDaemonSet(ctx context.Context, timeout time.Duration) (*appsv1.DaemonSet, error) {
	return n.waitDaemonSet(ctx, Namespace, Release, "app.kubernetes.io/name=vmnic", timeout)
}

// waitDaemonSet waits until a DaemonSet has rolled out and returns it; it
// fails at once when one of its pods (matching selector) waits for a reason
// retrying does not cure.
func (n *Node) waitDaemonSet(ctx context.Context, namespace, name, selector string, timeout time.Duration) (*appsv1.DaemonSet, error) {
	var ds *appsv1.DaemonSet
	err := n.poll(ctx, timeout, 200*time.Millisecond, "DaemonSet "+namespace+"/"+name+" rolled out", func(ctx context.Context) (bool, string, error) {
		var err error
		if ds, err = n.Kube.AppsV1().DaemonSets(namespace).Get(ctx, name, metav1.GetOptions{}); err != nil {
			return false, err.Error(), nil
		}
		st := ds.Status
		if st.ObservedGeneration >= ds.Generation && st.DesiredNumberScheduled > 0 &&
			st.UpdatedNumberScheduled == st.DesiredNumberScheduled && st.NumberReady == st.DesiredNumberScheduled &&
			st.NumberAvailable == st.DesiredNumberScheduled {
			return true, "", nil
		}
		if why := n.stuckPods(ctx, namespace, selector); why != "" {
			return false, "", fmt.Errorf("DaemonSet %s/%s cannot roll out: %s", namespace, name, why)
		}
		return false, fmt.Sprintf("generation %d observed %d, desired %d updated %d ready %d available %d",
			ds.Generation, st.ObservedGeneration, st.DesiredNumberScheduled, st.UpdatedNumberScheduled, st.NumberReady, st.NumberAvailable), nil
	})
	if err != nil {
		return nil, err
	}
	return ds, nil
}

// stuckReasons are container waiting reasons that retrying does not cure.
var stuckReasons = map[string]bool{
	"ErrImageNeverPull": true, "InvalidImageName": true,
	"CreateContainerError": true, "CreateContainerConfigError": true,
}

// stuckPods names a pod (in namespace, matching selector) whose container
// waits for a reason that retrying does not cure, or returns "".
func (n *Node) stuckPods(ctx context.Context, namespace, selector string) string {
	pods, err := n.Kube.CoreV1().Pods(namespace).List(ctx, metav1.ListOptions{LabelSelector: selector})
	if err != nil {
		return ""
	}
	for _, p := range pods.Items {
		for _, cs := range append(p.Status.InitContainerStatuses, p.Status.ContainerStatuses...) {
			if w := cs.State.Waiting; w != nil && stuckReasons[w.Reason] {
				return fmt.Sprintf("pod %s container %s: %s: %s", p.Name, cs.Name, w.Reason, w.Message)
			}
		}
	}
	return ""
}

// ConflistPlugins returns the plugin types of the primary conflist, in
// order.
func (n *Node) ConflistPlugins() ([]string, error) {
	b, err := os.ReadFile(n.ConflistPath())
	if err != nil {
		return nil, err
	}
	var conf struct {
		Plugins []struct {
			Type string `json:"type"`
		} `json:"plugins"`
	}
	if err := json.Unmarshal(b, &conf); err != nil {
		return nil, fmt.Errorf("%s: %w", n.ConflistPath(), err)
	}
	var types []string
	for _, p := range conf.Plugins {
		types = append(types, p.Type)
	}
	return types, nil
}

// PodNetns returns the network namespace path of a running pod's sandbox,
// as containerd reports it.
func (n *Node) PodNetns(namespace, name string) (string, error) {
	id, err := n.Crictl("pods", "-q", "--namespace", namespace, "--name", "^"+name+"$", "--state", "ready")
	if err != nil {
		return "", err
	}
	ids := strings.Fields(id)
	if len(ids) != 1 {
		return "", fmt.Errorf("pod %s/%s: %d ready sandboxes", namespace, name, len(ids))
	}
	out, err := n.Crictl("inspectp", ids[0])
	if err != nil {
		return "", err
	}
	var insp struct {
		Info struct {
			RuntimeSpec struct {
				Linux struct {
					Namespaces []struct {
						Type string `json:"type"`
						Path string `json:"path"`
					} `json:"namespaces"`
				} `json:"linux"`
			} `json:"runtimeSpec"`
		} `json:"info"`
	}
	if err := json.Unmarshal([]byte(out), &insp); err != nil {
		return "", err
	}
	for _, ns := range insp.Info.RuntimeSpec.Linux.Namespaces {
		if ns.Type == "network" && ns.Path != "" {
			return n.hostPath(ns.Path), nil
		}
	}
	return "", fmt.Errorf("pod %s/%s: sandbox %s has no network namespace path", namespace, name, ids[0])
}
