// Package proc starts the daemons tests need (etcd, kube-apiserver, the
// Spiderpool agent …) so that they never outlive the test: each child is
// forked from one long-lived locked OS thread with a parent-death signal,
// in its own process group, its output in a log file.
package proc

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Launcher starts child processes from one OS thread that stays locked, and
// alive, until close. Pdeathsig is sent when the thread that forked a child
// exits, not when the process does, and Go ends a thread whose goroutine
// exits while locked to it (the netns helpers tests use do that on errors):
// forking from an arbitrary goroutine could kill the API server mid-test.
type Launcher struct {
	reqs chan func()
	done chan struct{}
	once sync.Once
}

// NewLauncher starts the launcher's thread; Close ends it.
func NewLauncher() *Launcher {
	l, _ := NewLauncherIn("")
	return l
}

// NewLauncherIn starts a launcher whose thread lives in the network
// namespace at netnsPath (a bind mount such as /run/netns/NAME): every child
// it starts is born in that namespace. "" is the caller's namespace.
func NewLauncherIn(netnsPath string) (*Launcher, error) {
	l := &Launcher{reqs: make(chan func()), done: make(chan struct{})}
	ready := make(chan error, 1)
	go func() {
		// Never unlocked: when close ends this goroutine, the thread exits
		// too and any child still alive gets its Pdeathsig. A thread moved
		// into another namespace is never handed back to the runtime.
		runtime.LockOSThread()
		if netnsPath != "" {
			if err := enterNetns(netnsPath); err != nil {
				ready <- err
				return
			}
		}
		ready <- nil
		for {
			select {
			case f := <-l.reqs:
				f()
			case <-l.done:
				return
			}
		}
	}()
	if err := <-ready; err != nil {
		return nil, err
	}
	return l, nil
}

// enterNetns moves the calling (locked) thread into the network namespace
// at path.
func enterNetns(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("network namespace: %w", err)
	}
	defer func() { _ = f.Close() }()
	if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
		return fmt.Errorf("enter network namespace %s: %w", path, err)
	}
	return nil
}

// NetnsDialer returns a DialContext whose sockets are made in the network
// namespace at netnsPath (a socket keeps the namespace it was made in), for
// HTTP clients of servers that listen only there. Each dial runs on a
// thread of its own that is thrown away afterwards.
func NetnsDialer(netnsPath string) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		type res struct {
			c   net.Conn
			err error
		}
		ch := make(chan res, 1)
		go func() {
			// Never unlocked: the thread ends with this goroutine.
			runtime.LockOSThread()
			if err := enterNetns(netnsPath); err != nil {
				ch <- res{err: err}
				return
			}
			var d net.Dialer
			c, err := d.DialContext(ctx, network, addr)
			ch <- res{c, err}
		}()
		r := <-ch
		return r.c, r.err
	}
}

// Start runs cmd.Start on the launcher's thread.
func (l *Launcher) Start(cmd *exec.Cmd) error {
	errc := make(chan error, 1)
	select {
	case l.reqs <- func() { errc <- cmd.Start() }:
		return <-errc
	case <-l.done:
		return errors.New("launcher is closed")
	}
}

// Close ends the launcher's thread; children still alive get SIGKILL.
func (l *Launcher) Close() { l.once.Do(func() { close(l.done) }) }

// Proc is one child process.
type Proc struct {
	Name string
	Cmd  *exec.Cmd
	// Log is the file holding its output ("" when the caller set it up).
	Log    string
	exited chan struct{} // closed once cmd.Wait returned
	err    error         // cmd.Wait's result, valid after exited
}

// Exited is closed once the process has ended.
func (p *Proc) Exited() <-chan struct{} { return p.exited }

// Err is the process's exit error, valid once Exited is closed.
func (p *Proc) Err() error { return p.err }

// Start starts bin with args, output to logPath, in its own process group,
// killed with SIGKILL when the launcher's thread (or the whole test process)
// dies.
func Start(l *Launcher, name, bin, logPath string, args []string) (*Proc, error) {
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open %s log: %w", name, err)
	}
	// The child has its own copy of the descriptor.
	defer func() { _ = f.Close() }()
	_, _ = fmt.Fprintf(f, "==== %s %s\n", bin, strings.Join(args, " "))
	cmd := exec.Command(bin, args...)
	cmd.Stdout = f
	cmd.Stderr = f
	p, err := StartCmd(l, cmd)
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p.Name, p.Log = name, logPath
	return p, nil
}

// StartCmd starts a command the caller prepared (output, environment) the
// same way: own process group, SIGKILL when the launcher's thread dies.
func StartCmd(l *Launcher, cmd *exec.Cmd) (*Proc, error) {
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Setpgid = true
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	if err := l.Start(cmd); err != nil {
		return nil, err
	}
	p := &Proc{Name: cmd.Path, Cmd: cmd, exited: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.exited)
	}()
	return p, nil
}

// Kill sends SIGKILL to the process group and waits until the process is
// reaped. Safe to call more than once and on nil.
func (p *Proc) Kill() {
	if p == nil {
		return
	}
	select {
	case <-p.exited:
		return
	default:
	}
	_ = syscall.Kill(-p.Cmd.Process.Pid, syscall.SIGKILL)
	_ = p.Cmd.Process.Kill()
	<-p.exited
}

// HasExited reports whether the process has ended.
func (p *Proc) HasExited() bool {
	select {
	case <-p.exited:
		return true
	default:
		return false
	}
}

// Tail returns the last n lines of a log file ("" when it cannot be read).
func Tail(path string, n int) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer func() { _ = f.Close() }()
	const max = 64 << 10
	if st, err := f.Stat(); err == nil && st.Size() > max {
		_, _ = f.Seek(st.Size()-max, io.SeekStart)
	}
	b, _ := io.ReadAll(f)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// FreePorts returns n distinct free TCP ports on 127.0.0.1. Another process
// may take one before the caller binds it; callers retry on "address
// already in use".
func FreePorts(n int) ([]int, error) {
	ports := make([]int, 0, n)
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			_ = l.Close()
		}
	}()
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("find a free port: %w", err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// HTTPGet asks addr (host:port, or host:port/path) for its page through
// dial (NetnsDialer of the namespace to ask from), and returns the body.
func HTTPGet(ctx context.Context, dial func(ctx context.Context, network, addr string) (net.Conn, error), addr string) (string, error) {
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DialContext: dial}}
	if !strings.Contains(addr, "/") {
		addr += "/"
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr, nil)
	if err != nil {
		return "", err
	}
	resp, err := client.Do(req)
	if err != nil {
		return "", err
	}
	defer func() { _ = resp.Body.Close() }()
	body, err := io.ReadAll(resp.Body)
	return strings.TrimSpace(string(body)), err
}

// BusyLoops starts n processes that spin on a CPU each (a shell's empty
// loop, at the default priority, beside everything else) and returns
// what kills them: the load a busy node puts on whatever runs there.
func BusyLoops(n int) (stop func(), err error) {
	var cmds []*exec.Cmd
	stop = func() {
		for _, c := range cmds {
			_ = c.Process.Kill()
			_ = c.Wait()
		}
		cmds = nil
	}
	for range n {
		c := exec.Command("sh", "-c", "while :; do :; done")
		c.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		if err := c.Start(); err != nil {
			stop()
			return nil, fmt.Errorf("busy loop: %w", err)
		}
		cmds = append(cmds, c)
	}
	return stop, nil
}
