package node

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/vmnic/vmnic/test/cluster"
)

// Cilium v1.20.2 as its Helm chart installs it, with the programs built
// from its Go module (test/tools/cilium):
//
//   - its CustomResourceDefinitions (the operator would register them; no
//     operator runs);
//   - the agent's configuration is the cilium-config ConfigMap that
//     `helm template` of the release's own chart renders, with the values
//     CiliumValues names and the ones below, read from a directory as the
//     DaemonSet reads it (--config-dir); the agent compiles its BPF
//     programs from the release's sources with the machine's clang (19),
//     writes the conflist when it is ready, and runs the tunnel (VXLAN);
//   - the cilium-cni plugin in the CNI bin dir, as the chart's
//     install-cni-binaries init container copies it;
//   - kube-proxy beside it: the chart's kubeProxyReplacement is off.
//
// In the node container the agent has its own bpffs at /sys/fs/bpf, its
// state in /var/run/cilium and its BPF sources in /var/lib/cilium/bpf, as in
// its image. The agent uses the cluster's admin kubeconfig in place of its
// ServiceAccount.

// CiliumConflist is the conflist the agent writes (the chart's
// cni.confFileMountPath and cni.confPath).
const CiliumConflist = "05-cilium.conflist"

// ciliumHarnessValues are the chart values of this harness: what it does
// not run (the operator, Hubble, Envoy, the health endpoints need
// programs of their own), IPAM from the Node's podCIDR (the cluster-pool
// mode needs the operator), and kube-proxy beside the agent.
var ciliumHarnessValues = []string{
	"operator.enabled=false",
	"ipam.mode=kubernetes",
	"kubeProxyReplacement=false",
	"hubble.enabled=false",
	"envoy.enabled=false",
	"l7Proxy=false",
	"healthChecking=false",
	"endpointHealthChecking.enabled=false",
}

// startCilium installs Cilium on the node as its chart does, with
// kube-proxy, and returns once the agent wrote its conflist.
func (n *Node) startCilium(ctx context.Context, timeout time.Duration, valuesFiles []string) error {
	dir, err := moduleDir(ctx, "cilium", "github.com/cilium/cilium")
	if err != nil {
		return err
	}
	if n.joined == nil {
		crds, gerr := filepath.Glob(filepath.Join(dir, "pkg", "k8s", "apis", "cilium.io", "client", "crds", "*", "*.yaml"))
		if gerr != nil {
			return gerr
		}
		if err = n.Cluster.InstallCRDs(ctx, crds...); err != nil {
			return err
		}
	}
	if err = n.startKubeProxy(); err != nil {
		return err
	}
	conf, err := n.ciliumConfig(ctx, dir, valuesFiles)
	if err != nil {
		return err
	}
	// The image's BPF sources, at its lib-dir.
	lib := filepath.Join(n.Dir, "var-lib", "cilium")
	if err = os.MkdirAll(lib, 0o755); err != nil {
		return err
	}
	if out, cerr := exec.CommandContext(ctx, "cp", "-r", filepath.Join(dir, "bpf"), lib).CombinedOutput(); cerr != nil {
		return fmt.Errorf("copy Cilium's BPF sources: %w: %s", cerr, out)
	}
	// The agent runs "clang"; Debian names it clang-19.
	pathDir := filepath.Join(n.Dir, "cilium-path")
	if err = os.MkdirAll(pathDir, 0o755); err != nil {
		return err
	}
	clang, err := exec.LookPath("clang-19")
	if err != nil {
		return fmt.Errorf("the Cilium agent compiles its BPF programs with clang 19 (make deps): %w", err)
	}
	if err := os.Symlink(clang, filepath.Join(pathDir, "clang")); err != nil {
		return err
	}
	if err := n.AddCNIPlugin(n.Bin["cilium-cni"]); err != nil {
		return err
	}
	for _, p := range []string{"loopback"} {
		if err := n.AddCNIPlugin(n.Bin[p]); err != nil {
			return err
		}
	}
	env := []string{
		"K8S_NODE_NAME=" + n.Name,
		"CILIUM_K8S_NAMESPACE=kube-system",
		"KUBE_CLIENT_BACKOFF_BASE=1",
		"KUBE_CLIENT_BACKOFF_DURATION=120",
		"PATH=" + pathDir + ":" + filepath.Dir(n.Bin["cilium-agent"]) + ":/usr/sbin:/usr/bin:/sbin:/bin",
	}
	if _, err := n.startProc("cilium-agent", env, "--config-dir="+conf); err != nil {
		return err
	}
	return n.waitFile(ctx, filepath.Join(n.CNIConfDir, CiliumConflist), timeout)
}

// ciliumConfig renders the chart's cilium-config ConfigMap and writes it as
// a directory of one file per key, as the DaemonSet mounts it, with what
// this node names differently: the conflist's path, /proc (the node
// container's), the kubeconfig.
func (n *Node) ciliumConfig(ctx context.Context, moduleDir string, valuesFiles []string) (string, error) {
	args := []string{"template", "cilium", filepath.Join(moduleDir, "install", "kubernetes", "cilium"), "--namespace", "kube-system"}
	for _, f := range valuesFiles {
		args = append(args, "--values", f)
	}
	for _, v := range ciliumHarnessValues {
		args = append(args, "--set", v)
	}
	out, err := n.Helm(ctx, args...)
	if err != nil {
		return "", fmt.Errorf("helm template Cilium's chart: %w", err)
	}
	objs, err := cluster.Objects([]byte(out))
	if err != nil {
		return "", err
	}
	var data map[string]any
	for _, o := range objs {
		if o.GetKind() == "ConfigMap" && o.GetName() == "cilium-config" {
			data, _ = o.Object["data"].(map[string]any)
		}
	}
	if data == nil {
		return "", fmt.Errorf("the Cilium chart rendered no cilium-config ConfigMap")
	}
	_, confDir := n.RuntimeCNIDirs()
	data["write-cni-conf-when-ready"] = filepath.Join(confDir, CiliumConflist)
	data["procfs"] = "/proc"
	data["k8s-kubeconfig-path"] = n.Cluster.Kubeconfig
	dir := filepath.Join(n.Dir, "cilium-config")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	for k, v := range data {
		s, _ := v.(string)
		if err := os.WriteFile(filepath.Join(dir, k), []byte(s), 0o644); err != nil {
			return "", err
		}
	}
	return dir, nil
}
