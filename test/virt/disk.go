package virt

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"k8s.io/apimachinery/pkg/runtime"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/vmnic/vmnic/test/cluster"
	"github.com/vmnic/vmnic/test/guest"
)

// ExampleGuestScript is what the guest of the examples' VMs runs (the
// examples' vm.yaml boot a containerDisk; BuildDiskImage puts this guest
// under their image's name). It takes an address by DHCP on each NIC,
// printed on the serial console as "ADDR4 <dev> <address>" with
// "QUEUES <dev> <n>" (its receive queues), and serves HTTP on port 80:
// "/" answers "guest 80"; "/cgi-bin/ping?IP" pings IP once and
// "/cgi-bin/get?IP:PORT" fetches http://IP:PORT/, each answering what the
// guest saw ("OK"/"FAILED", or the page's last line): a test that reaches
// the guest's port 80 asks it to reach out, so the guest needs no
// addresses on its kernel command line.
const ExampleGuestScript = `for dev in $(ls /sys/class/net | grep '^eth' | sort); do
	udhcpc -i $dev -q -n -t 20 -T 2 || echo "DHCP4-FAILED $dev"
	echo "ADDR4 $dev $(ip -4 -o addr show dev $dev | awk '{print $4}' | head -1)"
	echo "QUEUES $dev $(ls -d /sys/class/net/$dev/queues/rx-* | wc -l)"
done
mkdir -p /www/cgi-bin
echo "guest 80" > /www/index.html
cat > /www/cgi-bin/ping <<'CGI'
#!/bin/sh
printf 'Content-Type: text/plain\r\n\r\n'
case $QUERY_STRING in *[!0-9a-f.:]*|'') echo BAD; exit 0;; esac
if ping -c 1 -W 2 "$QUERY_STRING" >/dev/null 2>&1; then echo OK; else echo FAILED; fi
CGI
cat > /www/cgi-bin/get <<'CGI'
#!/bin/sh
printf 'Content-Type: text/plain\r\n\r\n'
case $QUERY_STRING in *[!0-9.:]*|'') echo BAD; exit 0;; esac
page=$(printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 2 "${QUERY_STRING%:*}" "${QUERY_STRING##*:}" 2>/dev/null | tail -n 1)
echo "${page:-FAILED}"
CGI
chmod +x /www/cgi-bin/ping /www/cgi-bin/get
busybox httpd -p 80 -h /www
echo SERVING
while true; do sleep 3600; done
`

// DiskImage is a containerDisk image (KubeVirt's format: the disk under
// /disk) whose raw disk boots test/guest's kernel and an initramfs with a
// script: a FAT file system with SYSLINUX (Debian's syslinux and mtools)
// loading the kernel, the initramfs and the kernel's command line
// (guest.KernelArgs) from it, as a cloud image's boot loader would.
type DiskImage struct {
	Ref, Archive string
}

// DiskPath is where the disk is in a DiskImage.
const DiskPath = "/disk/disk.img"

// BuildDiskImage builds a DiskImage named ref whose guest runs script,
// once per kernel, initramfs and name (cached under
// .tools/kubevirt/disk).
func BuildDiskImage(ctx context.Context, ref, script string) (*DiskImage, error) {
	for _, tool := range []string{"syslinux", "mformat", "mcopy"} {
		if _, err := exec.LookPath(tool); err != nil {
			return nil, fmt.Errorf("%s (Debian: syslinux, mtools; make deps installs them): %w", tool, err)
		}
	}
	root, img, ctxDir, err := stageGuest("vmnic-disk-image-", script)
	if err != nil {
		return nil, err
	}
	defer func() { _ = os.RemoveAll(ctxDir) }()
	initrd := filepath.Join(ctxDir, "initrd.img")
	cfg := "DEFAULT guest\nPROMPT 0\nTIMEOUT 0\nLABEL guest\n  KERNEL /vmlinuz\n  INITRD /initrd.img\n  APPEND " + guest.KernelArgs + "\n"
	h := sha256.New()
	for _, f := range []string{img.Kernel, initrd} {
		data, rerr := os.ReadFile(f)
		if rerr != nil {
			return nil, rerr
		}
		h.Write(data)
	}
	h.Write([]byte(cfg))
	h.Write([]byte(ref))
	base := filepath.Join(root, ".tools", "kubevirt", "disk")
	di := &DiskImage{Ref: ref, Archive: filepath.Join(base, "disk-"+hex.EncodeToString(h.Sum(nil))[:12]+".tar")}
	if _, serr := os.Stat(di.Archive); serr == nil {
		return di, nil
	}
	disk := filepath.Join(ctxDir, "disk.img")
	if err = os.WriteFile(filepath.Join(ctxDir, "syslinux.cfg"), []byte(cfg), 0o644); err != nil {
		return nil, err
	}
	if err = os.WriteFile(disk, nil, 0o644); err != nil {
		return nil, err
	}
	if err = os.Truncate(disk, 32<<20); err != nil {
		return nil, err
	}
	steps := [][]string{
		{"mformat", "-i", disk, "-v", "VMNIC", "::"},
		{"mcopy", "-i", disk, img.Kernel, "::/vmlinuz"},
		{"mcopy", "-i", disk, initrd, "::/initrd.img"},
		{"mcopy", "-i", disk, filepath.Join(ctxDir, "syslinux.cfg"), "::/syslinux.cfg"},
		{"syslinux", "--install", disk},
	}
	for _, s := range steps {
		if out, err := exec.CommandContext(ctx, s[0], s[1:]...).CombinedOutput(); err != nil {
			return nil, fmt.Errorf("%s: %w: %s", strings.Join(s, " "), err, out)
		}
	}
	if err := padDiskCRC32(disk); err != nil {
		return nil, err
	}
	colon := strings.LastIndex(ref, ":")
	name, tag := ref[:max(colon, 0)], ref[colon+1:]
	if colon < 0 || strings.Contains(tag, "/") {
		return nil, fmt.Errorf("disk image %q: want NAME:TAG", ref)
	}
	if err := buildImage(ctx, root, name, tag, ctxDir, "FROM scratch\nCOPY disk.img "+DiskPath+"\n", di.Archive); err != nil {
		return nil, fmt.Errorf("build the disk image %s: %w", ref, err)
	}
	return di, nil
}

// buildImage builds an image name:tag from the context directory and the
// Dockerfile's text with deploy/image/build.sh, into archive.
func buildImage(ctx context.Context, root, name, tag, ctxDir, dockerfile, archive string) error {
	df := filepath.Join(ctxDir, "Dockerfile")
	if err := os.WriteFile(df, []byte(dockerfile), 0o644); err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, "bash", filepath.Join(root, "deploy", "image", "build.sh"),
		"-n", name, "-t", tag, "-c", ctxDir, "-f", df, "-o", archive)
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%w: %s", err, out)
	}
	return nil
}

// padDiskCRC32 pads the disk at path with zeroed sectors (padCRC32).
func padDiskCRC32(path string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	return os.WriteFile(path, padCRC32(data, 512), 0o644)
}

// ExampleVM reads an example's vm.yaml: one VirtualMachine whose first
// volume is the containerDisk it boots.
func ExampleVM(path string) (*kubevirtv1.VirtualMachine, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	objs, err := cluster.Objects(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if len(objs) != 1 || objs[0].GetKind() != "VirtualMachine" {
		return nil, fmt.Errorf("%s: want one VirtualMachine, got %d objects", path, len(objs))
	}
	vm := &kubevirtv1.VirtualMachine{}
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(objs[0].Object, vm); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if vm.Spec.Template == nil || len(vm.Spec.Template.Spec.Volumes) == 0 || vm.Spec.Template.Spec.Volumes[0].ContainerDisk == nil {
		return nil, fmt.Errorf("%s: its first volume is not a containerDisk", path)
	}
	return vm, nil
}
