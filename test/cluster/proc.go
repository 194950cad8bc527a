package cluster

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"syscall"
)

// launcher starts child processes from one OS thread that stays locked, and
// alive, until close. Pdeathsig is sent when the thread that forked a child
// exits, not when the process does, and Go ends a thread whose goroutine
// exits while locked to it (the netns helpers tests use do that on errors):
// forking from an arbitrary goroutine could kill the API server mid-test.
type launcher struct {
	reqs chan func()
	done chan struct{}
	once sync.Once
}

func newLauncher() *launcher {
	l := &launcher{reqs: make(chan func()), done: make(chan struct{})}
	go func() {
		// Never unlocked: when close ends this goroutine, the thread exits
		// too and any child still alive gets its Pdeathsig.
		runtime.LockOSThread()
		for {
			select {
			case f := <-l.reqs:
				f()
			case <-l.done:
				return
			}
		}
	}()
	return l
}

// start runs cmd.Start on the launcher's thread.
func (l *launcher) start(cmd *exec.Cmd) error {
	errc := make(chan error, 1)
	select {
	case l.reqs <- func() { errc <- cmd.Start() }:
		return <-errc
	case <-l.done:
		return errors.New("cluster is stopped")
	}
}

func (l *launcher) close() { l.once.Do(func() { close(l.done) }) }

// proc is one child process with its output in a log file.
type proc struct {
	name   string
	cmd    *exec.Cmd
	log    string
	exited chan struct{} // closed once cmd.Wait returned
	err    error         // cmd.Wait's result, valid after exited
}

// startProc starts bin with args, output to logPath, in its own process
// group, killed with SIGKILL when the launcher's thread (or the whole test
// process) dies.
func startProc(l *launcher, name, bin, logPath string, args []string) (*proc, error) {
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
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := l.start(cmd); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &proc{name: name, cmd: cmd, log: logPath, exited: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.exited)
	}()
	return p, nil
}

// kill sends SIGKILL to the process group and waits until the process is
// reaped. Safe to call more than once.
func (p *proc) kill() {
	if p == nil {
		return
	}
	select {
	case <-p.exited:
		return
	default:
	}
	_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
	_ = p.cmd.Process.Kill()
	<-p.exited
}

// hasExited reports whether the process has ended.
func (p *proc) hasExited() bool {
	select {
	case <-p.exited:
		return true
	default:
		return false
	}
}

// tail returns the last n lines of a log file ("" when it cannot be read).
func tail(path string, n int) string {
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

// freePorts returns n distinct free TCP ports on 127.0.0.1. Another process
// may take one before the caller binds it; callers retry on "address
// already in use".
func freePorts(n int) ([]int, error) {
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
