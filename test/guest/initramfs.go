package guest

import (
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"debug/elf"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"text/template"
)

// ErrUnavailable is wrapped by the errors of Check, Build and Start when a
// prerequisite (QEMU, a kernel, busybox, the go tool) is missing, so that
// tests can tell "cannot run here" from "broken".
var ErrUnavailable = errors.New("guest prerequisite unavailable")

// Locations of the host tools. They are variables so that a test binary can
// point them elsewhere.
var (
	// QEMU is the QEMU system emulator, looked up in PATH if not absolute.
	QEMU = "qemu-system-x86_64"
	// Busybox must be a statically linked busybox (Debian: busybox-static).
	Busybox = "/bin/busybox"
	// BootDir and ModulesDir are searched for vmlinuz-<version> and the
	// matching /lib/modules/<version>.
	BootDir    = "/boot"
	ModulesDir = "/lib/modules"
)

// netModules are the kernel modules the guest needs for its NIC; their
// dependencies are resolved from the modules' own .modinfo.
var netModules = []string{"virtio_pci", "virtio_net"}

// Image is a kernel and a base initramfs ready to be booted by Start.
type Image struct {
	// Kernel is the path of the kernel image (bzImage).
	Kernel string
	// Initrd is the path of the base initramfs, an uncompressed newc cpio
	// archive. Start appends the per-guest script to a copy of it.
	Initrd string
	// KernelVersion is the version of Kernel, e.g. "6.1.0-56-amd64".
	KernelVersion string
	// Modules lists the kernel modules /init loads, in load order.
	// Modules built into the kernel are not listed.
	Modules []string
}

// Check reports whether guests can be built and booted on this host. The
// error wraps ErrUnavailable and names what is missing.
func Check() error {
	if _, err := exec.LookPath(QEMU); err != nil {
		return fmt.Errorf("%w: %s not found (Debian: qemu-system-x86): %w", ErrUnavailable, QEMU, err)
	}
	if _, err := os.Stat(Busybox); err != nil {
		return fmt.Errorf("%w: busybox (Debian: busybox-static): %w", ErrUnavailable, err)
	}
	if _, _, err := findKernel(); err != nil {
		return err
	}
	if _, err := goTool(); err != nil {
		return err
	}
	return nil
}

// Build makes the base initramfs in dir and returns the image to boot. The
// archive is named after the hash of its content, so calling Build again with
// the same dir reuses the file.
//
// The initramfs holds busybox (with all applet links in /bin; /sbin, /usr/bin
// and /usr/sbin link to /bin), the virtio-net kernel modules, a DHCPv6 client
// (/bin/udhcpc6, see below), the DHCP lease scripts and /init. /init mounts
// proc, sysfs, devtmpfs, devpts and tmpfs on /run and /tmp, loads the modules,
// brings up lo and eth0 (IPv6 on, router advertisements accepted), runs
// /script.sh (supplied by Start) and powers the guest off. It prints marker
// lines starting with "VMNIC-GUEST: " on the console, notably
// "VMNIC-GUEST: script start" and "VMNIC-GUEST: script exit=N".
//
// Lease scripts: busybox udhcpc runs /usr/share/udhcpc/default.script (also
// installed as /etc/udhcpc/default.script, Debian's default path). It
// applies address, MTU, routers or classless static routes (option 121, which
// takes precedence as RFC 3442 says), DNS and hostname, then prints
//
//	DHCP4 <event> interface=eth0 ip=... mask=<prefix length> router=... mtu=... dns=... domain=... search=... staticroutes=... hostname=... lease=...
//
// with list values joined by commas (staticroutes as dest,gw,dest,gw...).
// Debian's busybox has no udhcpc6 applet, so /bin/udhcpc6 is a small Go
// replacement (internal/udhcpc6, compiled here with the go tool) that takes
// the usual udhcpc6 flags and runs /usr/share/udhcpc/default6.script, which
// adds $ipv6/128 and prints
//
//	DHCP6 <event> interface=eth0 ipv6=... ipv6prefix=... lease=... dns=... search=...
//
// Both scripts write their name servers to /etc/resolv.conf.
func Build(dir string) (*Image, error) {
	kernel, version, err := findKernel()
	if err != nil {
		return nil, err
	}
	bb, err := os.ReadFile(Busybox)
	if err != nil {
		return nil, fmt.Errorf("%w: busybox (Debian: busybox-static): %w", ErrUnavailable, err)
	}
	if err = checkStatic(Busybox); err != nil {
		return nil, err
	}
	applets, err := busyboxApplets()
	if err != nil {
		return nil, err
	}
	mods, err := resolveModules(filepath.Join(ModulesDir, version), netModules)
	if err != nil {
		return nil, err
	}
	dhcp6, err := buildUdhcpc6()
	if err != nil {
		return nil, err
	}

	var names []string
	for _, m := range mods {
		names = append(names, m.name)
	}
	var initScript bytes.Buffer
	if err := initTemplate.Execute(&initScript, struct{ Modules []string }{names}); err != nil {
		return nil, fmt.Errorf("rendering /init: %w", err)
	}

	var w cpioWriter
	for _, d := range []string{
		".", "bin", "dev", "etc", "etc/udhcpc", "lib", "lib/modules",
		"proc", "root", "run", "sys", "tmp", "usr", "usr/share", "usr/share/udhcpc", "var",
	} {
		w.Dir(d, 0o755)
	}
	w.CharDev("dev/console", 0o600, 5, 1)
	w.CharDev("dev/null", 0o666, 1, 3)
	w.Symlink("sbin", "bin")
	w.Symlink("usr/bin", "../bin")
	w.Symlink("usr/sbin", "../bin")
	w.Symlink("var/run", "../run")
	w.File("bin/busybox", 0o755, bb)
	for _, a := range applets {
		w.Symlink("bin/"+a, "busybox")
	}
	w.File("bin/udhcpc6", 0o755, dhcp6)
	for _, m := range mods {
		w.File("lib/modules/"+m.name+".ko", 0o644, m.data)
	}
	w.File("init", 0o755, initScript.Bytes())
	w.File("usr/share/udhcpc/default.script", 0o755, []byte(dhcp4Script))
	w.Symlink("etc/udhcpc/default.script", "/usr/share/udhcpc/default.script")
	w.File("usr/share/udhcpc/default6.script", 0o755, []byte(dhcp6Script))
	w.File("etc/hosts", 0o644, []byte("127.0.0.1 localhost\n::1 localhost\n"))
	w.File("etc/resolv.conf", 0o644, nil)
	w.File("etc/passwd", 0o644, []byte("root:x:0:0:root:/root:/bin/sh\n"))
	w.File("etc/group", 0o644, []byte("root:x:0:\n"))
	archive := w.Bytes()

	sum := sha256.Sum256(archive)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("creating %s: %w", dir, err)
	}
	path := filepath.Join(dir, "initramfs-"+hex.EncodeToString(sum[:8])+".cpio")
	if _, err := os.Stat(path); err != nil {
		if err := writeFileAtomic(path, archive); err != nil {
			return nil, err
		}
	}
	return &Image{Kernel: kernel, Initrd: path, KernelVersion: version, Modules: names}, nil
}

// findKernel returns the newest /boot/vmlinuz-<v> with a /lib/modules/<v>.
func findKernel() (path, version string, err error) {
	matches, _ := filepath.Glob(filepath.Join(BootDir, "vmlinuz-*"))
	sort.Sort(sort.Reverse(sort.StringSlice(matches)))
	for _, m := range matches {
		v := strings.TrimPrefix(filepath.Base(m), "vmlinuz-")
		if st, err := os.Stat(filepath.Join(ModulesDir, v, "kernel")); err == nil && st.IsDir() {
			f, err := os.Open(m)
			if err != nil {
				return "", "", fmt.Errorf("%w: kernel %s not readable: %w", ErrUnavailable, m, err)
			}
			_ = f.Close()
			return m, v, nil
		}
	}
	return "", "", fmt.Errorf("%w: no %s/vmlinuz-<version> with matching %s/<version> (Debian: linux-image-amd64)",
		ErrUnavailable, BootDir, ModulesDir)
}

func checkStatic(path string) error {
	f, err := elf.Open(path)
	if err != nil {
		return fmt.Errorf("reading %s: %w", path, err)
	}
	defer func() { _ = f.Close() }()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return fmt.Errorf("%w: %s is dynamically linked; install busybox-static", ErrUnavailable, path)
		}
	}
	return nil
}

func busyboxApplets() ([]string, error) {
	out, err := exec.Command(Busybox, "--list").Output()
	if err != nil {
		return nil, fmt.Errorf("%s --list: %w", Busybox, err)
	}
	var applets []string
	for _, a := range strings.Fields(string(out)) {
		// /init is ours; busybox itself is a real file.
		if a == "busybox" || strings.Contains(a, "/") {
			continue
		}
		applets = append(applets, a)
	}
	return applets, nil
}

type module struct {
	name string
	data []byte // uncompressed .ko
}

// resolveModules returns roots and their dependencies in load order,
// skipping modules built into the kernel. Dependencies come from each
// module's .modinfo section, so modules.dep is not needed.
func resolveModules(moddir string, roots []string) ([]module, error) {
	builtin := map[string]bool{}
	if b, err := os.ReadFile(filepath.Join(moddir, "modules.builtin")); err == nil {
		for _, l := range strings.Fields(string(b)) {
			builtin[moduleName(l)] = true
		}
	}
	files := map[string]string{}
	err := filepath.WalkDir(filepath.Join(moddir, "kernel"), func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() && strings.Contains(d.Name(), ".ko") {
			files[moduleName(d.Name())] = p
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("listing modules: %w", err)
	}

	var order []module
	state := map[string]int{} // 1 visiting, 2 done
	var visit func(name string) error
	visit = func(name string) error {
		switch state[name] {
		case 2:
			return nil
		case 1:
			return fmt.Errorf("module dependency cycle at %s", name)
		}
		state[name] = 1
		defer func() { state[name] = 2 }()
		path, ok := files[name]
		if !ok {
			if builtin[name] {
				return nil
			}
			return fmt.Errorf("%w: kernel module %s neither built in nor found under %s", ErrUnavailable, name, moddir)
		}
		data, err := readModule(path)
		if err != nil {
			return err
		}
		deps, err := moduleDeps(data)
		if err != nil {
			return fmt.Errorf("module %s: %w", path, err)
		}
		for _, d := range deps {
			if err := visit(d); err != nil {
				return err
			}
		}
		order = append(order, module{name: name, data: data})
		return nil
	}
	for _, r := range roots {
		if err := visit(moduleName(r)); err != nil {
			return nil, err
		}
	}
	return order, nil
}

// moduleName turns "kernel/drivers/net/virtio_net.ko.xz" into "virtio_net".
func moduleName(p string) string {
	n := filepath.Base(p)
	if i := strings.Index(n, ".ko"); i >= 0 {
		n = n[:i]
	}
	return strings.ReplaceAll(n, "-", "_")
}

// readModule returns the uncompressed module. gzip is handled in Go; xz and
// zstd need the xz and zstd tools.
func readModule(path string) ([]byte, error) {
	var data []byte
	var err error
	switch {
	case strings.HasSuffix(path, ".ko"):
		data, err = os.ReadFile(path)
	case strings.HasSuffix(path, ".ko.gz"):
		var f *os.File
		if f, err = os.Open(path); err == nil {
			defer func() { _ = f.Close() }()
			var zr *gzip.Reader
			if zr, err = gzip.NewReader(f); err == nil {
				data, err = io.ReadAll(zr)
			}
		}
	case strings.HasSuffix(path, ".ko.xz"):
		data, err = exec.Command("xz", "-dc", path).Output()
	case strings.HasSuffix(path, ".ko.zst"):
		data, err = exec.Command("zstd", "-dc", path).Output()
	default:
		err = errors.New("unknown module compression")
	}
	if err != nil {
		return nil, fmt.Errorf("reading module %s: %w", path, err)
	}
	return data, nil
}

// moduleDeps returns the "depends=" entry of the module's .modinfo.
func moduleDeps(ko []byte) ([]string, error) {
	f, err := elf.NewFile(bytes.NewReader(ko))
	if err != nil {
		return nil, fmt.Errorf("parsing ELF: %w", err)
	}
	sec := f.Section(".modinfo")
	if sec == nil {
		return nil, errors.New("no .modinfo section")
	}
	info, err := sec.Data()
	if err != nil {
		return nil, fmt.Errorf("reading .modinfo: %w", err)
	}
	for _, kv := range bytes.Split(info, []byte{0}) {
		if v, ok := bytes.CutPrefix(kv, []byte("depends=")); ok {
			var deps []string
			for _, d := range strings.Split(string(v), ",") {
				if d != "" {
					deps = append(deps, moduleName(d))
				}
			}
			return deps, nil
		}
	}
	return nil, nil
}

// buildUdhcpc6 compiles internal/udhcpc6 as a static binary.
func buildUdhcpc6() ([]byte, error) {
	gotool, err := goTool()
	if err != nil {
		return nil, err
	}
	_, self, _, ok := runtime.Caller(0)
	if !ok || !filepath.IsAbs(self) {
		return nil, errors.New("cannot locate the test/guest sources to build udhcpc6 (built with -trimpath?)")
	}
	tmp, err := os.MkdirTemp("", "vmnic-udhcpc6-")
	if err != nil {
		return nil, fmt.Errorf("building udhcpc6: %w", err)
	}
	defer func() { _ = os.RemoveAll(tmp) }()
	out := filepath.Join(tmp, "udhcpc6")
	cmd := exec.Command(gotool, "build", "-trimpath", "-ldflags=-s -w", "-o", out, "./internal/udhcpc6")
	cmd.Dir = filepath.Dir(self)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
	msg, err := cmd.CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("building udhcpc6: %w\n%s", err, msg)
	}
	data, err := os.ReadFile(out)
	if err != nil {
		return nil, fmt.Errorf("building udhcpc6: %w", err)
	}
	return data, nil
}

func goTool() (string, error) {
	if p, err := exec.LookPath("go"); err == nil {
		return p, nil
	}
	// go test puts $GOROOT/bin first in PATH, so this is reached only by a
	// test binary run by hand; fall back to $GOROOT/bin/go if GOROOT is set.
	// (runtime.GOROOT, the toolchain the binary was built with, is
	// deprecated: it need not exist where the binary runs.)
	if root := os.Getenv("GOROOT"); root != "" {
		p := filepath.Join(root, "bin", "go")
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	return "", fmt.Errorf("%w: the go tool (needed to build the guest's udhcpc6) is not in PATH or $GOROOT/bin", ErrUnavailable)
}

func writeFileAtomic(path string, data []byte) error {
	f, err := os.CreateTemp(filepath.Dir(path), ".tmp-"+filepath.Base(path))
	if err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	_, err = f.Write(data)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Chmod(f.Name(), 0o644)
	}
	if err == nil {
		err = os.Rename(f.Name(), path)
	}
	if err != nil {
		_ = os.Remove(f.Name())
		return fmt.Errorf("writing %s: %w", path, err)
	}
	return nil
}

var initTemplate = template.Must(template.New("init").Parse(`#!/bin/sh
# /init of the vmnic test guest, generated by github.com/vmnic/vmnic/test/guest.
export PATH=/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
hostname vmnic-guest
echo "VMNIC-GUEST: boot kernel=$(uname -r) uptime=$(cut -d' ' -f1 /proc/uptime)"
echo 1 > /proc/sys/net/ipv6/conf/default/accept_ra
{{- range .Modules}}
insmod /lib/modules/{{.}}.ko || echo "VMNIC-GUEST: insmod {{.}} failed"
{{- end}}
ip link set lo up
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
if [ -e /sys/class/net/eth0 ]; then
	echo 0 > /proc/sys/net/ipv6/conf/eth0/forwarding
	echo 1 > /proc/sys/net/ipv6/conf/eth0/accept_ra
	ip link set eth0 up
	i=0
	while [ "$(cat /sys/class/net/eth0/operstate)" != up ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
	echo "VMNIC-GUEST: eth0 up mac=$(cat /sys/class/net/eth0/address) queues=$(ls -d /sys/class/net/eth0/queues/rx-* | wc -l)"
else
	echo "VMNIC-GUEST: no eth0"
fi
echo "VMNIC-GUEST: script start uptime=$(cut -d' ' -f1 /proc/uptime)"
rc=0
if [ -f /script.sh ]; then
	/bin/sh /script.sh </dev/null
	rc=$?
fi
echo "VMNIC-GUEST: script exit=$rc"
sync
poweroff -f
`))

const dhcp4Script = `#!/bin/sh
# udhcpc lease script of the vmnic test guest.
ev=$1
j() { echo $* | tr ' ' ','; }
resolv() {
	{
		if [ -n "$search" ]; then echo "search $search"; elif [ -n "$domain" ]; then echo "search $domain"; fi
		for d in $dns; do echo "nameserver $d"; done
	} > /run/resolv.conf.dhcp4
	cat /run/resolv.conf.dhcp4 /run/resolv.conf.dhcp6 > /etc/resolv.conf 2>/dev/null
}
case "$1" in
deconfig)
	ip -4 addr flush dev "$interface"
	ip -4 route flush dev "$interface"
	ip link set dev "$interface" up
	echo "DHCP4 deconfig interface=$interface"
	;;
bound|renew)
	[ "$ev" = bound ] && ip -4 addr flush dev "$interface"
	[ -n "$mtu" ] && ip link set dev "$interface" mtu "$mtu"
	ip addr replace "$ip/$mask" ${broadcast:+broadcast $broadcast} dev "$interface"
	if [ -n "$staticroutes" ]; then
		set -- $staticroutes
		while [ $# -ge 2 ]; do
			if [ "$2" = 0.0.0.0 ]; then
				ip route replace "$1" dev "$interface" || echo "DHCP4 route $1 dev $interface failed"
			else
				ip route replace "$1" via "$2" dev "$interface" onlink || echo "DHCP4 route $1 via $2 failed"
			fi
			shift 2
		done
	elif [ -n "$router" ]; then
		for r in $router; do
			ip route replace default via "$r" dev "$interface" onlink || echo "DHCP4 route default via $r failed"
			break
		done
	fi
	[ -n "$hostname" ] && hostname "$hostname"
	resolv
	echo "DHCP4 $ev interface=$interface ip=$ip mask=$mask router=$(j $router) mtu=$mtu dns=$(j $dns) domain=$domain search=$(j $search) staticroutes=$(j $staticroutes) hostname=$hostname lease=$lease"
	;;
*)
	echo "DHCP4 $1 interface=$interface message=$message"
	;;
esac
exit 0
`

const dhcp6Script = `#!/bin/sh
# udhcpc6 lease script of the vmnic test guest.
j() { echo $* | tr ' ' ','; }
case "$1" in
deconfig)
	ip link set dev "$interface" up
	echo "DHCP6 deconfig interface=$interface"
	;;
bound|renew)
	[ -n "$ipv6" ] && ip -6 addr replace "$ipv6/128" dev "$interface"
	{
		[ -n "$search" ] && echo "search $search"
		for d in $dns; do echo "nameserver $d"; done
	} > /run/resolv.conf.dhcp6
	cat /run/resolv.conf.dhcp4 /run/resolv.conf.dhcp6 > /etc/resolv.conf 2>/dev/null
	echo "DHCP6 $1 interface=$interface ipv6=$ipv6 ipv6prefix=$ipv6prefix lease=$lease dns=$(j $dns) search=$(j $search)"
	;;
*)
	echo "DHCP6 $1 interface=$interface"
	;;
esac
exit 0
`
