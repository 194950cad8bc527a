// Package node runs a real Kubernetes node for tests: etcd, kube-apiserver,
// kube-controller-manager, kube-scheduler, containerd (with Debian's runc)
// and kubelet, with Flannel (flanneld in kube-subnet-mgr mode, vxlan
// backend, and its CNI plugin) as the primary CNI, or Calico or Cilium with
// kube-proxy (Options.Primary, calico.go, cilium.go). Every binary is built from a Go
// module by test/tools/build.sh.
//
// The node lives in a network namespace of its own, and everything it
// makes (links, routes, nftables, containerd's and kubelet's state, pod
// network namespaces, cgroups) is private to it or removed on Stop, so the
// host, and a system containerd or kubelet on it, are not disturbed:
//
//   - the node namespace holds eth0 (NodeIP) on a LAN that is a Linux bridge
//     in a second namespace; every control-plane process and every pod,
//     hostNetwork ones included, runs in the node namespace;
//
//   - the test process reaches the API server through sockets made in the
//     node namespace (Cluster.Config dials there);
//
//   - containerd's root, state, sockets, runc root and CNI dirs, kubelet's
//     root dir and logs, and flanneld's subnet file are under Dir;
//
//   - with Flannel, the kubernetes Service (10.96.0.1:443) is DNATed to the
//     API server in the node namespace's nftables, the one rule kube-proxy
//     would make for it (no kube-proxy runs); with Calico and Cilium,
//     kube-proxy runs and serves every Service;
//
//   - kubelet's pod cgroups are under a cgroup root of the node's own in
//     every hierarchy (cgroup v1 here), removed on Stop; the kernel
//     settings kubelet changes are restored on Stop.
//
//   - with Options.Container the node is a node container: PID and mount
//     namespaces of its own too, as real KubeVirt needs (container.go);
//     with Options.Join a second node joins the first's control plane on
//     its LAN.
//
//     n := node.StartT(t)
//     n.Kube.CoreV1().Pods("default").Create(...)
package node

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/vmnic/vmnic/test/cluster"
	"github.com/vmnic/vmnic/test/proc"
)

// Addresses of the node's network.
const (
	// NodeIP is the node's address on its LAN (eth0): kubelet's node IP,
	// the API server's, flanneld's vxlan endpoint.
	NodeIP = "192.168.200.10"
	// LANGateway is the LAN bridge's address, the node's default route.
	LANGateway = "192.168.200.1"
	// ClusterCIDR is Flannel's network; each node gets a /24 of it.
	ClusterCIDR = "10.244.0.0/16"
	// ServiceCIDR is the API server's service range; KubernetesService is
	// the kubernetes Service's ClusterIP in it.
	ServiceCIDR       = "10.96.0.0/16"
	KubernetesService = "10.96.0.1"
	// PauseImage is the image of every sandbox, imported from a local
	// archive (no registry is reachable); test pods use it for their
	// containers too, with imagePullPolicy Never.
	PauseImage = "vmnic.test/pause:1"
	// FlannelConflist is the primary CNI's config file in CNIConfDir, as
	// Flannel's own installer writes it.
	FlannelConflist = "10-flannel.conflist"
)

// Options tune Start. The zero value is fine.
type Options struct {
	// Name is the node's name; default "node-1".
	Name string
	// ReadyTimeout bounds the wait for the Node to become Ready once
	// everything runs. Default 2 minutes.
	ReadyTimeout time.Duration
	// Container runs the node in PID and mount namespaces of its own (see
	// container.go), as real KubeVirt needs.
	Container bool
	// Join makes a worker node that joins the control plane of Join (a
	// node this package started), on its LAN, at IP. It runs its own
	// containerd, kubelet and flanneld, and no control plane. Stop it
	// before Join.
	Join *Node
	// IP is the node's address on the LAN: NodeIP by default, another
	// address of the LAN's /24 for a node that joins.
	IP string
	// Aggregation configures the API server for extension API servers and
	// webhooks behind Services (cluster.Options.Aggregation).
	Aggregation bool
	// Primary is the node's primary CNI: Flannel (the default), Calico
	// (calico.go) or Cilium (cilium.go); Calico and Cilium run in a node
	// container only, with kube-proxy.
	Primary Primary
	// CiliumValues are values files for Cilium's chart (Primary Cilium).
	CiliumValues []string
}

// Primary names a primary CNI a node runs.
type Primary string

// The primary CNIs.
const (
	Flannel Primary = "flannel"
	Calico  Primary = "calico"
	Cilium  Primary = "cilium"
)

// Node is a running single-node cluster.
type Node struct {
	Name string
	// IP is the node's address on its LAN (eth0).
	IP string
	// Dir holds all state and logs: cluster/, containerd/, kubelet/,
	// cni/{bin,net.d}, flannel/.
	Dir string
	// NetNS is the path of the node's network namespace.
	NetNS string
	// Cluster is the control plane; Cluster.Config reaches it from the
	// test process.
	Cluster *cluster.Cluster
	// Kube is a clientset with Cluster.Config.
	Kube kubernetes.Interface
	// CNIBinDir and CNIConfDir are containerd's CNI directories.
	CNIBinDir, CNIConfDir string
	// ContainerdSock is containerd's gRPC socket.
	ContainerdSock string
	// NetnsDir is where containerd mounts pod network namespaces.
	NetnsDir string
	// Primary is the primary CNI the node runs.
	Primary Primary
	// Bin maps a tool's name (crictl, ctr, helm, ...) to its binary.
	Bin map[string]string
	// Timings of the start: "cluster", "containerd", "kubelet", "ready".
	Timings map[string]time.Duration

	id         string // random suffix of names
	lanNS      string
	joined     *Node // the node whose control plane this one joined
	initPid    int   // a node container's PID 1, in the machine's PID namespace
	cgroupRoot string
	launcher   *proc.Launcher
	procs      []*proc.Proc // in start order
	sysctls    map[string]string
	shimSocks  map[string]bool // /run/containerd/s entries before start
	cniCache   bool            // /var/lib/cni existed before start
	kubeletDir bool            // /var/lib/kubelet existed before start
	stopOnce   sync.Once
}

// Tools Start builds and uses.
var tools = []string{
	"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet",
	"containerd", "containerd-shim-runc-v2", "ctr", "crictl",
	"flanneld", "flannel", "bridge", "host-local", "loopback", "portmap", "helm",
}

// Check reports what the machine lacks for a node (Debian's runc, ip, nft,
// buildah), or nil.
func Check() error { return check(false) }

// CheckContainer is Check for node containers (Options.Container): a
// kubelet on the machine, or a test's node beside them, does not matter.
func CheckContainer() error { return check(true) }

// check is Check; a node container has a device-plugin directory of its
// own, so a kubelet on the machine does not matter to it.
func check(container bool) error {
	var missing []string
	for _, b := range []string{"runc", "ip", "nft", "buildah"} {
		if _, err := exec.LookPath(b); err != nil {
			missing = append(missing, b)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("a real node needs %s (make deps)", strings.Join(missing, ", "))
	}
	if os.Geteuid() != 0 {
		return errors.New("a real node needs root")
	}
	// kubelet's device manager always serves, and first empties, this
	// fixed directory: a kubelet already running here would lose its
	// device plugins.
	if container {
		return nil
	}
	if c, err := dialUnix(filepath.Join(kubeletDeviceDir, "kubelet.sock")); err == nil {
		_ = c.Close()
		return fmt.Errorf("a kubelet runs on this host (%s/kubelet.sock answers); the test node would take its device-plugin socket", kubeletDeviceDir)
	}
	return nil
}

// kubeletDeviceDir is the device-plugin directory every kubelet uses,
// whatever its --root-dir.
const kubeletDeviceDir = "/var/lib/kubelet/device-plugins"

// StartT starts a node in a fresh temporary directory and stops it when the
// test ends, with the tail of every log in the test's output when it failed.
func StartT(t testing.TB, opts Options) *Node {
	t.Helper()
	dir, err := os.MkdirTemp("", "vmnic-node-")
	if err != nil {
		t.Fatal(err)
	}
	n, err := Start(t.Context(), dir, opts)
	if err != nil {
		_ = os.RemoveAll(dir)
		t.Fatalf("start node: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("node logs (%s):\n%s", n.Dir, n.LogTail(40))
		}
		if err := n.Stop(); err != nil {
			t.Errorf("stop node: %v", err)
		}
		if !t.Failed() {
			_ = os.RemoveAll(dir)
		}
	})
	return n
}

// Start brings a node up in dir and returns once the Node is Ready. ctx
// bounds the start (tool builds included). On error everything started is
// stopped again.
func Start(ctx context.Context, dir string, opts Options) (*Node, error) {
	if err := check(opts.Container); err != nil {
		return nil, err
	}
	if opts.Name == "" {
		opts.Name = "node-1"
	}
	if opts.IP == "" {
		opts.IP = NodeIP
	}
	if opts.Join != nil && opts.IP == opts.Join.IP {
		return nil, fmt.Errorf("node %s joins %s: it needs an IP of its own (Options.IP)", opts.Name, opts.Join.Name)
	}
	if opts.ReadyTimeout <= 0 {
		opts.ReadyTimeout = 2 * time.Minute
	}
	if opts.Primary == "" {
		opts.Primary = Flannel
	}
	if opts.Primary != Flannel && !opts.Container {
		// calico-node, the Cilium agent and their CNI plugins keep state
		// at fixed paths (/var/lib/calico, /var/run/cilium, /sys/fs/bpf),
		// which a node container makes its own.
		return nil, fmt.Errorf("node %s: %s runs only in a node container (Options.Container)", opts.Name, opts.Primary)
	}
	names := slices.Concat(tools, primaryTools[opts.Primary])
	paths, err := cluster.Binaries(ctx, names...)
	if err != nil {
		return nil, err
	}
	idb := make([]byte, 3)
	_, _ = rand.Read(idb)
	id := hex.EncodeToString(idb)
	n := &Node{
		Name: opts.Name, IP: opts.IP, Dir: dir, id: id, Primary: opts.Primary,
		NetNS:      "/run/netns/vmnic-node-" + id,
		lanNS:      "vmnic-lan-" + id,
		joined:     opts.Join,
		cgroupRoot: "/vmnic-node-" + id,
		CNIBinDir:  filepath.Join(dir, "cni", "bin"),
		CNIConfDir: filepath.Join(dir, "cni", "net.d"),
		Bin:        map[string]string{},
		Timings:    map[string]time.Duration{},
	}
	if _, err := os.Stat(cniCacheDir); err == nil {
		n.cniCache = true
	}
	if _, err := os.Stat(filepath.Dir(kubeletDeviceDir)); err == nil {
		n.kubeletDir = true
	}
	for i, name := range names {
		n.Bin[name] = paths[i]
	}
	if err := n.start(ctx, opts); err != nil {
		tail := n.LogTail(30)
		_ = n.Stop()
		return nil, fmt.Errorf("%w\n%s", err, tail)
	}
	return n, nil
}

func (n *Node) start(ctx context.Context, opts Options) error {
	began := time.Now()
	// Dir becomes a shared mount of its own, as kubelet makes its root dir:
	// HostToContainer propagation (vmnicd's view of the pod netns mounts
	// under containerd's state) needs a shared source, and this machine's
	// root mount is private. Stop unmounts it with everything below.
	if err := unix.Mount(n.Dir, n.Dir, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("bind mount %s: %w", n.Dir, err)
	}
	if err := unix.Mount("", n.Dir, "", unix.MS_SHARED|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("make %s shared: %w", n.Dir, err)
	}
	if n.joined != nil {
		n.lanNS = n.joined.lanNS
	}
	if err := n.network(); err != nil {
		return err
	}
	l, err := proc.NewLauncherIn(n.NetNS)
	if err != nil {
		return err
	}
	n.launcher = l
	if opts.Container {
		if err := n.startContainer(ctx); err != nil {
			return err
		}
	}
	if n.joined != nil {
		n.Cluster, n.Kube = n.joined.Cluster, n.joined.Kube
	} else {
		c, err := cluster.Start(ctx, filepath.Join(n.Dir, "cluster"), cluster.Options{
			BinDir:      filepath.Dir(n.Bin["kube-apiserver"]),
			Launcher:    l,
			Address:     n.IP,
			Dial:        proc.NetnsDialer(n.NetNS),
			Aggregation: opts.Aggregation,
			APIServerArgs: []string{
				"--service-cluster-ip-range=" + ServiceCIDR,
				// No DNS knows the nodes' names: logs, exec and
				// port-forward reach kubelet at the node's IP.
				"--kubelet-preferred-address-types=InternalIP",
			},
		})
		if err != nil {
			return err
		}
		n.Cluster = c
		if n.Kube, err = kubernetes.NewForConfig(c.Config); err != nil {
			return err
		}
	}
	n.Timings["cluster"] = time.Since(began)
	if n.Primary == Flannel {
		if err := n.serviceDNAT(n.Cluster.URL); err != nil {
			return err
		}
	}
	if n.joined == nil {
		if err := n.startControllers(); err != nil {
			return err
		}
	}
	t := time.Now()
	if err := n.startContainerd(ctx); err != nil {
		return err
	}
	n.Timings["containerd"] = time.Since(t)
	if n.Primary == Flannel {
		if err := n.installFlannelCNI(); err != nil {
			return err
		}
	}
	t = time.Now()
	if err := n.startKubelet(); err != nil {
		return err
	}
	n.Timings["kubelet"] = time.Since(t)
	switch n.Primary {
	case Flannel:
		// flanneld exits when the Node has no podCIDR yet (its DaemonSet
		// would restart it): start it once the controller manager
		// assigned one.
		if err := n.waitPodCIDR(ctx, opts.ReadyTimeout); err != nil {
			return err
		}
		if err := n.startFlannel(); err != nil {
			return err
		}
		if err := n.waitFile(ctx, filepath.Join(n.Dir, "flannel", "subnet.env"), opts.ReadyTimeout); err != nil {
			return err
		}
	case Calico:
		if err := n.startCalico(ctx, opts.ReadyTimeout); err != nil {
			return err
		}
	case Cilium:
		// IPAM from the Node's podCIDR.
		if err := n.waitPodCIDR(ctx, opts.ReadyTimeout); err != nil {
			return err
		}
		if err := n.startCilium(ctx, opts.ReadyTimeout, opts.CiliumValues); err != nil {
			return err
		}
	}
	if err := n.WaitReady(ctx, opts.ReadyTimeout); err != nil {
		return err
	}
	n.Timings["ready"] = time.Since(began)
	return nil
}

// runCtx is run bounded by ctx.
func runCtx(ctx context.Context, name string, args ...string) (string, error) {
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, bytes.TrimSpace(append(stderr.Bytes(), stdout.Bytes()...)))
	}
	return stdout.String(), nil
}

// run runs a command in the host namespace and returns its standard
// output, with its standard error in the error when it fails.
func run(name string, args ...string) (string, error) {
	return runCtx(context.Background(), name, args...)
}

// InNode runs a command inside the node's network namespace and returns
// its standard output.
func (n *Node) InNode(name string, args ...string) (string, error) {
	return InNetns(n.NetNS, name, args...)
}

// InNetns runs a command inside the network namespace at path (a pod's,
// from PodNetns) and returns its standard output.
func InNetns(path, name string, args ...string) (string, error) {
	return run("nsenter", append([]string{"--net=" + path, "--", name}, args...)...)
}

// network makes the node's and the LAN's namespaces, eth0 on the LAN
// bridge, the default route, forwarding and the sysctls pods need.
func (n *Node) network() error {
	node := filepath.Base(n.NetNS)
	steps := [][]string{{"netns", "add", node}}
	if n.joined == nil {
		steps = append(steps,
			[]string{"netns", "add", n.lanNS},
			[]string{"-n", n.lanNS, "link", "add", "br0", "type", "bridge"},
			[]string{"-n", n.lanNS, "addr", "add", LANGateway + "/24", "dev", "br0"},
			[]string{"-n", n.lanNS, "link", "set", "br0", "up"})
	}
	// The LAN side of eth0 is named after the node's id: several nodes
	// share one LAN.
	port := "node-" + n.id
	steps = append(steps, [][]string{
		{"-n", node, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", n.lanNS},
		{"-n", n.lanNS, "link", "set", port, "master", "br0", "up"},
		{"-n", node, "addr", "add", n.IP + "/24", "dev", "eth0"},
		{"-n", node, "link", "set", "lo", "up"},
		{"-n", node, "link", "set", "eth0", "up"},
		{"-n", node, "route", "add", "default", "via", LANGateway},
	}...)
	for _, s := range steps {
		if _, err := run("ip", s...); err != nil {
			return err
		}
	}
	for _, kv := range []string{"net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"} {
		if _, err := n.InNode("sysctl", "-qw", kv); err != nil {
			return err
		}
	}
	return nil
}

// serviceDNAT programs what kube-proxy would for the kubernetes Service in
// the node namespace: 10.96.0.1:443 goes to the API server, from pods
// (prerouting) and from the node itself and hostNetwork pods (output).
func (n *Node) serviceDNAT(apiURL string) error {
	hostPort := strings.TrimPrefix(apiURL, "https://")
	rules := fmt.Sprintf(`table ip vmnic-test-services {
	chain prerouting { type nat hook prerouting priority -100; ip daddr %[1]s tcp dport 443 dnat to %[2]s; }
	chain output { type nat hook output priority -100; ip daddr %[1]s tcp dport 443 dnat to %[2]s; }
}
`, KubernetesService, hostPort)
	path := filepath.Join(n.Dir, "services.nft")
	if err := os.WriteFile(path, []byte(rules), 0o644); err != nil {
		return err
	}
	_, err := n.InNode("nft", "-f", path)
	return err
}

// startProc starts a node process (in the node namespace) with its log in
// Dir/<name>.log.
func (n *Node) startProc(name string, env []string, args ...string) (*proc.Proc, error) {
	return n.startProcOf(name, n.Bin[name], env, args...)
}

// startProcOf is startProc for a process named other than its binary
// (calico-node runs as Felix and as the tunnel address allocator).
func (n *Node) startProcOf(name, bin string, env []string, args ...string) (*proc.Proc, error) {
	logPath := filepath.Join(n.Dir, name+".log")
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	defer func() { _ = f.Close() }()
	_, _ = fmt.Fprintf(f, "==== %s %s\n", bin, strings.Join(args, " "))
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.Env = append([]string{"PATH=" + filepath.Dir(bin) + ":/usr/sbin:/usr/bin:/sbin:/bin", "HOME=" + n.Dir}, env...)
	if nodeProcs[name] {
		cmd = n.inContainer(cmd)
	}
	p, err := proc.StartCmd(n.launcher, cmd)
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p.Name, p.Log = name, logPath
	n.procs = append(n.procs, p)
	return p, nil
}

// nodeProcs are the processes that run inside a node container; the
// control plane stays outside.
var nodeProcs = map[string]bool{"containerd": true, "kubelet": true, "flanneld": true, "kube-proxy": true, "calico-felix": true, "calico-tunnel-addrs": true, "cilium-agent": true}

// startControllers starts kube-controller-manager (node CIDRs for Flannel,
// the DaemonSet and ServiceAccount controllers) and kube-scheduler.
func (n *Node) startControllers() error {
	pki := filepath.Join(n.Cluster.Dir, "pki")
	if _, err := n.startProc("kube-controller-manager", nil,
		"--kubeconfig="+n.Cluster.Kubeconfig,
		"--leader-elect=false",
		"--service-account-private-key-file="+filepath.Join(pki, "sa.key"),
		"--root-ca-file="+filepath.Join(pki, "apiserver.crt"),
		"--use-service-account-credentials",
		"--allocate-node-cidrs",
		"--cluster-cidr="+ClusterCIDR,
		"--node-cidr-mask-size=24",
		"--service-cluster-ip-range="+ServiceCIDR,
		"--controllers=*,-cloud-node-lifecycle,-service-lb-controller,-node-route-controller",
		"--bind-address=127.0.0.1", "--secure-port=10257",
		"--concurrent-daemonset-syncs=2",
	); err != nil {
		return err
	}
	_, err := n.startProc("kube-scheduler", nil,
		"--kubeconfig="+n.Cluster.Kubeconfig,
		"--leader-elect=false",
		"--bind-address=127.0.0.1", "--secure-port=10259",
	)
	return err
}

// poll calls check every interval until it reports done, returns an
// error, a node process dies, or timeout passes; the timeout's error says
// "<what> not after <timeout>" with check's last reason.
func (n *Node) poll(ctx context.Context, timeout, interval time.Duration, what string, check func(ctx context.Context) (done bool, reason string, err error)) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for {
		done, reason, err := check(ctx)
		if done || err != nil {
			return err
		}
		if err := n.exited(); err != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: not after %v: %s", what, timeout, reason)
		case <-time.After(interval):
		}
	}
}

// WaitReady waits until the Node reports Ready.
func (n *Node) WaitReady(ctx context.Context, timeout time.Duration) error {
	return n.poll(ctx, timeout, 200*time.Millisecond, "node "+n.Name+" Ready", func(ctx context.Context) (bool, string, error) {
		no, err := n.Kube.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
		if err != nil {
			return false, "not registered: " + err.Error(), nil
		}
		ready, why := NodeReady(no)
		return ready, why, nil
	})
}

// waitPodCIDR waits until the Node is registered with a podCIDR.
func (n *Node) waitPodCIDR(ctx context.Context, timeout time.Duration) error {
	return n.poll(ctx, timeout, 100*time.Millisecond, "node "+n.Name+" podCIDR", func(ctx context.Context) (bool, string, error) {
		no, err := n.Kube.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
		if err != nil {
			return false, err.Error(), nil
		}
		return no.Spec.PodCIDR != "", "none assigned", nil
	})
}

// waitFile waits until path exists, or a node process dies.
func (n *Node) waitFile(ctx context.Context, path string, timeout time.Duration) error {
	return n.poll(ctx, timeout, 100*time.Millisecond, path+" written", func(context.Context) (bool, string, error) {
		_, err := os.Stat(path)
		return err == nil, fmt.Sprint(err), nil
	})
}

// NodeReady reports whether a Node's Ready condition is True, and its
// message when not.
func NodeReady(no *corev1.Node) (bool, string) {
	for _, c := range no.Status.Conditions {
		if c.Type == corev1.NodeReady {
			return c.Status == corev1.ConditionTrue, fmt.Sprintf("%s: %s", c.Reason, c.Message)
		}
	}
	return false, "no Ready condition"
}

// exited returns an error naming a node process that has died.
func (n *Node) exited() error {
	for _, p := range n.procs {
		if p.HasExited() {
			return fmt.Errorf("%s exited (%v); log %s:\n%s", p.Name, p.Err(), p.Log, proc.Tail(p.Log, 20))
		}
	}
	return nil
}

// LogTail returns the last n lines of every node log.
func (n *Node) LogTail(lines int) string {
	var b strings.Builder
	if n.Cluster != nil {
		b.WriteString(n.Cluster.LogTail(lines))
	}
	for _, p := range n.procs {
		fmt.Fprintf(&b, "--- %s (last %d lines)\n%s\n", p.Log, lines, proc.Tail(p.Log, lines))
	}
	return b.String()
}

// Stop tears everything down, in this order, and reports what it could not
// undo: kubelet stops; every pod sandbox is stopped and removed through
// containerd (CNI DEL for each); the node's processes and the control
// plane are killed, and any containerd shim or container left of this
// node; mounts under Dir are unmounted; the node's cgroups, shim sockets and
// namespaces are removed and the kernel settings kubelet changed restored.
// Safe to call more than once.
func (n *Node) Stop() error {
	var errs []error
	n.stopOnce.Do(func() {
		errs = n.stop()
	})
	return errors.Join(errs...)
}

func (n *Node) stop() []error {
	var errs []error
	note := func(err error) {
		if err != nil {
			errs = append(errs, err)
		}
	}
	if p := n.proc("kubelet"); p != nil {
		p.Kill()
	}
	if n.ContainerdSock != "" && n.proc("containerd") != nil && !n.proc("containerd").HasExited() {
		note(n.removeSandboxes())
	}
	for i := len(n.procs) - 1; i >= 0; i-- {
		n.procs[i].Kill()
	}
	if n.Cluster != nil && n.joined == nil {
		n.Cluster.Stop()
	}
	note(n.killLeftovers())
	if n.launcher != nil {
		n.launcher.Close()
	}
	note(n.unmountAll())
	note(n.removeCgroups())
	n.removeShimSockets()
	n.removeCNICache()
	n.removeKubeletDeviceDir()
	netns := []string{filepath.Base(n.NetNS)}
	if n.joined == nil {
		netns = append(netns, n.lanNS)
	}
	for _, ns := range netns {
		if _, err := os.Stat(filepath.Join("/run/netns", ns)); err == nil {
			if _, err := run("ip", "netns", "delete", ns); err != nil {
				note(err)
			}
		}
	}
	note(n.restoreSysctls())
	return errs
}

func (n *Node) proc(name string) *proc.Proc {
	for _, p := range n.procs {
		if p.Name == name {
			return p
		}
	}
	return nil
}

// Launcher starts processes inside the node's network namespace (for
// daemons a test adds to the node, such as Spiderpool's agent).
func (n *Node) Launcher() *proc.Launcher { return n.launcher }

// Crictl runs crictl against the node's containerd.
func (n *Node) Crictl(args ...string) (string, error) {
	conf := filepath.Join(n.Dir, "crictl.yaml")
	if _, err := os.Stat(conf); err != nil {
		yaml := "runtime-endpoint: unix://" + n.ContainerdSock + "\nimage-endpoint: unix://" + n.ContainerdSock + "\ntimeout: 30\n"
		if err := os.WriteFile(conf, []byte(yaml), 0o644); err != nil {
			return "", err
		}
	}
	return run(n.Bin["crictl"], append([]string{"--config", conf}, args...)...)
}

// removeSandboxes stops and removes every pod sandbox, so that containerd
// sends CNI DEL for each and the pods' processes end.
func (n *Node) removeSandboxes() error {
	out, err := n.Crictl("pods", "-q")
	if err != nil {
		return err
	}
	var errs []error
	for _, id := range strings.Fields(out) {
		if _, err := n.Crictl("stopp", id); err != nil {
			errs = append(errs, err)
		}
		if _, err := n.Crictl("rmp", "-f", id); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// killLeftovers kills what outlived the processes Stop killed: containerd
// shims of this node's containerd (they daemonize) and any process in the
// node's cgroups (containers).
func (n *Node) killLeftovers() error {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return err
	}
	killed := false
	for _, e := range entries {
		pid := e.Name()
		if pid[0] < '0' || pid[0] > '9' {
			continue
		}
		cmdline, _ := os.ReadFile(filepath.Join("/proc", pid, "cmdline"))
		cgroup, _ := os.ReadFile(filepath.Join("/proc", pid, "cgroup"))
		ours := n.ContainerdSock != "" && bytes.Contains(cmdline, []byte(n.ContainerdSock)) ||
			bytes.Contains(cgroup, []byte(n.cgroupRoot+"/"))
		if !ours {
			continue
		}
		var p int
		if _, err := fmt.Sscan(pid, &p); err == nil {
			_ = syscall.Kill(p, syscall.SIGKILL)
			killed = true
		}
	}
	if killed {
		time.Sleep(200 * time.Millisecond)
	}
	return nil
}

// unmountAll unmounts everything mounted under Dir (kubelet's root dir
// bind mount, pod volumes, containerd's rootfs and netns mounts), deepest
// first, lazily.
func (n *Node) unmountAll() error {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return err
	}
	dir := filepath.Clean(n.Dir)
	var points []string
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) < 5 {
			continue
		}
		mp := unescapeMount(f[4])
		if mp == dir || strings.HasPrefix(mp, dir+"/") {
			points = append(points, mp)
		}
	}
	sort.Slice(points, func(i, j int) bool { return len(points[i]) > len(points[j]) })
	var errs []error
	for _, mp := range points {
		if err := unix.Unmount(mp, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("unmount %s: %w", mp, err))
		}
	}
	return errors.Join(errs...)
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var v int
			if _, err := fmt.Sscanf(s[i+1:i+4], "%o", &v); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// removeCgroups removes the node's cgroup root from every cgroup v1
// hierarchy (and the unified one, if mounted), leaves first.
func (n *Node) removeCgroups() error {
	hier, err := filepath.Glob("/sys/fs/cgroup/*")
	if err != nil {
		return err
	}
	var errs []error
	for _, h := range hier {
		root := filepath.Join(h, n.cgroupRoot)
		if _, err := os.Stat(root); err != nil {
			continue
		}
		var dirs []string
		_ = filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		sort.Slice(dirs, func(i, j int) bool { return len(dirs[i]) > len(dirs[j]) })
		for _, d := range dirs {
			var err error
			for range 20 {
				if err = unix.Rmdir(d); err == nil || errors.Is(err, unix.ENOENT) {
					err = nil
					break
				}
				time.Sleep(50 * time.Millisecond) // a killed task leaves late
			}
			if err != nil {
				errs = append(errs, fmt.Errorf("remove cgroup %s: %w", d, err))
			}
		}
	}
	return errors.Join(errs...)
}

// shimSocketDir is where every containerd 2.x puts its shims' sockets,
// whatever its own state dir.
const shimSocketDir = "/run/containerd/s"

func listShimSockets() map[string]bool {
	m := map[string]bool{}
	entries, _ := os.ReadDir(shimSocketDir)
	for _, e := range entries {
		m[e.Name()] = true
	}
	return m
}

// removeShimSockets removes the shim sockets that appeared while the node
// ran (a system containerd's are left alone: they were there before, or
// their shim still runs and listens).
func (n *Node) removeShimSockets() {
	if n.shimSocks == nil {
		return
	}
	for name := range listShimSockets() {
		if n.shimSocks[name] {
			continue
		}
		p := filepath.Join(shimSocketDir, name)
		if c, err := dialUnix(p); err == nil {
			_ = c.Close()
			continue // someone listens: not ours
		}
		_ = os.Remove(p)
	}
	if len(n.shimSocks) == 0 {
		// The directory (and /run/containerd) did not exist or was empty
		// before: remove them when empty.
		_ = os.Remove(shimSocketDir)
		_ = os.Remove(filepath.Dir(shimSocketDir))
	}
}

// cniCacheDir is libcni's result cache, which containerd does not let a
// config move.
const cniCacheDir = "/var/lib/cni"

// removeCNICache removes the results containerd's libcni cached for this
// node's networks (DEL removes them; a sandbox killed with its node leaves
// them), and the cache dir itself when this node made it.
func (n *Node) removeCNICache() {
	if n.id == "" {
		return
	}
	for _, net := range []string{n.FlannelNetwork()} {
		left, _ := filepath.Glob(filepath.Join(cniCacheDir, "results", net+"-*"))
		for _, p := range left {
			_ = os.Remove(p)
		}
	}
	if !n.cniCache {
		_ = os.Remove(filepath.Join(cniCacheDir, "results"))
		_ = os.Remove(cniCacheDir)
	}
}

// removeKubeletDeviceDir removes kubelet's device-plugin socket, and
// /var/lib/kubelet when this node's kubelet made it.
func (n *Node) removeKubeletDeviceDir() {
	// A node container's kubelet has its own (under Dir).
	if n.id == "" || n.proc("kubelet") == nil || n.initPid != 0 {
		return
	}
	_ = os.Remove(filepath.Join(kubeletDeviceDir, "kubelet.sock"))
	if !n.kubeletDir {
		_ = os.RemoveAll(filepath.Dir(kubeletDeviceDir))
	}
}

// kubeletSysctls are the kernel settings kubelet sets at start (its
// setupKernelTunables); Stop restores the values found before.
var kubeletSysctls = []string{"vm/overcommit_memory", "kernel/panic", "kernel/panic_on_oops"}

func (n *Node) saveSysctls() error {
	n.sysctls = map[string]string{}
	for _, k := range kubeletSysctls {
		b, err := os.ReadFile("/proc/sys/" + k)
		if err != nil {
			return err
		}
		n.sysctls[k] = strings.TrimSpace(string(b))
	}
	return nil
}

func (n *Node) restoreSysctls() error {
	var errs []error
	for k, v := range n.sysctls {
		if err := os.WriteFile("/proc/sys/"+k, []byte(v), 0o644); err != nil {
			errs = append(errs, fmt.Errorf("restore %s: %w", k, err))
		}
	}
	return errors.Join(errs...)
}

// Link joins two nodes' network namespaces with a veth pair, named name on
// both sides and up: a cable between the nodes, for a network of their own
// beside the LAN (an OVS bridge's uplink, a macvlan's parent). The pair
// goes with either namespace.
func Link(a, b *Node, name string) error {
	if _, err := run("ip", "-n", filepath.Base(a.NetNS), "link", "add", name, "type", "veth", "peer", "name", name, "netns", filepath.Base(b.NetNS)); err != nil {
		return err
	}
	for _, n := range []*Node{a, b} {
		if _, err := n.InNode("ip", "link", "set", name, "up"); err != nil {
			return err
		}
	}
	return nil
}

// primaryTools are the tools each primary CNI adds to tools.
var primaryTools = map[Primary][]string{
	Calico: {"calico-node", "calico", "kube-proxy"},
	Cilium: {"cilium-agent", "cilium-cni", "kube-proxy"},
}

// moduleDir is the directory of module path, required by test/tools/<tools>,
// in the module cache (its chart, manifests and sources are the tests').
func moduleDir(ctx context.Context, tools, path string) (string, error) {
	root, err := cluster.RepoRoot()
	if err != nil {
		return "", err
	}
	cmd := exec.CommandContext(ctx, "go", "list", "-m", "-f", "{{.Dir}}", path)
	cmd.Dir = filepath.Join(root, "test", "tools", tools)
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("find %s in test/tools/%s: %w", path, tools, err)
	}
	return strings.TrimSpace(string(out)), nil
}
