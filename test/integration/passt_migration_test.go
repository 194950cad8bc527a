package integration

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/vmnic/vmnic/test/cluster"
	"github.com/vmnic/vmnic/test/guest"
	"github.com/vmnic/vmnic/test/harness"
	"github.com/vmnic/vmnic/test/need"
	"github.com/vmnic/vmnic/test/proc"
	"github.com/vmnic/vmnic/test/spiderpool"
)

// passtNode is a simulated node for passt: its netns with the underlay
// uplink, vmnicd with facts from the API server, and a dual-stack
// Spiderpool agent.
func passtNode(t *testing.T, c *cluster.Cluster, name, pluginDir string) (*harness.Node, *libcni.NetworkConfigList) {
	t.Helper()
	agent := spiderpool.StartAgentT(t, c, spiderpool.AgentOptions{NodeName: name, PodName: "spiderpool-agent-" + name, EnableIPv6: true})
	node, _ := newNode(t, false)
	startClusterVmnicd(t, node, c, name)
	node.CNI = libcni.NewCNIConfigWithCacheDir([]string{node.BinDir, pluginDir}, filepath.Join(node.Dir, "cni-cache"), nil)
	return node, passtList(t, node, "1.0.0", agent.IPAMConfigDual([]string{"under-v4"}, []string{"under-v6"}), nil)
}

// passtUnderlay joins the nodes' uplink0 (the macvlan masters) with a veth
// and puts the underlay's host, 10.50.0.1 and fd00:50::1 (the pods'
// gateways), on a macvlan of node a's uplink in a netns of its own.
func passtUnderlay(t *testing.T, a, b *harness.Node) ns.NetNS {
	t.Helper()
	peer, err := testutils.NewNS()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { harness.RemoveNetns(peer) })
	err = a.NS.Do(func(ns.NetNS) error {
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "uplink0"}, PeerName: "uplink0", PeerNamespace: netlink.NsFd(int(b.NS.Fd()))}); err != nil {
			return err
		}
		up, err := netlink.LinkByName("uplink0")
		if err != nil {
			return err
		}
		if err := netlink.LinkSetUp(up); err != nil {
			return err
		}
		return netlink.LinkAdd(&netlink.Macvlan{LinkAttrs: netlink.LinkAttrs{Name: "under0", ParentIndex: up.Attrs().Index, Namespace: netlink.NsFd(int(peer.Fd()))}, Mode: netlink.MACVLAN_MODE_BRIDGE})
	})
	if err != nil {
		t.Fatalf("underlay: %v", err)
	}
	if err := b.NS.Do(func(ns.NetNS) error {
		up, err := netlink.LinkByName("uplink0")
		if err != nil {
			return err
		}
		return netlink.LinkSetUp(up)
	}); err != nil {
		t.Fatal(err)
	}
	if err := peer.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName("under0")
		if err != nil {
			return err
		}
		if err := addrsNoDAD(l, "10.50.0.1/24", "fd00:50::1/64"); err != nil {
			return err
		}
		return netlink.LinkSetUp(l)
	}); err != nil {
		t.Fatal(err)
	}
	return peer
}

// addrsNoDAD gives l the addresses, IPv6 ones without duplicate address
// detection (usable at once).
func addrsNoDAD(l netlink.Link, cidrs ...string) error {
	for _, cidr := range cidrs {
		addr, err := netlink.ParseAddr(cidr)
		if err != nil {
			return err
		}
		addr.Flags = unix.IFA_F_NODAD
		if err := netlink.AddrAdd(l, addr); err != nil {
			return err
		}
	}
	return nil
}

// startPasst runs passt in the pod's netns, serving sock, forwarding TCP
// port 8080 to the guest over IPv4 and IPv6.
func startPasst(t *testing.T, p *harness.Pod, sock string) {
	t.Helper()
	startPasstPorts(t, p, sock, "8080")
}

// startPasstPorts is startPasst forwarding the TCP ports of ports, passt's
// -t spec ("8080", "22,80"); one passt per pod interface binds its own.
func startPasstPorts(t *testing.T, p *harness.Pod, sock, ports string) {
	t.Helper()
	cmd := exec.Command("nsenter", "--net="+p.NS.Path(), "passt", "-f", "-e", "-s", sock, "-i", p.IfName, "-t", ports)
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatalf("passt: %v", err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		if t.Failed() {
			t.Logf("passt in %s:\n%s", p.Name, out.String())
		}
	})
	for i := 0; i < 100; i++ {
		if _, err := os.Stat(sock); err == nil {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("passt did not create %s:\n%s", sock, out.String())
}

// tcpProbe opens a new TCP connection to addr from the peer every 50 ms
// and reads the guest's answer; it keeps the times of the answered ones.
type tcpProbe struct {
	started time.Time
	mu      sync.Mutex
	ok      []time.Time
	sent    int
	stop    chan struct{}
	done    chan struct{}
}

func startTCPProbe(peer ns.NetNS, addr string) *tcpProbe {
	p := &tcpProbe{stop: make(chan struct{}), done: make(chan struct{}), started: time.Now()}
	var wg sync.WaitGroup
	one := func() {
		defer wg.Done()
		var answered bool
		_ = peer.Do(func(ns.NetNS) error {
			c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
			if err != nil {
				return err
			}
			defer func() { _ = c.Close() }()
			_ = c.SetDeadline(time.Now().Add(300 * time.Millisecond))
			if _, err := c.Write([]byte("GET / HTTP/1.0\r\n\r\n")); err != nil {
				return err
			}
			line, err := bufio.NewReader(c).ReadString('\n')
			answered = err == nil && strings.HasPrefix(line, "HTTP/1.")
			return nil
		})
		p.mu.Lock()
		p.sent++
		if answered {
			p.ok = append(p.ok, time.Now())
		}
		p.mu.Unlock()
	}
	go func() {
		defer close(p.done)
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-p.stop:
				wg.Wait()
				return
			case <-tick.C:
			}
			// Each probe on its own: one that times out does not delay
			// the next.
			wg.Add(1)
			go one()
		}
	}()
	return p
}

// answered is how many probes the guest answered so far.
func (p *tcpProbe) answered() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.ok)
}

func (p *tcpProbe) end() (answered, sent int, gap time.Duration) {
	stopped := time.Now()
	close(p.stop)
	<-p.done
	p.mu.Lock()
	defer p.mu.Unlock()
	gap, _ = longestGap(p.ok, p.started, stopped)
	return len(p.ok), p.sent, gap
}

// TestPasstLiveMigration live-migrates a real QEMU guest behind passt from
// a pod on one node to a pod on another (macvlan on a shared underlay as
// the pods' primary network, eth0, under KubeVirt's core passt binding;
// a dual-stack address from Spiderpool) while the underlay's host connects
// to a port passt forwards to the guest every 50 ms over IPv4 and over
// IPv6: the target is held until the switchover, its IPv6 address passes
// DAD though the source holds it too (the source does not hear the probe),
// then the underlay resolves the IP to the target and new connections
// reach the guest there on both families; the source's DEL leaves the IPs
// with the VM. It logs each family's probe gap next to QEMU's own
// downtime.
//
// The guest runs on passt's socket (QEMU -netdev stream), which the
// Debian passt here serves; KubeVirt's passt binding gives QEMU a
// vhost-user passt instead, on the same pod interface.
func TestPasstLiveMigration(t *testing.T) { testPasstLiveMigration(t, false) }

// TestPasstMigrationUnderLoad is TestPasstLiveMigration with busy loops on
// every core from the migration's start to the end: a busy node (a drain
// migrates many VMs at once) must not change what the migration keeps,
// IPv4 and IPv6 alike; the guest answers through the target after the
// source's DEL. (test/virt's MigrationUnderLoad moves each mode's VM ten
// times under the real KubeVirt, IPv4 only.)
func TestPasstMigrationUnderLoad(t *testing.T) { testPasstLiveMigration(t, true) }

func testPasstLiveMigration(t *testing.T, loaded bool) {
	need.NoError(t, guest.Check())
	need.Binary(t, "passt")
	img, err := guest.Build(t.TempDir())
	if err != nil {
		t.Fatalf("guest image: %v", err)
	}
	bed, pluginDir := newClusterBed(t, 5*time.Minute)
	ctx, c, kube := bed.ctx, bed.c, bed.kube
	a, la := passtNode(t, c, "node-a", pluginDir)
	b, lb := passtNode(t, c, "node-b", pluginDir)
	applyPool(ctx, t, c, "under-v4", "10.50.0.0/24", "10.50.0.20-10.50.0.40", "10.50.0.1")
	applyPool(ctx, t, c, "under-v6", "fd00:50::/64", "fd00:50::20-fd00:50::40", "fd00:50::1")
	peer := passtUnderlay(t, a, b)
	add := func(n *harness.Node, l *libcni.NetworkConfigList, p *harness.Pod) (string, string) {
		t.Helper()
		r := addRetry(ctx, t, n, l, p)
		return ip4(r), ip6Of(r)
	}

	vmi := createPasstVMI(ctx, t, c, "vm-pm")
	src := launcherOn(ctx, t, kube, vmi, "virt-launcher-vm-pm-src", "node-a", nil)
	ip, ip6 := add(a, la, src)
	if ip == "" || ip6 == "" {
		t.Fatalf("source got %q and %q, want an IPv4 and an IPv6 address", ip, ip6)
	}
	dir, err := os.MkdirTemp("", "pmig")
	if err != nil {
		t.Fatal(err)
	}
	// passt drops to nobody before it binds its socket.
	if err := os.Chmod(dir, 0o1777); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	startPasst(t, src, filepath.Join(dir, "src.passt"))
	var logf func(string)
	if testing.Verbose() {
		logf = func(s string) { t.Log("guest: " + s) }
	}
	// What KubeVirt's passt binding gives the domain: a vhost-user passt on
	// the pod interface eth0 (here passt's socket, which the Debian passt
	// serves), and no MAC without macAddress (libvirt picks one; QEMU's
	// default here): passt learns whatever the guest uses. The pod
	// interface's name is what virt-handler reports in the VMI's status.
	pq := vmi.DeepCopy()
	pq.Status.Interfaces = []kubevirtv1.VirtualMachineInstanceNetworkInterface{{Name: "default", PodInterfaceName: "eth0"}}
	di := kubevirtNICs(ctx, t, src, pq)
	if len(di) != 1 || di[0].Type != "vhostuser" || di[0].Source != "eth0" {
		t.Fatalf("KubeVirt's domain interfaces %+v: want one vhost-user passt on eth0", di)
	}
	guestMAC := di[0].MAC
	script := `udhcpc -i eth0 -q -f -n -t 15 -T 2 || echo DHCP4-FAILED
# passt (2023-03) forwards inbound connections to the last address it saw
# the guest send from, the unspecified one of a DAD probe included: the
# guest takes its one IPv6 address from passt's DHCPv6 without DAD (the
# address is the pod's) and no SLAAC address, and speaks first from it, as
# any guest soon does.
echo 0 > /proc/sys/net/ipv6/conf/eth0/autoconf
echo 0 > /proc/sys/net/ipv6/conf/eth0/accept_dad
udhcpc6 -i eth0 -q -n -t 10 -T 2 || echo DHCP6-FAILED
ping -c 1 -W 1 fd00:50::1 >/dev/null 2>&1 || true
i=0; while [ $i -lt 40 ] && ! ip -6 route show default | grep -q via; do sleep 0.25; i=$((i+1)); done
echo "ADDR4 $(ip -4 -o addr show dev eth0 | awk '{print $4}' | head -1)"
echo "ADDR6 $(ip -6 -o addr show dev eth0 scope global | awk '{print $4}' | head -1)"
echo "ROUTE6 $(ip -6 route show default | head -1)"
mkdir -p /tmp/www && echo guest > /tmp/www/index.html
busybox httpd -p 8080 -h /tmp/www
` + heartbeat + `echo SERVING
sleep 600
`
	gSrc, err := guest.Start(ctx, img, guest.Options{
		Stream: filepath.Join(dir, "src.passt"), MAC: guestMAC, Script: script,
		MonitorSocket: filepath.Join(dir, "src.qmp"), Timeout: 4 * time.Minute, Log: logf,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(gSrc.Kill)
	if m, err := gSrc.WaitFor(ctx, regexp.MustCompile(`^ADDR4 (.*)$`)); err != nil || !strings.HasPrefix(m[1], ip+"/") {
		t.Fatalf("guest address %v %v, want the pod's %s (passt hands it over)", m, err, ip)
	}
	if m, err := gSrc.WaitFor(ctx, regexp.MustCompile(`^ADDR6 (.*)$`)); err != nil || !strings.HasPrefix(m[1], ip6+"/") {
		t.Fatalf("guest IPv6 address %v %v, want the pod's %s (passt hands it over)", m, err, ip6)
	}
	if _, err := gSrc.WaitFor(ctx, regexp.MustCompile(`^SERVING$`)); err != nil {
		t.Fatal(err)
	}
	probe := startTCPProbe(peer, net.JoinHostPort(ip, "8080"))
	probe6 := startTCPProbe(peer, net.JoinHostPort(ip6, "8080"))
	time.Sleep(settle)
	srcMAC := podLinks(t, src)["eth0"].Attrs().HardwareAddr.String()

	// The VM's home never hears DAD probes for its address: KubeVirt
	// creates the target pod once the VMIM exists and the VMI shows the
	// migration only once that pod runs. Without the guard the target's
	// macvlan plugin fails its ADD (the source answers the probe for the
	// shared IPv6).
	waitDADGuard(t, src, true)
	if loaded {
		stop, err := proc.BusyLoops(runtime.NumCPU())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(stop)
	}
	m := bed.createVMIM(t, "mig-pm", vmi.Name)
	dst := launcherOn(ctx, t, kube, vmi, "virt-launcher-vm-pm-dst", "node-b", m)
	if got, got6 := add(b, lb, dst); got != ip || got6 != ip6 {
		t.Fatalf("target got %s and %s, want the VM's %s and %s", got, got6, ip, ip6)
	}
	if st := ipv6State(t, dst, ip6); st != "valid" {
		t.Fatalf("the target's %s is %s, want valid", ip6, st)
	}
	dstMAC := podLinks(t, dst)["eth0"].Attrs().HardwareAddr.String()
	// KubeVirt hands the migration off once the target pod runs; the
	// source's vmnicd then reasserts the address the target's macvlan
	// announced (it answered each claim at once already).
	bed.step(t, m, vmi, src, dst, "TargetReady")
	time.Sleep(300 * time.Millisecond)
	startPasst(t, dst, filepath.Join(dir, "dst.passt"))
	gDst, err := guest.Start(ctx, img, guest.Options{
		Stream: filepath.Join(dir, "dst.passt"), MAC: guestMAC, Script: script,
		MonitorSocket: filepath.Join(dir, "dst.qmp"), Incoming: "unix:" + filepath.Join(dir, "mig.sock"), Timeout: 4 * time.Minute, Log: logf,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(gDst.Kill)
	if _, err := gDst.QMP(ctx, "query-status", nil); err != nil {
		t.Fatal(err)
	}
	// The target's macvlan announced both addresses when it came up; the
	// source answered each claim at once.
	for _, a := range []string{ip, ip6} {
		if got := neighMAC(t, peer, a); got != srcMAC {
			t.Fatalf("before the migration the underlay resolves %s to %q, want the source's %s (target %s)", a, got, srcMAC, dstMAC)
		}
	}
	bed.step(t, m, vmi, src, dst, "Running")
	downtime := migrateGuest(ctx, t, gSrc, filepath.Join(dir, "mig.sock"), func() {
		if got := neighMAC(t, peer, ip); got == dstMAC {
			t.Fatal("the underlay learned the held target's MAC during the migration")
		}
		if got := neighMAC(t, peer, ip6); got == dstMAC {
			t.Fatal("the underlay learned the held target's MAC for the IPv6 address during the migration")
		}
	})
	completed := time.Now()
	bed.finish(t, m, vmi, src, dst, false)
	took := awaitNeigh(t, peer, ip, dstMAC, completed)
	t.Logf("the underlay's neighbour entry moved to the target %s after QEMU reported the migration completed", took.Round(time.Millisecond))
	for time.Since(completed) < 5*time.Second && neighMAC(t, peer, ip6) != dstMAC {
		time.Sleep(5 * time.Millisecond)
	}
	if got := neighMAC(t, peer, ip6); got != dstMAC {
		t.Errorf("after the switchover the underlay resolves %s to %q, want the target's %s", ip6, got, dstMAC)
	} else {
		t.Logf("IPv6: the underlay's neighbour entry moved to the target %s after QEMU reported the migration completed", time.Since(completed).Round(time.Millisecond))
	}
	time.Sleep(3 * time.Second)

	gSrc.Kill()
	if err := kube.CoreV1().Pods("default").Delete(ctx, src.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := a.Del(ctx, la, src); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second)
	answered, sent, gap := probe.end()
	answered6, sent6, gap6 := probe6.end()
	t.Logf("TCP probe every 50 ms to a port passt forwards: %d sent, %d answered, %d lost; longest gap %s; QEMU downtime %d ms",
		sent, answered, sent-answered, gap.Round(time.Millisecond), downtime)
	t.Logf("IPv6: TCP probe every 50 ms to a port passt forwards: %d sent, %d answered, %d lost; longest gap %s; QEMU downtime %d ms",
		sent6, answered6, sent6-answered6, gap6.Round(time.Millisecond), downtime)
	assertGuestAlive(t, gDst)
	if answered == 0 || sent < 40 || answered6 == 0 || sent6 < 40 {
		t.Fatalf("probes did not run: IPv4 %d sent, %d answered; IPv6 %d sent, %d answered", sent, answered, sent6, answered6)
	}
	if gap > 5*time.Second {
		t.Errorf("the guest was unreachable over IPv4 for %s", gap)
	}
	if gap6 > 5*time.Second {
		t.Errorf("the guest was unreachable over IPv6 for %s", gap6)
	}
	pool, err := c.Dynamic.Resource(schema.GroupVersionResource{Group: "spiderpool.spidernet.io", Version: "v2beta1", Resource: "spiderippools"}).
		Get(ctx, "under-v4", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if raw, _, _ := unstructured.NestedString(pool.Object, "status", "allocatedIPs"); !strings.Contains(raw, fmt.Sprintf("%q", ip)) {
		t.Errorf("after the source's DEL the pool lost %s: %s", ip, raw)
	}
	// The guest answers through the target after the source's DEL: the
	// first answer within 10 s (an emulated guest on a busy machine may
	// miss the probe's 300 ms deadline a few times; an underlay sending
	// to the deleted source's MAC would keep it away for 15 s and more).
	for _, a := range []string{ip, ip6} {
		last := startTCPProbe(peer, net.JoinHostPort(a, "8080"))
		start := time.Now()
		for time.Since(start) < 10*time.Second && last.answered() == 0 {
			time.Sleep(50 * time.Millisecond)
		}
		took := time.Since(start)
		if n, sent, _ := last.end(); n == 0 {
			t.Errorf("after the source's DEL the guest no longer answers %s through the target (%d probes in %s)", a, sent, took.Round(time.Millisecond))
		} else {
			t.Logf("after the source's DEL the guest answers %s through the target: first answer within %s", a, took.Round(50*time.Millisecond))
		}
	}
	if err := b.Del(ctx, lb, dst); err != nil {
		t.Fatal(err)
	}
}

// ipv6State is "valid", "tentative", "dadfailed" or "missing" for ip on
// the pod's interface.
func ipv6State(t *testing.T, p *harness.Pod, ip string) string {
	t.Helper()
	state := "missing"
	_ = p.NS.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName(p.IfName)
		if err != nil {
			return err
		}
		addrs, err := netlink.AddrList(l, netlink.FAMILY_V6)
		if err != nil {
			return err
		}
		for _, a := range addrs {
			if a.IP.String() != ip {
				continue
			}
			switch {
			case a.Flags&unix.IFA_F_DADFAILED != 0:
				state = "dadfailed"
			case a.Flags&unix.IFA_F_TENTATIVE != 0:
				state = "tentative"
			default:
				state = "valid"
			}
		}
		return nil
	})
	return state
}
