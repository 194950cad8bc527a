package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"k8s.io/client-go/discovery"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/vmnic/vmnic/daemon/install"
	"github.com/vmnic/vmnic/pkg/capabilities"
	"github.com/vmnic/vmnic/pkg/kubevirt"
	"github.com/vmnic/vmnic/pkg/netconf"
	"github.com/vmnic/vmnic/pkg/shim"
	release "github.com/vmnic/vmnic/pkg/version"
	"github.com/vmnic/vmnic/plugins"
)

// chainEntry is the entry chained into the primary's conflist; it names the
// socket and spool dir when they are not the defaults, so the shim finds
// this daemon.
func chainEntry(socket, spoolDir string) json.RawMessage {
	e := plugins.ChainEntry()
	if socket != netconf.DefaultSocket {
		e["socket"] = socket
	}
	if spoolDir != netconf.DefaultSpoolDir {
		e["spoolDir"] = spoolDir
	}
	b, _ := json.Marshal(e)
	return b
}

// capabilityRunner probes the node and publishes its NodeNetworkCapability,
// labels and OVS bridge resources.
func capabilityRunner(cfg *rest.Config, node, ovsdbEndpoint, spiderSock, confDir string, log *slog.Logger, m *Metrics) (*capabilities.Runner, error) {
	pub, err := capabilities.NewPublisherForConfig(cfg, node, log)
	if err != nil {
		return nil, err
	}
	disc, err := discovery.NewDiscoveryClientForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("discovery client: %w", err)
	}
	probe := capabilities.ProbeOptions{
		Discovery: disc, SpiderpoolSocket: spiderSock, CNIConfDir: confDir, Log: log,
	}
	if o := capabilities.NewOVS(ovsdbEndpoint, log); o != nil {
		probe.OVS = o
	}
	onReport := func(r capabilities.Report, _ bool, _ error) { m.SetCapabilities(r) }
	return capabilities.NewRunner(capabilities.RunOptions{Probe: probe, Sink: pub, OnReport: onReport}), nil
}

// installOnce installs the shim (when a source is given) and chains vmnic.
func installOnce(o install.Options, chain bool) error {
	if o.SourceBinary != "" {
		if _, err := install.InstallBinary(o); err != nil {
			return err
		}
	}
	if chain {
		if _, err := install.Chain(o); err != nil {
			return err
		}
	}
	return nil
}

// restConfig returns the API server config: the kubeconfig if given, the
// in-cluster config inside a pod, nil (standalone) otherwise.
func restConfig(kubeconfig string) (*rest.Config, error) {
	if kubeconfig != "" {
		return clientcmd.BuildConfigFromFlags("", kubeconfig)
	}
	if os.Getenv("KUBERNETES_SERVICE_HOST") != "" {
		return rest.InClusterConfig()
	}
	return nil, nil
}

// Config is how vmnicd is started. Each field but the last three is one of
// its flags (Flags binds them); Logger, Metrics and OnReady are for a
// program that runs vmnicd in its own process (the test harness), which
// passes them instead. Run is the one way to start the daemon: the binary,
// the chart and the tests all go through it.
type Config struct {
	Socket   string
	StateDir string
	SpoolDir string
	// Kubeconfig of the cluster; empty: the in-cluster config inside a pod,
	// standalone (VM facts from the network config) outside one.
	Kubeconfig string
	NodeName   string
	// Bindings are the KubeVirt binding names vmnic serves.
	Bindings         []string
	InstallFrom      string
	CNIBinDir        string
	CNIConfDir       string
	Chain            bool
	OVSDB            string
	HostNetns        string
	SpiderpoolSocket string
	Capabilities     bool
	MetricsAddr      string
	Events           bool
	PodName          string
	PodNamespace     string
	DrainTimeout     time.Duration
	// SyncTimeout bounds one wait for the informers' first sync
	// (DefaultSyncTimeout); WatchDownThreshold is how long a watch may be
	// down before /readyz fails (DefaultWatchDownThreshold).
	SyncTimeout        time.Duration
	WatchDownThreshold time.Duration

	// Logger is the daemon's log (nil: slog.Default()).
	Logger *slog.Logger
	// Metrics are the daemon's counters (nil: new ones).
	Metrics *Metrics
	// OnReady, if set, is called with the daemon once it is ready, for a
	// program that runs vmnicd in process to read its state.
	OnReady func(*Daemon)
}

// DefaultConfig is the configuration of a vmnicd started with no flags,
// less what the environment gives (KUBECONFIG, NODE_NAME, POD_NAME,
// POD_NAMESPACE: the flags take their defaults from it).
func DefaultConfig() Config {
	return Config{
		Socket: netconf.DefaultSocket, StateDir: DefaultStateDir, SpoolDir: netconf.DefaultSpoolDir,
		Bindings:  []string{kubevirt.DefaultBinding},
		CNIBinDir: install.DefaultBinDir, CNIConfDir: install.DefaultConfDir, Chain: true,
		OVSDB:            "unix:/var/run/openvswitch/db.sock",
		SpiderpoolSocket: capabilities.DefaultSpiderpoolSocket,
		Capabilities:     true, MetricsAddr: DefaultMetricsAddr, Events: true,
		DrainTimeout: DefaultDrainTimeout, SyncTimeout: DefaultSyncTimeout, WatchDownThreshold: DefaultWatchDownThreshold,
	}
}

// Flags binds c's flag fields to fs, with c's values as their defaults.
func (c *Config) Flags(fs *flag.FlagSet) {
	fs.StringVar(&c.Socket, "socket", c.Socket, "unix socket the shim talks to")
	fs.StringVar(&c.StateDir, "state-dir", c.StateDir, "directory of attachment records")
	fs.StringVar(&c.SpoolDir, "spool-dir", c.SpoolDir, "directory where the shim spools DELs while the daemon is away")
	fs.StringVar(&c.Kubeconfig, "kubeconfig", c.Kubeconfig, "kubeconfig of the cluster (empty: the in-cluster config in a pod, standalone with VM facts from the network config outside one)")
	fs.StringVar(&c.NodeName, "node-name", c.NodeName, "this node's name (with an API server)")
	fs.Func("bindings", "comma-separated KubeVirt binding names vmnic serves (default "+strings.Join(c.Bindings, ",")+")", func(v string) error {
		c.Bindings = strings.Split(v, ",")
		return nil
	})
	fs.StringVar(&c.InstallFrom, "install-from", c.InstallFrom, "shim binary to install into --cni-bin-dir (empty: do not install)")
	fs.StringVar(&c.CNIBinDir, "cni-bin-dir", c.CNIBinDir, "the host's CNI bin dir as this process sees it")
	fs.StringVar(&c.CNIConfDir, "cni-conf-dir", c.CNIConfDir, "the host's CNI config dir as this process sees it")
	fs.BoolVar(&c.Chain, "chain", c.Chain, "chain vmnic's entry into the primary CNI's conflist and keep it chained")
	fs.StringVar(&c.OVSDB, "ovsdb", c.OVSDB, "OVSDB endpoint of bridge mode: ports are added there and it is probed for the capability report (empty: no OVS)")
	fs.StringVar(&c.HostNetns, "host-netns", c.HostNetns, "the node's network namespace (a path), where modes put the node end of their links, when vmnicd does not run in it (empty: its own, as a hostNetwork DaemonSet pod)")
	fs.StringVar(&c.SpiderpoolSocket, "spiderpool-socket", c.SpiderpoolSocket, "Spiderpool agent socket the capability probe checks")
	fs.BoolVar(&c.Capabilities, "capabilities", c.Capabilities, "probe the node and publish a NodeNetworkCapability (with an API server)")
	fs.StringVar(&c.MetricsAddr, "metrics-addr", c.MetricsAddr, "address of the Prometheus metrics, /healthz and /readyz HTTP endpoint (empty: none)")
	fs.BoolVar(&c.Events, "events", c.Events, "report failed ADDs as Kubernetes Events on the pod and its VMI (with an API server)")
	fs.StringVar(&c.PodName, "pod-name", c.PodName, "this vmnicd's pod (in a DaemonSet): when the DaemonSet is deleted, vmnicd unchains itself and removes the shim on exit")
	fs.StringVar(&c.PodNamespace, "pod-namespace", c.PodNamespace, "the namespace of --pod-name")
	fs.DurationVar(&c.DrainTimeout, "drain-timeout", c.DrainTimeout, "how long a stopping vmnicd waits for the requests in flight")
	fs.DurationVar(&c.SyncTimeout, "sync-timeout", c.SyncTimeout, "how long one wait for the API server caches' first sync lasts before vmnicd logs what it still waits for (it waits on, not ready, and never exits for it)")
	fs.DurationVar(&c.WatchDownThreshold, "watch-down-threshold", c.WatchDownThreshold, "how long a watch on the API server may be down before /readyz fails and vmnicctl status reports it")
}

// installOptions are the shim install and chaining c asks for.
func (c *Config) installOptions(log *slog.Logger) install.Options {
	return install.Options{
		BinDir: c.CNIBinDir, ConfDir: c.CNIConfDir, SourceBinary: c.InstallFrom, Logger: log,
		CNIVersions: shim.Supported.SupportedVersions(),
		Entry:       chainEntry(c.Socket, c.SpoolDir),
	}
}

// Main is vmnicd's command line; it returns the exit code.
//
//	vmnicd [flags]            serve (installing the shim and chaining first when --install-from is set)
//	vmnicd install [flags]    the DaemonSet's init step: install the shim, chain, exit
//	vmnicd uninstall [flags]  unchain vmnic from the CNI configs and exit
func Main(args []string) int {
	cmd := "serve"
	if len(args) > 0 && (args[0] == "install" || args[0] == "uninstall") {
		cmd, args = args[0], args[1:]
	}
	cfg := DefaultConfig()
	cfg.Kubeconfig = os.Getenv("KUBECONFIG")
	cfg.NodeName = os.Getenv("NODE_NAME")
	cfg.PodName, cfg.PodNamespace = os.Getenv("POD_NAME"), os.Getenv("POD_NAMESPACE")
	fs := flag.NewFlagSet("vmnicd", flag.ContinueOnError)
	cfg.Flags(fs)
	level := fs.String("log-level", "info", "debug, info, warn or error")
	version := fs.Bool("version", false, "print the version and exit")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *version {
		fmt.Println("vmnicd", release.Version)
		return 0
	}
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(*level)); err != nil {
		fmt.Fprintf(os.Stderr, "vmnicd: --log-level: %v\n", err)
		return 2
	}
	log := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: lvl}))
	slog.SetDefault(log)
	cfg.Logger = log
	iopts := cfg.installOptions(log)
	switch cmd {
	case "install":
		if err := installOnce(iopts, cfg.Chain); err != nil {
			log.Error("install", "err", err)
			return 1
		}
		return 0
	case "uninstall":
		if _, err := install.Unchain(iopts); err != nil {
			log.Error("uninstall", "err", err)
			return 1
		}
		return 0
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := Run(ctx, cfg); err != nil {
		log.Error("run", "err", err)
		var ce configError
		if errors.As(err, &ce) {
			return 2
		}
		return 1
	}
	return 0
}

// configError is a Run error about the configuration (exit code 2).
type configError struct{ error }

func (e configError) Unwrap() error { return e.error }

// Run serves as vmnicd until ctx ends: the socket, the informers (which
// live as long as ctx), the shim's install and its chain watch, events,
// metrics and the capability publisher.
func Run(ctx context.Context, cfg Config) error {
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	metrics := cfg.Metrics
	if metrics == nil {
		metrics = NewMetrics()
	}
	iopts := cfg.installOptions(log)
	opts := Options{
		Socket: cfg.Socket, StateDir: cfg.StateDir, SpoolDir: cfg.SpoolDir, Logger: log, OVSDB: cfg.OVSDB,
		HostNetns: cfg.HostNetns, DrainTimeout: cfg.DrainTimeout, WatchDownThreshold: cfg.WatchDownThreshold,
		onReady: cfg.OnReady,
	}
	opts.Observe = ObserveOptions{Metrics: metrics, Node: cfg.NodeName}
	mode := "standalone"
	rcfg, err := restConfig(cfg.Kubeconfig)
	if err != nil {
		return configError{fmt.Errorf("kubeconfig: %w", err)}
	}
	if rcfg != nil {
		mode = "cluster"
		opts.Observe.Cluster = true
		countAPICalls(rcfg, metrics)
		if cfg.Events {
			kube, kerr := kubernetes.NewForConfig(rcfg)
			if kerr != nil {
				return configError{fmt.Errorf("kubernetes client: %w", kerr)}
			}
			ev := NewEvents(EventsOptions{Client: kube, Node: cfg.NodeName, Logger: log, Metrics: metrics})
			go ev.Run(ctx)
			opts.Observe.Events = ev
		}
		src, serr := kubevirt.NewCluster(kubevirt.ClusterOptions{
			Config: rcfg, NodeName: cfg.NodeName, Bindings: cfg.Bindings, Logger: log,
		})
		if serr != nil {
			return configError{fmt.Errorf("cluster source: %w", serr)}
		}
		opts.Facts = src
		opts.Watches = src.Health
		opts.prepare = syncInformers(src, cfg.SyncTimeout, log)
	}
	if cfg.InstallFrom != "" {
		// Ready only once the shim and the chain are in place.
		prev := opts.prepare
		opts.prepare = func(ctx context.Context) error {
			if ierr := installOnce(iopts, cfg.Chain); ierr != nil {
				return ierr
			}
			if cfg.Chain {
				go func() {
					if werr := install.Watch(ctx, iopts); werr != nil {
						log.Error("config watch stopped", "err", werr)
					}
				}()
			}
			if prev != nil {
				return prev(ctx)
			}
			return nil
		}
	}
	var metricsLn net.Listener
	if cfg.MetricsAddr != "" {
		// Metrics are for people: the daemon serves CNI without them.
		if metricsLn, err = net.Listen("tcp", cfg.MetricsAddr); err != nil {
			log.Error("metrics endpoint not served", "addr", cfg.MetricsAddr, "err", err)
			metricsLn = nil
		} else {
			opts.Observe.MetricsAddr = metricsLn.Addr().String()
		}
	}
	d, err := New(opts)
	if err != nil {
		if metricsLn != nil {
			_ = metricsLn.Close()
		}
		return err
	}
	if metricsLn != nil {
		go func() {
			if serr := d.ServeMetrics(ctx, metricsLn); serr != nil {
				log.Error("metrics endpoint stopped", "err", serr)
			}
		}()
	}
	if rcfg != nil && cfg.Capabilities {
		run, cerr := capabilityRunner(rcfg, cfg.NodeName, cfg.OVSDB, cfg.SpiderpoolSocket, cfg.CNIConfDir, log, metrics)
		if cerr != nil {
			return configError{fmt.Errorf("capabilities: %w", cerr)}
		}
		go func() {
			if rerr := run.Run(ctx); rerr != nil {
				log.Error("capability publisher stopped", "err", rerr)
			}
		}()
	}
	// Taken off the node with its DaemonSet (helm uninstall): only a
	// vmnicd that installs and chains the shim removes them.
	var rm *removal
	if rcfg != nil && cfg.InstallFrom != "" && cfg.Chain && cfg.PodName != "" && cfg.PodNamespace != "" {
		if rm, err = findRemoval(ctx, rcfg, cfg.PodNamespace, cfg.PodName); err != nil {
			log.Warn("its DaemonSet cannot be read: an uninstall leaves the shim chained", "err", err)
		}
	}
	log.Info("vmnicd starting", "version", release.Version, "mode", mode, "node", cfg.NodeName)
	if err := d.Run(ctx); err != nil {
		return err
	}
	if rm != nil && rm.removed() {
		if err := uninstall(iopts, log); err != nil {
			return fmt.Errorf("uninstall: %w", err)
		}
	}
	return nil
}

// syncInformers is the prepare step of a daemon with an API server: it
// starts the informers for as long as the daemon runs (ctx is Run's), and
// waits for their first sync. Each wait is bounded by timeout; past it the
// daemon stays not ready, says in one line what it still waits for and
// why, and waits again: the informers retry by themselves, and a daemon
// that exits instead only restarts into the same wait.
func syncInformers(src *kubevirt.Cluster, timeout time.Duration, log *slog.Logger) func(context.Context) error {
	if timeout <= 0 {
		timeout = DefaultSyncTimeout
	}
	return func(ctx context.Context) error {
		src.Start(ctx)
		for {
			err := src.WaitForSync(ctx, timeout)
			if err == nil {
				return nil
			}
			if ctx.Err() != nil {
				return ctx.Err()
			}
			log.Error("not ready: the API server caches did not sync; still waiting", "err", err)
		}
	}
}
