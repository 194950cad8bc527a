package daemon

import (
	"context"
	"encoding/json"
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
	fs := flag.NewFlagSet("vmnicd", flag.ContinueOnError)
	socket := fs.String("socket", netconf.DefaultSocket, "unix socket the shim talks to")
	stateDir := fs.String("state-dir", DefaultStateDir, "directory of attachment records")
	spoolDir := fs.String("spool-dir", netconf.DefaultSpoolDir, "directory where the shim spools DELs while the daemon is away")
	level := fs.String("log-level", "info", "debug, info, warn or error")
	kubeconfig := fs.String("kubeconfig", os.Getenv("KUBECONFIG"), "kubeconfig of the cluster (empty: standalone, VM facts from the network config)")
	nodeName := fs.String("node-name", os.Getenv("NODE_NAME"), "this node's name (with an API server)")
	bindings := fs.String("bindings", kubevirt.DefaultBinding, "comma-separated KubeVirt binding names vmnic serves")
	installFrom := fs.String("install-from", "", "shim binary to install into --cni-bin-dir (empty: do not install)")
	binDir := fs.String("cni-bin-dir", install.DefaultBinDir, "the host's CNI bin dir as this process sees it")
	confDir := fs.String("cni-conf-dir", install.DefaultConfDir, "the host's CNI config dir as this process sees it")
	chain := fs.Bool("chain", true, "chain vmnic's entry into the primary CNI's conflist and keep it chained")
	ovsdbEndpoint := fs.String("ovsdb", "unix:/var/run/openvswitch/db.sock", "OVSDB endpoint of bridge mode: ports are added there and it is probed for the capability report (empty: no OVS)")
	spiderSock := fs.String("spiderpool-socket", capabilities.DefaultSpiderpoolSocket, "Spiderpool agent socket the capability probe checks")
	probe := fs.Bool("capabilities", true, "probe the node and publish a NodeNetworkCapability (with an API server)")
	metricsAddr := fs.String("metrics-addr", DefaultMetricsAddr, "address of the Prometheus metrics, /healthz and /readyz HTTP endpoint (empty: none)")
	events := fs.Bool("events", true, "report failed ADDs as Kubernetes Events on the pod and its VMI (with an API server)")
	version := fs.Bool("version", false, "print the version and exit")
	podName := fs.String("pod-name", os.Getenv("POD_NAME"), "this vmnicd's pod (in a DaemonSet): when the DaemonSet is deleted, vmnicd unchains itself and removes the shim on exit")
	podNamespace := fs.String("pod-namespace", os.Getenv("POD_NAMESPACE"), "the namespace of --pod-name")
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
	metrics := NewMetrics()
	log := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: lvl}))
	slog.SetDefault(log)
	iopts := install.Options{
		BinDir: *binDir, ConfDir: *confDir, SourceBinary: *installFrom, Logger: log,
		CNIVersions: shim.Supported.SupportedVersions(),
		Entry:       chainEntry(*socket, *spoolDir),
	}
	switch cmd {
	case "install":
		if err := installOnce(iopts, *chain); err != nil {
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

	opts := Options{Socket: *socket, StateDir: *stateDir, SpoolDir: *spoolDir, Logger: log, OVSDB: *ovsdbEndpoint}
	opts.Observe = ObserveOptions{Metrics: metrics, Node: *nodeName}
	mode := "standalone"
	cfg, err := restConfig(*kubeconfig)
	if err != nil {
		log.Error("kubeconfig", "err", err)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if cfg != nil {
		mode = "cluster"
		opts.Observe.Cluster = true
		if *events {
			kube, kerr := kubernetes.NewForConfig(cfg)
			if kerr != nil {
				log.Error("kubernetes client", "err", kerr)
				return 2
			}
			ev := NewEvents(EventsOptions{Client: kube, Node: *nodeName, Logger: log, Metrics: metrics})
			go ev.Run(ctx)
			opts.Observe.Events = ev
		}
		src, serr := kubevirt.NewCluster(kubevirt.ClusterOptions{
			Config: cfg, NodeName: *nodeName, Bindings: strings.Split(*bindings, ","), Logger: log,
		})
		if serr != nil {
			log.Error("cluster source", "err", serr)
			return 2
		}
		opts.Facts = src
		opts.Prepare = func(ctx context.Context) error {
			ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
			defer cancel()
			return src.Start(ctx)
		}
	}
	if *installFrom != "" {
		// Ready only once the shim and the chain are in place.
		prev := opts.Prepare
		opts.Prepare = func(ctx context.Context) error {
			if ierr := installOnce(iopts, *chain); ierr != nil {
				return ierr
			}
			if *chain {
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
	if *metricsAddr != "" {
		// Metrics are for people: the daemon serves CNI without them.
		if metricsLn, err = net.Listen("tcp", *metricsAddr); err != nil {
			log.Error("metrics endpoint not served", "addr", *metricsAddr, "err", err)
			metricsLn = nil
		} else {
			opts.Observe.MetricsAddr = metricsLn.Addr().String()
		}
	}
	d, err := New(opts)
	if err != nil {
		log.Error("start", "err", err)
		return 1
	}
	if metricsLn != nil {
		go func() {
			if serr := d.ServeMetrics(ctx, metricsLn); serr != nil {
				log.Error("metrics endpoint stopped", "err", serr)
			}
		}()
	}
	if cfg != nil && *probe {
		run, cerr := capabilityRunner(cfg, *nodeName, *ovsdbEndpoint, *spiderSock, *confDir, log, metrics)
		if cerr != nil {
			log.Error("capabilities", "err", cerr)
			return 2
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
	if cfg != nil && *installFrom != "" && *chain && *podName != "" && *podNamespace != "" {
		if rm, err = watchRemoval(ctx, cfg, *podNamespace, *podName); err != nil {
			log.Warn("not watching the DaemonSet: an uninstall leaves the shim chained", "err", err)
		}
	}
	log.Info("vmnicd starting", "version", release.Version, "mode", mode, "node", *nodeName)
	if err := d.Run(ctx); err != nil {
		log.Error("run", "err", err)
		return 1
	}
	if rm != nil && rm.removed() {
		if err := uninstall(iopts, log); err != nil {
			log.Error("uninstall", "err", err)
			return 1
		}
	}
	return 0
}
