// Package ovs runs a private Open vSwitch for tests: an ovsdb-server and an
// ovs-vswitchd with all state (database, sockets, pidfiles, logs) in one
// directory, never /var/run/openvswitch or the system service. Without the
// openvswitch kernel module, bridges must use the userspace datapath
// (datapath_type=netdev); WithNetNS puts ovs-vswitchd in a test's network
// namespace so that datapath sees only the test's links.
//
// Both daemons run in the foreground as children of the test process, with a
// parent-death signal, so a crashed or killed test does not leave them behind.
package ovs

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netns"
	"github.com/vmnic/vmnic/test/need"
)

// SchemaPath is the vswitch schema the Debian package installs.
const SchemaPath = "/usr/share/openvswitch/vswitch.ovsschema"

// Binaries the package runs; tests can check for them up front.
var Binaries = []string{"ovsdb-tool", "ovsdb-server", "ovs-vswitchd", "ovs-vsctl", "ovs-appctl"}

// startTimeout bounds how long Start waits for a daemon to answer.
const startTimeout = 15 * time.Second

// maxSockPath keeps unix socket paths under sun_path (108 bytes) with room for
// the per-bridge sockets ovs-vswitchd creates in the same directory.
const maxSockPath = 80

// Option changes how Start runs the daemons.
type Option func(*OVS)

// WithNetNS runs ovs-vswitchd inside n, so its netdev datapath opens (and
// only sees) the links of that namespace. ovsdb-server stays where it is: its
// socket is a file, reachable from any namespace.
func WithNetNS(n ns.NetNS) Option {
	return func(o *OVS) { o.netns = n }
}

// OVS is a running private Open vSwitch.
type OVS struct {
	dir   string
	netns ns.NetNS
	env   []string

	mu       sync.Mutex
	server   *daemon
	vswitchd *daemon
}

// daemon is one child process we own.
type daemon struct {
	name string
	cmd  *exec.Cmd
	done chan struct{}
	err  error // Wait's result, valid after done is closed
}

// Start creates a database in dir (unless one is there already) and runs
// ovsdb-server and ovs-vswitchd on it, returning once both answer. dir holds
// the database, sockets, pidfiles and logs; nothing outside it is touched.
func Start(dir string, opts ...Option) (*OVS, error) {
	o, err := prepare(dir, opts)
	if err != nil {
		return nil, err
	}
	if err = o.boot(); err != nil {
		_ = o.Stop()
		return nil, err
	}
	return o, nil
}

// prepare checks the machine and dir and creates the database.
func prepare(dir string, opts []Option) (*OVS, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("ovs dir %q: %w", dir, err)
	}
	dir = abs
	if len(dir)+len("/ovs-vswitchd.ctl") > maxSockPath {
		return nil, fmt.Errorf("ovs dir %q: path too long for unix sockets (max %d)", dir, maxSockPath-len("/ovs-vswitchd.ctl"))
	}
	for _, b := range Binaries {
		if _, err = exec.LookPath(b); err != nil {
			return nil, fmt.Errorf("open vswitch binary %q: %w", b, err)
		}
	}
	if err = os.MkdirAll(dir, 0o750); err != nil {
		return nil, fmt.Errorf("ovs dir %q: %w", dir, err)
	}
	o := &OVS{dir: dir}
	for _, opt := range opts {
		opt(o)
	}
	// Every OVS tool resolves its default paths from these; pointing them
	// at dir keeps /var/run/openvswitch and /etc/openvswitch untouched.
	o.env = append(os.Environ(),
		"OVS_RUNDIR="+dir, "OVS_DBDIR="+dir, "OVS_LOGDIR="+dir, "OVS_SYSCONFDIR="+dir)
	if _, err = os.Stat(o.dbFile()); errors.Is(err, os.ErrNotExist) {
		var out string
		if out, err = o.run("ovsdb-tool", "create", o.dbFile(), SchemaPath); err != nil {
			return nil, fmt.Errorf("create ovs database %q: %w: %s", o.dbFile(), err, out)
		}
	}
	return o, nil
}

// boot starts both daemons and waits until ovs-vswitchd has applied the
// database once.
func (o *OVS) boot() error {
	if err := o.StartDB(); err != nil {
		return err
	}
	version, err := o.run("ovs-vsctl", "--version")
	if err != nil {
		return fmt.Errorf("ovs-vsctl --version: %w", err)
	}
	if _, err = o.Vsctl("--no-wait", "init"); err != nil {
		return err
	}
	if err = o.startVswitchd(); err != nil {
		return err
	}
	// Setting ovs_version (as ovs-ctl does at boot) in wait mode doubles as
	// the readiness check: ovs-vsctl returns only once ovs-vswitchd has
	// applied the change (cur_cfg caught up with next_cfg).
	if _, err = o.Vsctl(fmt.Sprintf("--timeout=%d", int(startTimeout.Seconds())),
		"set", "Open_vSwitch", ".", "ovs_version="+parseVersion(version)); err != nil {
		return fmt.Errorf("wait for ovs-vswitchd in %q: %w", o.dir, err)
	}
	return nil
}

// parseVersion takes "ovs-vsctl (Open vSwitch) 3.1.0" and returns "3.1.0".
func parseVersion(out string) string {
	first, _, _ := strings.Cut(out, "\n")
	f := strings.Fields(first)
	if len(f) == 0 {
		return "unknown"
	}
	return f[len(f)-1]
}

// Dir is the directory holding the database, sockets and logs.
func (o *OVS) Dir() string { return o.dir }

// DB is the database endpoint, e.g. "unix:/tmp/ovs123/db.sock".
func (o *OVS) DB() string { return "unix:" + o.sockPath() }

func (o *OVS) sockPath() string { return filepath.Join(o.dir, "db.sock") }
func (o *OVS) dbFile() string   { return filepath.Join(o.dir, "conf.db") }

// Vsctl runs ovs-vsctl against this switch and returns its trimmed stdout.
// Without a --timeout in args it gives up after 30 s.
func (o *OVS) Vsctl(args ...string) (string, error) {
	full := []string{"--db=" + o.DB()}
	if !hasTimeout(args) {
		full = append(full, "--timeout=30")
	}
	full = append(full, args...)
	out, err := o.run("ovs-vsctl", full...)
	if err != nil {
		return out, fmt.Errorf("ovs-vsctl %s: %w", strings.Join(args, " "), err)
	}
	return out, nil
}

func hasTimeout(args []string) bool {
	for _, a := range args {
		if strings.HasPrefix(a, "--timeout") || a == "-t" {
			return true
		}
	}
	return false
}

// DatapathEnv selects the datapath AddBridge gives bridges: "netdev" (the
// default, the userspace datapath: this project's machines have no
// openvswitch kernel module) or "system" (the kernel datapath; the node VM,
// test/nodevm, sets it).
const DatapathEnv = "VMNIC_TEST_OVS_DATAPATH"

// Datapath is the datapath_type tests give their bridges (DatapathEnv).
func Datapath() (string, error) {
	switch v := os.Getenv(DatapathEnv); v {
	case "", "netdev":
		return "netdev", nil
	case "system":
		return v, nil
	default:
		return "", fmt.Errorf("%s=%q: want netdev or system", DatapathEnv, v)
	}
}

// AddBridge adds bridge name on the datapath Datapath selects. On the
// kernel datapath it also checks that ovs-vswitchd really runs the bridge
// there (dpif/show lists it under system@ovs-system), so a test meant for
// the kernel datapath cannot pass on another.
func (o *OVS) AddBridge(name string) error {
	dp, err := Datapath()
	if err != nil {
		return err
	}
	if out, verr := o.Vsctl("add-br", name, "--", "set", "bridge", name, "datapath_type="+dp); verr != nil {
		return fmt.Errorf("%w: %s", verr, out)
	}
	if dp != "system" {
		return nil
	}
	out, err := o.Appctl("dpif/show")
	if err != nil {
		return fmt.Errorf("%w: %s", err, out)
	}
	if !strings.Contains(out, "system@ovs-system") || !strings.Contains(out, "\n  "+name+":") {
		return fmt.Errorf("bridge %s is not on the kernel datapath; dpif/show:\n%s", name, out)
	}
	return nil
}

// Appctl runs ovs-appctl against ovs-vswitchd ("dpif/show", "vlog/list" …).
func (o *OVS) Appctl(args ...string) (string, error) {
	full := append([]string{"-t", filepath.Join(o.dir, "ovs-vswitchd.ctl"), "--timeout=10"}, args...)
	out, err := o.run("ovs-appctl", full...)
	if err != nil {
		return out, fmt.Errorf("ovs-appctl %s: %w", strings.Join(args, " "), err)
	}
	return out, nil
}

// run runs a short-lived OVS tool with the private environment. The error
// carries stderr; the result is the trimmed stdout.
func (o *OVS) run(name string, args ...string) (string, error) {
	cmd := exec.Command(name, args...)
	cmd.Env = o.env
	cmd.Dir = o.dir
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return strings.TrimSpace(stdout.String()), fmt.Errorf("%w: %s", err, strings.TrimSpace(stderr.String()))
	}
	return strings.TrimSpace(stdout.String()), nil
}

// StartDB starts ovsdb-server on dir's database and socket and waits until
// the socket accepts connections. It is what Start does first, and what a
// test calls after KillDB to bring the same database back.
func (o *OVS) StartDB() error {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.server != nil {
		return fmt.Errorf("ovsdb-server in %q: already running", o.dir)
	}
	d, err := o.spawn(nil, "ovsdb-server", o.dbFile(),
		"--remote=punix:"+o.sockPath(),
		"--pidfile="+filepath.Join(o.dir, "ovsdb-server.pid"),
		"--unixctl="+filepath.Join(o.dir, "ovsdb-server.ctl"),
		"--log-file="+filepath.Join(o.dir, "ovsdb-server.log"),
		"--no-chdir", "-vconsole:off")
	if err != nil {
		return err
	}
	o.server = d
	err = waitFor(d, startTimeout, func() error {
		c, dialErr := net.DialTimeout("unix", o.sockPath(), time.Second)
		if dialErr != nil {
			return dialErr
		}
		return c.Close()
	})
	if err != nil {
		return fmt.Errorf("wait for ovsdb-server on %q: %w", o.sockPath(), err)
	}
	return nil
}

// KillDB kills ovsdb-server with SIGKILL, as a crash would, and waits for it
// to be gone. The database file and ovs-vswitchd stay.
func (o *OVS) KillDB() error {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.server == nil {
		return nil
	}
	err := o.server.stop(syscall.SIGKILL, 0)
	o.server = nil
	return err
}

func (o *OVS) startVswitchd() error {
	o.mu.Lock()
	defer o.mu.Unlock()
	d, err := o.spawn(o.netns, "ovs-vswitchd", o.DB(),
		"--pidfile="+filepath.Join(o.dir, "ovs-vswitchd.pid"),
		"--unixctl="+filepath.Join(o.dir, "ovs-vswitchd.ctl"),
		"--log-file="+filepath.Join(o.dir, "ovs-vswitchd.log"),
		"--no-chdir", "-vconsole:off")
	if err != nil {
		return err
	}
	o.vswitchd = d
	return nil
}

// spawn starts one daemon in the foreground, in netns n when n is not nil.
func (o *OVS) spawn(n ns.NetNS, name string, args ...string) (*daemon, error) {
	out, err := os.OpenFile(filepath.Join(o.dir, name+".out"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o640)
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	defer func() { _ = out.Close() }() // the child has its own copy
	cmd := exec.Command(name, args...)
	cmd.Env = o.env
	cmd.Dir = o.dir
	// *os.File outputs: exec starts no copying goroutines.
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{
		// The kernel kills the daemon when the thread that forked it
		// exits; startCmd forks from a thread that lives as long as the
		// test process, so only the process's death (a crashed or killed
		// test) triggers it.
		Pdeathsig: syscall.SIGKILL,
		Setpgid:   true, // keep ^C to the test from reaching the daemons first
	}
	if err := startCmd(cmd, n); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	d := &daemon{name: name, cmd: cmd, done: make(chan struct{})}
	go func() {
		d.err = cmd.Wait()
		close(d.done)
	}()
	return d, nil
}

// spawnRequests feed the spawner goroutine.
var (
	spawnOnce     sync.Once
	spawnRequests = make(chan spawnRequest)
)

type spawnRequest struct {
	cmd  *exec.Cmd
	ns   ns.NetNS
	done chan error
}

// startCmd starts cmd (in n, if not nil) from the spawner thread.
//
// PR_SET_PDEATHSIG fires when the forking *thread* exits, not the process,
// and Go does end threads: one whose goroutine exits while locked to it (as
// ns.Do and testutils.NewNS do with threads whose namespace they changed).
// Forking from an ordinary goroutine's thread would let an unrelated
// namespace helper kill our daemons later. The spawner locks one thread for
// the life of the process and never leaves it, so no other goroutine ever
// runs there.
func startCmd(cmd *exec.Cmd, n ns.NetNS) error {
	spawnOnce.Do(func() { go spawner() })
	req := spawnRequest{cmd: cmd, ns: n, done: make(chan error, 1)}
	spawnRequests <- req
	return <-req.done
}

func spawner() {
	runtime.LockOSThread() // never unlocked
	for req := range spawnRequests {
		req.done <- startInNS(req.cmd, req.ns)
	}
}

// startInNS forks cmd from the current (locked) thread while it is in n:
// the child inherits the thread's network namespace.
func startInNS(cmd *exec.Cmd, n ns.NetNS) error {
	if n == nil {
		return cmd.Start()
	}
	orig, err := netns.Get()
	if err != nil {
		return fmt.Errorf("current netns: %w", err)
	}
	defer func() { _ = orig.Close() }()
	if err := netns.Set(netns.NsHandle(n.Fd())); err != nil {
		return fmt.Errorf("enter netns %s: %w", n.Path(), err)
	}
	startErr := cmd.Start()
	if err := netns.Set(orig); err != nil {
		// The spawner thread would start later daemons in the wrong
		// namespace; nothing sensible is left to do.
		panic(fmt.Sprintf("ovs spawner: return from netns %s: %v", n.Path(), err))
	}
	return startErr
}

// waitFor polls check until it succeeds, the daemon exits or timeout passes.
func waitFor(d *daemon, timeout time.Duration, check func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := check()
		if err == nil {
			return nil
		}
		select {
		case <-d.done:
			return fmt.Errorf("%s exited: %v", d.name, d.err)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not ready after %s: %w", d.name, timeout, err)
		}
	}
}

// stop signals the daemon, escalating to SIGKILL after grace, and waits.
func (d *daemon) stop(sig syscall.Signal, grace time.Duration) error {
	select {
	case <-d.done:
		return nil
	default:
	}
	if err := d.cmd.Process.Signal(sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("signal %s: %w", d.name, err)
	}
	if grace > 0 {
		select {
		case <-d.done:
			return nil
		case <-time.After(grace):
		}
		_ = d.cmd.Process.Kill()
	}
	<-d.done
	return nil
}

// Stop terminates ovs-vswitchd and ovsdb-server (SIGTERM, then SIGKILL after
// a few seconds) and waits for both. It removes nothing: dir keeps the
// database and logs.
func (o *OVS) Stop() error {
	o.mu.Lock()
	defer o.mu.Unlock()
	var errs []error
	for _, d := range []**daemon{&o.vswitchd, &o.server} {
		if *d == nil {
			continue
		}
		errs = append(errs, (*d).stop(syscall.SIGTERM, 5*time.Second))
		*d = nil
	}
	return errors.Join(errs...)
}

// Logs returns the last lines of both daemons' log files, for failure reports.
func (o *OVS) Logs(lines int) string { return tailLogs(o.dir, lines) }

func tailLogs(dir string, lines int) string {
	var b strings.Builder
	for _, name := range []string{"ovsdb-server", "ovs-vswitchd"} {
		for _, suffix := range []string{".log", ".out"} {
			data, err := os.ReadFile(filepath.Join(dir, name+suffix))
			if err != nil || len(bytes.TrimSpace(data)) == 0 {
				continue
			}
			all := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
			if len(all) > lines {
				all = all[len(all)-lines:]
			}
			fmt.Fprintf(&b, "==> %s%s <==\n%s\n", name, suffix, strings.Join(all, "\n"))
		}
	}
	return b.String()
}

// StartT starts a private switch in a fresh temporary directory for the test,
// skipping (or, in CI, failing) when root or the OVS binaries are missing.
// Cleanup stops the daemons, logs their log tails if the test failed, and
// removes the directory.
func StartT(t testing.TB, opts ...Option) *OVS {
	t.Helper()
	need.Root(t)
	for _, b := range Binaries {
		need.Binary(t, b)
	}
	if _, err := os.Stat(SchemaPath); err != nil {
		need.NoError(t, fmt.Errorf("needs the vswitch schema (openvswitch-switch package): %w", err))
	}
	// t.TempDir paths carry the test name and can overflow sun_path.
	dir, err := os.MkdirTemp("", "ovs")
	if err != nil {
		t.Fatalf("ovs temp dir: %v", err)
	}
	o, err := Start(dir, opts...)
	if err != nil {
		t.Logf("open vswitch logs:\n%s", tailLogs(dir, 40))
		_ = os.RemoveAll(dir)
		t.Fatalf("start open vswitch: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("open vswitch logs (%s):\n%s", dir, o.Logs(40))
		}
		if err := o.Stop(); err != nil {
			t.Errorf("stop open vswitch: %v", err)
		}
		_ = os.RemoveAll(dir)
	})
	return o
}
