package virt_test

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"regexp"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/vmnic/vmnic/test/node"
	"github.com/vmnic/vmnic/test/proc"
	"github.com/vmnic/vmnic/test/virt"
)

// migrant is a running VM a Migration subtest moves, with what its probe
// needs.
type migrant struct {
	mode string
	vmi  *kubevirtv1.VirtualMachineInstance
	// dial opens the probe's connections (from a peer's network
	// namespace); targets are the host:port the probe asks, read again
	// while the VM migrates.
	dial    func(ctx context.Context, network, addr string) (net.Conn, error)
	targets func(ctx context.Context) []string
	// keepsPodIP: the launcher pod's IP is the VM's (passt).
	keepsPodIP bool
	// pingFrom, pingIP: the probe pings pingIP from the network namespace
	// pingFrom instead of asking for a page (a bridge NIC's guest answers
	// ICMP itself).
	pingFrom, pingIP string
	// echo is the guest's echo service (host:port): a TCP connection to it
	// must survive each migration.
	echo string
	// gapNetwork is the network whose gap vmnicd's Event must agree with
	// the probe ("" when the VM has one vmnic NIC).
	gapNetwork string
	// pulseFrom: the guest pings a peer every 50 ms (vmnic.pulse=), heard
	// in this network namespace; vmnicd's gap is compared with that
	// pulse's, and the probe's is logged beside it.
	pulseFrom string
	// quietMove: the probe of the guest's service does not run while the
	// VM moves, and one request after the move must be answered. A
	// masquerade target pod holds the connections to the guest's port
	// made while the guest is away (its neighbour entry for the guest
	// unresolved); as the guest resumes they reach it in a burst, which
	// its kernel answers at once and which delays its own pulse under
	// emulation by a few hundred milliseconds.
	quietMove bool
}

// gapTolerance is how far vmnicd's measure of a migration's network gap
// may be from the probe's.
const gapTolerance = 100 * time.Millisecond

// probeInterval is the probe's period.
const probeInterval = 50 * time.Millisecond

// migration moves each VM the mode subtests started from node-1 to node-2
// and back with a VirtualMachineInstanceMigration, KubeVirt doing the
// rest, while a probe asks the guest for a page every 50 ms. After each
// move the VM runs on the other node, its MACs (and the IPs vmnic's
// IPAM gave it) are kept, the guest answers there, and for passt a TCP
// connection opened before the first move still echoes.
func (e *env) migration(t *testing.T) {
	if len(e.migrants) == 0 {
		t.Fatal("no VM to migrate: every mode subtest failed")
	}
	for _, m := range e.migrants {
		t.Run(m.mode, func(t *testing.T) { e.migrate(t, m, 1) })
	}
}

// gapSample is one migration's longest gap as the probe vmnicd is judged
// by saw it, as vmnicd measured it, and as the probe of the guest's
// service saw it (the same probe but for a VM with a pulse).
type gapSample struct{ probe, vmnicd, service time.Duration }

// migrate moves the VM to node-2 and back, rounds times, checking each
// move, and returns each move's gaps.
func (e *env) migrate(t testing.TB, m *migrant, rounds int) []gapSample {
	var gaps []gapSample
	ctx := t.Context()
	var conn net.Conn
	var echo *bufio.Reader
	if m.echo != "" {
		var err error
		if conn, err = m.dial(ctx, "tcp", m.echo); err != nil {
			t.Fatalf("connect to the guest's echo service %s: %v", m.echo, err)
		}
		defer func() { _ = conn.Close() }()
		echo = bufio.NewReader(conn)
		if !checkEcho(t, conn, echo, "before") {
			t.FailNow()
		}
	}
	before, err := e.vmState(ctx, m.vmi)
	if err != nil {
		t.Fatal(err)
	}
	var moves []*node.Node
	for range rounds {
		moves = append(moves, e.b, e.a)
	}
	for _, to := range moves {
		var pulse *virt.PulseProbe
		if m.pulseFrom != "" {
			var err error
			if pulse, err = virt.StartPulseProbe(m.pulseFrom); err != nil {
				t.Fatal(err)
			}
		}
		stopProbe := func() virt.ProbeResult { return virt.ProbeResult{} }
		if !m.quietMove {
			stopProbe = m.startProbe(ctx, t)
		}
		start := time.Now()
		vmim, vmi, err := virt.Migrate(ctx, e.a, m.vmi.Namespace, m.vmi.Name, 5*time.Minute)
		took := time.Since(start)
		if err == nil {
			// The probe goes on until the guest has answered on the
			// target for a while.
			time.Sleep(3 * time.Second)
		}
		res := stopProbe()
		judge := res
		if pulse != nil {
			judge = pulse.Stop()
			t.Logf("pulse from the guest: %d echo requests, longest gap %v (from %s)", judge.Answered, judge.Gap.Round(time.Millisecond), judge.GapFrom.Format("15:04:05.000"))
			if judge.Answered < 2 {
				t.Errorf("the guest's pulse was not heard in %s (%d echo requests)", m.pulseFrom, judge.Answered)
			}
		}
		if err != nil {
			t.Fatal(err)
		}
		if vmi.Status.NodeName != to.Name {
			t.Fatalf("after migration %s the VM runs on %s, want %s", vmim.Name, vmi.Status.NodeName, to.Name)
		}
		if m.quietMove {
			t.Logf("%s to %s: Succeeded %v after the migration's creation", vmim.Name, to.Name, took.Round(time.Millisecond))
		} else {
			t.Logf("%s to %s: Succeeded %v after the migration's creation; probe: %d of %d rounds answered, longest gap %v (from %s)",
				vmim.Name, to.Name, took.Round(time.Millisecond), res.Answered, res.Sent, res.Gap.Round(time.Millisecond), res.GapFrom.Format("15:04:05.000"))
		}
		if gap, err := e.reportedGap(ctx, vmi, vmim.Name, m.gapNetwork); err != nil {
			t.Error(err)
		} else {
			t.Logf("%s: vmnicd measured a network gap of %v; the probe's longest gap was %v", vmim.Name, gap, judge.Gap.Round(time.Millisecond))
			gaps = append(gaps, gapSample{probe: judge.Gap, vmnicd: gap, service: res.Gap})
			if d := gap - judge.Gap; d > gapTolerance || d < -gapTolerance {
				t.Errorf("%s: vmnicd's network gap %v is %v from the probe's %v (more than %v)", vmim.Name, gap, d, judge.Gap, gapTolerance)
			}
		}
		switch {
		case m.quietMove:
			if err := answersAfter(ctx, m, vmi); err != nil {
				t.Errorf("after the migration to %s: %v", to.Name, err)
			}
		case !res.Last.After(start.Add(took)):
			t.Errorf("the guest did not answer the probe on %s after the migration (%d answers, the last at %s)", to.Name, res.Answered, res.Last.Format("15:04:05.000"))
		}
		after, err := e.vmState(ctx, vmi)
		if err != nil {
			t.Fatal(err)
		}
		if !m.keepsPodIP {
			after.podIP = before.podIP
		}
		if after.String() != before.String() {
			t.Errorf("after the migration to %s the VM has\n  %s\nbefore\n  %s", to.Name, after, before)
		}
		if conn != nil && !checkEcho(t, conn, echo, "after-"+to.Name) {
			conn = nil // broken: the other checks go on
		}
		m.vmi = vmi
		if err := e.waitSourceDone(ctx, vmi); err != nil {
			t.Fatal(err)
		}
	}
	return gaps
}

// answersAfter asks the guest's service (m.targets) for its page until it
// answers, for up to 30 s.
func answersAfter(ctx context.Context, m *migrant, vmi *kubevirtv1.VirtualMachineInstance) error {
	deadline := time.Now().Add(30 * time.Second)
	var last error
	for time.Now().Before(deadline) {
		for _, addr := range m.targets(ctx) {
			got, err := proc.HTTPGet(ctx, m.dial, addr)
			if err == nil && got == "guest 8080" {
				return nil
			}
			last = fmt.Errorf("%s answered %q, %v", addr, got, err)
		}
		time.Sleep(250 * time.Millisecond)
	}
	return fmt.Errorf("the guest of VMI %s does not answer on 8080 30s after the migration (last: %v)", vmi.Name, last)
}

// gapMessage is the measure in vmnicd's VMNICMigrationNetworkGap event.
var gapMessage = regexp.MustCompile(`^live migration (\S+), interface \S+ \(network "([^"]*)", mode \S+\): network gap (\S+), `)

// reportedGap waits for the target vmnicd's event on the VMI with the
// network gap of migration job on network ("" for any), and returns it.
func (e *env) reportedGap(ctx context.Context, vmi *kubevirtv1.VirtualMachineInstance, job, network string) (time.Duration, error) {
	deadline := time.Now().Add(time.Minute)
	var seen []string
	for {
		evs, err := e.a.Kube.CoreV1().Events(vmi.Namespace).List(ctx, metav1.ListOptions{
			FieldSelector: "involvedObject.name=" + vmi.Name + ",reason=VMNICMigrationNetworkGap",
		})
		if err != nil {
			return 0, err
		}
		seen = seen[:0]
		for _, ev := range evs.Items {
			if !strings.HasPrefix(ev.Message, "live migration "+job+",") {
				continue
			}
			seen = append(seen, ev.Message)
			m := gapMessage.FindStringSubmatch(ev.Message)
			if m == nil || network != "" && m[2] != network {
				continue
			}
			if ev.Type != corev1.EventTypeNormal || ev.InvolvedObject.UID != vmi.UID {
				return 0, fmt.Errorf("gap event %s: type %s on %s, want Normal on VMI %s", ev.Name, ev.Type, ev.InvolvedObject.UID, vmi.UID)
			}
			return time.ParseDuration(m[3])
		}
		if time.Now().After(deadline) {
			return 0, fmt.Errorf("no VMNICMigrationNetworkGap event with a gap for %s on VMI %s within 1m (events of it: %q)", job, vmi.Name, seen)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// waitSourceDone waits until every launcher pod of the VMI but the one it
// runs in has ended (Succeeded or Failed). Under load, a migration back to
// the source's node before that has failed here: the new target's
// kernel-boot container lost its socket and the target never got ready.
func (e *env) waitSourceDone(ctx context.Context, vmi *kubevirtv1.VirtualMachineInstance) error {
	if vmi.Status.MigrationState == nil {
		return fmt.Errorf("VMI %s has no migration state", vmi.Name)
	}
	current := vmi.Status.MigrationState.TargetPod
	deadline := time.Now().Add(2 * time.Minute)
	for {
		pods, err := e.a.Kube.CoreV1().Pods(vmi.Namespace).List(ctx, metav1.ListOptions{LabelSelector: "kubevirt.io/created-by=" + string(vmi.UID)})
		if err != nil {
			return err
		}
		var live []string
		for _, p := range pods.Items {
			if p.Name != current && p.Status.Phase != corev1.PodSucceeded && p.Status.Phase != corev1.PodFailed {
				live = append(live, p.Name+" "+string(p.Status.Phase))
			}
		}
		if len(live) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("VMI %s: the pods %v have not ended 2m after its migration", vmi.Name, live)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// startProbe starts the VM's probe and returns its stop.
func (m *migrant) startProbe(ctx context.Context, t testing.TB) func() virt.ProbeResult {
	if m.pingIP != "" {
		p, err := virt.StartPingProbe(m.pingFrom, m.pingIP, probeInterval)
		if err != nil {
			t.Fatal(err)
		}
		return p.Stop
	}
	probe := virt.StartProbe(m.dial, probeInterval, "guest 8080", m.targets(ctx)...)
	refresh, stop := context.WithCancel(ctx)
	go func() {
		for refresh.Err() == nil {
			if targets := m.targets(refresh); len(targets) > 0 {
				probe.SetTargets(targets...)
			}
			select {
			case <-refresh.Done():
			case <-time.After(200 * time.Millisecond):
			}
		}
	}()
	return func() virt.ProbeResult {
		stop()
		return probe.Stop()
	}
}

// checkEcho sends a line on the connection to the guest's echo service
// and expects it back.
func checkEcho(t testing.TB, conn net.Conn, r *bufio.Reader, line string) bool {
	t.Helper()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := fmt.Fprintln(conn, line); err != nil {
		t.Errorf("the TCP connection to the guest (%s) did not survive: send: %v", line, err)
		return false
	}
	got, err := r.ReadString('\n')
	if err != nil || strings.TrimSpace(got) != line {
		t.Errorf("the TCP connection to the guest (%s) did not survive: read %q, %v", line, got, err)
		return false
	}
	return true
}

// vmState is what a migration keeps of a VM: the MAC of each interface in
// the VMI's status, the pod IP, the IP and MAC of each secondary NIC in
// Multus' network-status.
type vmState struct {
	macs  []string
	podIP string
	nics  []string
}

func (s vmState) String() string {
	return fmt.Sprintf("MACs %v, pod IP %s, secondary NICs %v", s.macs, s.podIP, s.nics)
}

func (e *env) vmState(ctx context.Context, vmi *kubevirtv1.VirtualMachineInstance) (vmState, error) {
	var s vmState
	vmi, err := virt.GetVMI(ctx, e.a, vmi.Namespace, vmi.Name)
	if err != nil {
		return s, err
	}
	for _, i := range vmi.Status.Interfaces {
		s.macs = append(s.macs, i.Name+"="+strings.ToLower(i.MAC))
	}
	// The pod the VM runs in: after a migration its target (the source
	// may still be running).
	var pod *corev1.Pod
	if ms := vmi.Status.MigrationState; ms != nil && ms.Completed && ms.TargetPod != "" {
		pod, err = e.a.Kube.CoreV1().Pods(vmi.Namespace).Get(ctx, ms.TargetPod, metav1.GetOptions{})
	} else {
		pod, err = virt.LauncherPod(ctx, e.a, vmi)
	}
	if err != nil {
		return s, err
	}
	s.podIP = pod.Status.PodIP
	status, err := virt.NetworkStatus(pod)
	if err != nil {
		return s, err
	}
	for _, n := range status {
		// Multus lists every interface a CNI result names; the NICs are
		// the ones with addresses.
		if !n.Default && len(n.IPs) > 0 {
			s.nics = append(s.nics, fmt.Sprintf("%s=%v/%s", n.Name, n.IPs, strings.ToLower(n.MAC)))
		}
	}
	return s, nil
}

// launcherAddrs are host:port at the pod IP of each running launcher pod
// of the VMI (a migration's source and target).
func launcherAddrs(ctx context.Context, n *node.Node, vmi *kubevirtv1.VirtualMachineInstance, port string) []string {
	pods, err := n.Kube.CoreV1().Pods(vmi.Namespace).List(ctx, metav1.ListOptions{LabelSelector: "kubevirt.io/created-by=" + string(vmi.UID)})
	if err != nil {
		return nil
	}
	var addrs []string
	for _, p := range pods.Items {
		if p.Status.Phase == corev1.PodRunning && p.Status.PodIP != "" {
			addrs = append(addrs, net.JoinHostPort(p.Status.PodIP, port))
		}
	}
	return addrs
}
