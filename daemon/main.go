package daemon

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/vmnic/vmnic/pkg/kubevirt"
	"github.com/vmnic/vmnic/pkg/netconf"
)

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

// Version is set at build time.
var Version = "dev"

// Main is vmnicd's command line; it returns the exit code.
func Main(args []string) int {
	fs := flag.NewFlagSet("vmnicd", flag.ContinueOnError)
	socket := fs.String("socket", netconf.DefaultSocket, "unix socket the shim talks to")
	stateDir := fs.String("state-dir", DefaultStateDir, "directory of attachment records")
	spoolDir := fs.String("spool-dir", netconf.DefaultSpoolDir, "directory where the shim spools DELs while the daemon is away")
	level := fs.String("log-level", "info", "debug, info, warn or error")
	kubeconfig := fs.String("kubeconfig", os.Getenv("KUBECONFIG"), "kubeconfig of the cluster (empty: standalone, VM facts from the network config)")
	nodeName := fs.String("node-name", os.Getenv("NODE_NAME"), "this node's name (with an API server)")
	bindings := fs.String("bindings", kubevirt.DefaultBinding, "comma-separated KubeVirt binding names vmnic serves")
	version := fs.Bool("version", false, "print the version and exit")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *version {
		fmt.Println("vmnicd", Version)
		return 0
	}
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(*level)); err != nil {
		fmt.Fprintf(os.Stderr, "vmnicd: --log-level: %v\n", err)
		return 2
	}
	log := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: lvl}))
	slog.SetDefault(log)
	opts := Options{Socket: *socket, StateDir: *stateDir, SpoolDir: *spoolDir, Logger: log}
	mode := "standalone"
	cfg, err := restConfig(*kubeconfig)
	if err != nil {
		log.Error("kubeconfig", "err", err)
		return 2
	}
	if cfg != nil {
		mode = "cluster"
		src, err := kubevirt.NewCluster(kubevirt.ClusterOptions{
			Config: cfg, NodeName: *nodeName, Bindings: strings.Split(*bindings, ","), Logger: log,
		})
		if err != nil {
			log.Error("cluster source", "err", err)
			return 2
		}
		opts.Facts = src
		opts.Prepare = func(ctx context.Context) error {
			ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
			defer cancel()
			return src.Start(ctx)
		}
	}
	d, err := New(opts)
	if err != nil {
		log.Error("start", "err", err)
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	log.Info("vmnicd starting", "version", Version, "mode", mode, "node", *nodeName)
	if err := d.Run(ctx); err != nil {
		log.Error("run", "err", err)
		return 1
	}
	return 0
}
