package node

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/vmnic/vmnic/test/cluster"
)

// containerdConfig is containerd 2.x's config (version 3) with everything
// private to the node: root, state, sockets, runc's root, the CNI dirs;
// NRI and the snapshotters and tracing it cannot use here are off.
// restrict_oom_score_adj: root here lacks CAP_SYS_RESOURCE, and runc fails
// without it ("can't get final child's PID from pipe: EOF"). The shim is the
// one built beside containerd (a Debian one earlier on PATH fails every
// sandbox).
const containerdConfig = `version = 3
root = "{{.Dir}}/root"
state = "{{.State}}"
disabled_plugins = [
  "io.containerd.nri.v1.nri",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.blockfile",
  "io.containerd.snapshotter.v1.erofs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "{{.Sock}}"

[ttrpc]
  address = "{{.Sock}}.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{{.Dir}}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{{.Pause}}"

[plugins."io.containerd.cri.v1.runtime"]
  enable_selinux = false
  disable_apparmor = true
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{{.CNIBin}}"]
    conf_dir = "{{.CNIConf}}"
    max_conf_num = 1
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      runtime_path = "{{.Shim}}"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "{{.Runc}}"
        Root = "{{.Dir}}/runc"
        SystemdCgroup = false
`

// startContainerd writes the config, starts containerd in the node
// namespace and imports the pause image.
func (n *Node) startContainerd(ctx context.Context) error {
	dir := filepath.Join(n.Dir, "containerd")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	for _, d := range []string{n.CNIBinDir, n.CNIConfDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	runc, lookErr := exec.LookPath("runc")
	if lookErr != nil {
		return lookErr
	}
	n.ContainerdSock = filepath.Join(dir, "containerd.sock")
	n.NetnsDir = filepath.Join(dir, "state", "io.containerd.grpc.v1.cri", "netns")
	cniBin, cniConf := n.RuntimeCNIDirs()
	state := filepath.Join(dir, "state")
	if n.initPid != 0 {
		state = containerStateDir
	}
	r := strings.NewReplacer("{{.Dir}}", dir, "{{.State}}", state, "{{.Sock}}", n.ContainerdSock, "{{.Pause}}", PauseImage,
		"{{.CNIBin}}", cniBin, "{{.CNIConf}}", cniConf,
		"{{.Shim}}", n.Bin["containerd-shim-runc-v2"], "{{.Runc}}", runc)
	conf := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(conf, []byte(r.Replace(containerdConfig)), 0o644); err != nil {
		return err
	}
	n.shimSocks = listShimSockets()
	if _, err := n.startProc("containerd", nil, "--config", conf, "--log-level", "info"); err != nil {
		return err
	}
	if err := n.poll(ctx, 30*time.Second, 50*time.Millisecond, "containerd listening on "+n.ContainerdSock, func(context.Context) (bool, string, error) {
		c, err := dialUnix(n.ContainerdSock)
		if err != nil {
			return false, err.Error(), nil
		}
		_ = c.Close()
		return true, "", nil
	}); err != nil {
		return err
	}
	pause, err := PauseArchive(ctx)
	if err != nil {
		return err
	}
	return n.ImportImage(pause)
}

func dialUnix(path string) (net.Conn, error) {
	return net.DialTimeout("unix", path, time.Second)
}

// Ctr runs ctr against the node's containerd, in Kubernetes' namespace.
func (n *Node) Ctr(args ...string) (string, error) {
	return run(n.Bin["ctr"], append([]string{"--address", n.ContainerdSock, "--namespace", "k8s.io"}, args...)...)
}

// ImportImage imports an OCI or docker archive into the node's containerd
// (images kubelet runs with imagePullPolicy Never or IfNotPresent), named
// as a pull from a registry names them: by tag and by digest
// (<repository>@<manifest digest>). The runtime then reports a container's
// image by that digest, and KubeVirt pins a migration target's container
// disk and kernel-boot image to it (repository@digest of the source pod's
// image): without the digest name the target node would try to pull.
func (n *Node) ImportImage(archive string) error {
	if _, err := n.Ctr("images", "import", "--no-unpack=false", archive); err != nil {
		return err
	}
	out, err := n.Ctr("images", "ls")
	if err != nil {
		return err
	}
	names := map[string]bool{}
	type image struct{ ref, repo, digest string }
	var tagged []image
	for i, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if i == 0 || len(f) < 3 {
			continue // the header
		}
		names[f[0]] = true
		slash, colon := strings.LastIndex(f[0], "/"), strings.LastIndex(f[0], ":")
		if !strings.Contains(f[0], "@") && colon > slash && strings.HasPrefix(f[2], "sha256:") {
			tagged = append(tagged, image{f[0], f[0][:colon], f[2]})
		}
	}
	for _, img := range tagged {
		if byDigest := img.repo + "@" + img.digest; !names[byDigest] {
			names[byDigest] = true
			if _, err := n.Ctr("images", "tag", img.ref, byDigest); err != nil {
				return err
			}
		}
	}
	return nil
}

// PauseArchive builds the pause image (test/node/pause, FROM scratch) with
// deploy/image/build.sh once per machine and returns its archive.
func PauseArchive(ctx context.Context) (string, error) {
	root, err := cluster.RepoRoot()
	if err != nil {
		return "", err
	}
	bin, err := pauseBinary(ctx)
	if err != nil {
		return "", err
	}
	out := filepath.Join(root, ".tools", "images", "pause.tar")
	stamp := out + ".stamp"
	want, err := os.ReadFile(bin + ".stamp")
	if err != nil {
		return "", err
	}
	if b, rerr := os.ReadFile(stamp); rerr == nil && string(b) == string(want) {
		if _, serr := os.Stat(out); serr == nil {
			return out, nil
		}
	}
	tmp, err := os.MkdirTemp("", "vmnic-pause-")
	if err != nil {
		return "", err
	}
	defer func() { _ = os.RemoveAll(tmp) }()
	if err := copyFile(bin, filepath.Join(tmp, "pause"), 0o755); err != nil {
		return "", err
	}
	df := "FROM scratch\nCOPY pause /pause\nENTRYPOINT [\"/pause\"]\n"
	if err := os.WriteFile(filepath.Join(tmp, "Dockerfile"), []byte(df), 0o644); err != nil {
		return "", err
	}
	name, tag, _ := strings.Cut(PauseImage, ":")
	if err := buildImage(ctx, root, "-n", name, "-t", tag, "-c", tmp, "-f", filepath.Join(tmp, "Dockerfile"), "-o", out); err != nil {
		return "", err
	}
	return out, os.WriteFile(stamp, want, 0o644)
}

// buildImage runs deploy/image/build.sh with args.
func buildImage(ctx context.Context, root string, args ...string) error {
	cmd := exec.CommandContext(ctx, "bash", append([]string{filepath.Join(root, "deploy", "image", "build.sh")}, args...)...)
	cmd.Dir = root
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("deploy/image/build.sh %s: %w: %s", strings.Join(args, " "), err, b)
	}
	return nil
}
