package node

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// FlannelNetwork is the name of the primary network in the conflist. It is
// the node's own, so that the result cache containerd's libcni keeps in the
// host's /var/lib/cni (not configurable in containerd) can be told apart.
func (n *Node) FlannelNetwork() string { return "cbr0-" + n.id }

// installFlannelCNI copies the flannel plugin and the plugins it and
// containerd delegate to (bridge, host-local, loopback, portmap) into the
// CNI bin dir and writes the conflist Flannel's installer writes, with the
// subnet file, the plugin's scratch dir and host-local's dir under Dir (in
// a node container at Flannel's own /run/flannel, bound from there, so
// that a DaemonSet that runs the plugins, Multus', finds them on every
// node).
func (n *Node) installFlannelCNI() error {
	for _, p := range []string{"flannel", "bridge", "host-local", "loopback", "portmap"} {
		if err := n.AddCNIPlugin(n.Bin[p]); err != nil {
			return err
		}
	}
	fdir := n.flannelDir()
	if err := os.MkdirAll(filepath.Join(n.Dir, "flannel"), 0o755); err != nil {
		return err
	}
	conf := map[string]any{
		"name":       n.FlannelNetwork(),
		"cniVersion": "0.3.1",
		"plugins": []any{
			map[string]any{
				"type":       "flannel",
				"subnetFile": filepath.Join(fdir, "subnet.env"),
				"dataDir":    filepath.Join(fdir, "cni"),
				"ipam":       map[string]any{"type": "host-local", "dataDir": filepath.Join(fdir, "ipam")},
				"delegate":   map[string]any{"hairpinMode": true, "isDefaultGateway": true},
			},
			map[string]any{"type": "portmap", "capabilities": map[string]any{"portMappings": true}},
		},
	}
	b, err := json.MarshalIndent(conf, "", "  ")
	if err != nil {
		return err
	}
	netConf := `{"Network": "` + ClusterCIDR + `", "Backend": {"Type": "vxlan"}}` + "\n"
	if err := os.WriteFile(filepath.Join(n.Dir, "flannel", "net-conf.json"), []byte(netConf), 0o644); err != nil {
		return err
	}
	return writeAtomic(filepath.Join(n.CNIConfDir, FlannelConflist), append(b, '\n'))
}

// startFlannel starts flanneld in kube-subnet-mgr mode on eth0: it waits for
// the Node's podCIDR (from the controller manager), writes the subnet file
// the CNI plugin reads and makes flannel.1.
func (n *Node) startFlannel() error {
	fdir := n.flannelDir()
	_, err := n.startProc("flanneld", []string{"NODE_NAME=" + n.Name},
		"--kube-subnet-mgr",
		"--kubeconfig-file="+n.Cluster.Kubeconfig,
		"--iface=eth0",
		"--ip-masq",
		"--net-config-path="+filepath.Join(fdir, "net-conf.json"),
		"--subnet-file="+filepath.Join(fdir, "subnet.env"),
		"--v=1",
	)
	return err
}

// flannelDir is Dir/flannel as the node's processes name it: in a node
// container at /run/flannel (see containerInit).
func (n *Node) flannelDir() string {
	if n.initPid != 0 {
		return "/run/flannel"
	}
	return filepath.Join(n.Dir, "flannel")
}

// AddCNIPlugin copies a plugin binary into the CNI bin dir under its own
// name (through a rename: containerd never runs half a binary).
func (n *Node) AddCNIPlugin(bin string) error {
	return copyFile(bin, filepath.Join(n.CNIBinDir, filepath.Base(bin)), 0o755)
}

// ConflistPath is the primary CNI's config file: Flannel's, Calico's or
// the one the Cilium agent writes.
func (n *Node) ConflistPath() string {
	name := map[Primary]string{Flannel: FlannelConflist, Calico: CalicoConflist, Cilium: CiliumConflist}[n.Primary]
	return filepath.Join(n.CNIConfDir, name)
}

func copyFile(src, dst string, perm os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer func() { _ = in.Close() }()
	tmp := dst + ".tmp"
	out, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, perm)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		_ = out.Close()
		return err
	}
	if err := out.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, dst)
}

// writeAtomic writes a file through a rename (containerd reloads on the
// rename, never reading half a file).
func writeAtomic(path string, data []byte) error { return writeAtomicMode(path, data, 0o644) }

// writeAtomicMode is writeAtomic with a file mode.
func writeAtomicMode(path string, data []byte, perm os.FileMode) error {
	tmp := filepath.Join(filepath.Dir(path), fmt.Sprintf(".%s.tmp", filepath.Base(path)))
	if err := os.WriteFile(tmp, data, perm); err != nil {
		return err
	}
	if err := os.Chmod(tmp, perm); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}
