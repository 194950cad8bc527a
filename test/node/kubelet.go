package node

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// kubeletConfig is what works on these machines: cgroupfs under a cgroup
// root of the node's own, cgroup v1 allowed, swap allowed, the node's
// containerd, the API on 127.0.0.1 of the node namespace (a node
// container: on its IP) with anonymous
// AlwaysAllow (test only), no iptables chains (kubelet would add a
// KUBE-FIREWALL DROP chain), eviction thresholds a test machine's disk
// cannot trip. A node container reports its ephemeral storage
// (localStorageCapacityIsolation), which KubeVirt's launcher pods request.
const kubeletConfig = `apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
cgroupRoot: {{.CgroupRoot}}
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: unix://{{.Sock}}
address: {{.Address}}
port: 10250
healthzBindAddress: 127.0.0.1
healthzPort: 10248
readOnlyPort: 0
authentication:
  anonymous:
    enabled: true
  webhook:
    enabled: false
authorization:
  mode: AlwaysAllow
podLogsDir: {{.Dir}}/pod-logs
makeIPTablesUtilChains: false
clusterDomain: cluster.local
clusterDNS: [10.96.0.10]
resolvConf: {{.Dir}}/resolv.conf
evictionHard:
  memory.available: 50Mi
  nodefs.available: 1%
  imagefs.available: 1%
  nodefs.inodesFree: 1%
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
nodeStatusUpdateFrequency: 2s
nodeStatusReportFrequency: 10s
syncFrequency: 10s
serializeImagePulls: false
localStorageCapacityIsolation: {{.LocalStorage}}
`

// startKubelet writes kubelet's config and starts it; kubelet registers the
// Node.
func (n *Node) startKubelet() error {
	dir := filepath.Join(n.Dir, "kubelet")
	for _, d := range []string{dir, filepath.Join(dir, "root"), filepath.Join(dir, "pki"), filepath.Join(dir, "pod-logs")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	// Pods' resolv.conf: a search path and a name server (nothing answers
	// it; vmnic hands it to the guest).
	if err := os.WriteFile(filepath.Join(dir, "resolv.conf"), []byte("nameserver 198.18.0.53\n"), 0o644); err != nil {
		return err
	}
	r := strings.NewReplacer("{{.CgroupRoot}}", n.cgroupRoot, "{{.Sock}}", n.ContainerdSock, "{{.Dir}}", dir,
		"{{.LocalStorage}}", fmt.Sprint(n.initPid != 0), "{{.Address}}", n.kubeletAddress())
	conf := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(conf, []byte(r.Replace(kubeletConfig)), 0o644); err != nil {
		return err
	}
	// kubelet wants its cgroup root in every hierarchy; Stop removes it.
	hier, _ := filepath.Glob("/sys/fs/cgroup/*")
	for _, h := range hier {
		if st, err := os.Lstat(h); err != nil || !st.IsDir() {
			continue // cpu -> cpu,cpuacct symlinks
		}
		if err := os.Mkdir(filepath.Join(h, n.cgroupRoot), 0o755); err != nil && !os.IsExist(err) {
			return err
		}
	}
	if err := n.saveSysctls(); err != nil {
		return err
	}
	_, err := n.startProc("kubelet", nil,
		"--config="+conf,
		"--kubeconfig="+n.Cluster.Kubeconfig,
		"--root-dir="+filepath.Join(dir, "root"),
		"--cert-dir="+filepath.Join(dir, "pki"),
		"--hostname-override="+n.Name,
		"--node-ip="+n.IP,
		"--v=1",
	)
	return err
}

// kubeletAddress is where kubelet serves: 127.0.0.1 of the node's
// namespace, or in a node container its IP, so that the API server (on
// another node, or proxying logs) reaches it, as on a real node.
func (n *Node) kubeletAddress() string {
	if n.initPid != 0 {
		return n.IP
	}
	return "127.0.0.1"
}
