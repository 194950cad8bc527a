package node

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"

	"github.com/vmnic/vmnic/test/cluster"
	"github.com/vmnic/vmnic/test/proc"
)

// Calico v3.31.0 as its manifest for a Kubernetes datastore with VXLAN
// networking (manifests/calico-vxlan.yaml of the release) installs it, with
// the programs built from its Go module (test/tools/calico):
//
//   - its CustomResourceDefinitions, from the same manifest;
//   - what calico-node's image runs (its rc.local): "calico-node -startup"
//     (the Calico Node resource, the default IPPool), a first
//     "-allocate-tunnel-addrs" run, then Felix and the tunnel address
//     allocator; no BIRD and no confd, as the manifest's
//     CALICO_NETWORKING_BACKEND=vxlan starts none;
//   - the conflist and kubeconfig its install-cni container writes, and
//     the calico and calico-ipam plugins (one binary under both names) and
//     portmap in the CNI bin dir;
//   - kube-proxy, which Calico does not replace (kubeproxy.go).
//
// Felix runs its nftables dataplane (GA in 3.31), beside kube-proxy in
// nftables mode, as Calico's documentation pairs them. The processes use
// the cluster's admin kubeconfig in place of calico-node's and calico-cni's
// ServiceAccounts.

// CalicoConflist is the primary conflist Calico's installer writes.
const CalicoConflist = "10-calico.conflist"

// CalicoNetwork is the network name in Calico's conflist.
const CalicoNetwork = "k8s-pod-network"

// calicoManifest is the release's manifest, relative to its module.
const calicoManifest = "manifests/calico-vxlan.yaml"

// calicoNetworkConfig is the manifest's cni_network_config, which its
// install-cni container fills in (veth_mtu "0": Felix's MTU file decides).
const calicoNetworkConfig = `{
  "name": "k8s-pod-network",
  "cniVersion": "0.3.1",
  "plugins": [
    {
      "type": "calico",
      "log_level": "info",
      "log_file_path": "/var/log/calico/cni/cni.log",
      "datastore_type": "kubernetes",
      "nodename": "__KUBERNETES_NODE_NAME__",
      "mtu": 0,
      "ipam": {
          "type": "calico-ipam"
      },
      "policy": {
          "type": "k8s"
      },
      "kubernetes": {
          "kubeconfig": "__KUBECONFIG_FILEPATH__"
      }
    },
    {
      "type": "portmap",
      "snat": true,
      "capabilities": {"portMappings": true}
    }
  ]
}
`

// calicoEnv is calico-node's environment in the manifest's DaemonSet, for
// this node.
func (n *Node) calicoEnv() []string {
	return []string{
		"DATASTORE_TYPE=kubernetes",
		"KUBECONFIG=" + n.Cluster.Kubeconfig,
		"WAIT_FOR_DATASTORE=true",
		"NODENAME=" + n.Name,
		"CALICO_NETWORKING_BACKEND=vxlan",
		"CLUSTER_TYPE=k8s,bgp",
		"IP=autodetect",
		"CALICO_IPV4POOL_IPIP=Never",
		"CALICO_IPV4POOL_VXLAN=CrossSubnet",
		"CALICO_IPV6POOL_VXLAN=CrossSubnet",
		// The manifest leaves the pool at 192.168.0.0/16, the LAN's
		// range here; kubeadm users set it to the cluster CIDR.
		"CALICO_IPV4POOL_CIDR=" + ClusterCIDR,
		"CALICO_DISABLE_FILE_LOGGING=true",
		"FELIX_DEFAULTENDPOINTTOHOSTACTION=ACCEPT",
		"FELIX_IPV6SUPPORT=false",
		"FELIX_HEALTHENABLED=true",
		// What the image's felix service adds (etc/service/available/felix/run).
		"FELIX_FELIXHOSTNAME=" + n.Name,
		"FELIX_DATASTORETYPE=kubernetes",
		// The image's /etc/calico/felix.cfg: no log file, no metadata
		// server.
		"FELIX_LOGFILEPATH=none",
		"FELIX_LOGSEVERITYFILE=none",
		"FELIX_METADATAADDR=none",
		"FELIX_NFTABLESMODE=Enabled",
		// Built without cgo, calico-node has no libbpf: the clean-up of
		// a BPF dataplane's leftovers, which Felix runs at the start of
		// its nftables dataplane, would panic. A fresh node has none; the
		// switch is the one Felix's own functional tests use.
		"FELIX_DebugSkipCTLBCleanup=true",
	}
}

// startCalico installs Calico on the node and starts it as its manifest
// does, with kube-proxy, and returns once Felix reports ready.
func (n *Node) startCalico(ctx context.Context, timeout time.Duration) error {
	if n.joined == nil {
		if err := n.installCalicoCRDs(ctx); err != nil {
			return err
		}
	}
	if err := n.startKubeProxy(); err != nil {
		return err
	}
	env := n.calicoEnv()
	if err := n.runOnce(ctx, "calico-startup", n.Bin["calico-node"], env, "-startup"); err != nil {
		return err
	}
	if err := n.runOnce(ctx, "calico-tunnel-addrs-once", n.Bin["calico-node"], env, "-allocate-tunnel-addrs", "-allocate-tunnel-addrs-run-once"); err != nil {
		return err
	}
	if _, err := n.startProcOf("calico-felix", n.Bin["calico-node"], env, "-felix"); err != nil {
		return err
	}
	if _, err := n.startProcOf("calico-tunnel-addrs", n.Bin["calico-node"], env, "-allocate-tunnel-addrs"); err != nil {
		return err
	}
	if err := n.installCalicoCNI(); err != nil {
		return err
	}
	// The readiness probe of the manifest's calico-node container.
	return n.poll(ctx, timeout, 200*time.Millisecond, "Felix ready", func(ctx context.Context) (bool, string, error) {
		cmd := n.nodeCmd(ctx, n.Bin["calico-node"], "-felix-ready")
		cmd.Env = env
		out, err := cmd.CombinedOutput()
		if err != nil {
			return false, strings.TrimSpace(string(out)), nil
		}
		return true, "", nil
	})
}

// installCalicoCRDs applies the CustomResourceDefinitions of Calico's
// manifest.
func (n *Node) installCalicoCRDs(ctx context.Context) error {
	dir, err := moduleDir(ctx, "calico", "github.com/projectcalico/calico")
	if err != nil {
		return err
	}
	b, err := os.ReadFile(filepath.Join(dir, calicoManifest))
	if err != nil {
		return err
	}
	objs, err := cluster.Objects(b)
	if err != nil {
		return err
	}
	var crds [][]byte
	for _, o := range objs {
		if o.GetKind() != "CustomResourceDefinition" {
			continue
		}
		j, err := o.MarshalJSON()
		if err != nil {
			return err
		}
		crds = append(crds, j)
	}
	return n.Cluster.InstallCRDManifests(ctx, crds...)
}

// installCalicoCNI does what the manifest's install-cni container does: the
// plugins into the CNI bin dir, a kubeconfig and the conflist into the CNI
// conf dir, named as the node's processes see them.
func (n *Node) installCalicoCNI() error {
	for _, p := range []string{"portmap", "loopback", "host-local"} {
		if err := n.AddCNIPlugin(n.Bin[p]); err != nil {
			return err
		}
	}
	for _, name := range []string{"calico", "calico-ipam"} {
		if err := copyFile(n.Bin["calico"], filepath.Join(n.CNIBinDir, name), 0o755); err != nil {
			return err
		}
	}
	kubeconfig, err := os.ReadFile(n.Cluster.Kubeconfig)
	if err != nil {
		return err
	}
	if err = writeAtomic(filepath.Join(n.CNIConfDir, "calico-kubeconfig"), kubeconfig); err != nil {
		return err
	}
	_, confDir := n.RuntimeCNIDirs()
	conf := strings.NewReplacer(
		"__KUBERNETES_NODE_NAME__", n.Name,
		"__KUBECONFIG_FILEPATH__", filepath.Join(confDir, "calico-kubeconfig"),
	).Replace(calicoNetworkConfig)
	// The installer writes it as it parsed it (json.MarshalIndent of the
	// filled-in template).
	var v any
	if err = json.Unmarshal([]byte(conf), &v); err != nil {
		return fmt.Errorf("the network config of Calico's manifest: %w", err)
	}
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return writeAtomic(filepath.Join(n.CNIConfDir, CalicoConflist), b)
}

// CalicoIPPools returns the names of Calico's IPPools and their CIDRs.
func (n *Node) CalicoIPPools(ctx context.Context) (map[string]string, error) {
	gvr := schema.GroupVersionResource{Group: "crd.projectcalico.org", Version: "v1", Resource: "ippools"}
	l, err := n.Cluster.Dynamic.Resource(gvr).List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, err
	}
	pools := map[string]string{}
	for _, p := range l.Items {
		cidr, _, _ := unstructured.NestedString(p.Object, "spec", "cidr")
		pools[p.GetName()] = cidr
	}
	return pools, nil
}

// runOnce runs a node program to its end, in the node's namespaces, with
// its output appended to Dir/<name>.log.
func (n *Node) runOnce(ctx context.Context, name, bin string, env []string, args ...string) error {
	logPath := filepath.Join(n.Dir, name+".log")
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer func() { _ = f.Close() }()
	_, _ = fmt.Fprintf(f, "==== %s %s\n", bin, strings.Join(args, " "))
	cmd := n.nodeCmd(ctx, bin, args...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.Env = append([]string{"PATH=" + filepath.Dir(bin) + ":/usr/sbin:/usr/bin:/sbin:/bin", "HOME=" + n.Dir}, env...)
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("%s: %w\n%s", name, err, proc.Tail(logPath, 20))
	}
	return nil
}
