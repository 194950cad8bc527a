package integration

import (
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/util/retry"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/vmnic/vmnic/pkg/kubevirt"
	"github.com/vmnic/vmnic/test/cluster"
	"github.com/vmnic/vmnic/test/harness"
	"github.com/vmnic/vmnic/test/spiderpool"
)

// migrationBed is one OVS node with vmnicd watching a real API server, the
// real Spiderpool agent for VLAN 100's pool, and a peer pod on the VLAN.
type migrationBed struct {
	ctx   context.Context
	c     *cluster.Cluster
	kube  kubernetes.Interface
	kv    rest.Interface
	n     *ovsNode
	l     *libcni.NetworkConfigList
	peer  *harness.Pod
	agent *spiderpool.Agent
}

// newClusterBed starts the API server with KubeVirt's CRDs and the clients
// a migration test writes with; it returns Spiderpool's IPAM plugin dir.
// The bed's ctx ends after timeout.
func newClusterBed(t *testing.T, timeout time.Duration) (*migrationBed, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	t.Cleanup(cancel)
	b := &migrationBed{ctx: ctx, c: cluster.StartT(t)}
	if err := b.c.InstallKubeVirtCRDs(ctx); err != nil {
		t.Fatal(err)
	}
	pluginDir, err := spiderpool.PluginPath()
	if err != nil {
		t.Fatal(err)
	}
	if b.kube, err = kubernetes.NewForConfig(b.c.Config); err != nil {
		t.Fatal(err)
	}
	if b.kv, err = kubevirt.KubeVirtClient(b.c.Config); err != nil {
		t.Fatal(err)
	}
	return b, pluginDir
}

func newMigrationBed(t *testing.T) *migrationBed {
	t.Helper()
	b, pluginDir := newMigrationBedNoDaemon(t, 4*time.Minute)
	b.startNode(t, pluginDir)
	return b
}

// newMigrationBedNoDaemon is the API server, Spiderpool's agent and pool
// of a migration bed, without its node: a test makes objects before
// vmnicd starts, then calls startNode.
func newMigrationBedNoDaemon(t *testing.T, timeout time.Duration) (*migrationBed, string) {
	t.Helper()
	b, pluginDir := newClusterBed(t, timeout)
	b.agent = spiderpool.StartAgentT(t, b.c, spiderpool.AgentOptions{NodeName: testNode})
	applyPool(b.ctx, t, b.c, "vlan100-v4", "10.100.0.0/24", "10.100.0.20-10.100.0.40", "10.100.0.1")
	return b, pluginDir
}

// startNode starts the bed's OVS node with the vmnicd binary (extra
// flags after the bed's), its network and a peer pod on VLAN 100.
func (b *migrationBed) startNode(t *testing.T, pluginDir string, extraFlags ...string) {
	t.Helper()
	b.n = newOVSNodeBare(t)
	b.n.vmnicdFlags = append(clusterFlags(b.c, testNode), extraFlags...)
	b.n.start(t)
	b.n.cniVersion = "1.0.0"
	b.n.CNI = libcni.NewCNIConfigWithCacheDir([]string{b.n.BinDir, pluginDir}, filepath.Join(b.n.Dir, "cni-cache"), nil)
	b.l = b.n.bridgeList(t, "vlan100", map[string]any{"vlan": 100}, b.agent.IPAMConfig("vlan100-v4"))
	peerNet := b.n.bridgeList(t, "peer", map[string]any{"vlan": 100}, b.n.hostLocalOn("10.100.0.0/24", "10.100.0.1", "10.100.0.100", "10.100.0.150"))
	b.peer, _ = b.n.addPod(t, peerNet, "peer-1")
}

// clusterFlags are the flags of a vmnicd binary that watches c's API
// server as node, as the chart starts it but for what the sandbox node
// differs in: its metrics on a free port, no capability publisher (these
// clusters have no NodeNetworkCapability CRD), a short drain.
func clusterFlags(c *cluster.Cluster, node string) []string {
	return []string{
		"--kubeconfig", c.Kubeconfig, "--node-name", node,
		"--metrics-addr", "127.0.0.1:0", "--capabilities=false", "--drain-timeout", "5s",
	}
}

// startClusterVmnicd runs the vmnicd binary for node on a sandbox node,
// watching c's API server.
func startClusterVmnicd(t *testing.T, n *harness.Node, c *cluster.Cluster, node string) *harness.DaemonProcess {
	t.Helper()
	bin, err := harness.Vmnicd()
	if err != nil {
		t.Fatal(err)
	}
	return startClusterVmnicdBinary(t, n, c, node, bin)
}

// startClusterVmnicdBinary is startClusterVmnicd with another build of
// vmnicd (n.DaemonEnv goes to its environment).
func startClusterVmnicdBinary(t *testing.T, n *harness.Node, c *cluster.Cluster, node, bin string) *harness.DaemonProcess {
	t.Helper()
	n.DaemonInHostNetns = true
	p, err := n.StartVmnicdBinary(bin, append(clusterFlags(c, node), "--host-netns", n.NS.Path())...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.Stop() })
	return p
}

// createVMIM creates the migration object of vmi, as a user would.
func (b *migrationBed) createVMIM(t *testing.T, name, vmi string) *kubevirtv1.VirtualMachineInstanceMigration {
	t.Helper()
	m := &kubevirtv1.VirtualMachineInstanceMigration{
		TypeMeta:   metav1.TypeMeta{APIVersion: "kubevirt.io/v1", Kind: "VirtualMachineInstanceMigration"},
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default"},
		Spec:       kubevirtv1.VirtualMachineInstanceMigrationSpec{VMIName: vmi},
	}
	out := &kubevirtv1.VirtualMachineInstanceMigration{}
	if err := b.kv.Post().Namespace("default").Resource("virtualmachineinstancemigrations").Body(m).Do(b.ctx).Into(out); err != nil {
		t.Fatal(err)
	}
	return out
}

// setPhase writes VMIM name's phase (its status subresource), as
// virt-controller does: again on a conflict.
func (b *migrationBed) setPhase(t *testing.T, name, phase string) {
	t.Helper()
	gvr := schema.GroupVersionResource{Group: "kubevirt.io", Version: "v1", Resource: "virtualmachineinstancemigrations"}
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		obj, err := b.c.Dynamic.Resource(gvr).Namespace("default").Get(b.ctx, name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if err := unstructured.SetNestedField(obj.Object, phase, "status", "phase"); err != nil {
			return err
		}
		_, err = b.c.Dynamic.Resource(gvr).Namespace("default").UpdateStatus(b.ctx, obj, metav1.UpdateOptions{})
		return err
	})
	if err != nil {
		t.Fatalf("VMIM %s phase %s: %v", name, phase, err)
	}
}

// updateVMI changes the VMI name in one update of the object, labels and
// status together (KubeVirt's VMI has no status subresource), again on a
// conflict (vmnicd annotates a VMI that migrated away from its node).
func (b *migrationBed) updateVMI(t *testing.T, name string, change func(v *kubevirtv1.VirtualMachineInstance)) {
	t.Helper()
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		v := &kubevirtv1.VirtualMachineInstance{}
		if err := b.kv.Get().Namespace("default").Resource("virtualmachineinstances").Name(name).Do(b.ctx).Into(v); err != nil {
			return err
		}
		if v.Labels == nil {
			v.Labels = map[string]string{}
		}
		change(v)
		return b.kv.Put().Namespace("default").Resource("virtualmachineinstances").Name(name).Body(v).Do(b.ctx).Error()
	})
	if err != nil {
		t.Fatalf("update VMI %s: %v", name, err)
	}
}

// podNode is the node of the pod name.
func (b *migrationBed) podNode(t *testing.T, name string) string {
	t.Helper()
	pod, err := b.kube.CoreV1().Pods("default").Get(b.ctx, name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return pod.Spec.NodeName
}

// migrationSteps are the stages of a migration in order, named as the
// VMIM phase each one sets.
var migrationSteps = []string{"PreparingTarget", "TargetReady", "Running", "Succeeded"}

// step stands in for KubeVirt v1.8.2 moving migration m of vmi from the
// pod src to dst on to stage (one of migrationSteps, or Failed), through
// every step before it not taken yet, writing what virt-controller and
// the two virt-handlers write at each: the VMIM's phase, and the VMI's
// migration state and node labels, which are all vmnicd reads.
//   - PreparingTarget (virt-controller's handoff, once the target pod
//     runs): the VMI names the migration, its pods and nodes, and is
//     labelled kubevirt.io/migrationTargetNodeName=<target node>;
//   - TargetReady: the target's virt-handler gives its address;
//   - Running: the source's virt-handler starts sending the VM;
//   - Succeeded: the target's virt-handler marks it completed and moves
//     the VMI's kubevirt.io/nodeName label and status.nodeName in the same
//     update, then drops the migration-target label;
//   - Failed: the source's virt-handler marks it failed; the target's
//     drops the migration-target label.
func (b *migrationBed) step(t *testing.T, m *kubevirtv1.VirtualMachineInstanceMigration, vmi *kubevirtv1.VirtualMachineInstance, src, dst *harness.Pod, stage string) {
	t.Helper()
	srcNode, dstNode := b.podNode(t, src.Name), b.podNode(t, dst.Name)
	cur := &kubevirtv1.VirtualMachineInstance{}
	if err := b.kv.Get().Namespace("default").Resource("virtualmachineinstances").Name(vmi.Name).Do(b.ctx).Into(cur); err != nil {
		t.Fatal(err)
	}
	done := -1
	if s := cur.Status.MigrationState; s != nil && s.MigrationUID == m.UID {
		switch {
		case s.Completed:
			done = 3
		case s.StartTimestamp != nil:
			done = 2
		case s.TargetNodeAddress != "":
			done = 1
		default:
			done = 0
		}
	}
	last := slices.Index(migrationSteps, stage)
	if stage == "Failed" {
		last = 0 // fails once handed off
	}
	now := metav1.Now()
	for i := done + 1; i <= last; i++ {
		switch migrationSteps[i] {
		case "PreparingTarget":
			b.setPhase(t, m.Name, "Scheduled")
			b.updateVMI(t, vmi.Name, func(v *kubevirtv1.VirtualMachineInstance) {
				v.Status.MigrationState = &kubevirtv1.VirtualMachineInstanceMigrationState{
					MigrationUID: m.UID, SourceNode: srcNode, TargetNode: dstNode, SourcePod: src.Name, TargetPod: dst.Name,
				}
				v.Labels[kubevirtv1.MigrationTargetNodeNameLabel] = dstNode
			})
		case "TargetReady":
			b.updateVMI(t, vmi.Name, func(v *kubevirtv1.VirtualMachineInstance) {
				v.Status.MigrationState.TargetNodeAddress = "192.0.2.2"
			})
		case "Running":
			b.updateVMI(t, vmi.Name, func(v *kubevirtv1.VirtualMachineInstance) {
				v.Status.MigrationState.StartTimestamp = &now
			})
		case "Succeeded":
			b.updateVMI(t, vmi.Name, func(v *kubevirtv1.VirtualMachineInstance) {
				s := v.Status.MigrationState
				s.TargetNodeDomainDetected, s.TargetNodeDomainReadyTimestamp = true, &now
				if s.StartTimestamp == nil {
					s.StartTimestamp = &now
				}
				s.EndTimestamp, s.Completed = &now, true
				v.Labels[kubevirtv1.NodeNameLabel] = dstNode
				v.Status.NodeName = dstNode
			})
		}
		b.setPhase(t, m.Name, migrationSteps[i])
	}
	switch stage {
	case "Failed":
		b.updateVMI(t, vmi.Name, func(v *kubevirtv1.VirtualMachineInstance) {
			v.Status.MigrationState.Failed, v.Status.MigrationState.EndTimestamp = true, &now
		})
		b.setPhase(t, m.Name, "Failed")
	case "Succeeded":
	default:
		return
	}
	b.updateVMI(t, vmi.Name, func(v *kubevirtv1.VirtualMachineInstance) {
		delete(v.Labels, kubevirtv1.MigrationTargetNodeNameLabel)
	})
}

// finish ends migration m of vmi from src to dst as KubeVirt does: with
// every step, to Succeeded or Failed.
func (b *migrationBed) finish(t *testing.T, m *kubevirtv1.VirtualMachineInstanceMigration, vmi *kubevirtv1.VirtualMachineInstance, src, dst *harness.Pod, failed bool) {
	t.Helper()
	stage := "Succeeded"
	if failed {
		stage = "Failed"
	}
	b.step(t, m, vmi, src, dst, stage)
}

// targetPod is a migration target launcher pod of vmi for VMIM m.
func (b *migrationBed) targetPod(t *testing.T, vmi *kubevirtv1.VirtualMachineInstance, m *kubevirtv1.VirtualMachineInstanceMigration, name string) *harness.Pod {
	t.Helper()
	return launcherOn(b.ctx, t, b.kube, vmi, name, testNode, m)
}

func guardOf(t *testing.T, p *harness.Pod) string {
	t.Helper()
	out, err := exec.Command("nsenter", "--net="+p.NS.Path(), "nft", "list", "table", "bridge", "vmnic_net1").CombinedOutput()
	if err != nil {
		t.Fatalf("guard of %s: %v\n%s", p.Name, err, out)
	}
	return string(out)
}

func held(t *testing.T, p *harness.Pod) bool {
	return strings.Contains(guardOf(t, p), `iifname "tap1" drop`)
}

// arpWatch records the ARP frames a pod receives that claim ip.
type arpWatch struct {
	mu     sync.Mutex
	frames []arpSeen
	fd     int
}

type arpSeen struct {
	at  time.Time
	mac string
}

func watchARP(t *testing.T, p *harness.Pod, ip net.IP) *arpWatch {
	t.Helper()
	w := &arpWatch{}
	err := p.NS.Do(func(ns.NetNS) error {
		ifi, err := net.InterfaceByName(p.IfName)
		if err != nil {
			return err
		}
		proto := int(htons(unix.ETH_P_ARP))
		w.fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, proto)
		if err != nil {
			return err
		}
		return unix.Bind(w.fd, &unix.SockaddrLinklayer{Protocol: uint16(proto), Ifindex: ifi.Index})
	})
	if err != nil {
		t.Fatalf("ARP capture on %s: %v", p.Name, err)
	}
	t.Cleanup(func() { _ = unix.Close(w.fd) })
	want := ip.To4()
	go func() {
		buf := make([]byte, 1500)
		for {
			n, _, err := unix.Recvfrom(w.fd, buf, 0)
			if err != nil {
				return
			}
			f := buf[:n]
			if n < 42 || binary.BigEndian.Uint16(f[12:14]) != unix.ETH_P_ARP || !net.IP(f[28:32]).Equal(want) {
				continue
			}
			w.mu.Lock()
			w.frames = append(w.frames, arpSeen{at: time.Now(), mac: net.HardwareAddr(f[22:28]).String()})
			w.mu.Unlock()
		}
	}()
	return w
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

func (w *arpWatch) seen() []arpSeen {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]arpSeen(nil), w.frames...)
}

// TestBridgeMigrationHold: a migration target pod gets the VMI's IP and MAC
// and is wired held (nothing between its tap and the VLAN, nothing claims
// the address); the hold survives a daemon restart; when the migration
// succeeds the hold is released and the address announced from the target
// at once, and the source is silenced; the source's DEL keeps the IP with
// the VM.
func TestBridgeMigrationHold(t *testing.T) {
	b := newMigrationBed(t)
	vmi := createBridgeVMI(b.ctx, t, b.c, "vm-m")
	src := launcher(b.ctx, t, b.kube, vmi, "virt-launcher-vm-m-src")
	rs := addRetry(b.ctx, t, b.n.Node, b.l, src)
	ip, mac := ip4(rs), rs.Interfaces[1].Mac
	watch := watchARP(t, b.peer, net.ParseIP(ip))

	m := b.createVMIM(t, "mig-1", vmi.Name)
	dst := b.targetPod(t, vmi, m, "virt-launcher-vm-m-dst")
	rd := addRetry(b.ctx, t, b.n.Node, b.l, dst)
	if ip4(rd) != ip || rd.Interfaces[1].Mac != mac {
		t.Fatalf("target got %s %s, want the source's %s %s", ip4(rd), rd.Interfaces[1].Mac, ip, mac)
	}
	if !held(t, dst) || held(t, src) {
		t.Fatalf("after the target's ADD: target held %v, source held %v; want true, false", held(t, dst), held(t, src))
	}
	if err := b.n.Check(b.ctx, b.l, dst); err != nil {
		t.Errorf("CHECK of the held target: %v", err)
	}

	// The daemon restarts in the middle: the hold is on record.
	if err := b.n.stop(); err != nil {
		t.Fatal(err)
	}
	b.n.start(t)
	time.Sleep(500 * time.Millisecond)
	if !held(t, dst) {
		t.Fatal("hold lost across a daemon restart")
	}
	b.step(t, m, vmi, src, dst, "Running")
	time.Sleep(300 * time.Millisecond)
	if !held(t, dst) {
		t.Fatal("target released while the migration runs")
	}
	if s := watch.seen(); len(s) != 0 {
		t.Fatalf("the peer heard %s claimed before the switchover: %v", ip, s)
	}

	switched := time.Now()
	b.finish(t, m, vmi, src, dst, false)
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) && (len(watch.seen()) == 0 || held(t, dst) || !held(t, src)) {
		time.Sleep(20 * time.Millisecond)
	}
	seen := watch.seen()
	if len(seen) == 0 {
		t.Fatalf("no gratuitous ARP for %s reached the peer after the switchover", ip)
	}
	t.Logf("switchover: first announcement at the peer %s after the VMIM turned Succeeded (%d frames)", seen[0].at.Sub(switched).Round(time.Millisecond), len(seen))
	if seen[0].mac != mac {
		t.Errorf("announced from %s, want the guest's %s", seen[0].mac, mac)
	}
	if held(t, dst) {
		t.Error("target still held after the migration succeeded")
	}
	if !held(t, src) {
		t.Error("source not silenced after the migration succeeded")
	}
	if err := b.n.Check(b.ctx, b.l, dst); err != nil {
		t.Errorf("CHECK of the released target: %v", err)
	}

	// The source pod goes: Spiderpool keeps the IP for the VM.
	if err := b.kube.CoreV1().Pods("default").Delete(b.ctx, src.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := b.n.Del(b.ctx, b.l, src); err != nil {
		t.Fatal(err)
	}
	pool, err := b.c.Dynamic.Resource(schema.GroupVersionResource{Group: "spiderpool.spidernet.io", Version: "v2beta1", Resource: "spiderippools"}).
		Get(b.ctx, "vlan100-v4", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if raw, _, _ := unstructured.NestedString(pool.Object, "status", "allocatedIPs"); !strings.Contains(raw, fmt.Sprintf("%q", ip)) {
		t.Errorf("after the source's DEL the pool lost %s: %s", ip, raw)
	}
	if err := b.n.Check(b.ctx, b.l, dst); err != nil {
		t.Errorf("target after the source's DEL: %v", err)
	}
}

// TestBridgeMigrationFailed: a failed migration leaves the target held and
// the source untouched; the target's DEL leaves nothing of it.
func TestBridgeMigrationFailed(t *testing.T) {
	b := newMigrationBed(t)
	vmi := createBridgeVMI(b.ctx, t, b.c, "vm-f")
	src := launcher(b.ctx, t, b.kube, vmi, "virt-launcher-vm-f-src")
	rs := addRetry(b.ctx, t, b.n.Node, b.l, src)
	watch := watchARP(t, b.peer, net.ParseIP(ip4(rs)))
	m := b.createVMIM(t, "mig-f", vmi.Name)
	dst := b.targetPod(t, vmi, m, "virt-launcher-vm-f-dst")
	addRetry(b.ctx, t, b.n.Node, b.l, dst)
	b.finish(t, m, vmi, src, dst, true)
	time.Sleep(3 * time.Second)
	if !held(t, dst) || held(t, src) {
		t.Errorf("after a failed migration: target held %v, source held %v; want true, false", held(t, dst), held(t, src))
	}
	if s := watch.seen(); len(s) != 0 {
		t.Errorf("the address was announced after a failed migration: %v", s)
	}
	if err := b.n.Del(b.ctx, b.l, dst); err != nil {
		t.Fatal(err)
	}
	for _, p := range b.n.vmnicPorts(t) {
		if p == portOf(dst) {
			t.Errorf("target port %s left", p)
		}
	}
	if links := podLinks(t, dst); len(links) != 1 {
		t.Errorf("target links left: %v", keys(links))
	}
	if err := b.n.Check(b.ctx, b.l, src); err != nil {
		t.Errorf("source after the failed migration: %v", err)
	}
}
