package integration

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"github.com/vishvananda/netlink"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"

	"github.com/vmnic/vmnic/test/cluster"
	"github.com/vmnic/vmnic/test/guest"
	"github.com/vmnic/vmnic/test/harness"
	"github.com/vmnic/vmnic/test/need"
	"github.com/vmnic/vmnic/test/spiderpool"
)

// passtNode is a simulated node for passt: its netns with the underlay
// uplink, vmnicd with facts from the API server, and a Spiderpool agent.
func passtNode(t *testing.T, c *cluster.Cluster, name, pluginDir string, dctx context.Context) (*harness.Node, *libcni.NetworkConfigList) {
	t.Helper()
	agent := spiderpool.StartAgentT(t, c, spiderpool.AgentOptions{NodeName: name, PodName: "spiderpool-agent-" + name})
	node, _ := newNode(t, false)
	d, err := node.StartDaemonWith(logger(t), clusterFacts(t, c, name, dctx))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = d.Stop() })
	node.CNI = libcni.NewCNIConfigWithCacheDir([]string{node.BinDir, pluginDir}, filepath.Join(node.Dir, "cni-cache"), nil)
	return node, passtList(t, node, "1.0.0", agent.IPAMConfig("under-v4"), nil)
}

// passtUnderlay joins the nodes' uplink0 (the macvlan masters) with a veth
// and puts the underlay's host, 10.50.0.1 (the pods' gateway), on a macvlan
// of node a's uplink in a netns of its own.
func passtUnderlay(t *testing.T, a, b *harness.Node) ns.NetNS {
	t.Helper()
	peer, err := testutils.NewNS()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = peer.Close(); _ = testutils.UnmountNS(peer) })
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
		addr, _ := netlink.ParseAddr("10.50.0.1/24")
		if err := netlink.AddrAdd(l, addr); err != nil {
			return err
		}
		return netlink.LinkSetUp(l)
	}); err != nil {
		t.Fatal(err)
	}
	return peer
}

// startPasst runs passt in the pod's netns, serving sock, forwarding TCP
// port 8080 to the guest.
func startPasst(t *testing.T, p *harness.Pod, sock string) {
	t.Helper()
	cmd := exec.Command("nsenter", "--net="+p.NS.Path(), "passt", "-f", "-e", "-s", sock, "-i", p.IfName, "-t", "8080", "-4")
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
	mu   sync.Mutex
	ok   []time.Time
	sent int
	stop chan struct{}
	done chan struct{}
}

func startTCPProbe(peer ns.NetNS, addr string) *tcpProbe {
	p := &tcpProbe{stop: make(chan struct{}), done: make(chan struct{})}
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

func (p *tcpProbe) end() (answered, sent int, gap time.Duration) {
	stopped := time.Now()
	close(p.stop)
	<-p.done
	p.mu.Lock()
	defer p.mu.Unlock()
	gap, _ = longestGap(p.ok, stopped)
	return len(p.ok), p.sent, gap
}

// TestPasstLiveMigration live-migrates a real QEMU guest behind passt from
// a pod on one node to a pod on another (macvlan on a shared underlay, the
// IP from Spiderpool) while the underlay's host connects to a port passt
// forwards to the guest every 50 ms: the target is held until the
// switchover, then the underlay resolves the IP to the target and new
// connections reach the guest there; the source's DEL leaves the IP with
// the VM. It logs the probe gap next to QEMU's own downtime.
func TestPasstLiveMigration(t *testing.T) {
	need.NoError(t, guest.Check())
	need.Binary(t, "passt")
	img, err := guest.Build(t.TempDir())
	if err != nil {
		t.Fatalf("guest image: %v", err)
	}
	bed, pluginDir := newClusterBed(t, 5*time.Minute)
	ctx, c, kube := bed.ctx, bed.c, bed.kube
	dctx, dcancel := context.WithCancel(context.Background())
	t.Cleanup(dcancel)
	a, la := passtNode(t, c, "node-a", pluginDir, dctx)
	b, lb := passtNode(t, c, "node-b", pluginDir, dctx)
	applyPool(ctx, t, c, "under-v4", "10.50.0.0/24", "10.50.0.20-10.50.0.40", "10.50.0.1")
	peer := passtUnderlay(t, a, b)
	add := func(n *harness.Node, l *libcni.NetworkConfigList, p *harness.Pod) string {
		t.Helper()
		return ip4(addRetry(ctx, t, n, l, p))
	}

	vmi := createBridgeVMI(ctx, t, c, "vm-pm")
	src := launcherOn(ctx, t, kube, vmi, "virt-launcher-vm-pm-src", "node-a", nil)
	ip := add(a, la, src)
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
	const guestMAC = "02:00:00:50:00:01"
	script := `udhcpc -i eth0 -q -f -n -t 15 -T 2 || echo DHCP4-FAILED
echo "ADDR4 $(ip -4 -o addr show dev eth0 | awk '{print $4}' | head -1)"
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
	if _, err := gSrc.WaitFor(ctx, regexp.MustCompile(`^SERVING$`)); err != nil {
		t.Fatal(err)
	}
	probe := startTCPProbe(peer, net.JoinHostPort(ip, "8080"))
	time.Sleep(settle)
	srcMAC := podLinks(t, src)["net1"].Attrs().HardwareAddr.String()

	m := bed.createVMIM(t, "mig-pm", vmi.Name)
	dst := launcherOn(ctx, t, kube, vmi, "virt-launcher-vm-pm-dst", "node-b", m)
	if got := add(b, lb, dst); got != ip {
		t.Fatalf("target got %s, want the VM's %s", got, ip)
	}
	dstMAC := podLinks(t, dst)["net1"].Attrs().HardwareAddr.String()
	// KubeVirt moves the VMIM on once the target pod runs; the source's
	// vmnicd then reasserts the address the target's macvlan announced.
	bed.setStatus(t, "virtualmachineinstancemigrations", m.Name, map[string]any{"phase": "TargetReady"})
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
	if got := neighMAC(t, peer, ip); got != srcMAC {
		t.Fatalf("before the migration the underlay resolves %s to %q, want the source's %s (target %s)", ip, got, srcMAC, dstMAC)
	}
	bed.setStatus(t, "virtualmachineinstancemigrations", m.Name, map[string]any{"phase": "Running"})
	downtime := migrateGuest(ctx, t, gSrc, filepath.Join(dir, "mig.sock"), func() {
		if got := neighMAC(t, peer, ip); got == dstMAC {
			t.Fatal("the underlay learned the held target's MAC during the migration")
		}
	})
	completed := time.Now()
	bed.finish(t, m, vmi, src, dst, false)
	for time.Since(completed) < 5*time.Second && neighMAC(t, peer, ip) != dstMAC {
		time.Sleep(5 * time.Millisecond)
	}
	if got := neighMAC(t, peer, ip); got != dstMAC {
		t.Fatalf("after the switchover the underlay resolves %s to %q, want the target's %s", ip, got, dstMAC)
	}
	t.Logf("the underlay's neighbour entry moved to the target %s after QEMU reported the migration completed", time.Since(completed).Round(time.Millisecond))
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
	t.Logf("TCP probe every 50 ms to a port passt forwards: %d sent, %d answered, %d lost; longest gap %s; QEMU downtime %d ms",
		sent, answered, sent-answered, gap.Round(time.Millisecond), downtime)
	assertGuestAlive(t, gDst)
	if answered == 0 || sent < 40 {
		t.Fatalf("probe did not run: %d sent, %d answered", sent, answered)
	}
	if gap > 5*time.Second {
		t.Errorf("the guest was unreachable for %s", gap)
	}
	pool, err := c.Dynamic.Resource(schema.GroupVersionResource{Group: "spiderpool.spidernet.io", Version: "v2beta1", Resource: "spiderippools"}).
		Get(ctx, "under-v4", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if raw, _, _ := unstructured.NestedString(pool.Object, "status", "allocatedIPs"); !strings.Contains(raw, fmt.Sprintf("%q", ip)) {
		t.Errorf("after the source's DEL the pool lost %s: %s", ip, raw)
	}
	last := startTCPProbe(peer, net.JoinHostPort(ip, "8080"))
	time.Sleep(500 * time.Millisecond)
	if n, _, _ := last.end(); n == 0 {
		t.Error("after the source's DEL the guest no longer answers through the target")
	}
	if err := b.Del(ctx, lb, dst); err != nil {
		t.Fatal(err)
	}
}
