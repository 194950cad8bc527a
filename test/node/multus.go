package node

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/vmnic/vmnic/test/cluster"
)

// Multus thick on the node: multus-daemon in a DaemonSet pod (it takes its
// API credentials from the pod, as it is meant to run), multus-shim in the
// CNI bin dir, the generated 00-multus.conf in front of Flannel's.
const (
	// MultusImage is the local image of multus-daemon and multus-shim (and a
	// busybox for the init step's copy), built from test/tools/multus.
	MultusImage = "multus:v4.3.0"
	// MultusConf is the file multus-daemon generates in CNIConfDir (a
	// single-plugin config of type multus-shim).
	MultusConf = "00-multus.conf"
	// MultusDaemonSet is the DaemonSet's name in kube-system.
	MultusDaemonSet = "kube-multus-ds"
)

// multusDaemonSet is the upstream thick DaemonSet
// (deployments/multus-daemonset-thick.yml) with this node's paths, and one
// departure. Upstream mounts the host's / at /hostroot with HostToContainer
// propagation and runs the plugins chrooted there; this machine's / is a
// private mount, which the runtime refuses to propagate from, and a /hostroot
// without propagation would not see the pod netns mounted after Multus
// started. So the node's whole directory (a shared mount: every path the
// plugins touch, the netns mounts, the CNI dirs, Flannel's subnet file,
// vmnic's socket) is mounted at its own path, and multus-daemon runs the
// plugins in its container (no chrootDir). The init step copies the shim
// with a rename, as install_multus does.
//
// In node containers one DaemonSet serves every node, so it mounts only
// paths that are the same on each, at their own paths
// (multusContainerPaths), as upstream's chroot into the host's / would
// show them to the plugins; {{.Dir}} is then /run/node.
const multusDaemonSet = `apiVersion: v1
kind: ConfigMap
metadata:
  name: multus-daemon-config
  namespace: kube-system
data:
  daemon-config.json: |
    {
      "cniVersion": "0.3.1",
      "logLevel": "verbose",
      "logToStderr": true,
      "binDir": "{{.Bin}}",
      "cniConfigDir": "{{.Conf}}",
      "multusAutoconfigDir": "{{.Conf}}",
      "multusConfigFile": "auto",
      "socketDir": "{{.Sock}}",
      "daemonSocketDir": "{{.Sock}}"
    }
---
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: kube-multus-ds
  namespace: kube-system
spec:
  selector:
    matchLabels: {name: multus}
  template:
    metadata:
      labels: {name: multus}
    spec:
      hostNetwork: true
      hostPID: true
      serviceAccountName: multus
      terminationGracePeriodSeconds: 1
      tolerations: [{operator: Exists}]
      initContainers:
        - name: install-multus-shim
          image: {{.Image}}
          imagePullPolicy: Never
          command: [/bin/busybox, sh, -c, "cp /usr/src/multus-cni/bin/multus-shim {{.Bin}}/.multus-shim.tmp && mv -f {{.Bin}}/.multus-shim.tmp {{.Bin}}/multus-shim"]
          securityContext: {privileged: true}
          volumeMounts:
            - {name: node, mountPath: "{{.Dir}}"}
      containers:
        - name: kube-multus
          image: {{.Image}}
          imagePullPolicy: Never
          command: [/usr/src/multus-cni/bin/multus-daemon, -config=/etc/cni/net.d/multus.d/daemon-config.json]
          env:
            - name: MULTUS_NODE_NAME
              valueFrom: {fieldRef: {fieldPath: spec.nodeName}}
          securityContext: {privileged: true}
          volumeMounts:
{{.Mounts}}            - {name: config, mountPath: /etc/cni/net.d/multus.d}
      volumes:
{{.Volumes}}        - {name: config, configMap: {name: multus-daemon-config, items: [{key: daemon-config.json, path: daemon-config.json}]}}
`

// MultusDir is the module directory of Multus (its deployments/ holds the
// upstream manifests).
func MultusDir(ctx context.Context) (string, error) {
	return moduleDir(ctx, "multus", "gopkg.in/k8snetworkplumbingwg/multus-cni.v4")
}

// InstallMultus builds the Multus image, imports it into n and more (nodes
// that joined n) and applies the upstream thick manifest's CRD, RBAC and
// ServiceAccount, then the ConfigMap and DaemonSet; it returns once the
// DaemonSet is ready and 00-multus.conf is written on every node.
func (n *Node) InstallMultus(ctx context.Context, more ...*Node) error {
	paths, err := cluster.Binaries(ctx, "multus-daemon", "multus-shim")
	if err != nil {
		return err
	}
	root, err := cluster.RepoRoot()
	if err != nil {
		return err
	}
	context := filepath.Join(n.Dir, "multus-image")
	bin := filepath.Join(context, "usr", "src", "multus-cni", "bin")
	if err = os.MkdirAll(bin, 0o755); err != nil {
		return err
	}
	for i, name := range []string{"multus-daemon", "multus-shim"} {
		if err = copyFile(paths[i], filepath.Join(bin, name), 0o755); err != nil {
			return err
		}
	}
	busybox, err := exec.LookPath("busybox")
	if err != nil {
		return err
	}
	if err = os.MkdirAll(filepath.Join(context, "bin"), 0o755); err != nil {
		return err
	}
	if err = copyFile(busybox, filepath.Join(context, "bin", "busybox"), 0o755); err != nil {
		return err
	}
	// multus-daemon checks that it runs as root through os/user, which
	// reads /etc/passwd.
	if err = os.MkdirAll(filepath.Join(context, "etc"), 0o755); err != nil {
		return err
	}
	if err = os.WriteFile(filepath.Join(context, "etc", "passwd"), []byte("root:x:0:0:root:/root:/bin/sh\n"), 0o644); err != nil {
		return err
	}
	df := "FROM scratch\nCOPY usr /usr\nCOPY bin /bin\nCOPY etc /etc\n"
	if err = os.WriteFile(filepath.Join(context, "Dockerfile"), []byte(df), 0o644); err != nil {
		return err
	}
	name, tag, _ := strings.Cut(MultusImage, ":")
	archive := filepath.Join(n.Dir, "multus-image.tar")
	if err = buildImage(ctx, root, "-n", name, "-t", tag, "-c", context, "-f", filepath.Join(context, "Dockerfile"), "-o", archive); err != nil {
		return err
	}
	for _, x := range append([]*Node{n}, more...) {
		if err = x.ImportImage(archive); err != nil {
			return err
		}
	}
	mdir, err := MultusDir(ctx)
	if err != nil {
		return err
	}
	upstream, err := os.ReadFile(filepath.Join(mdir, "deployments", "multus-daemonset-thick.yml"))
	if err != nil {
		return err
	}
	// The CRD, ClusterRole, ClusterRoleBinding and ServiceAccount as
	// upstream ships them; its ConfigMap and DaemonSet carry host paths.
	var keep [][]byte
	for _, doc := range bytes.Split(upstream, []byte("\n---")) {
		if bytes.Contains(doc, []byte("kind: ConfigMap")) || bytes.Contains(doc, []byte("kind: DaemonSet")) {
			continue
		}
		keep = append(keep, doc)
	}
	if err = n.Cluster.Apply(ctx, bytes.Join(keep, []byte("\n---"))); err != nil {
		return fmt.Errorf("apply Multus' CRD and RBAC: %w", err)
	}
	dir, bin, conf, sock := n.Dir, n.CNIBinDir, n.CNIConfDir, filepath.Join(n.Dir, "multus", "run")
	mounts := "            - {name: node, mountPath: \"" + n.Dir + "\", mountPropagation: HostToContainer}\n"
	volumes := "        - {name: node, hostPath: {path: \"" + n.Dir + "\"}}\n"
	if n.initPid != 0 {
		// Multus makes its socket directory afresh: not a mount of its
		// own.
		dir, sock = "/run/node", "/run/node/multus"
		bin, conf = n.RuntimeCNIDirs()
		mounts, volumes = "", ""
		for i, p := range multusContainerPaths {
			name := fmt.Sprintf("p%d", i)
			if p == dir {
				name = "node" // the init step's volume
			}
			mounts += fmt.Sprintf("            - {name: %s, mountPath: %q, mountPropagation: HostToContainer}\n", name, p)
			volumes += fmt.Sprintf("        - {name: %s, hostPath: {path: %q, type: DirectoryOrCreate}}\n", name, p)
		}
	} else if err = os.MkdirAll(sock, 0o755); err != nil {
		return err
	}
	r := strings.NewReplacer("{{.Dir}}", dir, "{{.Bin}}", bin, "{{.Conf}}", conf, "{{.Sock}}", sock,
		"{{.Mounts}}", mounts, "{{.Volumes}}", volumes, "{{.Image}}", MultusImage)
	if err = n.Cluster.Apply(ctx, []byte(r.Replace(multusDaemonSet))); err != nil {
		return fmt.Errorf("apply Multus' DaemonSet: %w", err)
	}
	if _, err = n.waitDaemonSet(ctx, "kube-system", MultusDaemonSet, "name=multus", 2*time.Minute); err != nil {
		return err
	}
	for _, x := range append([]*Node{n}, more...) {
		if err = x.waitFile(ctx, filepath.Join(x.CNIConfDir, MultusConf), time.Minute); err != nil {
			return err
		}
	}
	return nil
}

// multusContainerPaths are the node paths Multus' container mounts in node
// containers, each at its own path: the CNI and netns directories and
// Multus' socket directory (/run/node), Flannel's directory, vmnic's shim
// socket and DEL spool at the chart's defaults, the Spiderpool agent's
// socket directory (for the IPAM of an underlay plugin Multus runs), and
// kubelet's directory, as upstream's DaemonSet mounts it: Multus asks
// kubelet's pod-resources socket there for the devices of a network whose
// NetworkAttachmentDefinition names a resource (k8s.v1.cni.cncf.io/resourceName).
var multusContainerPaths = []string{"/run/node", "/run/flannel", "/run/vmnic", "/var/lib/vmnic", "/var/run/spidernet", "/var/lib/kubelet"}
