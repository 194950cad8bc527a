package virt

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"hash/crc32"
	"io"
	"math"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/vmnic/vmnic/test/cluster"
	"github.com/vmnic/vmnic/test/guest"
	"github.com/vmnic/vmnic/test/node"
)

// GuestScript is what the guests of the KubeVirt tests run (test/guest's
// initramfs runs it once its NICs are up): DHCP on each NIC in turn, each
// printed as "ADDR4 <dev> <address>" and "MAC <dev> <mac>"; HTTP on ports
// 8080 and 8081, each answering "guest <port>"; an echo service on TCP
// port 9000 (a connection held open shows that it survives a migration);
// then a ping to each address of vmnic.peers= (comma-separated) on the
// kernel command line, printed as "PEER-OK <ip>" or "PEER-FAILED <ip>";
// and, with vmnic.pulse=<ip>, a ping to that address every 50 ms for as
// long as the guest runs (PulseProbe hears it).
// Everything it prints goes to the serial console, which KubeVirt logs
// (logSerialConsole).
const GuestScript = `peers=$(sed -n 's/.*vmnic\.peers=\([^ ]*\).*/\1/p' /proc/cmdline | tr , ' ')
for dev in $(ls /sys/class/net | grep '^eth' | sort); do
	udhcpc -i $dev -q -n -t 20 -T 2 || echo "DHCP4-FAILED $dev"
	echo "ADDR4 $dev $(ip -4 -o addr show dev $dev | awk '{print $4}' | head -1)"
	echo "MAC $dev $(cat /sys/class/net/$dev/address)"
done
echo "ROUTE4 $(ip -4 route show default | head -1)"
for p in 8080 8081; do
	mkdir -p /tmp/www$p && echo "guest $p" > /tmp/www$p/index.html
	busybox httpd -p $p -h /tmp/www$p
done
busybox nc -ll -p 9000 -e cat &
echo SERVING
pulse=$(sed -n 's/.*vmnic\.pulse=\([^ ]*\).*/\1/p' /proc/cmdline)
[ -n "$pulse" ] && ping -q -i 0.05 "$pulse" >/dev/null 2>&1 &
for peer in $peers; do
	i=0
	until ping -c 1 -W 2 "$peer" >/dev/null 2>&1; do
		i=$((i+1)); [ $i -ge 30 ] && break
	done
	if [ $i -lt 30 ]; then echo "PEER-OK $peer"; else echo "PEER-FAILED $peer"; fi
done
while true; do sleep 3600; done
`

// GuestImage is the kernelBoot image of the guests: test/guest's kernel
// at /boot/vmlinuz and its initramfs with GuestScript at /boot/initrd.img.
type GuestImage struct {
	Ref, Archive string
}

// Kernel and initrd paths in the guest image.
const (
	GuestKernelPath = "/boot/vmlinuz"
	GuestInitrdPath = "/boot/initrd.img"
)

// BuildGuestImage builds the guest image (once per kernel, initramfs and
// script: its tag is their hash) under .tools/kubevirt/guest.
func BuildGuestImage(ctx context.Context) (*GuestImage, error) {
	root, img, ctxDir, err := stageGuest("vmnic-guest-image-", GuestScript)
	if err != nil {
		return nil, err
	}
	defer func() { _ = os.RemoveAll(ctxDir) }()
	kernel, err := os.ReadFile(img.Kernel)
	if err != nil {
		return nil, err
	}
	initrd, err := os.ReadFile(filepath.Join(ctxDir, "initrd.img"))
	if err != nil {
		return nil, err
	}
	kernel, initrd = padCRC32(kernel, 1), padCRC32(initrd, 1)
	if err := os.WriteFile(filepath.Join(ctxDir, "vmlinuz"), kernel, 0o644); err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(ctxDir, "initrd.img"), initrd, 0o644); err != nil {
		return nil, err
	}
	h := sha256.New()
	h.Write(kernel)
	h.Write(initrd)
	tag := hex.EncodeToString(h.Sum(nil))[:12]
	gi := &GuestImage{Ref: "vmnic.test/guest:" + tag, Archive: filepath.Join(root, ".tools", "kubevirt", "guest", "guest-"+tag+".tar")}
	if _, err := os.Stat(gi.Archive); err == nil {
		return gi, nil
	}
	df := "FROM scratch\nCOPY vmlinuz " + GuestKernelPath + "\nCOPY initrd.img " + GuestInitrdPath + "\n"
	if err := buildImage(ctx, root, "vmnic.test/guest", tag, ctxDir, df, gi.Archive); err != nil {
		return nil, fmt.Errorf("build the guest image: %w", err)
	}
	return gi, nil
}

// padCRC32 appends zeroed units of unit bytes to data until its CRC-32
// fits in an int32. virt-handler records the CRC-32 (a uint32) of a
// kernelBoot image's kernel and initrd, and of a containerDisk's disk, in
// the VMI's status, and KubeVirt v1.8.2's CRD declares those fields int32,
// which Kubernetes 1.36 enforces: a checksum of 2^31 or more makes every
// status update of the VMI fail (kubevirt/kubevirt#17858, fixed after
// v1.8.2 by #17469). Zeros after the initramfs's archives are skipped by
// the kernel, after the kernel image by its loader, and whole sectors after
// a disk's file system by everything.
func padCRC32(data []byte, unit int) []byte {
	zeros := make([]byte, unit)
	for crc := crc32.ChecksumIEEE(data); crc > math.MaxInt32; crc = crc32.Update(crc, crc32.IEEETable, zeros) {
		data = append(data, zeros...)
	}
	return data
}

// stageGuest builds test/guest's image (cached under .tools/kubevirt/guest)
// and writes an initramfs that runs script as initrd.img into a new
// temporary directory, which the caller removes.
func stageGuest(prefix, script string) (root string, img *guest.Image, dir string, err error) {
	if root, err = cluster.RepoRoot(); err != nil {
		return "", nil, "", err
	}
	if img, err = guest.Build(filepath.Join(root, ".tools", "kubevirt", "guest")); err != nil {
		return "", nil, "", err
	}
	if dir, err = os.MkdirTemp("", prefix); err != nil {
		return "", nil, "", err
	}
	if err = img.Initramfs(filepath.Join(dir, "initrd.img"), script); err != nil {
		_ = os.RemoveAll(dir)
		return "", nil, "", err
	}
	return root, img, dir, nil
}

// VMI is a disk-less VMI that boots the guest image (kernelBoot), with its
// serial console logged, 256 MiB and one pod-network interface with the
// given binding; kernelArgs are added to the guest's command line.
func VMI(name string, img *GuestImage, iface kubevirtv1.Interface, kernelArgs string) *kubevirtv1.VirtualMachineInstance {
	vmi := &kubevirtv1.VirtualMachineInstance{
		TypeMeta:   metav1.TypeMeta{APIVersion: "kubevirt.io/v1", Kind: "VirtualMachineInstance"},
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default"},
	}
	iface.Name = "default"
	vmi.Spec.Networks = []kubevirtv1.Network{{Name: "default", NetworkSource: kubevirtv1.NetworkSource{Pod: &kubevirtv1.PodNetwork{}}}}
	vmi.Spec.Domain.Devices.Interfaces = []kubevirtv1.Interface{iface}
	yes := true
	vmi.Spec.Domain.Devices.LogSerialConsole = &yes
	vmi.Spec.Domain.Resources.Requests = corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("256Mi")}
	vmi.Spec.Domain.Firmware = &kubevirtv1.Firmware{KernelBoot: &kubevirtv1.KernelBoot{
		KernelArgs: strings.TrimSpace(guest.KernelArgs + " " + kernelArgs),
		Container: &kubevirtv1.KernelBootContainer{
			Image:           img.Ref,
			KernelPath:      GuestKernelPath,
			InitrdPath:      GuestInitrdPath,
			ImagePullPolicy: corev1.PullIfNotPresent,
		},
	}}
	return vmi
}

// GetVMI reads a VMI.
func GetVMI(ctx context.Context, n *node.Node, namespace, name string) (*kubevirtv1.VirtualMachineInstance, error) {
	u, err := n.Cluster.Dynamic.Resource(node.VMIResource).Namespace(namespace).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return nil, err
	}
	vmi := &kubevirtv1.VirtualMachineInstance{}
	return vmi, runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, vmi)
}

// WaitVMIRunning waits until KubeVirt reports the VMI Running and returns
// it; on a timeout the error has the VMI's conditions and KubeVirt's pods.
func WaitVMIRunning(ctx context.Context, n *node.Node, namespace, name string, timeout time.Duration) (*kubevirtv1.VirtualMachineInstance, error) {
	var vmi *kubevirtv1.VirtualMachineInstance
	err := wait(ctx, timeout, "VMI "+name+" Running", func() (bool, string) {
		v, err := GetVMI(ctx, n, namespace, name)
		if err != nil {
			return false, err.Error()
		}
		vmi = v
		if v.Status.Phase == kubevirtv1.Failed || v.Status.Phase == kubevirtv1.Succeeded {
			return false, fmt.Sprintf("phase %s: %+v", v.Status.Phase, v.Status.Conditions)
		}
		return v.Status.Phase == kubevirtv1.Running, fmt.Sprintf("phase %s, conditions %+v", v.Status.Phase, v.Status.Conditions)
	}, func() string { return launcherReport(ctx, n, namespace, name) + PodsReport(ctx, n) })
	return vmi, err
}

// LauncherPod returns the VMI's running virt-launcher pod.
func LauncherPod(ctx context.Context, n *node.Node, vmi *kubevirtv1.VirtualMachineInstance) (*corev1.Pod, error) {
	pods, err := n.Kube.CoreV1().Pods(vmi.Namespace).List(ctx, metav1.ListOptions{LabelSelector: "kubevirt.io/created-by=" + string(vmi.UID)})
	if err != nil {
		return nil, err
	}
	for i := range pods.Items {
		if pods.Items[i].Status.Phase == corev1.PodRunning {
			return &pods.Items[i], nil
		}
	}
	return nil, fmt.Errorf("VMI %s: no running virt-launcher pod among %d", vmi.Name, len(pods.Items))
}

// launcherReport is the state and the last log lines of each container of
// the VMI's launcher pods, and the pods' events.
func launcherReport(ctx context.Context, n *node.Node, namespace, name string) string {
	vmi, err := GetVMI(ctx, n, namespace, name)
	if err != nil {
		return err.Error() + "\n"
	}
	pods, err := n.Kube.CoreV1().Pods(namespace).List(ctx, metav1.ListOptions{LabelSelector: "kubevirt.io/created-by=" + string(vmi.UID)})
	if err != nil {
		return err.Error() + "\n"
	}
	var b strings.Builder
	for _, p := range pods.Items {
		fmt.Fprintf(&b, "launcher pod %s on %q: %s %s\n", p.Name, p.Spec.NodeName, p.Status.Phase, p.Status.Message)
		for _, c := range append(p.Spec.InitContainers, p.Spec.Containers...) {
			tail := int64(15)
			data, err := n.Kube.CoreV1().Pods(namespace).GetLogs(p.Name, &corev1.PodLogOptions{Container: c.Name, TailLines: &tail}).DoRaw(ctx)
			if err != nil {
				data = []byte(err.Error())
			}
			fmt.Fprintf(&b, "  --- %s:\n%s\n", c.Name, data)
		}
		evs, err := n.Kube.CoreV1().Events(namespace).List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=" + p.Name})
		if err == nil {
			for _, e := range evs.Items {
				fmt.Fprintf(&b, "  event %s %s: %s\n", e.Type, e.Reason, e.Message)
			}
		}
	}
	return b.String()
}

// Console is the VMI's serial console log so far (the launcher pod's
// guest-console-log container), its lines trimmed.
func Console(ctx context.Context, n *node.Node, vmi *kubevirtv1.VirtualMachineInstance) (string, error) {
	pod, err := LauncherPod(ctx, n, vmi)
	if err != nil {
		return "", err
	}
	rc, err := n.Kube.CoreV1().Pods(pod.Namespace).GetLogs(pod.Name, &corev1.PodLogOptions{Container: "guest-console-log"}).Stream(ctx)
	if err != nil {
		return "", err
	}
	defer func() { _ = rc.Close() }()
	var b strings.Builder
	sc := bufio.NewScanner(io.LimitReader(rc, 16<<20))
	for sc.Scan() {
		b.WriteString(strings.TrimSpace(sc.Text()))
		b.WriteByte('\n')
	}
	return b.String(), sc.Err()
}

// WaitConsole follows the VMI's serial console log until a line matches
// re, and returns its submatches.
func WaitConsole(ctx context.Context, n *node.Node, vmi *kubevirtv1.VirtualMachineInstance, re *regexp.Regexp, timeout time.Duration) ([]string, error) {
	var match []string
	err := wait(ctx, timeout, "guest console line "+re.String(), func() (bool, string) {
		console, err := Console(ctx, n, vmi)
		if err != nil {
			return false, err.Error()
		}
		lines := strings.Split(strings.TrimSuffix(console, "\n"), "\n")
		for _, line := range lines {
			if m := re.FindStringSubmatch(line); m != nil {
				match = m
				return true, ""
			}
		}
		if len(lines) > 10 {
			lines = lines[len(lines)-10:]
		}
		return false, "console so far ends with:\n" + strings.Join(lines, "\n")
	}, func() string { return launcherReport(ctx, n, vmi.Namespace, vmi.Name) })
	return match, err
}

// NetworkStatusEntry is one network of Multus' network-status annotation.
type NetworkStatusEntry struct {
	Name      string   `json:"name"`
	Interface string   `json:"interface"`
	IPs       []string `json:"ips"`
	MAC       string   `json:"mac"`
	Default   bool     `json:"default"`
}

// NetworkStatus is the pod's network-status annotation, as Multus wrote it.
func NetworkStatus(pod *corev1.Pod) ([]NetworkStatusEntry, error) {
	raw := pod.Annotations["k8s.v1.cni.cncf.io/network-status"]
	var s []NetworkStatusEntry
	if err := json.Unmarshal([]byte(raw), &s); err != nil {
		return nil, fmt.Errorf("pod %s: network-status %q: %w", pod.Name, raw, err)
	}
	return s, nil
}
