package daemon

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/vmnic/vmnic/pkg/netconf"
)

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
	if *kubeconfig != "" || os.Getenv("KUBERNETES_SERVICE_HOST") != "" {
		log.Error("a Kubernetes API server was configured, but this vmnicd build only runs standalone; unset KUBECONFIG/--kubeconfig")
		return 2
	}
	d, err := New(Options{Socket: *socket, StateDir: *stateDir, SpoolDir: *spoolDir, Logger: log})
	if err != nil {
		log.Error("start", "err", err)
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	log.Info("vmnicd starting", "version", Version, "mode", "standalone")
	if err := d.Run(ctx); err != nil {
		log.Error("run", "err", err)
		return 1
	}
	return 0
}
