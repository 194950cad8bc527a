// Package daemon is vmnicd, the node daemon behind the vmnic shim: it serves
// CNI requests for VM NICs on a root-only unix socket with warm state, keeps
// attachment records, runs the guests' DHCP servers, and replays the DELs
// the shim spooled while it was away.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/vmnic/vmnic/pkg/kubevirt"
	"github.com/vmnic/vmnic/pkg/mode"
	"github.com/vmnic/vmnic/pkg/netconf"
	"github.com/vmnic/vmnic/pkg/proto"
	"github.com/vmnic/vmnic/pkg/state"
	"github.com/vmnic/vmnic/plugins"
)

// Defaults.
const (
	DefaultStateDir       = "/var/lib/vmnic"
	DefaultResyncInterval = 5 * time.Minute
	// SpoolPollInterval is how often the daemon looks for DELs spooled
	// since it last looked (a directory read).
	SpoolPollInterval   = time.Second
	DefaultDrainTimeout = 20 * time.Second
	// DefaultSyncTimeout bounds one wait for the informers' first sync:
	// past it vmnicd says in one log line which informer it still waits
	// for, and why, and waits again. It never exits for it.
	DefaultSyncTimeout = 2 * time.Minute
	// DefaultWatchDownThreshold is how long a watch may be down before
	// /readyz fails. client-go's reflector retries a failed list or watch
	// with a backoff capped at 30 s and jittered up to twice that: after
	// an API server outage of 20 s the watches came back 53 s after the
	// server did. Twice the longest retry gap is past any blip: a daemon
	// deciding on a stale cache.
	DefaultWatchDownThreshold = 2 * time.Minute
	// requestTimeout bounds one request's work inside the daemon.
	requestTimeout = 2 * time.Minute
)

// Options configure a Daemon.
type Options struct {
	Socket   string
	StateDir string
	SpoolDir string
	// Facts tells which pods are VMs and what their NICs need.
	Facts          kubevirt.Source
	Logger         *slog.Logger
	ResyncInterval time.Duration
	DrainTimeout   time.Duration
	// Ready, if set, is closed once the daemon serves requests.
	Ready chan<- struct{}
	// onReady, if set, is called with the daemon then (Config.OnReady).
	onReady func(*Daemon)
	// prepare, if set, runs after the socket listens and before the
	// daemon is ready (the shim's install, the informers' first sync):
	// requests meanwhile get "try again later". Its ctx is Run's: what it
	// starts lives as long as the daemon. Only Run (main.go) sets it, so
	// that every vmnicd, the binary's and a test's, is prepared alike.
	prepare func(ctx context.Context) error
	// Watches reports the facts source's watches on the API server (nil
	// standalone); WatchDownThreshold is how long one may be down before
	// /readyz fails and vmnicctl status says so.
	Watches            func() []kubevirt.WatchHealth
	WatchDownThreshold time.Duration
	// OVSDB is the default ovsdb-server endpoint of the modes that add OVS
	// ports (mode.Env); a network config's ovsdbSocket overrides it.
	OVSDB string
	// HostNetns is the node's network namespace, where modes put the node
	// end of their veths and OVS runs; "" is the daemon's own (a DaemonSet
	// on the host network). Tests set it.
	HostNetns string
	// Observe configures metrics and Kubernetes events (observe.go).
	Observe ObserveOptions
	// Modes builds the modes the daemon serves from its environment;
	// nil is plugins.Modes, every mode vmnic has. Tests give their own.
	Modes func(env mode.Env) []mode.Mode
}

// Daemon is vmnicd.
type Daemon struct {
	opts    Options
	log     *slog.Logger
	store   *state.Store
	servers *Servers
	// modes by name, and their names in registry order.
	modes     map[string]mode.Mode
	modeNames []string
	// runCtx is Run's context, for work that outlives a request.
	runCtx   context.Context
	watchers watchers
	// gapSrc: sources whose guests migrate away (gap.go).
	gapSrc gapSources
	// reassert is the migration phase each guarding source last reasserted
	// its addresses for.
	reassertMu sync.Mutex
	reassert   map[string]string
	locks      keyedMutex
	// gc excludes GC from ADD/DEL, as the CNI spec asks.
	gc       sync.RWMutex
	ready    atomic.Bool
	inflight sync.WaitGroup
	// socketIno is the inode of the socket Run listens on; 0 while it
	// does not (before Run, and while it drains).
	socketIno atomic.Uint64
	// healthTimeout bounds one liveness check (health.go).
	healthTimeout time.Duration
	// spoolTried is each spool entry's modification time when Run's loop
	// last tried it (replay): only Run's goroutine uses it.
	spoolTried map[string]time.Time
}

// Servers gives access to the DHCP servers of the attachments.
func (d *Daemon) Servers() *Servers { return d.servers }

// New checks opts and prepares the daemon; Run starts it.
func New(opts Options) (*Daemon, error) {
	if opts.Socket == "" {
		opts.Socket = netconf.DefaultSocket
	}
	if opts.StateDir == "" {
		opts.StateDir = DefaultStateDir
	}
	if opts.SpoolDir == "" {
		opts.SpoolDir = netconf.DefaultSpoolDir
	}
	if opts.Facts == nil {
		opts.Facts = kubevirt.Standalone{}
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.ResyncInterval == 0 {
		opts.ResyncInterval = DefaultResyncInterval
	}
	if opts.DrainTimeout == 0 {
		opts.DrainTimeout = DefaultDrainTimeout
	}
	if opts.WatchDownThreshold == 0 {
		opts.WatchDownThreshold = DefaultWatchDownThreshold
	}
	store, err := state.Open(filepath.Join(opts.StateDir, "attachments"))
	if err != nil {
		return nil, err
	}
	if opts.Modes == nil {
		opts.Modes = plugins.Modes
	}
	servers := NewServers(opts.Logger)
	d := &Daemon{
		opts:    opts,
		log:     opts.Logger,
		store:   store,
		servers: servers,
		modes:   map[string]mode.Mode{},

		healthTimeout: defaultHealthTimeout,
	}
	env := mode.Env{Servers: servers, OVSDB: opts.OVSDB, HostNetns: opts.HostNetns, Log: opts.Logger}
	for _, m := range opts.Modes(env) {
		if _, dup := d.modes[m.Name()]; dup {
			return nil, fmt.Errorf("mode %q registered twice", m.Name())
		}
		d.modes[m.Name()] = m
		d.modeNames = append(d.modeNames, m.Name())
	}
	return d, nil
}

// Run serves until ctx ends, then drains in-flight requests and stops.
func (d *Daemon) Run(ctx context.Context) error {
	d.runCtx = ctx
	ln, ino, err := listen(d.opts.Socket)
	if err != nil {
		return err
	}
	d.socketIno.Store(ino)
	d.log.Info("listening", "socket", d.opts.Socket, "stateDir", d.opts.StateDir, "spoolDir", d.opts.SpoolDir)

	serveDone := make(chan struct{})
	go func() {
		defer close(serveDone)
		d.serve(ln)
	}()

	// Until ready, requests get "try again later" and the shim retries.
	if d.opts.prepare != nil {
		if err := d.opts.prepare(ctx); err != nil {
			d.socketIno.Store(0)
			_ = ln.Close()
			<-serveDone
			removeSocket(d.opts.Socket, ino)
			if ctx.Err() != nil {
				d.log.Info("stopped before ready")
				return nil
			}
			return fmt.Errorf("prepare: %w", err)
		}
	}
	d.restore(ctx)
	d.replaySpool(ctx)
	d.ready.Store(true)
	if d.opts.Ready != nil {
		close(d.opts.Ready)
	}
	if d.opts.onReady != nil {
		d.opts.onReady(d)
	}
	d.log.Info("ready")
	// What the modes find without a record goes once the daemon serves:
	// the sweep waits for in-flight ADDs and DELs, it does not hold up
	// readiness.
	d.sweep(ctx)
	migrationsDone := make(chan struct{})
	go func() {
		defer close(migrationsDone)
		d.watchMigrations(ctx)
	}()
	defer func() { <-migrationsDone }()

	ticker := time.NewTicker(d.opts.ResyncInterval)
	defer ticker.Stop()
	spoolTicker := time.NewTicker(SpoolPollInterval)
	defer spoolTicker.Stop()
	for running := true; running; {
		select {
		case <-ctx.Done():
			running = false
		case <-spoolTicker.C:
			d.replayNewSpool(ctx)
		case <-ticker.C:
			d.replaySpool(ctx)
			d.restore(ctx)
			d.sweep(ctx)
		}
	}

	d.log.Info("stopping: draining requests")
	d.ready.Store(false)
	d.socketIno.Store(0)
	_ = ln.Close()
	<-serveDone
	drained := make(chan struct{})
	go func() { d.inflight.Wait(); close(drained) }()
	select {
	case <-drained:
	case <-time.After(d.opts.DrainTimeout):
		d.log.Warn("drain timed out; requests still running", "timeout", d.opts.DrainTimeout)
	}
	d.servers.StopAll()
	for _, m := range d.modes {
		if c, ok := m.(mode.Closer); ok {
			c.Close()
		}
	}
	removeSocket(d.opts.Socket, ino)
	d.log.Info("stopped")
	return nil
}

// listen creates the socket directory 0700 and the socket 0600. A stale
// socket from a previous daemon is replaced; anything else at the path is an
// error.
func listen(path string) (net.Listener, uint64, error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, 0, fmt.Errorf("create socket dir %q: %w", dir, err)
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		return nil, 0, fmt.Errorf("chmod socket dir %q: %w", dir, err)
	}
	if st, err := os.Lstat(path); err == nil {
		if st.Mode().Type() != os.ModeSocket {
			return nil, 0, fmt.Errorf("socket path %q exists and is not a socket", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, 0, fmt.Errorf("remove stale socket %q: %w", path, err)
		}
	}
	// The umask closes the window between bind and chmod.
	old := syscall.Umask(0o177)
	ln, err := net.Listen("unix", path)
	syscall.Umask(old)
	if err != nil {
		return nil, 0, fmt.Errorf("listen on %q: %w", path, err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	if cerr := os.Chmod(path, 0o600); cerr != nil {
		_ = ln.Close()
		return nil, 0, fmt.Errorf("chmod socket %q: %w", path, cerr)
	}
	st, err := os.Stat(path)
	if err != nil {
		_ = ln.Close()
		return nil, 0, fmt.Errorf("stat socket %q: %w", path, err)
	}
	return ln, st.Sys().(*syscall.Stat_t).Ino, nil
}

// removeSocket removes the socket only if it is still ours: during a
// rollout the next daemon may already listen on the same path.
func removeSocket(path string, ino uint64) {
	st, err := os.Stat(path)
	if err != nil {
		return
	}
	if sys, ok := st.Sys().(*syscall.Stat_t); ok && sys.Ino == ino {
		_ = os.Remove(path)
	}
}

func (d *Daemon) serve(ln net.Listener) {
	for {
		conn, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			d.log.Error("accept", "err", err)
			time.Sleep(50 * time.Millisecond)
			continue
		}
		d.inflight.Add(1)
		go func() {
			defer d.inflight.Done()
			d.serveConn(conn)
		}()
	}
}

func (d *Daemon) serveConn(conn net.Conn) {
	defer func() { _ = conn.Close() }()
	_ = conn.SetReadDeadline(time.Now().Add(30 * time.Second))
	req := &proto.Request{}
	var resp *proto.Response
	if err := proto.Decode(conn, req); err != nil {
		if errors.Is(err, io.EOF) {
			return // a connection check (the shim's readiness probe, a test): nothing asked
		}
		resp = errResponse(badRequest(err))
	} else {
		ctx, cancel := context.WithTimeout(context.Background(), requestTimeout)
		resp = d.Handle(ctx, req)
		cancel()
	}
	_ = conn.SetWriteDeadline(time.Now().Add(30 * time.Second))
	if err := encode(conn, resp); err != nil {
		d.log.Warn("write response", "command", req.Command, "container", req.ContainerID, "err", err)
	}
}

// keyedMutex serialises work on one attachment while others run in parallel.
type keyedMutex struct {
	mu    sync.Mutex
	locks map[string]*keyLock
}

type keyLock struct {
	sync.Mutex
	refs int
}

func (k *keyedMutex) Lock(key string) func() {
	k.mu.Lock()
	if k.locks == nil {
		k.locks = map[string]*keyLock{}
	}
	l := k.locks[key]
	if l == nil {
		l = &keyLock{}
		k.locks[key] = l
	}
	l.refs++
	k.mu.Unlock()
	l.Lock()
	return func() {
		l.Unlock()
		k.mu.Lock()
		l.refs--
		if l.refs == 0 {
			delete(k.locks, key)
		}
		k.mu.Unlock()
	}
}
