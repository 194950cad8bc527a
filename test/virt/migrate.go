package virt

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os/exec"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/vmnic/vmnic/test/node"
)

// MigrationResource is KubeVirt's VirtualMachineInstanceMigration resource.
var MigrationResource = schema.GroupVersionResource{Group: "kubevirt.io", Version: "v1", Resource: "virtualmachineinstancemigrations"}

// PreferNode makes the scheduler prefer the node name for the VMI's pod
// without binding it there: a VMI pinned by nodeSelector cannot migrate
// (its target pod inherits the selector), and with two nodes a migration
// goes to the other node, and the next one back.
func PreferNode(vmi *kubevirtv1.VirtualMachineInstance, name string) {
	vmi.Spec.Affinity = &corev1.Affinity{NodeAffinity: &corev1.NodeAffinity{
		PreferredDuringSchedulingIgnoredDuringExecution: []corev1.PreferredSchedulingTerm{{
			Weight: 100,
			Preference: corev1.NodeSelectorTerm{MatchExpressions: []corev1.NodeSelectorRequirement{{
				Key: corev1.LabelHostname, Operator: corev1.NodeSelectorOpIn, Values: []string{name},
			}}},
		}},
	}}
}

// Migrate creates a VirtualMachineInstanceMigration of the VMI, as a user
// does, and waits until KubeVirt reports it Succeeded; it returns the
// migration and the VMI after it. A migration that fails returns an error
// with its phase and the VMI's migration state.
func Migrate(ctx context.Context, n *node.Node, namespace, vmiName string, timeout time.Duration) (*kubevirtv1.VirtualMachineInstanceMigration, *kubevirtv1.VirtualMachineInstance, error) {
	m := &kubevirtv1.VirtualMachineInstanceMigration{
		TypeMeta:   metav1.TypeMeta{APIVersion: "kubevirt.io/v1", Kind: "VirtualMachineInstanceMigration"},
		ObjectMeta: metav1.ObjectMeta{GenerateName: vmiName + "-", Namespace: namespace},
		Spec:       kubevirtv1.VirtualMachineInstanceMigrationSpec{VMIName: vmiName},
	}
	obj, err := runtime.DefaultUnstructuredConverter.ToUnstructured(m)
	if err != nil {
		return nil, nil, err
	}
	u, err := n.Cluster.Dynamic.Resource(MigrationResource).Namespace(namespace).Create(ctx, &unstructured.Unstructured{Object: obj}, metav1.CreateOptions{})
	if err != nil {
		return nil, nil, fmt.Errorf("create the migration of %s: %w", vmiName, err)
	}
	name := u.GetName()
	var vmim *kubevirtv1.VirtualMachineInstanceMigration
	err = wait(ctx, timeout, "migration "+name+" Succeeded", func() (bool, string) {
		u, gerr := n.Cluster.Dynamic.Resource(MigrationResource).Namespace(namespace).Get(ctx, name, metav1.GetOptions{})
		if gerr != nil {
			return false, gerr.Error()
		}
		v := &kubevirtv1.VirtualMachineInstanceMigration{}
		if cerr := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, v); cerr != nil {
			return false, cerr.Error()
		}
		vmim = v
		if v.Status.Phase == kubevirtv1.MigrationFailed {
			return true, "" // reported below
		}
		return v.Status.Phase == kubevirtv1.MigrationSucceeded, "phase " + string(v.Status.Phase)
	}, func() string {
		vmi, gerr := GetVMI(ctx, n, namespace, vmiName)
		if gerr != nil {
			return gerr.Error()
		}
		return fmt.Sprintf("VMI migration state %+v\n", vmi.Status.MigrationState) + launcherReport(ctx, n, namespace, vmiName)
	})
	if err == nil && vmim.Status.Phase == kubevirtv1.MigrationFailed {
		vmi, _ := GetVMI(ctx, n, namespace, vmiName)
		var state any
		if vmi != nil {
			state = vmi.Status.MigrationState
		}
		err = fmt.Errorf("migration %s failed: conditions %+v, VMI migration state %+v\n%s", name, vmim.Status.Conditions, state, launcherReport(ctx, n, namespace, vmiName))
	}
	if err != nil {
		return vmim, nil, err
	}
	vmi, err := GetVMI(ctx, n, namespace, vmiName)
	return vmim, vmi, err
}

// Probe asks a VM for a page every interval, from a network namespace,
// and records when the answers came: the longest time without an answer
// during a migration is the migration's gap in traffic as a client sees
// it. Each request runs on its own (a slow or lost one does not delay the
// next), with a timeout of one second. Receive times, not send times: a
// request sent while the VM was away can still be answered once it is
// back (a SYN retransmitted, a connection passt migrated), and counting
// it at its send time would shorten the gap.
type Probe struct {
	interval time.Duration
	client   *http.Client
	want     string
	cancel   context.CancelFunc
	done     sync.WaitGroup

	mu       sync.Mutex
	targets  []string
	answers  []time.Time // when the answers (the body want) came
	answered map[int]bool
	sent     int
}

// StartProbe starts a probe of http://<target>/ for each of targets
// (host:port), expecting the body want; dial opens its connections.
func StartProbe(dial func(ctx context.Context, network, addr string) (net.Conn, error), interval time.Duration, want string, targets ...string) *Probe {
	ctx, cancel := context.WithCancel(context.Background())
	p := &Probe{
		interval: interval, want: want, cancel: cancel, targets: targets, answered: map[int]bool{},
		client: &http.Client{Timeout: time.Second, Transport: &http.Transport{DialContext: dial, DisableKeepAlives: true}},
	}
	p.done.Add(1)
	go p.run(ctx)
	return p
}

// SetTargets replaces the probed addresses (a masquerade VM's pod IP
// changes when it migrates: probe the source's and the target's).
func (p *Probe) SetTargets(targets ...string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.targets = targets
}

func (p *Probe) run(ctx context.Context) {
	defer p.done.Done()
	t := time.NewTicker(p.interval)
	defer t.Stop()
	var reqs sync.WaitGroup
	defer reqs.Wait()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		p.mu.Lock()
		targets := slices.Clone(p.targets)
		p.sent++
		round := p.sent
		p.mu.Unlock()
		for _, target := range targets {
			reqs.Add(1)
			go func() {
				defer reqs.Done()
				if p.get(ctx, target) {
					p.mu.Lock()
					p.answers = append(p.answers, time.Now())
					p.answered[round] = true
					p.mu.Unlock()
				}
			}()
		}
	}
}

func (p *Probe) get(ctx context.Context, target string) bool {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+target+"/", nil)
	if err != nil {
		return false
	}
	resp, err := p.client.Do(req)
	if err != nil {
		return false
	}
	defer func() { _ = resp.Body.Close() }()
	body, err := io.ReadAll(resp.Body)
	return err == nil && strings.TrimSpace(string(body)) == p.want
}

// ProbeResult is what a probe saw.
type ProbeResult struct {
	// Sent is the number of rounds sent; Answered the rounds answered.
	Sent, Answered int
	// Gap is the longest time between two answers; GapFrom is the time
	// of the answer before it.
	Gap     time.Duration
	GapFrom time.Time
	// Last is the time of the last answer.
	Last time.Time
}

// Stop ends the probe (requests in flight finish first) and returns what
// it saw.
func (p *Probe) Stop() ProbeResult {
	p.cancel()
	p.done.Wait()
	p.mu.Lock()
	defer p.mu.Unlock()
	answers := slices.Clone(p.answers)
	slices.SortFunc(answers, func(a, b time.Time) int { return a.Compare(b) })
	// A round sent to several targets (a masquerade VM's source and
	// target pods) counts once.
	r := ProbeResult{Sent: p.sent, Answered: len(p.answered)}
	if len(answers) > 0 {
		r.Last = answers[len(answers)-1]
	}
	for i := 1; i < len(answers); i++ {
		if g := answers[i].Sub(answers[i-1]); g > r.Gap {
			r.Gap, r.GapFrom = g, answers[i-1]
		}
	}
	return r
}

// PingProbe pings a VM every interval from a network namespace (iputils
// ping, as root, with receive timestamps), for a NIC where the guest
// itself answers ICMP: a bridge NIC, whose pod holds no address. Stop
// returns what Probe's does, from the replies' receive times.
type PingProbe struct {
	cmd *exec.Cmd
	out bytes.Buffer
}

// StartPingProbe starts ping in the network namespace at netns.
func StartPingProbe(netns, ip string, interval time.Duration) (*PingProbe, error) {
	p := &PingProbe{}
	p.cmd = exec.Command("nsenter", "--net="+netns, "--", "ping", "-D", "-n", "-W", "1",
		"-i", strconv.FormatFloat(interval.Seconds(), 'f', 3, 64), ip)
	p.cmd.Stdout = &p.out
	if err := p.cmd.Start(); err != nil {
		return nil, fmt.Errorf("ping %s: %w", ip, err)
	}
	return p, nil
}

// pingReply is a reply line of ping -D: "[<unix time>] 64 bytes from ...".
var pingReply = regexp.MustCompile(`^\[(\d+\.\d+)\] \d+ bytes from .*icmp_seq=(\d+)`)

// Stop ends ping and returns the probe's result: Sent is the last
// sequence number, the times are the replies' receive times.
func (p *PingProbe) Stop() ProbeResult {
	_ = p.cmd.Process.Signal(syscall.SIGINT)
	_ = p.cmd.Wait()
	var r ProbeResult
	var prev time.Time
	for _, line := range strings.Split(p.out.String(), "\n") {
		m := pingReply.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		secs, _ := strconv.ParseFloat(m[1], 64)
		at := time.Unix(0, int64(secs*1e9))
		seq, _ := strconv.Atoi(m[2])
		r.Answered++
		r.Sent = max(r.Sent, seq)
		if !prev.IsZero() && at.Sub(prev) > r.Gap {
			r.Gap, r.GapFrom = at.Sub(prev), prev
		}
		prev, r.Last = at, at
	}
	return r
}

// PulseProbe hears a VM's pulse: the guest pings a peer every 50 ms
// (GuestScript's vmnic.pulse=), and the probe, on a raw ICMP socket in
// the peer's network namespace, records when each echo request came. The
// longest time without one is the gap in the VM's own traffic, which a
// probe of a service in the guest can overstate (a masquerade guest that
// resumes first answers the connections queued while it moved).
type PulseProbe struct {
	fd   int
	stop atomic.Bool
	done chan struct{}

	mu   sync.Mutex
	seen []time.Time
}

// StartPulseProbe starts hearing echo requests in the network namespace
// at netns.
func StartPulseProbe(netns string) (*PulseProbe, error) {
	p := &PulseProbe{fd: -1, done: make(chan struct{})}
	err := ns.WithNetNSPath(netns, func(ns.NetNS) error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_ICMP)
		p.fd = fd
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("raw ICMP socket in %s: %w", netns, err)
	}
	tv := unix.Timeval{Usec: 100000}
	_ = unix.SetsockoptTimeval(p.fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	go p.run()
	return p, nil
}

func (p *PulseProbe) run() {
	defer close(p.done)
	buf := make([]byte, 1500)
	for !p.stop.Load() {
		n, _, err := unix.Recvfrom(p.fd, buf, 0)
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return
		}
		// An IPv4 header, then ICMP: type 8 is an echo request.
		if n < 20 {
			continue
		}
		ihl := int(buf[0]&0x0f) * 4
		if n > ihl && buf[ihl] == 8 {
			p.mu.Lock()
			p.seen = append(p.seen, time.Now())
			p.mu.Unlock()
		}
	}
}

// Stop ends the probe and returns what it heard: Answered (and Sent) is
// the number of echo requests, the times are their arrivals.
func (p *PulseProbe) Stop() ProbeResult {
	p.stop.Store(true)
	<-p.done
	_ = unix.Close(p.fd)
	p.mu.Lock()
	defer p.mu.Unlock()
	r := ProbeResult{Sent: len(p.seen), Answered: len(p.seen)}
	for i, at := range p.seen {
		if i > 0 && at.Sub(p.seen[i-1]) > r.Gap {
			r.Gap, r.GapFrom = at.Sub(p.seen[i-1]), p.seen[i-1]
		}
		r.Last = at
	}
	return r
}
