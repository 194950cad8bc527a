// Package guest boots a real Linux guest under QEMU on a tap device, for
// end-to-end tests of the vmnic CNI plugin.
//
// Build assembles a small busybox initramfs for the host's Debian kernel
// (/boot/vmlinuz-*), Start boots it with QEMU (TCG, no KVM needed) inside a
// network namespace with the NIC attached to an existing persistent tap, runs
// a shell script as the guest's main job and streams the serial console, and
// WaitFor lets a test wait for console lines:
//
//	img, err := guest.Build(t.TempDir())
//	g, err := guest.Start(ctx, img, guest.Options{
//		NetnsPath: netnsPath, Tap: "tap0", MAC: "02:00:00:00:00:01",
//		Script: "udhcpc -i eth0 -q -f -n && ping -c 3 192.0.2.1 && echo PING-OK",
//	})
//	defer g.Kill()
//	_, err = g.WaitFor(ctx, regexp.MustCompile(`^PING-OK$`))
//
// Under TCG a guest reaches its script about 7 s after Start and the whole
// QEMU run of a short script takes about 10 s. Booting needs root (network
// namespaces, taps); Check reports missing host tools.
//
// Live migration: start a second guest from the same Image with the same
// Options except for its own Tap (possibly in another netns), plus Incoming
// (e.g. "unix:/tmp/x/mig.sock") and a MonitorSocket; then run
// src.QMP(ctx, "migrate", map[string]any{"uri": "unix:/tmp/x/mig.sock"}) and
// poll "query-migrate" until its status is "completed" (about 2 s for 256 MiB).
// The script carries on on the destination's console; the source stays
// paused until killed.
package guest

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
)

// ScriptExit matches the line /init prints when the script has ended; the
// submatch is the script's exit status.
var ScriptExit = regexp.MustCompile(`^VMNIC-GUEST: script exit=(\d+)$`)

// KernelArgs is the guest kernel command line, before Options.KernelArgs.
const KernelArgs = "console=ttyS0 quiet panic=-1"

// NIC is one more guest NIC on an existing tap (single queue).
type NIC struct {
	Tap string
	MAC string
}

// Options configure one guest.
type Options struct {
	// NetnsPath, if set, is the network namespace QEMU runs in (a path
	// such as /var/run/netns/x or /proc/<pid>/ns/net).
	NetnsPath string
	// Tap is the name of an existing tap device in that namespace. It must
	// have been created with IFF_TAP|IFF_NO_PI (and IFF_MULTI_QUEUE when
	// Queues > 1) and be persistent. Empty means the guest has no NIC.
	Tap string
	// MAC is the guest NIC's MAC address; empty lets QEMU pick one.
	MAC string
	// Queues > 1 makes the NIC multiqueue (tap queues=N, virtio mq=on).
	Queues int
	// CPUs is the number of vCPUs; default max(1, Queues), since the
	// guest uses min(Queues, CPUs) queue pairs.
	CPUs int
	// Stream, instead of Tap, connects the first NIC to a unix stream
	// socket (QEMU -netdev stream): a passt instance listening there.
	Stream string
	// More NICs after the first, in order: eth1, eth2, ... in the guest
	// (the script brings them up).
	More []NIC
	// Script is run by busybox sh as the guest's main job once eth0 is up;
	// its output goes to the serial console. The guest powers off when it
	// ends.
	Script string
	// MemoryMiB is the guest RAM size; default 256.
	MemoryMiB int
	// Timeout kills QEMU if it is still running after that long; default
	// 5 minutes.
	Timeout time.Duration
	// KernelArgs are appended to the guest kernel command line.
	KernelArgs string
	// MonitorSocket, if set, is the path of a unix socket on which QEMU
	// serves QMP (see Guest.QMP).
	MonitorSocket string
	// Incoming, if set, is passed as -incoming (e.g. "tcp:0:4444",
	// "unix:/path" or "defer") to make this QEMU a migration target.
	// The guest then does not boot but waits for the migration stream.
	Incoming string
	// Log, if set, is called with every console line and, prefixed with
	// "qemu: ", every line QEMU writes to stderr. It is called from
	// another goroutine; it is not called any more once Kill or Wait has
	// returned.
	Log func(line string)
}

// Guest is a running QEMU process.
type Guest struct {
	cmd      *exec.Cmd
	tmp      string
	log      func(string)
	qmpPath  string
	done     chan struct{} // closed once QEMU has exited and all output is read
	exitErr  error         // valid once done is closed
	killOnce sync.Once

	mu      sync.Mutex
	lines   []string
	partial []byte
	stderr  bytes.Buffer
	cursor  int           // next line WaitFor looks at
	changed chan struct{} // closed and replaced on every new line and at EOF
	eof     bool
	reason  error // why we killed QEMU, if we did
}

// Start boots img with the given options and returns once QEMU has started.
// QEMU is killed when ctx is done or o.Timeout has passed; call Kill (for
// example with defer) to stop it earlier and clean up.
func Start(ctx context.Context, img *Image, o Options) (*Guest, error) {
	qemu, err := exec.LookPath(QEMU)
	if err != nil {
		return nil, fmt.Errorf("%w: %s not found (Debian: qemu-system-x86): %w", ErrUnavailable, QEMU, err)
	}
	if o.MemoryMiB == 0 {
		o.MemoryMiB = 256
	}
	if o.Timeout == 0 {
		o.Timeout = 5 * time.Minute
	}
	if o.CPUs == 0 {
		o.CPUs = max(1, o.Queues)
	}

	tmp, err := os.MkdirTemp("", "vmnic-guest-")
	if err != nil {
		return nil, fmt.Errorf("creating guest dir: %w", err)
	}
	initrd := filepath.Join(tmp, "initrd.cpio")
	if err = writeInitrd(initrd, img.Initrd, o.Script); err != nil {
		_ = os.RemoveAll(tmp)
		return nil, err
	}

	cmd := exec.Command(qemu, qemuArgs(img, initrd, &o)...)
	g := &Guest{
		cmd:     cmd,
		tmp:     tmp,
		log:     o.Log,
		qmpPath: o.MonitorSocket,
		done:    make(chan struct{}),
		changed: make(chan struct{}),
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		_ = os.RemoveAll(tmp)
		return nil, fmt.Errorf("qemu stdout: %w", err)
	}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		_ = os.RemoveAll(tmp)
		return nil, fmt.Errorf("qemu stderr: %w", err)
	}
	start := cmd.Start
	if o.NetnsPath != "" {
		// The child inherits the network namespace of the OS thread
		// that forks it; ns.WithNetNSPath runs cmd.Start on a locked
		// thread switched into the namespace.
		start = func() error {
			return ns.WithNetNSPath(o.NetnsPath, func(ns.NetNS) error { return cmd.Start() })
		}
	}
	if err := start(); err != nil {
		_ = os.RemoveAll(tmp)
		return nil, fmt.Errorf("starting %s: %w", qemu, err)
	}

	var readers sync.WaitGroup
	readers.Add(2)
	go func() { defer readers.Done(); g.readConsole(stdout) }()
	go func() { defer readers.Done(); g.readStderr(stderr) }()
	go func() {
		readers.Wait()
		err := cmd.Wait()
		g.mu.Lock()
		switch {
		case err == nil:
		case g.reason != nil:
			err = fmt.Errorf("%w (qemu: %w)", g.reason, err)
		default:
			err = fmt.Errorf("qemu: %w; stderr: %s", err, strings.TrimSpace(g.stderr.String()))
		}
		g.mu.Unlock()
		g.exitErr = err
		_ = os.RemoveAll(tmp)
		close(g.done)
	}()
	go func() {
		timer := time.NewTimer(o.Timeout)
		defer timer.Stop()
		select {
		case <-g.done:
		case <-ctx.Done():
			g.kill(fmt.Errorf("guest killed: %w", context.Cause(ctx)))
		case <-timer.C:
			g.kill(fmt.Errorf("guest killed after timeout %v", o.Timeout))
		}
	}()
	return g, nil
}

func qemuArgs(img *Image, initrd string, o *Options) []string {
	args := []string{
		"-accel", "tcg",
		// "max" gives the guest RDRAND, which seeds the kernel's RNG at
		// once; with the default qemu64 CPU getrandom(2) (and so any Go
		// program using crypto/rand) blocks for minutes under TCG.
		"-cpu", "max",
		"-nodefaults", "-no-user-config", "-no-reboot",
		"-display", "none", "-monitor", "none",
		"-chardev", "stdio,id=console,signal=off",
		"-serial", "chardev:console",
		"-m", strconv.Itoa(o.MemoryMiB),
		"-smp", strconv.Itoa(o.CPUs),
		"-kernel", img.Kernel,
		"-initrd", initrd,
		"-append", strings.TrimSpace(KernelArgs + " " + o.KernelArgs),
	}
	if o.Tap != "" {
		netdev := "tap,id=n0,ifname=" + o.Tap + ",script=no,downscript=no,vhost=off"
		// romfile= skips the iPXE option ROM: not needed for -kernel
		// and often not installed (Debian: ipxe-qemu).
		dev := "virtio-net-pci,netdev=n0,romfile="
		if o.MAC != "" {
			dev += ",mac=" + o.MAC
		}
		if o.Queues > 1 {
			netdev += ",queues=" + strconv.Itoa(o.Queues)
			dev += ",mq=on,vectors=" + strconv.Itoa(2*o.Queues+2)
		}
		args = append(args, "-netdev", netdev, "-device", dev)
	}
	if o.Stream != "" {
		dev := "virtio-net-pci,netdev=n0,romfile="
		if o.MAC != "" {
			dev += ",mac=" + o.MAC
		}
		args = append(args, "-netdev", "stream,id=n0,server=off,addr.type=unix,addr.path="+o.Stream, "-device", dev)
	}
	for i, nic := range o.More {
		id := "n" + strconv.Itoa(i+1)
		dev := "virtio-net-pci,netdev=" + id + ",romfile="
		if nic.MAC != "" {
			dev += ",mac=" + nic.MAC
		}
		args = append(args, "-netdev", "tap,id="+id+",ifname="+nic.Tap+",script=no,downscript=no,vhost=off", "-device", dev)
	}
	if o.MonitorSocket != "" {
		args = append(args, "-qmp", "unix:"+o.MonitorSocket+",server=on,wait=off")
	}
	if o.Incoming != "" {
		args = append(args, "-incoming", o.Incoming)
	}
	return args
}

// writeInitrd writes base followed by a cpio archive holding /script.sh.
func writeInitrd(path, base, script string) error {
	b, err := os.ReadFile(base)
	if err != nil {
		return fmt.Errorf("reading base initramfs: %w", err)
	}
	var w cpioWriter
	w.File("script.sh", 0o755, []byte(script))
	// The kernel unpacks concatenated archives in turn; base is padded
	// to 512 bytes by cpioWriter.
	b = append(b, w.Bytes()...)
	if err := os.WriteFile(path, b, 0o644); err != nil {
		return fmt.Errorf("writing initramfs: %w", err)
	}
	return nil
}

func (g *Guest) readConsole(r io.Reader) {
	buf := make([]byte, 32*1024)
	for {
		n, err := r.Read(buf)
		if n > 0 {
			g.consume(buf[:n], false)
		}
		if err != nil {
			break
		}
	}
	g.consume(nil, true)
}

// consume splits console output into lines; at eof it also flushes an
// unterminated last line.
func (g *Guest) consume(p []byte, eof bool) {
	var added []string
	g.mu.Lock()
	for len(p) > 0 {
		i := bytes.IndexByte(p, '\n')
		if i < 0 {
			g.partial = append(g.partial, p...)
			break
		}
		g.partial = append(g.partial, p[:i]...)
		added = append(added, cleanLine(g.partial))
		g.partial = g.partial[:0]
		p = p[i+1:]
	}
	if eof {
		if len(g.partial) > 0 {
			added = append(added, cleanLine(g.partial))
			g.partial = nil
		}
		g.eof = true
	}
	g.lines = append(g.lines, added...)
	if len(added) > 0 || eof {
		close(g.changed)
		g.changed = make(chan struct{})
	}
	g.mu.Unlock()
	if g.log != nil {
		for _, l := range added {
			g.log(l)
		}
	}
}

func cleanLine(b []byte) string {
	return strings.ReplaceAll(string(b), "\r", "")
}

func (g *Guest) readStderr(r io.Reader) {
	s := bufio.NewScanner(r)
	for s.Scan() {
		g.mu.Lock()
		g.stderr.WriteString(s.Text() + "\n")
		g.mu.Unlock()
		if g.log != nil {
			g.log("qemu: " + s.Text())
		}
	}
	_, _ = io.Copy(io.Discard, r)
}

// WaitFor waits for a console line matching re and returns its submatches
// (as regexp.FindStringSubmatch does). Lines are consumed like by expect(1):
// each call looks only at lines after the one the previous successful call
// matched, so a sequence of WaitFor calls checks the order of events. Lines
// have "\r" removed. If QEMU exits or ctx ends first, the error holds the
// last 40 console lines.
func (g *Guest) WaitFor(ctx context.Context, re *regexp.Regexp) ([]string, error) {
	for {
		g.mu.Lock()
		for i := g.cursor; i < len(g.lines); i++ {
			if m := re.FindStringSubmatch(g.lines[i]); m != nil {
				g.cursor = i + 1
				g.mu.Unlock()
				return m, nil
			}
		}
		eof, changed := g.eof, g.changed
		g.mu.Unlock()
		if eof {
			<-g.done
			return nil, fmt.Errorf("guest exited (%v) before printing a line matching %q; console tail:\n%s",
				g.exitErr, re, g.tail(40))
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return nil, fmt.Errorf("waiting for a console line matching %q: %w; console tail:\n%s",
				re, context.Cause(ctx), g.tail(40))
		}
	}
}

// tail returns the last n console lines and QEMU's stderr.
func (g *Guest) tail(n int) string {
	g.mu.Lock()
	defer g.mu.Unlock()
	lines := g.lines[max(0, len(g.lines)-n):]
	s := "\t" + strings.Join(lines, "\n\t")
	if len(g.partial) > 0 {
		s += "\n\t" + string(g.partial)
	}
	if e := strings.TrimSpace(g.stderr.String()); e != "" {
		s += "\nqemu stderr:\n" + e
	}
	return s
}

// Output returns the whole console output so far.
func (g *Guest) Output() string {
	g.mu.Lock()
	defer g.mu.Unlock()
	var b strings.Builder
	for _, l := range g.lines {
		b.WriteString(l)
		b.WriteByte('\n')
	}
	b.Write(g.partial)
	return b.String()
}

// Wait waits for QEMU to exit and returns its error, if any. A guest that
// powers itself off exits cleanly; one stopped by Kill, its context or its
// timeout returns an error saying so.
func (g *Guest) Wait() error {
	<-g.done
	return g.exitErr
}

// Done is closed once QEMU has exited.
func (g *Guest) Done() <-chan struct{} { return g.done }

// Kill stops QEMU, if it is still running, and waits for it to exit. It is
// safe to call more than once and after the guest has exited.
func (g *Guest) Kill() {
	g.kill(errors.New("guest killed"))
	<-g.done
}

func (g *Guest) kill(reason error) {
	g.killOnce.Do(func() {
		select {
		case <-g.done:
			return
		default:
		}
		g.mu.Lock()
		g.reason = reason
		g.mu.Unlock()
		_ = g.cmd.Process.Kill()
	})
}

// Initramfs writes to path the initramfs Start boots: img's base with
// script as /script.sh, which /init runs. For a guest another program
// boots, such as KubeVirt's kernelBoot from a container image.
func (img *Image) Initramfs(path, script string) error {
	return writeInitrd(path, img.Initrd, script)
}
