package node

import (
	"os"
	"path/filepath"
)

// startKubeProxy starts kube-proxy (nftables mode) on the node, as a
// kube-proxy DaemonSet does, for a primary CNI that does not replace it.
// The conntrack settings are left as they are: kube-proxy would raise the
// machine-wide table size, which the node may not touch.
func (n *Node) startKubeProxy() error {
	conf := `apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: nftables
clusterCIDR: ` + ClusterCIDR + `
hostnameOverride: ` + n.Name + `
bindAddress: 0.0.0.0
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
clientConnection:
  kubeconfig: ` + n.Cluster.Kubeconfig + `
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
  udpTimeout: 0s
  udpStreamTimeout: 0s
`
	path := filepath.Join(n.Dir, "kube-proxy.yaml")
	if err := os.WriteFile(path, []byte(conf), 0o644); err != nil {
		return err
	}
	_, err := n.startProc("kube-proxy", nil, "--config="+path, "--v=1")
	return err
}
