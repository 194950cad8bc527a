package node

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/vmnic/vmnic/test/cluster"
	"github.com/vmnic/vmnic/test/proc"
)

// A node container (Options.Container) gives the node what a machine of
// its own would: PID and mount namespaces of its own beside its network
// namespace. KubeVirt's virt-handler needs both: it takes PID 1 for the
// node (hostPID, /proc/1/ns/mnt, /proc/1/root), and it and the launcher
// pods use fixed host paths (/var/lib/kubelet, /var/run/kubevirt,
// /var/lib/kubevirt, the device-plugin directory), which two nodes on one
// machine must not share.
//
// PID 1 of the node is the pause program (it reaps what is left to it),
// started by unshare after the script below has made the mount namespace:
//
//   - /run is a tmpfs of the node's (containerd's shim sockets, KubeVirt's
//     runtime directories), shared so that pods may mount from it with
//     Bidirectional propagation, as virt-handler's do;
//   - /var/lib is Dir/var-lib, with kubelet's root directory bound at
//     /var/lib/kubelet (so its device-plugin directory is the node's own);
//     /var/log is Dir/var-log (Calico's CNI plugin logs to
//     /var/log/calico);
//   - the CNI directories are at /run/node/cni/{bin,net.d}
//     (ContainerCNIBinDir, ContainerCNIConfDir), and containerd's state
//     directory, which holds the pod network namespaces, at
//     /run/node/containerd-state: the same paths on every node, as a
//     DaemonSet's hostPath needs;
//   - OVSRunDir and SpiderpoolSocketDir are at /run/openvswitch and
//     /run/spidernet, where a node's OVS and Spiderpool agent keep their
//     sockets (the chart's defaults name them under /var/run): a test
//     starts both on the machine in the node's network namespace, with
//     these directories; Flannel's directory (subnet file, the plugin's
//     and host-local's state) is at its own default, /run/flannel;
//   - /dev is a tmpfs with the devices a node's pods use, and no /dev/kvm:
//     this machine's hangs, and the nodes emulate instead;
//   - /proc is the PID namespace's own, /sys/fs/bpf a bpffs of the node's
//     (the Cilium agent pins its maps there).
//
// Everything else is the machine's, and Dir is the same shared mount inside
// and out, so that a test sees the node's pod network namespaces and
// volumes under Dir. Node processes (containerd, kubelet, flanneld) enter
// the namespaces through nsenter. Stopping PID 1 ends every process of
// the node, and its mounts go with the namespace.
const containerInit = `set -e
# Only this namespace's copies of the mounts the node covers stop
# propagating: Dir stays shared with the machine.
for p in /run /var/lib /var/log /dev /sys/fs/bpf; do
  mount --make-private "$(findmnt -n -o TARGET -T "$p")"
done
mount -t tmpfs -o mode=0755 tmpfs /run
mount --make-shared /run
mkdir -p /run/lock /run/netns
mount --bind "$DIR/var-lib" /var/lib
mount --bind "$DIR/var-log" /var/log
mount --bind "$DIR/kubelet/root" /var/lib/kubelet
mkdir -p /run/node/cni/bin /run/node/cni/net.d
mount --bind "$DIR/cni/bin" /run/node/cni/bin
mount --bind "$DIR/cni/net.d" /run/node/cni/net.d
mkdir -p /run/node/containerd-state
mount --bind "$DIR/containerd/state" /run/node/containerd-state
mkdir -p /run/openvswitch /run/spidernet /run/flannel
mount --bind "$DIR/openvswitch" /run/openvswitch
mount --bind "$DIR/spidernet" /run/spidernet
mount --bind "$DIR/flannel" /run/flannel
mount -t bpf bpf /sys/fs/bpf
mount -t tmpfs -o mode=0755,size=1m tmpfs /dev
cd /dev
for d in null:1:3:666 zero:1:5:666 full:1:7:666 random:1:8:666 urandom:1:9:666 tty:5:0:666 kmsg:1:11:644 fuse:10:229:666; do
  IFS=:
  set -- $d
  unset IFS
  mknod -m "$4" "$1" c "$2" "$3"
done
mkdir -p net pts shm mqueue
mknod -m 666 net/tun c 10 200
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts /dev/pts
ln -s pts/ptmx ptmx
mount -t tmpfs -o mode=1777 shm /dev/shm
mount -t mqueue mqueue /dev/mqueue || true
ln -s /proc/self/fd fd
ln -s /proc/self/fd/0 stdin
ln -s /proc/self/fd/1 stdout
ln -s /proc/self/fd/2 stderr
cd /
echo "node container ready"
exec "$PAUSE"
`

// startContainer starts the node's PID 1.
func (n *Node) startContainer(ctx context.Context) error {
	pause, err := pauseBinary(ctx)
	if err != nil {
		return err
	}
	for _, d := range []string{filepath.Join(n.Dir, "var-lib", "kubelet"), filepath.Join(n.Dir, "var-log"), filepath.Join(n.Dir, "kubelet", "root"), n.CNIBinDir, n.CNIConfDir, filepath.Join(n.Dir, "containerd", "state"), n.OVSRunDir(), n.SpiderpoolSocketDir(), filepath.Join(n.Dir, "flannel")} {
		if merr := os.MkdirAll(d, 0o755); merr != nil {
			return merr
		}
	}
	logPath := filepath.Join(n.Dir, "init.log")
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer func() { _ = f.Close() }()
	// --propagation unchanged: unshare would make every mount private,
	// Dir too.
	cmd := exec.Command("unshare", "--pid", "--fork", "--mount", "--propagation", "unchanged", "--mount-proc",
		"--", "/bin/sh", "-c", containerInit)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "DIR=" + n.Dir, "PAUSE=" + pause}
	p, err := proc.StartCmd(n.launcher, cmd)
	if err != nil {
		return fmt.Errorf("start the node's init: %w", err)
	}
	p.Name, p.Log = "init", logPath
	n.procs = append(n.procs, p)
	// unshare forks PID 1 and waits for it; PID 1 runs the script, then
	// becomes pause.
	if err := n.poll(ctx, 10*time.Second, 20*time.Millisecond, "the node's init", func(context.Context) (bool, string, error) {
		pid, err := onlyChild(p.Cmd.Process.Pid)
		if err != nil {
			return false, err.Error(), nil
		}
		exe, err := os.Readlink(filepath.Join("/proc", strconv.Itoa(pid), "exe"))
		if err != nil || exe != pause {
			return false, "PID 1 runs " + exe, nil
		}
		n.initPid = pid
		return true, "", nil
	}); err != nil {
		return err
	}
	return nil
}

// The CNI directories inside a node container (see containerInit).
const (
	ContainerCNIBinDir  = "/run/node/cni/bin"
	ContainerCNIConfDir = "/run/node/cni/net.d"
)

// RuntimeCNIDirs are the CNI directories as containerd, and any pod's
// hostPath, names them: CNIBinDir and CNIConfDir, or inside a node
// container the same directories at ContainerCNIBinDir and
// ContainerCNIConfDir.
func (n *Node) RuntimeCNIDirs() (bin, conf string) {
	if n.initPid != 0 {
		return ContainerCNIBinDir, ContainerCNIConfDir
	}
	return n.CNIBinDir, n.CNIConfDir
}

// containerStateDir is containerd's state directory inside a node
// container (Dir/containerd/state outside).
const containerStateDir = "/run/node/containerd-state"

// RuntimeNetnsDir is where containerd mounts pod network namespaces, as it
// names them in the paths it hands to CNI: NetnsDir, or the same directory
// at its path inside a node container.
func (n *Node) RuntimeNetnsDir() string {
	if n.initPid != 0 {
		return filepath.Join(containerStateDir, "io.containerd.grpc.v1.cri", "netns")
	}
	return n.NetnsDir
}

// hostPath turns a path containerd names inside a node container into the
// same file's path outside.
func (n *Node) hostPath(p string) string {
	if n.initPid != 0 && strings.HasPrefix(p, containerStateDir+"/") {
		return filepath.Join(n.Dir, "containerd", "state", strings.TrimPrefix(p, containerStateDir+"/"))
	}
	return p
}

// nsPath is the path of one of the node container's namespaces.
func (n *Node) nsPath(kind string) string {
	return filepath.Join("/proc", strconv.Itoa(n.initPid), "ns", kind)
}

// onlyChild returns the one child of pid.
func onlyChild(pid int) (int, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", pid, pid))
	if err != nil {
		return 0, err
	}
	f := strings.Fields(string(b))
	if len(f) != 1 {
		return 0, fmt.Errorf("process %d has %d children", pid, len(f))
	}
	return strconv.Atoi(f[0])
}

// inContainer makes cmd run inside the node container's PID and mount
// namespaces, through nsenter: it forks the command into the PID namespace
// and waits for it. (A child forked by Go straight into another PID
// namespace with a parent-death signal kills itself: its parent's PID reads
// 0 there.) The command shares nsenter's process group, which proc.Kill
// kills.
func (n *Node) inContainer(cmd *exec.Cmd) *exec.Cmd {
	if n.initPid == 0 {
		return cmd
	}
	c := exec.Command("nsenter", append([]string{"--mount=" + n.nsPath("mnt"), "--pid=" + n.nsPath("pid"), "--", cmd.Path}, cmd.Args[1:]...)...)
	c.Stdout, c.Stderr, c.Env, c.Dir = cmd.Stdout, cmd.Stderr, cmd.Env, cmd.Dir
	return c
}

// InContainer runs a command in the node's network and mount namespaces
// (the node container's, or the machine's mount namespace for a node
// without one) and returns its standard output.
func (n *Node) InContainer(name string, args ...string) (string, error) {
	nsenter := n.nodeCmd(context.Background(), name, args...)
	return run(nsenter.Path, nsenter.Args[1:]...)
}

// nodeCmd is name run in the node's network namespace and, in a node
// container, its mount and PID namespaces, as the node's own processes run.
func (n *Node) nodeCmd(ctx context.Context, name string, args ...string) *exec.Cmd {
	ns := []string{"--net=" + n.NetNS}
	if n.initPid != 0 {
		ns = append(ns, "--mount="+n.nsPath("mnt"), "--pid="+n.nsPath("pid"))
	}
	return exec.CommandContext(ctx, "nsenter", append(append(ns, "--", name), args...)...)
}

// pauseBinary builds test/node/pause once per machine (the pause image's
// program, and a node container's PID 1) and returns its path.
func pauseBinary(ctx context.Context) (string, error) {
	root, err := cluster.RepoRoot()
	if err != nil {
		return "", err
	}
	out := filepath.Join(root, ".tools", "images", "pause")
	src, err := os.ReadFile(filepath.Join(root, "test", "node", "pause", "main.go"))
	if err != nil {
		return "", err
	}
	stamp := out + ".stamp"
	want := fmt.Sprintf("%x", hash(src))
	if b, rerr := os.ReadFile(stamp); rerr == nil && string(b) == want {
		if _, serr := os.Stat(out); serr == nil {
			return out, nil
		}
	}
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return "", err
	}
	tmp := out + ".tmp"
	build := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags=-s -w", "-o", tmp, "./test/node/pause")
	build.Dir = root
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := build.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build pause: %w: %s", err, b)
	}
	if err := os.Rename(tmp, out); err != nil {
		return "", err
	}
	return out, os.WriteFile(stamp, []byte(want), 0o644)
}
