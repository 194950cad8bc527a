package integration

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/vmnic/vmnic/test/cluster"
	"github.com/vmnic/vmnic/test/guest"
	"github.com/vmnic/vmnic/test/harness"
	"github.com/vmnic/vmnic/test/need"
	"github.com/vmnic/vmnic/test/spiderpool"
)

// clusterOVSNode is a simulated node of a cluster: its own netns, OVS
// switch, vmnicd (facts from the API server for its node name) and
// Spiderpool agent.
func clusterOVSNode(t *testing.T, c *cluster.Cluster, name, pluginDir string) (*ovsNode, *libcni.NetworkConfigList) {
	t.Helper()
	agent := spiderpool.StartAgentT(t, c, spiderpool.AgentOptions{NodeName: name, PodName: "spiderpool-agent-" + name})
	n := newOVSNodeCluster(t, c, name)
	n.cniVersion = "1.0.0"
	n.CNI = libcni.NewCNIConfigWithCacheDir([]string{n.BinDir, pluginDir}, filepath.Join(n.Dir, "cni-cache"), nil)
	return n, n.bridgeList(t, "vlan100", map[string]any{"vlan": 100}, agent.IPAMConfig("vlan100-v4"))
}

// linkNodes joins the two nodes' br1 with a veth pair, a trunk carrying
// every VLAN: the shared L2 underlay.
func linkNodes(t *testing.T, a, b *ovsNode) {
	t.Helper()
	err := a.NS.Do(func(ns.NetNS) error {
		return netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "uplink-a"}, PeerName: "uplink-b", PeerNamespace: netlink.NsFd(int(b.NS.Fd()))})
	})
	if err != nil {
		t.Fatalf("underlay link: %v", err)
	}
	for _, c := range []struct {
		n    *ovsNode
		name string
	}{{a, "uplink-a"}, {b, "uplink-b"}} {
		if err := c.n.NS.Do(func(ns.NetNS) error {
			l, err := netlink.LinkByName(c.name)
			if err != nil {
				return err
			}
			return netlink.LinkSetUp(l)
		}); err != nil {
			t.Fatal(err)
		}
		c.n.vsctl(t, "add-port", "br1", c.name)
	}
}

// launcherOn creates a launcher pod object of vmi on node; migration is the
// VMIM it is the target of, or nil.
func launcherOn(ctx context.Context, t *testing.T, kube kubernetes.Interface, vmi *kubevirtv1.VirtualMachineInstance, name, node string, migration *kubevirtv1.VirtualMachineInstanceMigration) *harness.Pod {
	t.Helper()
	yes := true
	// The Multus annotations of the VMI's networks: a default network
	// replaces the pod network on eth0; a secondary one is net1.
	// virt-controller copies the VMI's annotations (the VM template's:
	// Spiderpool's ipam.spidernet.io/ippools, Multus' default network) to
	// the pod, but kubectl's and the API version marks (KubeVirt v1.8.2
	// pkg/virt-controller/services/template.go filterVMIAnnotationsForPod).
	ann := map[string]string{}
	for k, v := range vmi.Annotations {
		if !strings.HasPrefix(k, "kubectl.kubernetes.io") && !strings.HasPrefix(k, "kubevirt.io/storage-observed-api-version") &&
			!strings.HasPrefix(k, "kubevirt.io/latest-observed-api-version") {
			ann[k] = v
		}
	}
	ann["kubevirt.io/domain"] = vmi.Name
	ifName := "eth0"
	for _, n := range vmi.Spec.Networks {
		switch m := n.Multus; {
		case m != nil && m.Default:
			ann["v1.multus-cni.io/default-network"] = "default/" + m.NetworkName
		case m != nil:
			ann["k8s.v1.cni.cncf.io/networks"] = `[{"interface":"net1","name":"` + m.NetworkName + `","namespace":"default"}]`
			ifName = "net1"
		}
	}
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Name: name, Namespace: "default",
			Labels:      map[string]string{"kubevirt.io": "virt-launcher", "kubevirt.io/created-by": string(vmi.UID)},
			Annotations: ann,
			OwnerReferences: []metav1.OwnerReference{{
				APIVersion: "kubevirt.io/v1", Kind: "VirtualMachineInstance", Name: vmi.Name, UID: vmi.UID, Controller: &yes,
			}},
		},
		Spec: corev1.PodSpec{NodeName: node, Containers: []corev1.Container{{Name: "compute", Image: "virt-launcher"}}},
	}
	if migration != nil {
		pod.Labels["kubevirt.io/migrationJobUID"] = string(migration.UID)
		pod.Annotations["kubevirt.io/migrationJobName"] = migration.Name
	}
	obj, err := kube.CoreV1().Pods("default").Create(ctx, pod, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create pod %s: %v", name, err)
	}
	if migration == nil {
		scheduleVMI(ctx, t, kube, vmi.Name, node)
	}
	p := newPod(t, name)
	p.IfName, p.UID = ifName, string(obj.UID)
	return p
}

// scheduleVMI writes what virt-controller writes on a VMI once its
// launcher pod runs on node: the label kubevirt.io/nodeName, by which
// that node's virt-handler and vmnicd watch it, and status.nodeName.
func scheduleVMI(ctx context.Context, t *testing.T, kube kubernetes.Interface, vmi, node string) {
	t.Helper()
	patch := fmt.Sprintf(`{"metadata":{"labels":{%q:%q}},"status":{"nodeName":%q,"phase":"Scheduled"}}`, kubevirtv1.NodeNameLabel, node, node)
	err := kube.Discovery().RESTClient().Patch(types.MergePatchType).
		AbsPath("/apis/kubevirt.io/v1/namespaces/default/virtualmachineinstances", vmi).Body([]byte(patch)).Do(ctx).Error()
	if err != nil {
		t.Fatalf("schedule VMI %s on %s: %v", vmi, node, err)
	}
}

// prober pings the guest every 50 ms from a peer pod and keeps the reply
// times.
type prober struct {
	started time.Time
	cmd     *exec.Cmd
	mu      sync.Mutex
	replies []time.Time
	sent    int
	done    chan struct{}
}

var (
	pingReply   = regexp.MustCompile(`^\[(\d+\.\d+)\] \d+ bytes from .*icmp_seq=\d+`)
	pingSummary = regexp.MustCompile(`^(\d+) packets transmitted, (\d+) (packets )?received`)
)

func startProbe(t *testing.T, peer *harness.Pod, ip string) *prober {
	t.Helper()
	p := &prober{done: make(chan struct{}), started: time.Now()}
	p.cmd = exec.Command("nsenter", "--net="+peer.NS.Path(), "ping", "-D", "-n", "-i", "0.05", "-W", "1", ip)
	out, err := p.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		defer close(p.done)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			line := sc.Text()
			if m := pingReply.FindStringSubmatch(line); m != nil {
				f, _ := strconv.ParseFloat(m[1], 64)
				p.mu.Lock()
				p.replies = append(p.replies, time.Unix(0, int64(f*1e9)))
				p.mu.Unlock()
			} else if m := pingSummary.FindStringSubmatch(line); m != nil {
				p.mu.Lock()
				p.sent, _ = strconv.Atoi(m[1])
				p.mu.Unlock()
			}
		}
	}()
	t.Cleanup(func() { _ = p.cmd.Process.Kill() })
	return p
}

// stop ends the probe and returns the replies, the probes sent, and the
// longest time without a reply (up to the stop, so that an outage that
// never ended counts too).
func (p *prober) stop() (replies, sent int, gap time.Duration, gapEnd time.Time) {
	stopped := time.Now()
	_ = p.cmd.Process.Signal(os.Interrupt)
	<-p.done
	_ = p.cmd.Wait()
	p.mu.Lock()
	defer p.mu.Unlock()
	gap, gapEnd = longestGap(p.replies, p.started, stopped)
	return len(p.replies), p.sent, gap, gapEnd
}

// longestGap is the longest time without an answer: from the start of
// probing to the first answer, between two answers, or from the last one
// to the end of probing; and when it ended. A probe that was never
// answered is one gap from start to stop.
func longestGap(answers []time.Time, started, stopped time.Time) (gap time.Duration, end time.Time) {
	r := append([]time.Time{started}, answers...)
	sort.Slice(r, func(i, j int) bool { return r[i].Before(r[j]) })
	r = append(r, stopped)
	for i := 1; i < len(r); i++ {
		if d := r[i].Sub(r[i-1]); d > gap {
			gap, end = d, r[i]
		}
	}
	return gap, end
}

// heartbeat, in a guest's script, prints a line every second on the
// console, which the target's QEMU carries on after a migration. Shell
// builtins but sleep: it adds as little work as it can to the guest.
const heartbeat = "(while :; do read -r up _ </proc/uptime; echo \"TICK $up\"; sleep 1; done) &\n"

// settle is how long the source guest runs, probed, before it migrates.
// Migrated within a few seconds of its boot, a guest under TCG now and then
// panicked or stopped on the target; past its boot-time activity that
// became rarer.
const settle = 8 * time.Second

// assertGuestAlive fails the test, saying so, when the migrated guest is
// not running on the target (its kernel panicked, or it printed no
// heartbeat since the migration): what the probes saw then says nothing
// about the network.
func assertGuestAlive(t *testing.T, g *guest.Guest) {
	t.Helper()
	out := g.Output()
	if i := strings.Index(out, "Kernel panic"); i >= 0 {
		t.Fatalf("the guest's kernel panicked after the migration (QEMU under TCG), so its reachability says nothing about the network:\n%s", out[i:min(len(out), i+2000)])
	}
	if !strings.Contains(out, "TICK") {
		t.Fatal("the migrated guest printed no heartbeat on the target's console (QEMU under TCG): it is not running, so its reachability says nothing about the network")
	}
}

// TestBridgeLiveMigration live-migrates a real QEMU guest between two
// simulated nodes (own netns, OVS, vmnicd and Spiderpool agent each, on a
// shared L2 underlay) while a peer pings it every 50 ms: the target is
// held until the VMIM succeeds, the guest keeps its IP and MAC, the switch
// learns the guest behind the target port only at the switchover, and
// after the source's DEL the IP is still allocated and answered from the
// target. It logs the probe gap next to QEMU's own downtime.
func TestBridgeLiveMigration(t *testing.T) {
	need.NoError(t, guest.Check())
	img, err := guest.Build(t.TempDir())
	if err != nil {
		t.Fatalf("guest image: %v", err)
	}
	bed, pluginDir := newClusterBed(t, 5*time.Minute)
	ctx, c, kube := bed.ctx, bed.c, bed.kube
	a, la := clusterOVSNode(t, c, "node-a", pluginDir)
	b, lb := clusterOVSNode(t, c, "node-b", pluginDir)
	linkNodes(t, a, b)
	applyPool(ctx, t, c, "vlan100-v4", "10.100.0.0/24", "10.100.0.20-10.100.0.40", "10.100.0.1")
	peerNet := a.bridgeList(t, "peer", map[string]any{"vlan": 100}, a.hostLocalOn("10.100.0.0/24", "10.100.0.1", "10.100.0.100", "10.100.0.150"))
	peer, _ := a.addPod(t, peerNet, "peer-1")

	vmi := createBridgeVMI(ctx, t, c, "vm-lm")
	src := launcherOn(ctx, t, kube, vmi, "virt-launcher-vm-lm-src", "node-a", nil)
	rs := addRetry(ctx, t, a.Node, la, src)
	ip, mac := ip4(rs), rs.Interfaces[1].Mac
	dir, err := os.MkdirTemp("", "mig")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	var logf func(string)
	if testing.Verbose() {
		logf = func(s string) { t.Log("guest: " + s) }
	}
	script := "udhcpc -i eth0 -q -f -n -t 15 -T 2 || echo DHCP4-FAILED\necho \"ADDR4 $(ip -4 -o addr show dev eth0 | awk '{print $4}' | head -1)\"\n" + heartbeat + "sleep 600\n"
	// Booted as KubeVirt's tap binding boots it; the target's QEMU takes
	// the migrated domain, so the same NIC.
	di := kubevirtNICs(ctx, t, src, vmi)
	if len(di) != 1 || di[0].MAC != mac || di[0].Target != "tap1" {
		t.Fatalf("KubeVirt's domain interfaces %+v, want tap1 with the guest's MAC %s", di, mac)
	}
	tap := di[0].Target
	gSrc, err := guest.Start(ctx, img, guest.Options{
		NetnsPath: src.NS.Path(), Tap: tap, MAC: di[0].MAC, Script: script,
		MonitorSocket: filepath.Join(dir, "src.qmp"), Timeout: 4 * time.Minute, Log: logf,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(gSrc.Kill)
	if m, err := gSrc.WaitFor(ctx, regexp.MustCompile(`^ADDR4 (.*)$`)); err != nil || m[1] != ip+"/24" {
		t.Fatalf("source guest address %v %v, want %s/24", m, err, ip)
	}
	probe := startProbe(t, peer, ip)
	time.Sleep(settle)

	m := bed.createVMIM(t, "mig-lm", vmi.Name)
	dst := launcherOn(ctx, t, kube, vmi, "virt-launcher-vm-lm-dst", "node-b", m)
	rd := addRetry(ctx, t, b.Node, lb, dst)
	if ip4(rd) != ip || rd.Interfaces[1].Mac != mac {
		t.Fatalf("target got %s %s, want %s %s", ip4(rd), rd.Interfaces[1].Mac, ip, mac)
	}
	if !held(t, dst) {
		t.Fatal("target not held")
	}
	if dt := kubevirtNICs(ctx, t, dst, vmi); len(dt) != 1 || dt[0].Target != tap || dt[0].MAC != mac {
		t.Fatalf("KubeVirt's domain interfaces on the target %+v, want the source's %s with %s", dt, tap, mac)
	}
	gDst, err := guest.Start(ctx, img, guest.Options{
		NetnsPath: dst.NS.Path(), Tap: tap, MAC: di[0].MAC, Script: script,
		MonitorSocket: filepath.Join(dir, "dst.qmp"), Incoming: "unix:" + filepath.Join(dir, "mig.sock"), Timeout: 4 * time.Minute, Log: logf,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(gDst.Kill)
	if _, err := gDst.QMP(ctx, "query-status", nil); err != nil {
		t.Fatal(err)
	}
	targetPort := b.vsctl(t, "get", "interface", portOf(dst), "ofport")
	if learnedOn(t, b, mac) == targetPort {
		t.Fatal("node-b's switch learned the guest behind the held target before the migration")
	}

	bed.step(t, m, vmi, src, dst, "Running")
	downtime := migrateGuest(ctx, t, gSrc, filepath.Join(dir, "mig.sock"), func() {
		if learnedOn(t, b, mac) == targetPort && held(t, dst) {
			t.Fatal("node-b's switch learned the guest behind the held target during the migration")
		}
	})
	completed := time.Now()
	// KubeVirt's part: the VMIM and the VMI record the handover.
	bed.finish(t, m, vmi, src, dst, false)
	for time.Since(completed) < 5*time.Second && held(t, dst) {
		time.Sleep(5 * time.Millisecond)
	}
	t.Logf("hold released %s after QEMU reported the migration completed", time.Since(completed).Round(time.Millisecond))
	time.Sleep(2 * time.Second)
	if held(t, dst) || !held(t, src) {
		t.Errorf("after the switchover: target held %v, source silenced %v", held(t, dst), held(t, src))
	}
	if got := learnedOn(t, b, mac); got != targetPort {
		t.Errorf("node-b's switch has the guest MAC on port %q, want the target's %s", got, targetPort)
	}

	// The source goes (QEMU exits, the pod terminates, DEL): the IP stays.
	gSrc.Kill()
	if err := kube.CoreV1().Pods("default").Delete(ctx, src.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := a.Del(ctx, la, src); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second)
	replies, sent, gap, gapEnd := probe.stop()
	lost := sent - replies
	t.Logf("probe every 50 ms: %d sent, %d answered, %d lost; longest gap %s (ending %s); QEMU downtime %d ms",
		sent, replies, lost, gap.Round(time.Millisecond), gapEnd.Format("15:04:05.000"), downtime)
	assertGuestAlive(t, gDst)
	if replies == 0 || sent < 40 {
		t.Fatalf("probe did not run: %d sent, %d answered", sent, replies)
	}
	if gap > 5*time.Second {
		t.Errorf("the guest was unreachable for %s", gap)
	}
	if err := pingFrom(peer, ip); err != nil {
		t.Errorf("after the source's DEL the guest no longer answers from the target: %v", err)
	}
	for _, p := range []*harness.Pod{dst} {
		if err := b.Del(ctx, lb, p); err != nil {
			t.Fatal(err)
		}
	}
}

// migrateGuest live-migrates src to the QEMU waiting on the unix socket
// sock, calling during between polls of QMP's query-migrate (every 10
// ms), and returns the downtime QEMU reports once completed.
func migrateGuest(ctx context.Context, t *testing.T, src *guest.Guest, sock string, during func()) int {
	t.Helper()
	if _, err := src.QMP(ctx, "migrate", map[string]any{"uri": "unix:" + sock}); err != nil {
		t.Fatal(err)
	}
	for {
		raw, err := src.QMP(ctx, "query-migrate", nil)
		if err != nil {
			t.Fatal(err)
		}
		var st struct {
			Status   string `json:"status"`
			Downtime int    `json:"downtime"`
		}
		_ = json.Unmarshal(raw, &st)
		switch st.Status {
		case "completed":
			return st.Downtime
		case "failed", "cancelled":
			t.Fatalf("migration %s: %s", st.Status, raw)
		}
		during()
		time.Sleep(10 * time.Millisecond)
	}
}

// learnedOn is the OpenFlow port node n's switch learned mac on, "" if none.
func learnedOn(t *testing.T, n *ovsNode, mac string) string {
	t.Helper()
	out, err := n.sw.Appctl("fdb/show", "br1")
	if err != nil {
		t.Fatalf("fdb/show: %v\n%s", err, out)
	}
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) >= 3 && f[2] == mac {
			return f[0]
		}
	}
	return ""
}
