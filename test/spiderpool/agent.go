// Package spiderpool runs the real Spiderpool v1.2.2 agent against a test
// cluster (test/cluster), so tests can hand the real `spiderpool` IPAM
// plugin to CNI plugins (CNI_PATH=PluginPath()) and check what Spiderpool
// records in its CRDs.
//
// The binaries come from their own module, test/tools/spiderpool (its
// Kubernetes 0.29 libraries cannot share test/tools' 1.36 ones), built by
// test/tools/build.sh into the repository's .tools/bin. StartAgent runs
// the agent alone: no webhook defaults or validates objects (SpiderIPPools
// need spec.ipVersion), and nothing garbage-collects IPs. StartController
// (controller.go) adds spiderpool-controller as the chart deploys it: its
// webhooks, and the SpiderMultusConfigs it turns into
// NetworkAttachmentDefinitions.
//
//	c := cluster.StartT(t)
//	a := spiderpool.StartAgentT(t, c, spiderpool.AgentOptions{})
//	// netconf: "ipam": {"type": "spiderpool", "ipam_unix_socket_path": a.Socket, ...}
package spiderpool

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmnic/vmnic/test/proc"

	"github.com/vmnic/vmnic/test/cluster"
)

// Module is the Go module the binaries, CRDs and chart come from.
const Module = "github.com/spidernet-io/spiderpool"

// PluginName is the IPAM plugin's binary name, the netconf's ipam.type.
const PluginName = "spiderpool"

// maxSocketPath is the longest unix socket path the kernel takes
// (sun_path is 108 bytes with the terminating NUL).
const maxSocketPath = 107

// AgentOptions tune StartAgent. The zero value is fine.
type AgentOptions struct {
	// Namespace is the agent's namespace (SPIDERPOOL_POD_NAMESPACE): where
	// a pool's spec.multusName without a namespace resolves. It is created
	// when missing. Default "kube-system".
	Namespace string
	// PodName is SPIDERPOOL_POD_NAME; no such Pod needs to exist. Default
	// "spiderpool-agent".
	PodName string
	// NodeName is SPIDERPOOL_NODE_NAME, the node the agent serves; give
	// pods this spec.nodeName. Default "spiderpool-node".
	NodeName string
	// MultusClusterNetwork is MULTUS_CLUSTER_NETWORK, "namespace/name" of
	// the default network (matched against spec.multusName of pools for
	// the first NIC). Default "<Namespace>/default".
	MultusClusterNetwork string
	// EnableIPv6 sets enableIPv6 in conf.yml (enableIPv4 is always on).
	EnableIPv6 bool
	// LogLevel is SPIDERPOOL_LOG_LEVEL (debug, info, warn, error). Default
	// "debug".
	LogLevel string
	// BinDir holds spiderpool-agent. Empty: test/tools/build.sh builds it
	// (when missing or stale) into the repository's .tools/bin.
	BinDir string
	// Launcher starts the agent; one made with proc.NewLauncherIn runs it
	// in another network namespace (a node's, whose API server it
	// reaches). The caller keeps it. nil: the agent's own.
	Launcher *proc.Launcher
	// KubeVirtInstalled leaves KubeVirt's CRDs as they are: the cluster
	// runs the real KubeVirt, whose operator made them. Otherwise
	// StartAgent installs the minimal ones the agent reads.
	KubeVirtInstalled bool
	// ReadyTimeout bounds the wait for the agent's health endpoint
	// (building the binary is bounded only by StartAgent's context).
	// Default 60s.
	ReadyTimeout time.Duration
}

// Agent is a running spiderpool-agent.
type Agent struct {
	// Socket is the IPAM unix socket, the netconf's ipam_unix_socket_path.
	Socket string
	// Dir holds conf.yml, the socket, gops/ and spiderpool-agent.log.
	Dir string
	// Log is the agent's log file.
	Log string
	// Namespace, PodName and NodeName are the agent's identity.
	Namespace, PodName, NodeName string
	// HealthPort is the agent's OpenAPI HTTP port (all addresses).
	HealthPort int

	launcher *proc.Launcher
	own      bool // launcher is the agent's own: Stop closes it
	proc     *proc.Proc
	stopOnce sync.Once
}

// StartAgent installs Spiderpool's CRDs (and KubeVirt's minimal ones, see
// AgentOptions.KubeVirtInstalled) into c, writes dir/conf.yml, starts
// spiderpool-agent with c's admin kubeconfig and waits until
// GET /v1/ipam/healthy answers on the unix socket. ctx bounds the startup only (including a build of the binary);
// the agent lives until Stop, or until the test process dies (it gets
// SIGKILL then). On error nothing is left running and the error carries
// the tail of the agent's log.
func StartAgent(ctx context.Context, c *cluster.Cluster, dir string, opts AgentOptions) (*Agent, error) {
	opts = withDefaults(opts)
	dir, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("agent dir: %w", err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("agent dir: %w", err)
	}
	a := &Agent{
		Socket:    filepath.Join(dir, "spiderpool.sock"),
		Dir:       dir,
		Log:       filepath.Join(dir, "spiderpool-agent.log"),
		Namespace: opts.Namespace,
		PodName:   opts.PodName,
		NodeName:  opts.NodeName,
	}
	if len(a.Socket) > maxSocketPath {
		return nil, fmt.Errorf("socket path %s is longer than %d bytes: use a shorter dir", a.Socket, maxSocketPath)
	}

	bin := filepath.Join(opts.BinDir, "spiderpool-agent")
	if opts.BinDir == "" {
		paths, err := cluster.Binaries(ctx, "spiderpool-agent")
		if err != nil {
			return nil, err
		}
		bin = paths[0]
	}
	if err := installObjects(ctx, c, opts); err != nil {
		return nil, err
	}
	conf := filepath.Join(dir, "conf.yml")
	if err := os.WriteFile(conf, []byte(agentConfig(a.Socket, opts.EnableIPv6)), 0o644); err != nil {
		return nil, fmt.Errorf("write agent config: %w", err)
	}

	a.launcher = opts.Launcher
	if a.launcher == nil {
		a.launcher, a.own = proc.NewLauncher(), true
	}
	if err := a.start(ctx, bin, conf, c.Kubeconfig, opts); err != nil {
		a.Stop()
		return nil, fmt.Errorf("%w\n--- %s (last 40 lines)\n%s", err, a.Log, a.LogTail(40))
	}
	return a, nil
}

// StartAgentT starts an agent in a t.TempDir() and stops it when the test
// ends. It fails the test when startup fails, and logs the tail of the
// agent's log when the test failed.
func StartAgentT(t testing.TB, c *cluster.Cluster, opts AgentOptions) *Agent {
	t.Helper()
	a, err := StartAgent(t.Context(), c, t.TempDir(), opts)
	if err != nil {
		t.Fatalf("start spiderpool-agent: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("spiderpool-agent log (%s):\n%s", a.Log, a.LogTail(40))
		}
		a.Stop()
	})
	return a
}

// Stop kills the agent (SIGKILL to its process group) and waits until it
// is gone. It leaves Dir in place and is safe to call more than once.
func (a *Agent) Stop() {
	a.stopOnce.Do(func() {
		a.proc.Kill()
		if a.own {
			a.launcher.Close()
		}
	})
}

// Pid is the agent's process id (0 when not started).
func (a *Agent) Pid() int {
	if a.proc == nil {
		return 0
	}
	return a.proc.Cmd.Process.Pid
}

// LogTail returns the last n lines of the agent's log.
func (a *Agent) LogTail(n int) string { return proc.Tail(a.Log, n) }

// IPAMConfig returns the "ipam" object of a netconf that delegates to the
// `spiderpool` plugin talking to this agent, with ipv4Pools as the default
// IPv4 pools (none: the pod's annotations or the default pools decide). The
// plugin logs to Dir/ipam-plugin.log instead of its default
// /var/log/spidernet/spiderpool.log.
func (a *Agent) IPAMConfig(ipv4Pools ...string) map[string]any {
	return a.IPAMConfigDual(ipv4Pools, nil)
}

// IPAMConfigDual is IPAMConfig with default IPv4 and IPv6 pools (a
// dual-stack NIC takes one address from each; the agent needs EnableIPv6).
func (a *Agent) IPAMConfigDual(ipv4Pools, ipv6Pools []string) map[string]any {
	m := map[string]any{
		"type":                  PluginName,
		"ipam_unix_socket_path": a.Socket,
		"log_file_path":         filepath.Join(a.Dir, "ipam-plugin.log"),
	}
	if len(ipv4Pools) > 0 {
		m["default_ipv4_ippool"] = ipv4Pools
	}
	if len(ipv6Pools) > 0 {
		m["default_ipv6_ippool"] = ipv6Pools
	}
	return m
}

// PluginPath returns the directory holding the built `spiderpool` IPAM
// plugin (and the `coordinator` plugin), for CNI_PATH. It builds them when
// missing or stale.
func PluginPath() (string, error) {
	paths, err := cluster.Binaries(context.Background(), PluginName, "coordinator")
	if err != nil {
		return "", err
	}
	return filepath.Dir(paths[0]), nil
}

// ModuleDir returns the module cache directory of Spiderpool as
// test/tools/spiderpool requires it, downloading the module when missing.
func ModuleDir(ctx context.Context) (string, error) {
	root, err := cluster.RepoRoot()
	if err != nil {
		return "", err
	}
	cmd := exec.CommandContext(ctx, "go", "mod", "download", "-json", Module)
	cmd.Dir = filepath.Join(root, "test", "tools", "spiderpool")
	cmd.Env = append(os.Environ(), "GONOSUMDB=github.com/tigera", "GOFLAGS=-mod=readonly")
	out, err := cmd.Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			err = fmt.Errorf("%w: %s", err, strings.TrimSpace(string(ee.Stderr)))
		}
		return "", fmt.Errorf("go mod download %s in test/tools/spiderpool: %w", Module, err)
	}
	var m struct{ Dir, Error string }
	if err := json.Unmarshal(out, &m); err != nil {
		return "", fmt.Errorf("go mod download %s: %w", Module, err)
	}
	if m.Dir == "" {
		return "", fmt.Errorf("go mod download %s: no directory (%s)", Module, m.Error)
	}
	return m.Dir, nil
}

// CRDFiles returns the CRD manifests StartAgent installs: the chart's
// spiderpool.spidernet.io CRDs and the NetworkAttachmentDefinition CRD (in
// the agent's scheme), not the SR-IOV operator's.
func CRDFiles(ctx context.Context) ([]string, error) {
	dir, err := ModuleDir(ctx)
	if err != nil {
		return nil, err
	}
	files, err := filepath.Glob(filepath.Join(dir, "charts", "spiderpool", "crds", "spiderpool.spidernet.io_*.yaml"))
	if err != nil {
		return nil, fmt.Errorf("spiderpool CRDs: %w", err)
	}
	if len(files) == 0 {
		return nil, fmt.Errorf("no spiderpool CRDs in %s/charts/spiderpool/crds", dir)
	}
	return append(files, filepath.Join(dir, "charts", "spiderpool", "crds", "k8s.cni.cncf.io_networkattachmentdefinitions_crd.yaml")), nil
}

func withDefaults(o AgentOptions) AgentOptions {
	if o.Namespace == "" {
		o.Namespace = "kube-system"
	}
	if o.PodName == "" {
		o.PodName = "spiderpool-agent"
	}
	if o.NodeName == "" {
		o.NodeName = "spiderpool-node"
	}
	if o.MultusClusterNetwork == "" {
		o.MultusClusterNetwork = o.Namespace + "/default"
	}
	if o.LogLevel == "" {
		o.LogLevel = "debug"
	}
	if o.ReadyTimeout <= 0 {
		o.ReadyTimeout = 60 * time.Second
	}
	return o
}

// installObjects creates what the chart and the controller would: the
// CRDs and the agent's namespace.
func installObjects(ctx context.Context, c *cluster.Cluster, opts AgentOptions) error {
	files, err := CRDFiles(ctx)
	if err != nil {
		return err
	}
	if err := c.InstallCRDs(ctx, files...); err != nil {
		return fmt.Errorf("spiderpool CRDs: %w", err)
	}
	// The agent reads VirtualMachineInstances (kubevirt.io/v1) when it
	// releases a VM pod's IPs.
	if !opts.KubeVirtInstalled {
		if err := c.InstallKubeVirtCRDs(ctx); err != nil {
			return fmt.Errorf("kubevirt CRDs: %w", err)
		}
	}
	return c.CreateNamespace(ctx, opts.Namespace)
}

// agentConfig is the spiderpool-conf ConfigMap's conf.yml: IPv4 (and IPv6
// when asked), KubeVirt static IPs, everything else off.
func agentConfig(socket string, ipv6 bool) string {
	return fmt.Sprintf(`ipamUnixSocketPath: %s
enableIPv4: true
enableIPv6: %t
enableStatefulSet: false
enableKubevirtStaticIP: true
enableCleanOutdatedEndpoint: false
enableSpiderSubnet: false
enableAutoPoolForApplication: false
enableIPConflictDetection: false
enableGatewayDetection: false
enableValidatingResourcesDeletedWebhook: false
clusterSubnetDefaultFlexibleIPNumber: 0
tuneSysctlConfig: false
podResourceInject:
  enabled: false
agent:
  networkResourcePlugin:
    enabled: false
`, strconv.Quote(socket), ipv6)
}

// agentEnv is the environment of the agent: the caller's without anything
// the agent reads, plus the agent's identity and ports.
func agentEnv(kubeconfig, gopsDir string, opts AgentOptions, ports []int) []string {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if k == "KUBECONFIG" || k == "GOPS_CONFIG_DIR" || strings.HasPrefix(k, "SPIDERPOOL_") || strings.HasPrefix(k, "MULTUS_") {
			continue
		}
		env = append(env, kv)
	}
	return append(env,
		"KUBECONFIG="+kubeconfig,
		// gops writes a port file per process there, not in $HOME.
		"GOPS_CONFIG_DIR="+gopsDir,
		"SPIDERPOOL_LOG_LEVEL="+opts.LogLevel,
		"SPIDERPOOL_POD_NAMESPACE="+opts.Namespace,
		"SPIDERPOOL_POD_NAME="+opts.PodName,
		"SPIDERPOOL_NODE_NAME="+opts.NodeName,
		"MULTUS_CLUSTER_NETWORK="+opts.MultusClusterNetwork,
		"SPIDERPOOL_HEALTH_PORT="+strconv.Itoa(ports[0]),
		"SPIDERPOOL_METRIC_HTTP_PORT="+strconv.Itoa(ports[1]),
		"SPIDERPOOL_GOPS_LISTEN_PORT="+strconv.Itoa(ports[2]),
	)
}

func (a *Agent) start(ctx context.Context, bin, conf, kubeconfig string, opts AgentOptions) error {
	gopsDir := filepath.Join(a.Dir, "gops")
	if err := os.MkdirAll(gopsDir, 0o700); err != nil {
		return fmt.Errorf("gops dir: %w", err)
	}
	for attempt := 1; ; attempt++ {
		ports, err := proc.FreePorts(3)
		if err != nil {
			return err
		}
		f, err := os.OpenFile(a.Log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			return fmt.Errorf("open agent log: %w", err)
		}
		args := []string{"daemon", "--config-path=" + conf}
		_, _ = fmt.Fprintf(f, "==== %s %s\n", bin, strings.Join(args, " "))
		cmd := exec.Command(bin, args...)
		cmd.Dir = a.Dir
		cmd.Env = agentEnv(kubeconfig, gopsDir, opts, ports)
		cmd.Stdout = f
		cmd.Stderr = f
		p, err := proc.StartCmd(a.launcher, cmd)
		// The child has its own copy of the descriptor.
		_ = f.Close()
		if err != nil {
			return fmt.Errorf("start spiderpool-agent: %w", err)
		}
		a.proc, a.HealthPort = p, ports[0]
		err = a.waitHealthy(ctx, opts.ReadyTimeout)
		if err == nil {
			return nil
		}
		p.Kill()
		if attempt < 3 && p.HasExited() && strings.Contains(a.LogTail(20), "address already in use") {
			continue
		}
		return fmt.Errorf("spiderpool-agent: %w", err)
	}
}

// waitHealthy polls GET /v1/ipam/healthy on the unix socket, as the IPAM
// plugin does before every request.
func (a *Agent) waitHealthy(ctx context.Context, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	client := a.HTTPClient()
	defer client.CloseIdleConnections()
	var last string
	for {
		err := a.get(ctx, client, "/v1/ipam/healthy")
		if err == nil {
			return nil
		}
		last = err.Error()
		select {
		case <-a.proc.Exited():
			return fmt.Errorf("exited during startup (%v)", a.proc.Err())
		case <-ctx.Done():
			return fmt.Errorf("not healthy on %s after %v (last: %s): %w", a.Socket, timeout, last, ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// HTTPClient returns a client that talks to the agent's unix socket; any
// URL host works ("http://spiderpool/v1/ipam/healthy").
func (a *Agent) HTTPClient() *http.Client {
	var d net.Dialer
	return &http.Client{
		Timeout: 5 * time.Second,
		Transport: &http.Transport{
			Proxy: nil,
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				return d.DialContext(ctx, "unix", a.Socket)
			},
		},
	}
}

func (a *Agent) get(ctx context.Context, client *http.Client, path string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://spiderpool"+path, nil)
	if err != nil {
		return err
	}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", path, resp.Status)
	}
	return nil
}
