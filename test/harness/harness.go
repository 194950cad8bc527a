// Package harness runs vmnic the way a node does, without a cluster: the
// shim and the reference plugins executed by libcni (the library containerd
// uses) from inside a sandbox "node" network namespace, the daemon in
// process, and pods as fresh network namespaces. Integration tests, the
// benchmarks and `make demo` all stand on it.
//
// Test address plan: pod networks use 198.18.0.0/15 and fd00:198:18::/48
// (benchmarking ranges, never routed outside the namespaces made here); the
// guest side is KubeVirt's fixed 10.0.2.0/24 and fd10:0:2::/120.
package harness

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"golang.org/x/sys/unix"

	"github.com/vmnic/vmnic/daemon"
	"github.com/vmnic/vmnic/pkg/api"
	"github.com/vmnic/vmnic/pkg/ctl"
)

// RepoRoot finds the repository root from the working directory.
func RepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		data, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && strings.HasPrefix(string(data), "module github.com/vmnic/vmnic\n") {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("repository root (go.mod of github.com/vmnic/vmnic) not found above the working directory")
		}
		dir = parent
	}
}

// ReferencePlugins are the reference plugins BinDir builds from
// test/tools/cni; a program that needs fewer (the demo) may narrow the list
// before its first NewNode.
var ReferencePlugins = []string{
	"github.com/containernetworking/plugins/plugins/main/ptp",
	"github.com/containernetworking/plugins/plugins/main/bridge",
	"github.com/containernetworking/plugins/plugins/main/loopback",
	"github.com/containernetworking/plugins/plugins/main/macvlan",
	"github.com/containernetworking/plugins/plugins/main/ipvlan",
	"github.com/containernetworking/plugins/plugins/ipam/host-local",
}

// CNIBinEnv names a directory of prebuilt CNI binaries for BinDir.
const CNIBinEnv = "VMNIC_TEST_CNI_BIN"

var (
	buildOnce sync.Once
	buildDir  string
	buildErr  error
)

// BinDir builds, once per process, the reference plugins into the
// repository's git-ignored .tools/cni-bin, links the vmnic shim that make
// build writes (Built) in beside them, and returns that directory. Go's
// build cache makes this cheap after the first time.
//
// With CNIBinEnv set, BinDir builds nothing and returns that directory,
// which must hold what BinDir would build (the node VM, test/nodevm,
// has no Go toolchain to build with: its host builds them).
func BinDir() (string, error) {
	buildOnce.Do(func() {
		if dir := os.Getenv(CNIBinEnv); dir != "" {
			for _, pkg := range append(ReferencePlugins, "vmnic") {
				if _, err := os.Stat(filepath.Join(dir, filepath.Base(pkg))); err != nil {
					buildErr = fmt.Errorf("%s=%s: %w", CNIBinEnv, dir, err)
					return
				}
			}
			buildDir = dir
			return
		}
		root, err := RepoRoot()
		if err != nil {
			buildErr = err
			return
		}
		dir := filepath.Join(root, ".tools", "cni-bin")
		if err = os.MkdirAll(dir, 0o755); err != nil {
			buildErr = err
			return
		}
		if err = goBuild(filepath.Join(root, "test", "tools", "cni"), dir, ReferencePlugins...); err != nil {
			buildErr = err
			return
		}
		// The shim is the one make build writes, linked in beside them.
		shim, err := Built("vmnic")
		if err != nil {
			buildErr = err
			return
		}
		// Renamed into place: test processes running side by side share it.
		link := filepath.Join(dir, "vmnic")
		tmp := fmt.Sprintf("%s.%d", link, os.Getpid())
		_ = os.Remove(tmp)
		if err := os.Symlink(shim, tmp); err != nil {
			buildErr = err
			return
		}
		if err := os.Rename(tmp, link); err != nil {
			buildErr = err
			return
		}
		buildDir = dir
	})
	return buildDir, buildErr
}

func goBuild(moduleDir, out string, pkgs ...string) error {
	args := append([]string{"build", "-o", out}, pkgs...)
	cmd := exec.Command("go", args...)
	cmd.Dir = moduleDir
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build %s: %w\n%s", strings.Join(pkgs, " "), err, b)
	}
	return nil
}

// Node is a sandbox node: a network namespace in which the plugins run, and
// a directory for the daemon's socket, state and spool and libcni's cache.
type Node struct {
	// DaemonInHostNetns starts daemon processes in the test's own network
	// namespace instead of the node's (to reach an API server on loopback,
	// as a hostNetwork DaemonSet pod does).
	DaemonInHostNetns bool
	// DaemonEnv is added to the environment of daemon processes.
	DaemonEnv []string
	NS        ns.NetNS
	procs     []*DaemonProcess
	Dir       string
	BinDir    string
	CNI       *libcni.CNIConfig
}

// NewNode makes the node namespace and directories under dir.
func NewNode(dir string) (*Node, error) {
	bin, err := BinDir()
	if err != nil {
		return nil, err
	}
	nodeNS, err := testutils.NewNS()
	if err != nil {
		return nil, fmt.Errorf("create node netns: %w", err)
	}
	n := &Node{NS: nodeNS, Dir: dir, BinDir: bin}
	n.CNI = libcni.NewCNIConfigWithCacheDir([]string{bin}, filepath.Join(dir, "cni-cache"), nil)
	return n, nil
}

// NewHostNode is a node without a network namespace of its own, whose
// daemon runs in the test's: for daemons that only talk to an API server
// and wire no pod. A test that dies leaves no namespace behind.
func NewHostNode(dir string) *Node {
	return &Node{Dir: dir, DaemonInHostNetns: true}
}

// Close kills the daemon processes still running and removes the node
// namespace.
func (n *Node) Close() {
	for _, p := range n.procs {
		p.kill()
	}
	if n.NS != nil {
		RemoveNetns(n.NS)
	}
}

// Socket, StateDir and SpoolDir are the daemon's paths on this node.
func (n *Node) Socket() string   { return filepath.Join(n.Dir, "run", "vmnic.sock") }
func (n *Node) StateDir() string { return filepath.Join(n.Dir, "state") }
func (n *Node) SpoolDir() string { return filepath.Join(n.Dir, "state", "spool") }

// Daemon is vmnicd run in this process through daemon.Run, the entry
// point the binary's main runs: the same configuration, preparation and
// informers, without a process around them. Tests that talk to an API
// server run the binary instead (StartVmnicd).
type Daemon struct {
	*daemon.Daemon
	cancel context.CancelFunc
	done   chan error
}

// DaemonConfig is the configuration StartDaemon runs: this node's socket,
// state and spool, no metrics endpoint, no OVSDB, a short drain.
func (n *Node) DaemonConfig(log *slog.Logger) daemon.Config {
	cfg := daemon.DefaultConfig()
	cfg.Socket, cfg.StateDir, cfg.SpoolDir = n.Socket(), n.StateDir(), n.SpoolDir()
	cfg.Logger = log
	cfg.MetricsAddr = ""
	cfg.OVSDB = ""
	cfg.DrainTimeout = 5 * time.Second
	return cfg
}

// StartDaemon runs vmnicd for this node and waits until it is ready.
func (n *Node) StartDaemon(log *slog.Logger) (*Daemon, error) {
	return n.StartDaemonWith(log, nil)
}

// StartDaemonWith is StartDaemon with a hook on the configuration: the
// flags a node's vmnicd would be given (an OVSDB endpoint, the node's
// network namespace), and its metrics.
func (n *Node) StartDaemonWith(log *slog.Logger, adjust func(*daemon.Config)) (*Daemon, error) {
	cfg := n.DaemonConfig(log)
	if adjust != nil {
		adjust(&cfg)
	}
	got := make(chan *daemon.Daemon, 1)
	cfg.OnReady = func(d *daemon.Daemon) { got <- d }
	ctx, cancel := context.WithCancel(context.Background())
	dd := &Daemon{cancel: cancel, done: make(chan error, 1)}
	go func() { dd.done <- daemon.Run(ctx, cfg) }()
	select {
	case dd.Daemon = <-got:
		return dd, nil
	case err := <-dd.done:
		cancel()
		return nil, fmt.Errorf("daemon exited before ready: %w", err)
	case <-time.After(30 * time.Second):
		cancel()
		return nil, errors.New("daemon not ready after 30s")
	}
}

// Stop stops the daemon (as on SIGTERM) and waits for it.
func (d *Daemon) Stop() error {
	if d == nil || d.cancel == nil {
		return nil
	}
	d.cancel()
	d.cancel = nil
	return <-d.done
}

// Pod is a pod sandbox: its network namespace and CNI identity.
type Pod struct {
	NS          ns.NetNS
	ContainerID string
	Namespace   string
	Name        string
	IfName      string
	// UID is the pod object's UID (K8S_POD_UID); empty means "uid-" and
	// the container ID.
	UID string
}

// NewPod makes a pod netns. Names starting with "virt-launcher-" are VM pods.
func NewPod(name string) (*Pod, error) {
	podNS, err := testutils.NewNS()
	if err != nil {
		return nil, fmt.Errorf("create pod netns: %w", err)
	}
	id := strings.ReplaceAll(filepath.Base(podNS.Path()), "cni-", "")
	id = strings.ReplaceAll(id, "-", "")
	return &Pod{NS: podNS, ContainerID: "c" + id, Namespace: "default", Name: name, IfName: "eth0"}, nil
}

// RemoveNetns closes a bind-mounted network namespace and removes its
// mount, as containerd does: a lazy unmount, which also succeeds while a
// process (a vmnicd that has not yet replayed a spooled DEL, say) still has
// the namespace open. testutils.UnmountNS does a plain unmount, which then
// fails with EBUSY and leaves the namespace behind.
func RemoveNetns(n ns.NetNS) {
	path := n.Path()
	_ = n.Close()
	if err := unix.Unmount(path, unix.MNT_DETACH); err == nil || errors.Is(err, unix.EINVAL) {
		_ = os.Remove(path)
	}
}

// Close removes the pod netns (what the runtime does after DEL).
func (p *Pod) Close() {
	if p.NS != nil {
		RemoveNetns(p.NS)
		p.NS = nil
	}
}

func (p *Pod) uid() string {
	if p.UID != "" {
		return p.UID
	}
	return "uid-" + p.ContainerID
}

// Runtime is the libcni runtime config of the pod, as containerd builds it.
func (p *Pod) Runtime() *libcni.RuntimeConf {
	args := [][2]string{
		{"IgnoreUnknown", "1"},
		{"K8S_POD_NAMESPACE", p.Namespace},
		{"K8S_POD_NAME", p.Name},
		{"K8S_POD_INFRA_CONTAINER_ID", p.ContainerID},
		{"K8S_POD_UID", p.uid()},
	}
	// containerd builds CNI_ARGS from a map, so the keys come in any order:
	// each pod gets its own order (fixed by its container ID, so a failure
	// can be replayed).
	seed := fnv.New64a()
	_, _ = seed.Write([]byte(p.ContainerID))
	r := rand.New(rand.NewPCG(seed.Sum64(), 0))
	r.Shuffle(len(args), func(i, j int) { args[i], args[j] = args[j], args[i] })
	rt := &libcni.RuntimeConf{
		ContainerID: p.ContainerID,
		IfName:      p.IfName,
		Args:        args,
	}
	// What containerd passes for the "dns" capability: the pod's DNS.
	rt.CapabilityArgs = map[string]any{"dns": map[string]any{
		"servers":  []string{"198.18.0.53"},
		"searches": []string{p.Namespace + ".svc.cluster.local", "svc.cluster.local"},
	}}
	if p.NS != nil {
		rt.NetNS = p.NS.Path()
	} else {
		rt.NetNS = ""
	}
	return rt
}

// In runs f with the calling thread in the node namespace, so the plugins
// libcni executes inherit it (host-side veths land in the node, not on the
// machine running the tests).
func (n *Node) In(f func() error) error {
	return n.NS.Do(func(ns.NetNS) error { return f() })
}

// Add runs ADD of the list for pod.
func (n *Node) Add(ctx context.Context, list *libcni.NetworkConfigList, p *Pod) (types.Result, error) {
	var res types.Result
	err := n.In(func() error {
		var err error
		res, err = n.CNI.AddNetworkList(ctx, list, p.Runtime())
		return err
	})
	return res, err
}

// Del runs DEL of the list for pod.
func (n *Node) Del(ctx context.Context, list *libcni.NetworkConfigList, p *Pod) error {
	return n.In(func() error { return n.CNI.DelNetworkList(ctx, list, p.Runtime()) })
}

// DelAsContainerd runs the two DELs containerd sends for a sandbox: on
// stop, with the netns and the cached result as prevResult; on removal,
// with an empty CNI_NETNS and no prevResult (the cache went with the first).
func (n *Node) DelAsContainerd(ctx context.Context, list *libcni.NetworkConfigList, p *Pod) error {
	if err := n.Del(ctx, list, p); err != nil {
		return fmt.Errorf("DEL on sandbox stop: %w", err)
	}
	rt := p.Runtime()
	rt.NetNS = ""
	if err := n.In(func() error { return n.CNI.DelNetworkList(ctx, list, rt) }); err != nil {
		return fmt.Errorf("DEL on sandbox removal (no netns, no prevResult): %w", err)
	}
	return nil
}

// Check runs CHECK of the list for pod.
func (n *Node) Check(ctx context.Context, list *libcni.NetworkConfigList, p *Pod) error {
	return n.In(func() error { return n.CNI.CheckNetworkList(ctx, list, p.Runtime()) })
}

// Status runs STATUS of the list.
func (n *Node) Status(ctx context.Context, list *libcni.NetworkConfigList) error {
	return n.In(func() error { return n.CNI.GetStatusNetworkList(ctx, list) })
}

// GC runs GC of the list with the given valid attachments.
func (n *Node) GC(ctx context.Context, list *libcni.NetworkConfigList, valid []types.GCAttachment) error {
	return n.In(func() error {
		return n.CNI.GCNetworkList(ctx, list, &libcni.GCArgs{ValidAttachments: valid})
	})
}

// NetOptions shape a pod network conflist.
type NetOptions struct {
	CNIVersion string
	Name       string
	// Primary is "ptp" (default) or "bridge".
	Primary string
	Subnet4 string // default 198.18.0.0/24; "-" for none
	Subnet6 string // default fd00:198:18::/64; "-" for none
	// Vmnic chains vmnic after the primary plugin.
	Vmnic bool
	// VM is the standalone VM facts object (args.cni.vmnic).
	VM           map[string]any
	ReadyTimeout string
	// Extra keys merged into vmnic's entry.
	Extra map[string]any
}

// ConfList builds the conflist JSON the node's runtime would read.
func (n *Node) ConfList(o NetOptions) ([]byte, error) {
	if o.CNIVersion == "" {
		o.CNIVersion = "1.1.0"
	}
	if o.Name == "" {
		o.Name = "podnet"
	}
	if o.Primary == "" {
		o.Primary = "ptp"
	}
	if o.Subnet4 == "" {
		o.Subnet4 = "198.18.0.0/24"
	}
	if o.Subnet6 == "" {
		o.Subnet6 = "fd00:198:18::/64"
	}
	var ranges []any
	for _, s := range []string{o.Subnet4, o.Subnet6} {
		if s != "-" {
			ranges = append(ranges, []any{map[string]any{"subnet": s}})
		}
	}
	primary := map[string]any{
		"type": o.Primary,
		"mtu":  1480,
		"ipam": map[string]any{
			"type":    "host-local",
			"ranges":  ranges,
			"dataDir": filepath.Join(n.Dir, "host-local"),
			"routes":  defaultRoutes(o),
		},
	}
	if o.Primary == "bridge" {
		primary["bridge"] = "cni0"
		primary["isGateway"] = true
	}
	plugins := []any{primary}
	if o.Vmnic {
		v := map[string]any{
			"type":     "vmnic",
			"mode":     "masquerade",
			"socket":   n.Socket(),
			"spoolDir": n.SpoolDir(),
			// As in a real conflist: the runtime then passes the pod's DNS.
			"capabilities": map[string]any{"dns": true},
		}
		if o.ReadyTimeout != "" {
			v["readyTimeout"] = o.ReadyTimeout
		}
		if o.VM != nil {
			v["args"] = map[string]any{"cni": map[string]any{"vmnic": o.VM}}
		}
		for k, val := range o.Extra {
			v[k] = val
		}
		plugins = append(plugins, v)
	}
	return json.Marshal(map[string]any{"cniVersion": o.CNIVersion, "name": o.Name, "plugins": plugins})
}

func defaultRoutes(o NetOptions) []any {
	var r []any
	if o.Subnet4 != "-" {
		r = append(r, map[string]any{"dst": "0.0.0.0/0"})
	}
	if o.Subnet6 != "-" {
		r = append(r, map[string]any{"dst": "::/0"})
	}
	return r
}

// List parses conflist JSON.
func List(data []byte) (*libcni.NetworkConfigList, error) {
	return libcni.ConfListFromBytes(data)
}

// BuildVersion builds the shim and vmnicd stamped with version into dir,
// as two releases of vmnic would be (their bytes differ).
func BuildVersion(dir, version string) (shimBin, daemonBin string, err error) {
	root, err := RepoRoot()
	if err != nil {
		return "", "", err
	}
	ld := "-X github.com/vmnic/vmnic/pkg/version.Version=" + version
	shimBin, daemonBin = filepath.Join(dir, "vmnic"), filepath.Join(dir, "vmnicd")
	for out, pkg := range map[string]string{shimBin: "./cmd/vmnic", daemonBin: "./cmd/vmnicd"} {
		cmd := exec.Command("go", "build", "-ldflags", ld, "-o", out, pkg)
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if b, err := cmd.CombinedOutput(); err != nil {
			return "", "", fmt.Errorf("go build %s: %w\n%s", pkg, err, b)
		}
	}
	return shimBin, daemonBin, nil
}

// BuildDaemon builds vmnicd into dir with the given build tags (say,
// "failpoints") and returns the binary's path.
func BuildDaemon(dir string, tags ...string) (string, error) {
	root, err := RepoRoot()
	if err != nil {
		return "", err
	}
	bin := filepath.Join(dir, "vmnicd")
	args := []string{"build", "-o", bin}
	if len(tags) > 0 {
		args = append(args, "-tags", strings.Join(tags, ","))
	}
	cmd := exec.Command("go", append(args, "./cmd/vmnicd")...)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build vmnicd %v: %w\n%s", tags, err, b)
	}
	return bin, nil
}

// DaemonProcess is vmnicd running as its own process in the node netns.
type DaemonProcess struct {
	Cmd    *exec.Cmd
	Log    string
	Socket string
	done   chan struct{}
	err    error
}

// WaitReady waits until the daemon says it is ready (vmnicctl status).
func (p *DaemonProcess) WaitReady(timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var last error
	for {
		st, err := ctl.Status(ctx, p.Socket)
		if err == nil && st.Ready {
			return nil
		}
		last = err
		select {
		case <-p.done:
			return fmt.Errorf("vmnicd exited before ready: %v (log: %s)", p.err, p.Log)
		case <-ctx.Done():
			return fmt.Errorf("vmnicd not ready within %s: %v (log: %s)", timeout, last, p.Log)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Status is what the daemon tells vmnicctl status.
func (p *DaemonProcess) Status(ctx context.Context) (*api.Status, error) {
	return ctl.Status(ctx, p.Socket)
}

// BuiltEnv names the directory of the binaries `make build` writes
// (vmnic, vmnicd, vmnicctl) that the tests run: `make test` sets it to bin/,
// the node VM to the bin/ its host built.
const BuiltEnv = "VMNIC_TEST_BIN"

var (
	builtOnce sync.Once
	builtDir  string
	builtErr  error
)

// Built is the path of one of the binaries users run (vmnic, vmnicd,
// vmnicctl): in BuiltEnv's directory, or else in the bin/ that `make
// build` writes (make runs once per test process, one process at a time,
// so the binary is the release build of this tree).
func Built(name string) (string, error) {
	builtOnce.Do(func() {
		if dir := os.Getenv(BuiltEnv); dir != "" {
			builtDir = dir
			return
		}
		root, err := RepoRoot()
		if err != nil {
			builtErr = err
			return
		}
		dir := filepath.Join(root, "bin")
		if err = os.MkdirAll(dir, 0o755); err != nil {
			builtErr = err
			return
		}
		lock, err := os.OpenFile(filepath.Join(dir, ".build.lock"), os.O_CREATE|os.O_RDWR, 0o644)
		if err != nil {
			builtErr = err
			return
		}
		defer func() { _ = lock.Close() }()
		if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
			builtErr = err
			return
		}
		cmd := exec.Command("make", "-s", "build")
		cmd.Dir = root
		if b, err := cmd.CombinedOutput(); err != nil {
			builtErr = fmt.Errorf("make build: %w\n%s", err, b)
			return
		}
		builtDir = dir
	})
	if builtErr != nil {
		return "", builtErr
	}
	bin := filepath.Join(builtDir, name)
	if _, err := os.Stat(bin); err != nil {
		return "", fmt.Errorf("%s (what make build writes): %w", name, err)
	}
	return bin, nil
}

// Vmnicd is the vmnicd binary users run (Built).
func Vmnicd() (string, error) { return Built("vmnicd") }

// StartDaemonProcess runs the vmnicd binary (Vmnicd) inside the node
// namespace (or the test's, with DaemonInHostNetns), logging to
// Dir/vmnicd.log; it returns once the socket answers.
func (n *Node) StartDaemonProcess(extraArgs ...string) (*DaemonProcess, error) {
	bin, err := Vmnicd()
	if err != nil {
		return nil, err
	}
	return n.StartDaemonBinary(bin, "vmnicd.log", extraArgs...)
}

// StartVmnicd is StartDaemonProcess that returns once the daemon is ready:
// its informers synced, its shim installed when it installs one.
func (n *Node) StartVmnicd(extraArgs ...string) (*DaemonProcess, error) {
	bin, err := Vmnicd()
	if err != nil {
		return nil, err
	}
	return n.StartVmnicdBinary(bin, extraArgs...)
}

// StartVmnicdBinary is StartVmnicd with another build of vmnicd (one with
// the failpoints tag, say); each start on the node logs to a file of its
// own.
func (n *Node) StartVmnicdBinary(bin string, extraArgs ...string) (*DaemonProcess, error) {
	logName := "vmnicd.log"
	if len(n.procs) > 0 {
		logName = fmt.Sprintf("vmnicd-%d.log", len(n.procs)+1)
	}
	p, err := n.StartDaemonBinary(bin, logName, extraArgs...)
	if err != nil {
		return nil, err
	}
	if err := p.WaitReady(60 * time.Second); err != nil {
		p.kill()
		return nil, err
	}
	return p, nil
}

// StartDaemonBinary runs the given vmnicd binary like StartDaemonProcess,
// logging to Dir/logName.
func (n *Node) StartDaemonBinary(bin, logName string, extraArgs ...string) (*DaemonProcess, error) {
	logPath := filepath.Join(n.Dir, logName)
	logf, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	args := append([]string{"--socket", n.Socket(), "--state-dir", n.StateDir(), "--spool-dir", n.SpoolDir()}, extraArgs...)
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = append([]string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}, n.DaemonEnv...)
	// Started from a thread inside the node netns, the daemon lives there.
	start := func() error { return n.In(cmd.Start) }
	if n.DaemonInHostNetns {
		start = cmd.Start
	}
	if err := start(); err != nil {
		_ = logf.Close()
		return nil, fmt.Errorf("start vmnicd: %w", err)
	}
	_ = logf.Close()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if c, err := net.Dial("unix", n.Socket()); err == nil {
			_ = c.Close()
			p := &DaemonProcess{Cmd: cmd, Log: logPath, Socket: n.Socket(), done: make(chan struct{})}
			go func() { p.err = cmd.Wait(); close(p.done) }()
			n.procs = append(n.procs, p)
			return p, nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	_ = cmd.Process.Kill()
	_ = cmd.Wait()
	return nil, fmt.Errorf("vmnicd did not listen on %s within 30s (log: %s)", n.Socket(), logPath)
}

// Done is closed when the process has exited; Err then says how.
func (p *DaemonProcess) Done() <-chan struct{} { return p.done }

// Err is the exit of a process that is Done.
func (p *DaemonProcess) Err() error {
	<-p.done
	return p.err
}

// Stop sends SIGTERM and waits for the exit.
func (p *DaemonProcess) Stop() error {
	select {
	case <-p.done:
		return p.err
	default:
	}
	_ = p.Cmd.Process.Signal(syscall.SIGTERM)
	<-p.done
	return p.err
}

// Kill sends SIGKILL, as a node losing the process would, and waits.
func (p *DaemonProcess) Kill() { p.kill() }

// kill ends a daemon a test left running (a test that failed before its
// Stop), so no vmnicd outlives its node.
func (p *DaemonProcess) kill() {
	select {
	case <-p.done:
	default:
		_ = p.Cmd.Process.Kill()
		<-p.done
	}
}
