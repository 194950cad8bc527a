package spiderpool

import (
	"errors"
	"io"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"syscall"
)

// launcher starts child processes from one OS thread that stays locked, and
// alive, until close (the approach of test/cluster). Pdeathsig is sent when
// the thread that forked a child exits, not when the process does, and Go
// ends a thread whose goroutine exits while locked to it (netns helpers do
// that on errors): forking from an arbitrary goroutine could kill the agent
// mid-test.
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
		return errors.New("agent is stopped")
	}
}

func (l *launcher) close() { l.once.Do(func() { close(l.done) }) }

// proc is one child process in its own process group, killed with SIGKILL
// when the launcher's thread (or the whole test process) dies.
type proc struct {
	cmd    *exec.Cmd
	exited chan struct{} // closed once cmd.Wait returned
	err    error         // cmd.Wait's result, valid after exited
}

func startProc(l *launcher, cmd *exec.Cmd) (*proc, error) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := l.start(cmd); err != nil {
		return nil, err
	}
	p := &proc{cmd: cmd, exited: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.exited)
	}()
	return p, nil
}

// kill sends SIGKILL to the process group and waits until the process is
// reaped. Safe to call more than once and on nil.
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
