package virt_test

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/vmnic/vmnic/pkg/kubevirt"
	"github.com/vmnic/vmnic/test/node"
	"github.com/vmnic/vmnic/test/virt"
)

// benchRuns is how many times each arm runs: the figures are medians.
const benchRuns = 5

// plainPasstNAD is the network only the benchmark's peer uses: KubeVirt's
// core passt binding on the macvlan underlay with nothing chained.
const plainPasstNAD = "macvlan-plain"

// BenchmarkRealKubeVirt measures vmnic under the real KubeVirt on the two
// node containers, against KubeVirt's own bindings in the same run:
//   - time from a VMI's creation to Running: vmnic's masquerade against
//     KubeVirt's masquerade with vmnic not installed; KubeVirt's passt
//     binding on the macvlan underlay with vmnic chained and without; a
//     NIC in vmnic's bridge mode (OVS, Spiderpool) with no peer, because
//     KubeVirt's own bridge binding makes a dummy link, which this
//     kernel does not have. Once vmnic is installed the arms take turns,
//     round by round;
//   - each mode's live migrations (2*3 per mode, there and back): the
//     probe's longest gap (bridge: a ping; masquerade and passt: the
//     guest's pulse, and for passt the HTTP probe beside it) and vmnicd's
//     measure of it;
//   - the CPU time and memory of each node's vmnicd through all of it.
//
// Run it once (-benchtime 1x): it reports medians of benchRuns.
func BenchmarkRealKubeVirt(b *testing.B) {
	for range b.N {
		benchRealKubeVirt(b)
	}
}

func benchRealKubeVirt(b *testing.B) {
	e := newEnv(b)
	times := map[string][]time.Duration{}
	vmiWith := func(name string, iface kubevirtv1.Interface) *kubevirtv1.VirtualMachineInstance {
		vmi := virt.VMI(name, e.guest, iface, "")
		zero := int64(0)
		vmi.Spec.TerminationGracePeriodSeconds = &zero
		virt.PreferNode(vmi, e.a.Name)
		return vmi
	}
	secondaryOnly := func(vmi *kubevirtv1.VirtualMachineInstance, nad string) *kubevirtv1.VirtualMachineInstance {
		vmi.Spec.Networks = []kubevirtv1.Network{{Name: "net", NetworkSource: kubevirtv1.NetworkSource{Multus: &kubevirtv1.MultusNetwork{NetworkName: nad}}}}
		vmi.Spec.Domain.Devices.Interfaces[0].Name = "net"
		return vmi
	}
	// passt with a port listed: without, it forwards every port and
	// needs more open files than this machine allows.
	passtIface := kubevirtv1.Interface{
		InterfaceBindingMethod: kubevirtv1.InterfaceBindingMethod{PasstBinding: &kubevirtv1.InterfacePasstBinding{}},
		Ports:                  []kubevirtv1.Port{{Port: 8080, Protocol: "TCP"}},
	}
	arms := []struct {
		name string
		vmi  func(name string) *kubevirtv1.VirtualMachineInstance
	}{
		{"masq-vmnic", func(n string) *kubevirtv1.VirtualMachineInstance {
			return vmiWith(n, kubevirtv1.Interface{Binding: &kubevirtv1.PluginBinding{Name: kubevirt.DefaultBinding}})
		}},
		{"bridge-vmnic", func(n string) *kubevirtv1.VirtualMachineInstance {
			return secondaryOnly(vmiWith(n, kubevirtv1.Interface{Binding: &kubevirtv1.PluginBinding{Name: kubevirt.DefaultBinding}}), secondaries[0].nad)
		}},
		{"passt-core", func(n string) *kubevirtv1.VirtualMachineInstance {
			vmi := vmiWith(n, passtIface)
			vmi.Annotations = map[string]string{defaultNetwork: "default/" + plainPasstNAD}
			return vmi
		}},
		{"passt-vmnic", func(n string) *kubevirtv1.VirtualMachineInstance {
			vmi := vmiWith(n, passtIface)
			vmi.Annotations = map[string]string{defaultNetwork: "default/" + passtNAD}
			return vmi
		}},
	}
	// KubeVirt's own masquerade before vmnic is on the node.
	for i := range benchRuns {
		vmi := vmiWith(fmt.Sprintf("masq-core-%d", i), kubevirtv1.Interface{InterfaceBindingMethod: kubevirtv1.InterfaceBindingMethod{Masquerade: &kubevirtv1.InterfaceMasquerade{}}})
		times["masq-core"] = append(times["masq-core"], e.timeToRunning(b, vmi))
	}
	e.secondary(b)
	e.network(b, plainPasstNAD, "172.16.20.0/24", "172.16.20.100-172.16.20.199", "172.16.20.1",
		map[string]any{"type": "macvlan", "master": passtUplink, "mode": "bridge"})
	e.installVmnic(b)
	before := e.vmnicdUsage(b)
	for i := range benchRuns {
		for _, arm := range arms {
			times[arm.name] = append(times[arm.name], e.timeToRunning(b, arm.vmi(fmt.Sprintf("%s-%d", arm.name, i))))
		}
	}
	// Each figure is logged as soon as it is known: a failure later on
	// keeps it.
	for _, name := range []string{"masq-core", "masq-vmnic", "bridge-vmnic", "passt-core", "passt-vmnic"} {
		b.Logf("time to Running, %s: median %v of %v", name, median(times[name]), times[name])
	}
	e.masquerade(b)
	e.bridge(b)
	e.passt(b)
	for _, m := range e.migrants {
		// The test checks that passt's TCP connection survives its two
		// moves; here the moves are only measured.
		m.echo = ""
	}
	gaps := map[string][]gapSample{}
	rounds := (benchRuns + 1) / 2
	for _, m := range e.migrants {
		gaps[m.mode] = e.migrate(b, m, rounds)
		for _, g := range gaps[m.mode] {
			b.Logf("%s migration gap: probe %v, vmnicd %v", m.mode, g.probe, g.vmnicd)
		}
	}
	after := e.vmnicdUsage(b)

	for _, name := range []string{"masq-core", "masq-vmnic", "bridge-vmnic", "passt-core", "passt-vmnic"} {
		b.ReportMetric(ms(median(times[name])), name+"-ms-median")
	}
	for _, mode := range []string{"Masquerade", "Bridge", "Passt"} {
		var probe, vmnicd, service []time.Duration
		for _, g := range gaps[mode] {
			probe, vmnicd, service = append(probe, g.probe), append(vmnicd, g.vmnicd), append(service, g.service)
		}
		if len(probe) == 0 {
			b.Errorf("no migration gap measured for %s", mode)
			continue
		}
		unit := "gap-" + strings.ToLower(mode)
		b.Logf("migration gap, %s: probe median %v of %v; vmnicd median %v of %v", mode, median(probe), probe, median(vmnicd), vmnicd)
		b.ReportMetric(ms(median(probe)), unit+"-probe-ms-median")
		b.ReportMetric(ms(median(vmnicd)), unit+"-vmnicd-ms-median")
		if mode == "Passt" {
			b.Logf("… its HTTP probe's longest time without an answer: median %v of %v", median(service), service)
			b.ReportMetric(ms(median(service)), unit+"-http-ms-median")
		}
	}
	var cpu time.Duration
	var hwm int64
	for pid, u := range after {
		cpu += u.cpu - before[pid].cpu
		hwm = max(hwm, u.hwmKiB)
		b.Logf("vmnicd pid %d: %v CPU during the measured runs, RSS %d KiB (peak %d KiB)", pid, u.cpu-before[pid].cpu, u.rssKiB, u.hwmKiB)
	}
	b.ReportMetric(cpu.Seconds()/float64(max(len(after), 1)), "vmnicd-cpu-s-per-node")
	b.ReportMetric(float64(hwm)/1024, "vmnicd-peak-rss-MiB")
}

// timeToRunning creates the VMI, returns the time until KubeVirt reports
// it Running, and deletes it (and waits until its pods are gone).
func (e *env) timeToRunning(tb testing.TB, vmi *kubevirtv1.VirtualMachineInstance) time.Duration {
	tb.Helper()
	ctx := tb.Context()
	start := time.Now()
	created, err := e.a.CreateVMI(ctx, vmi)
	if err != nil {
		tb.Fatal(err)
	}
	if _, err := virt.WaitVMIRunning(ctx, e.a, created.Namespace, created.Name, 5*time.Minute); err != nil {
		tb.Fatal(err)
	}
	took := time.Since(start)
	zero := int64(0)
	if err := e.a.Cluster.Dynamic.Resource(node.VMIResource).Namespace(created.Namespace).Delete(ctx, created.Name, metav1.DeleteOptions{GracePeriodSeconds: &zero}); err != nil {
		tb.Fatal(err)
	}
	deadline := time.Now().Add(3 * time.Minute)
	for {
		_, verr := virt.GetVMI(ctx, e.a, created.Namespace, created.Name)
		pods, perr := e.a.Kube.CoreV1().Pods(created.Namespace).List(ctx, metav1.ListOptions{LabelSelector: "kubevirt.io/created-by=" + string(created.UID)})
		if perr != nil {
			tb.Fatal(perr)
		}
		if apierrors.IsNotFound(verr) && len(pods.Items) == 0 {
			break
		}
		if time.Now().After(deadline) {
			tb.Fatalf("VMI %s: still there 3m after its deletion (%v, %d pods)", created.Name, verr, len(pods.Items))
		}
		time.Sleep(250 * time.Millisecond)
	}
	return took
}

// usage is a process's CPU time and memory.
type usage struct {
	cpu            time.Duration
	rssKiB, hwmKiB int64
}

// vmnicdUsage reads the CPU time and memory of each node's vmnicd (the
// processes named vmnicd in a node's network namespace), by PID.
func (e *env) vmnicdUsage(tb testing.TB) map[int]usage {
	tb.Helper()
	nets := map[uint64]bool{}
	for _, n := range []*node.Node{e.a, e.b} {
		var st syscall.Stat_t
		if err := syscall.Stat(n.NetNS, &st); err != nil {
			tb.Fatal(err)
		}
		nets[st.Ino] = true
	}
	out := map[int]usage{}
	dirs, _ := filepath.Glob("/proc/[0-9]*")
	for _, dir := range dirs {
		pid, _ := strconv.Atoi(filepath.Base(dir))
		comm, err := os.ReadFile(filepath.Join(dir, "comm"))
		if err != nil || strings.TrimSpace(string(comm)) != "vmnicd" {
			continue
		}
		var st syscall.Stat_t
		if syscall.Stat(filepath.Join(dir, "ns", "net"), &st) != nil || !nets[st.Ino] {
			continue
		}
		stat, err := os.ReadFile(filepath.Join(dir, "stat"))
		if err != nil {
			continue
		}
		// Fields after the command's closing parenthesis: utime and
		// stime are the 12th and 13th.
		f := strings.Fields(string(stat[strings.LastIndexByte(string(stat), ')')+1:]))
		utime, _ := strconv.ParseInt(f[11], 10, 64)
		stime, _ := strconv.ParseInt(f[12], 10, 64)
		u := usage{cpu: time.Duration(utime+stime) * time.Second / 100} // USER_HZ
		status, _ := os.ReadFile(filepath.Join(dir, "status"))
		for _, line := range strings.Split(string(status), "\n") {
			k, v, _ := strings.Cut(line, ":")
			kib, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			switch k {
			case "VmRSS":
				u.rssKiB = kib
			case "VmHWM":
				u.hwmKiB = kib
			}
		}
		out[pid] = u
	}
	if len(out) != 2 {
		tb.Errorf("found %d vmnicd processes in the nodes' namespaces, want 2", len(out))
	}
	return out
}

func median(d []time.Duration) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	return s[len(s)/2]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
