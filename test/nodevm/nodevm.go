// Package nodevm runs tests inside a node VM: QEMU booting Debian's own
// kernel (linux-image-amd64, which has ipvlan, openvswitch and 8021q as
// modules, as this project's test machines' kernel does not) on a root
// filesystem made from Debian's packages. rootfs.sh builds the kernel,
// initramfs and root image once per machine into .tools/nodevm/<hash>
// (make deps runs it); Boot starts the VM on a copy-on-write snapshot of the
// image, shares the host directories the tests need at their own paths
// (read-only: the repository, the Go toolchain and module cache) and a
// directory of its own (read-write), and runs test binaries there as root,
// one after the other, before powering off.
//
// QEMU uses KVM when /dev/kvm really runs a guest (Accel probes it) and
// TCG, software emulation, otherwise.
package nodevm

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vmnic/vmnic/test/cluster"
	"github.com/vmnic/vmnic/test/harness"
	"github.com/vmnic/vmnic/test/need"
)

// ErrNoImage is wrapped when the boot files are not built.
var ErrNoImage = errors.New("node VM image not built (make deps runs test/nodevm/rootfs.sh)")

// Image is the node VM's boot files.
type Image struct {
	Dir, Kernel, Initrd, Rootfs string
}

// FindImage returns the image rootfs.sh built for its current content, in
// the .tools/nodevm of the repository at root.
func FindImage(root string) (*Image, error) {
	script, err := os.ReadFile(filepath.Join(root, "test", "nodevm", "rootfs.sh"))
	if err != nil {
		return nil, err
	}
	sum := sha256.Sum256(script)
	dir := filepath.Join(root, ".tools", "nodevm", hex.EncodeToString(sum[:])[:12])
	img := &Image{Dir: dir, Kernel: filepath.Join(dir, "vmlinuz"), Initrd: filepath.Join(dir, "initrd.img"), Rootfs: filepath.Join(dir, "rootfs.img")}
	for _, f := range []string{img.Kernel, img.Initrd, img.Rootfs} {
		if _, err := os.Stat(f); err != nil {
			return nil, fmt.Errorf("%w: %w", ErrNoImage, err)
		}
	}
	return img, nil
}

// Run is one program the VM runs, a test binary say.
type Run struct {
	// Name names the run's log (Name.log in the run directory).
	Name string
	// Path is the program; it must be under a share or the run directory.
	Path string
	Args []string
	// Dir is the working directory (under a share).
	Dir string
	// Env is added to the VM's environment.
	Env []string
}

// Options are the VM's size, what it shares and what it loads.
type Options struct {
	// CPUs and MemoryMiB size the VM (2 and 4096).
	CPUs, MemoryMiB int
	// Shares are host directories mounted read-only at the same paths.
	Shares []string
	// Modules are loaded (modprobe) before the first run.
	Modules []string
	// Env is the environment of every run (PATH and HOME are set).
	Env []string
	// Console receives what the VM prints on its serial console.
	Console io.Writer
	// Accel is "kvm" or "tcg"; empty asks Accel.
	Accel string
}

// Result is what a boot did.
type Result struct {
	// Accel is the accelerator QEMU used.
	Accel string
	// Boot is the VM's uptime when its init started the runs: the kernel,
	// the initramfs and the root file system.
	Boot time.Duration
	// Wall is QEMU's whole run, start to exit.
	Wall time.Duration
	// Runs are the runs in order; a run the VM never finished is missing
	// or has Exit -1.
	Runs []RunResult
}

// RunResult is one run's exit status, time and output.
type RunResult struct {
	Name     string
	Exit     int
	Duration time.Duration
	Output   string
}

var markerRE = regexp.MustCompile(`VMNIC-NODEVM: (\S+) (\S+) ([0-9.]+)`)

// Boot boots the VM in dir (its run directory, shared read-write at the
// same path), runs runs and returns once QEMU exits. ctx bounds the whole
// boot: when it ends QEMU is killed.
func Boot(ctx context.Context, img *Image, dir string, o Options, runs []Run) (*Result, error) {
	if o.CPUs == 0 {
		o.CPUs = 2
	}
	if o.MemoryMiB == 0 {
		o.MemoryMiB = 4096
	}
	if o.Accel == "" {
		o.Accel = Accel(ctx, img)
	}
	dir, err := filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	script, err := initScript(dir, o, runs)
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, "init.sh"), script, 0o644); err != nil {
		return nil, err
	}
	args := []string{
		"-accel", o.Accel, "-cpu", "max", "-smp", strconv.Itoa(o.CPUs), "-m", strconv.Itoa(o.MemoryMiB),
		"-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot", "-nic", "none",
		"-kernel", img.Kernel, "-initrd", img.Initrd,
		"-append", "console=ttyS0 quiet root=/dev/vda rw init=/usr/local/sbin/vmnic-init panic=-1",
		"-drive", "file=" + img.Rootfs + ",if=virtio,format=raw,snapshot=on,cache=unsafe",
		"-virtfs", "local,path=" + dir + ",mount_tag=vmnic,security_model=none",
	}
	if o.Accel == "tcg" {
		args[1] = "tcg,thread=multi"
	}
	for i, s := range o.Shares {
		args = append(args, "-virtfs", fmt.Sprintf("local,path=%s,mount_tag=share%d,security_model=none,readonly=on", s, i))
	}
	var console bytes.Buffer
	w := io.Writer(&console)
	if o.Console != nil {
		w = io.MultiWriter(&console, o.Console)
	}
	cmd := exec.CommandContext(ctx, "qemu-system-x86_64", args...)
	cmd.Stdout, cmd.Stderr = w, w
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	start := time.Now()
	runErr := cmd.Run()
	res := &Result{Accel: o.Accel, Wall: time.Since(start)}
	for _, m := range markerRE.FindAllStringSubmatch(console.String(), -1) {
		if m[1] == "init.sh" && m[2] == "start" {
			secs, _ := strconv.ParseFloat(m[3], 64)
			res.Boot = time.Duration(secs * float64(time.Second))
		}
	}
	for _, r := range runs {
		rr := RunResult{Name: r.Name, Exit: -1}
		if b, err := os.ReadFile(filepath.Join(dir, r.Name+".log")); err == nil {
			rr.Output = string(b)
		}
		if b, err := os.ReadFile(filepath.Join(dir, r.Name+".exit")); err == nil {
			f := strings.Fields(string(b))
			if len(f) == 2 {
				rr.Exit, _ = strconv.Atoi(f[0])
				secs, _ := strconv.ParseFloat(f[1], 64)
				rr.Duration = time.Duration(secs * float64(time.Second))
			}
		}
		res.Runs = append(res.Runs, rr)
	}
	if runErr != nil {
		return res, fmt.Errorf("qemu: %w (console tail:\n%s)", runErr, tail(console.String(), 3000))
	}
	if !strings.Contains(console.String(), "VMNIC-NODEVM: init.sh exit=") {
		return res, fmt.Errorf("the node VM powered off before its runs ended (console tail:\n%s)", tail(console.String(), 3000))
	}
	return res, nil
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// shellQuote quotes s for sh.
func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

var nameRE = regexp.MustCompile(`^[A-Za-z0-9_.-]+$`)

// initScript is the run directory's init.sh, which the image's init runs:
// it mounts the shares, loads the modules and runs the runs, each writing
// Name.log and then Name.exit ("<status> <seconds>").
func initScript(dir string, o Options, runs []Run) ([]byte, error) {
	var b strings.Builder
	b.WriteString("set -u\nexport HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n")
	fmt.Fprintf(&b, "mkdir -p %s && mount --bind /run/nodevm %s\n", shellQuote(dir), shellQuote(dir))
	for i, s := range o.Shares {
		fmt.Fprintf(&b, "mkdir -p %[1]s && mount -t 9p -o trans=virtio,version=9p2000.L,msize=1048576,ro share%[2]d %[1]s || echo 'VMNIC-NODEVM: share%[2]d failed 0'\n", shellQuote(s), i)
	}
	for _, m := range o.Modules {
		fmt.Fprintf(&b, "modprobe %s || echo 'VMNIC-NODEVM: modprobe %s failed 0'\n", shellQuote(m), m)
	}
	b.WriteString("ip link set lo up\n")
	for _, e := range o.Env {
		fmt.Fprintf(&b, "export %s\n", shellQuote(e))
	}
	for _, r := range runs {
		if !nameRE.MatchString(r.Name) {
			return nil, fmt.Errorf("run name %q: want letters, digits, ._-", r.Name)
		}
		var cmd []string
		for _, e := range r.Env {
			cmd = append(cmd, shellQuote(e))
		}
		cmd = append(cmd, shellQuote(r.Path))
		for _, a := range r.Args {
			cmd = append(cmd, shellQuote(a))
		}
		log, exit := shellQuote(filepath.Join(dir, r.Name+".log")), shellQuote(filepath.Join(dir, r.Name+".exit"))
		fmt.Fprintf(&b, "echo 'VMNIC-NODEVM: %[1]s start' $(cut -d' ' -f1 /proc/uptime)\n", r.Name)
		fmt.Fprintf(&b, "t0=$(cut -d' ' -f1 /proc/uptime)\n")
		fmt.Fprintf(&b, "(cd %s && env %s) > %s 2>&1 < /dev/null\n", shellQuote(r.Dir), strings.Join(cmd, " "), log)
		fmt.Fprintf(&b, "rc=$?; t1=$(cut -d' ' -f1 /proc/uptime)\n")
		fmt.Fprintf(&b, "echo \"$rc $(echo \"$t1 $t0\" | awk '{print $1-$2}')\" > %s\n", exit)
		fmt.Fprintf(&b, "echo \"VMNIC-NODEVM: %s exit=$rc $t1\"\n", r.Name)
	}
	b.WriteString("sync\n")
	return []byte(b.String()), nil
}

// Accel returns "kvm" when /dev/kvm boots img's kernel far enough to
// print on the console within a few seconds, and "tcg" otherwise (no
// /dev/kvm, or one that cannot run a guest, as in some nested setups).
func Accel(ctx context.Context, img *Image) string {
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return "tcg"
	}
	_ = f.Close()
	ctx, cancel := context.WithTimeout(ctx, 8*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "qemu-system-x86_64", "-accel", "kvm", "-m", "256", "-display", "none",
		"-monitor", "none", "-serial", "stdio", "-no-reboot", "-nic", "none", "-kernel", img.Kernel,
		"-append", "console=ttyS0 panic=-1 root=/dev/nonexistent")
	out, _ := cmd.Output()
	if bytes.Contains(out, []byte("Linux version")) {
		return "kvm"
	}
	return "tcg"
}

// Setup is what Prepare made on the host for a boot: the test binaries
// and the options that share the rest.
type Setup struct {
	Root string
	// Binaries maps a package directory (from Root) to its test binary.
	Binaries map[string]string
	// Options shares the repository, the Go toolchain and the module cache
	// and loads the modules the suite needs; its Env points the tests at
	// the prebuilt binaries (harness.CNIBinEnv, harness.BuiltEnv,
	// cluster.ToolsBinEnv).
	Options Options
}

// Modules are the kernel modules the tests in the VM use beyond what
// loads on demand.
var Modules = []string{"ipvlan", "macvlan", "8021q", "openvswitch", "veth", "tun", "nf_tables"}

// Prepare builds on the host what the VM cannot (it has no Go build
// cache): the test binaries of pkgs (package directories from root) into
// dir, vmnic's shim and the reference plugins, vmnicd (the binary make
// build writes), and the cluster's tools.
func Prepare(ctx context.Context, root, dir string, pkgs ...string) (*Setup, error) {
	s := &Setup{Root: root, Binaries: map[string]string{}}
	for _, pkg := range pkgs {
		bin := filepath.Join(dir, strings.ReplaceAll(pkg, "/", "_")+".test")
		cmd := exec.CommandContext(ctx, "go", "test", "-c", "-o", bin, "./"+pkg)
		cmd.Dir = root
		if out, err := cmd.CombinedOutput(); err != nil {
			return nil, fmt.Errorf("go test -c ./%s: %w\n%s", pkg, err, out)
		}
		s.Binaries[pkg] = bin
	}
	cniBin, err := harness.BinDir()
	if err != nil {
		return nil, err
	}
	vmnicd, err := harness.Vmnicd()
	if err != nil {
		return nil, err
	}
	tools, err := cluster.Binaries(ctx, "etcd", "kube-apiserver", "spiderpool-agent", "spiderpool", "coordinator", "ifacer", "spiderpool-controller", "helm")
	if err != nil {
		return nil, err
	}
	goEnv := func(v string) (string, error) {
		out, gerr := exec.CommandContext(ctx, "go", "env", v).Output()
		if gerr != nil {
			return "", fmt.Errorf("go env %s: %w", v, gerr)
		}
		return strings.TrimSpace(string(out)), nil
	}
	goroot, err := goEnv("GOROOT")
	if err != nil {
		return nil, err
	}
	modcache, err := goEnv("GOMODCACHE")
	if err != nil {
		return nil, err
	}
	s.Options = Options{
		Shares:  []string{root, goroot, modcache},
		Modules: Modules,
		Env: []string{
			need.NodeVMEnv + "=1", harness.CNIBinEnv + "=" + cniBin, harness.BuiltEnv + "=" + filepath.Dir(vmnicd),
			cluster.ToolsBinEnv + "=" + filepath.Dir(tools[0]),
			"CI=" + os.Getenv("CI"),
			"PATH=" + filepath.Join(goroot, "bin") + ":/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
			// The module cache is read-only in the VM and nothing is
			// downloaded: test/spiderpool reads its CRDs from the cache.
			"GOMODCACHE=" + modcache, "GOCACHE=/tmp/gocache", "GOPROXY=off", "GOTOOLCHAIN=local", "GOFLAGS=-mod=readonly",
		},
	}
	return s, nil
}

// Run is the run of pkg's test binary with args, in pkg's directory.
func (s *Setup) Run(name, pkg string, env []string, args ...string) Run {
	return Run{Name: name, Path: s.Binaries[pkg], Dir: filepath.Join(s.Root, pkg), Env: env, Args: args}
}
