package fleet

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/vmnic/vmnic/pkg/kubevirt"
	"github.com/vmnic/vmnic/test/cluster"
	"github.com/vmnic/vmnic/test/harness"
	"github.com/vmnic/vmnic/test/need"
)

const (
	// nodes are the Node objects of the simulated cluster.
	nodes = 1000
	// daemons run a vmnicd each: node-0000 … node-0049.
	daemons = 50
	// owned daemons' nodes (node-0000 … node-0004) run one VMI each at
	// every scale point; the other daemons' nodes none. Every other VMI
	// runs on a node without a daemon.
	owned = 5
	// migrations move VMIs between nodes without a daemon at each scale
	// point (with fewer VMIs, each of them several times).
	migrations = 200
	// writers create and change objects in parallel.
	writers = 16
)

// scales are the cluster sizes measured, in VMIs.
var scales = []int{10, 1000, 10000}

// BenchmarkFleet grows the cluster through the scale points and, at each,
// starts the daemons afresh, lets them sync, churns the rest of the
// cluster (200 migrations) and changes each owned VMI once, and reads
// every daemon's figures. Run it once (-benchtime 1x); the report goes to
// $VMNIC_FLEET_OUT (default .tools/bench/fleet.json).
func BenchmarkFleet(b *testing.B) {
	need.Root(b)
	for range b.N {
		benchFleet(b)
	}
}

func benchFleet(b *testing.B) {
	ctx, cancel := context.WithTimeout(b.Context(), 40*time.Minute)
	defer cancel()
	c, err := cluster.Start(ctx, b.TempDir(), cluster.Options{APIServerArgs: []string{"--max-requests-inflight=1000", "--max-mutating-requests-inflight=500"}})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(c.Stop)
	if err := c.InstallKubeVirtCRDs(ctx); err != nil {
		b.Fatal(err)
	}
	cfg := rest.CopyConfig(c.Config)
	cfg.QPS, cfg.Burst = 2000, 4000
	f := &fleet{ctx: ctx, b: b, c: c}
	if f.kube, err = kubernetes.NewForConfig(cfg); err != nil {
		b.Fatal(err)
	}
	if f.kv, err = kubevirt.KubeVirtClient(cfg); err != nil {
		b.Fatal(err)
	}
	start := time.Now()
	parallel(b, nodes, func(i int) error {
		n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: nodeName(i), Labels: map[string]string{"kubernetes.io/os": "linux"}}}
		n.Status.Conditions = []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue, LastHeartbeatTime: metav1.Now()}}
		_, err := f.kube.CoreV1().Nodes().Create(ctx, n, metav1.CreateOptions{})
		return err
	})
	b.Logf("%d Node objects made in %s", nodes, time.Since(start).Round(time.Millisecond))

	rep := Report{Nodes: nodes, Daemons: daemons, Migrations: migrations}
	for k, scale := range scales {
		grown := time.Now()
		f.grow(scale)
		b.Logf("%d VMIs with their launcher pods (%s)", scale, time.Since(grown).Round(time.Millisecond))
		s, busy := f.measure(scale, k == len(scales)-1)
		rep.Scales = append(rep.Scales, s)
		logScale(b, s)
		if busy != nil {
			rep.Busy = busy
			b.Logf("%d VM starts on %s: its vmnicd received %.0f objects and made %.0f requests in %.1fs", busy.Starts, busy.Node, busy.Objects, busy.Requests, busy.Seconds)
		}
	}
	out := cmp.Or(os.Getenv("VMNIC_FLEET_OUT"), filepath.Join(repoRoot(b), ".tools", "bench", "fleet.json"))
	raw, _ := json.MarshalIndent(rep, "", "  ")
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		b.Fatal(err)
	}
	if err := os.WriteFile(out, raw, 0o644); err != nil {
		b.Fatal(err)
	}
	first, last := rep.Scales[0], rep.Scales[len(rep.Scales)-1]
	b.ReportMetric(WorstRatio(first, last, func(d Daemon) float64 { return float64(d.RSSKiB) }), "rss-ratio-max")
	b.ReportMetric(WorstRatio(first, last, func(d Daemon) float64 { return d.Objects }), "objects-ratio-max")
	b.ReportMetric(last.WatchesPerDaemon, "watches-per-daemon")
	b.ReportMetric(Median(last.Daemons, func(d Daemon) float64 { return float64(d.RSSKiB) / 1024 }, nil), "rss-MiB-median")
	b.ReportMetric(Median(last.Daemons, func(d Daemon) float64 { return d.SeenMs }, OwnsVMI), "seen-ms-median")
}

func nodeName(i int) string { return fmt.Sprintf("node-%04d", i) }

// fleet is the simulated cluster.
type fleet struct {
	ctx  context.Context
	b    *testing.B
	c    *cluster.Cluster
	kube kubernetes.Interface
	kv   rest.Interface
	vmis int
	// where is the node of each VMI: the churn writes without reading.
	where []string
	// moved counts migrations made, to name them.
	moved int
}

// vmiNode is where VMI i runs: the owned daemons' nodes first, then the
// nodes without a daemon, round robin.
func vmiNode(i int) string {
	if i < owned {
		return nodeName(i)
	}
	return nodeName(daemons + (i-owned)%(nodes-daemons))
}

func vmiName(i int) string { return fmt.Sprintf("vm-%05d", i) }

// grow makes VMIs (and launcher pods) until there are n, as KubeVirt has
// them once scheduled: the VMI labelled with its node, with its status.
func (f *fleet) grow(n int) {
	from := f.vmis
	for i := from; i < n; i++ {
		f.where = append(f.where, vmiNode(i))
	}
	parallel(f.b, n-from, func(k int) error {
		i := from + k
		node := f.where[i]
		vmi := fleetVMI(vmiName(i), node)
		out := &kubevirtv1.VirtualMachineInstance{}
		if err := f.kv.Post().Namespace("default").Resource("virtualmachineinstances").Body(vmi).Do(f.ctx).Into(out); err != nil {
			return err
		}
		_, err := f.kube.CoreV1().Pods("default").Create(f.ctx, launcherPod(out, node), metav1.CreateOptions{})
		return err
	})
	f.vmis = n
}

// fleetVMI is a VMI of a common shape: a masquerade NIC on the pod
// network and a vmnic-bound one on a Multus network, a container disk,
// scheduled on node and running.
func fleetVMI(name, node string) *kubevirtv1.VirtualMachineInstance {
	vmi := &kubevirtv1.VirtualMachineInstance{
		TypeMeta: metav1.TypeMeta{APIVersion: "kubevirt.io/v1", Kind: "VirtualMachineInstance"},
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default", Labels: map[string]string{
			kubevirtv1.NodeNameLabel: node, "kubevirt.io/vm": name, "app": "fleet",
		}},
	}
	vmi.Spec.Networks = []kubevirtv1.Network{
		{Name: "default", NetworkSource: kubevirtv1.NetworkSource{Pod: &kubevirtv1.PodNetwork{}}},
		{Name: "blue", NetworkSource: kubevirtv1.NetworkSource{Multus: &kubevirtv1.MultusNetwork{NetworkName: "blue"}}},
	}
	vmi.Spec.Domain.Devices.Interfaces = []kubevirtv1.Interface{
		{Name: "default", InterfaceBindingMethod: kubevirtv1.InterfaceBindingMethod{Masquerade: &kubevirtv1.InterfaceMasquerade{}}},
		{Name: "blue", Binding: &kubevirtv1.PluginBinding{Name: kubevirt.DefaultBinding}},
	}
	vmi.Spec.Domain.Devices.Disks = []kubevirtv1.Disk{{Name: "root", DiskDevice: kubevirtv1.DiskDevice{Disk: &kubevirtv1.DiskTarget{Bus: kubevirtv1.DiskBusVirtio}}}}
	vmi.Spec.Volumes = []kubevirtv1.Volume{{Name: "root", VolumeSource: kubevirtv1.VolumeSource{ContainerDisk: &kubevirtv1.ContainerDiskSource{Image: "vmnic.test/fleet/disk:1"}}}}
	vmi.Status.Phase = kubevirtv1.Running
	vmi.Status.NodeName = node
	vmi.Status.Interfaces = []kubevirtv1.VirtualMachineInstanceNetworkInterface{
		{Name: "default", IP: "10.244.0.10", MAC: "02:00:00:00:00:01", InterfaceName: "eth0", PodInterfaceName: "eth0"},
		{Name: "blue", MAC: "02:00:00:00:00:02", InterfaceName: "eth1", PodInterfaceName: kubevirt.HashedIfName("blue")},
	}
	vmi.Status.Conditions = []kubevirtv1.VirtualMachineInstanceCondition{{Type: kubevirtv1.VirtualMachineInstanceReady, Status: corev1.ConditionTrue}}
	return vmi
}

// launcherPod is vmi's virt-launcher pod on node, with what vmnic reads of
// one (labels, annotations, the VMI as its controller).
func launcherPod(vmi *kubevirtv1.VirtualMachineInstance, node string) *corev1.Pod {
	yes := true
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Name: "virt-launcher-" + vmi.Name, Namespace: "default",
			Labels: map[string]string{"kubevirt.io": "virt-launcher", "kubevirt.io/created-by": string(vmi.UID), "vm.kubevirt.io/name": vmi.Name},
			Annotations: map[string]string{
				"kubevirt.io/domain":          vmi.Name,
				"k8s.v1.cni.cncf.io/networks": `[{"interface":"` + kubevirt.HashedIfName("blue") + `","name":"blue","namespace":"default"}]`,
			},
			OwnerReferences: []metav1.OwnerReference{{APIVersion: "kubevirt.io/v1", Kind: "VirtualMachineInstance", Name: vmi.Name, UID: vmi.UID, Controller: &yes, BlockOwnerDeletion: &yes}},
		},
		Spec: corev1.PodSpec{NodeName: node, Containers: []corev1.Container{{
			Name: "compute", Image: "virt-launcher:v1.8.2", Command: []string{"/usr/bin/virt-launcher-monitor", "--qemu-timeout", "255s", "--name", vmi.Name, "--uid", string(vmi.UID)},
		}}},
	}
}

// churn runs migrations of VMIs between nodes without a daemon, each
// through KubeVirt's steps on the VMI (handoff, running, completed and
// relabelled, target label dropped) with its VMIM, and returns how many
// changes it made.
func (f *fleet) churn() int {
	others := min(f.vmis-owned, migrations)
	var mu sync.Mutex
	changes := 0
	// Migration k moves VMI owned + k%others; one VMI's migrations run
	// one after the other.
	parallel(f.b, others, func(j int) error {
		for k := j; k < migrations; k += others {
			if err := f.migrate(owned+j, &mu, &changes); err != nil {
				return err
			}
		}
		return nil
	})
	return changes
}

// migrate moves VMI i to another node without a daemon.
func (f *fleet) migrate(i int, mu *sync.Mutex, changes *int) error {
	mu.Lock()
	f.moved++
	n := f.moved
	mu.Unlock()
	name := vmiName(i)
	from := f.where[i]
	to := nodeName(daemons + (n*7+i)%(nodes-daemons))
	if to == from {
		to = nodeName(daemons + (n*7+i+1)%(nodes-daemons))
	}
	m := &kubevirtv1.VirtualMachineInstanceMigration{
		TypeMeta:   metav1.TypeMeta{APIVersion: "kubevirt.io/v1", Kind: "VirtualMachineInstanceMigration"},
		ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("mig-%05d", n), Namespace: "default", Labels: map[string]string{kubevirtv1.MigrationSelectorLabel: name}},
		Spec:       kubevirtv1.VirtualMachineInstanceMigrationSpec{VMIName: name},
	}
	created := &kubevirtv1.VirtualMachineInstanceMigration{}
	if err := f.kv.Post().Namespace("default").Resource("virtualmachineinstancemigrations").Body(m).Do(f.ctx).Into(created); err != nil {
		return err
	}
	now := time.Now().UTC().Format(time.RFC3339)
	steps := []string{
		fmt.Sprintf(`{"metadata":{"labels":{%q:%q}},"status":{"migrationState":{"migrationUid":%q,"sourceNode":%q,"targetNode":%q,"sourcePod":"virt-launcher-%s","targetPod":"virt-launcher-%s-%d","completed":false}}}`,
			kubevirtv1.MigrationTargetNodeNameLabel, to, created.UID, from, to, name, name, n),
		`{"status":{"migrationState":{"targetNodeAddress":"10.0.0.2"}}}`,
		fmt.Sprintf(`{"status":{"migrationState":{"startTimestamp":%q}}}`, now),
		fmt.Sprintf(`{"metadata":{"labels":{%q:%q}},"status":{"nodeName":%q,"migrationState":{"endTimestamp":%q,"completed":true}}}`, kubevirtv1.NodeNameLabel, to, to, now),
		fmt.Sprintf(`{"metadata":{"labels":{%q:null}}}`, kubevirtv1.MigrationTargetNodeNameLabel),
	}
	for _, s := range steps {
		if err := f.kv.Patch(types.MergePatchType).Namespace("default").Resource("virtualmachineinstances").Name(name).Body([]byte(s)).Do(f.ctx).Error(); err != nil {
			return err
		}
	}
	f.where[i] = to
	mu.Lock()
	*changes += len(steps)
	mu.Unlock()
	return nil
}

// busyStarts are the VM starts made on one daemon's node (busy).
const busyStarts = 100

// measure starts the daemons, lets them sync, churns the cluster, times
// a change of each owned VMI reaching its daemon, and reads the figures;
// with busy, it then starts VMs on the node of a daemon without any and
// counts what that costs the daemon.
func (f *fleet) measure(scale int, busy bool) (Scale, *Busy) {
	b := f.b
	s := Scale{VMIs: scale, Nodes: nodes}
	base, err := f.c.WatchCounts(f.ctx, "pods", "virtualmachineinstances")
	if err != nil {
		b.Fatal(err)
	}
	ds := make([]*daemonProc, daemons)
	parallel(b, daemons, func(i int) error {
		d, err := startDaemon(f.c, nodeName(i), b.TempDir())
		ds[i] = d
		return err
	})
	defer func() {
		for _, d := range ds {
			if d != nil {
				d.stop()
			}
		}
	}()
	time.Sleep(3 * time.Second)
	with, err := f.c.WatchCounts(f.ctx, "pods", "virtualmachineinstances")
	if err != nil {
		b.Fatal(err)
	}
	s.WatchesPerDaemon = float64(with["pods"]+with["virtualmachineinstances"]-base["pods"]-base["virtualmachineinstances"]) / daemons

	before := make([]harness.APICounters, daemons)
	for i, d := range ds {
		before[i] = d.counters(b)
	}
	reads0 := f.readRequests()
	churned := time.Now()
	s.Changes = f.churn()
	time.Sleep(2 * time.Second)
	s.ChurnSeconds = time.Since(churned).Seconds()
	reads := f.readRequests() - reads0
	s.ReadRequestsPerMin = reads / daemons / (s.ChurnSeconds / 60)
	churned0 := make([]harness.APICounters, daemons)
	for i, d := range ds {
		churned0[i] = d.counters(b)
	}

	seen := make([]time.Duration, owned)
	for i := range owned {
		seen[i] = f.timeSeen(ds[i], vmiName(i), scale)
	}
	for i, d := range ds {
		after := d.counters(b)
		dd := Daemon{
			Node: nodeName(i), RSSKiB: d.rssKiB(b), Objects: after.Objects, Requests: after.Requests, Bytes: after.Bytes,
			ChurnObjects: churned0[i].Objects - before[i].Objects, ChurnRequests: churned0[i].Requests - before[i].Requests,
		}
		if i < owned {
			dd.OwnVMIs = 1
			dd.SeenMs = float64(seen[i].Microseconds()) / 1000
		}
		s.Daemons = append(s.Daemons, dd)
	}
	if !busy {
		return s, nil
	}
	d := ds[owned]
	before0 := d.counters(b)
	started := time.Now()
	parallel(b, busyStarts, func(k int) error {
		vmi := fleetVMI(fmt.Sprintf("vm-busy-%03d", k), d.node)
		out := &kubevirtv1.VirtualMachineInstance{}
		if err := f.kv.Post().Namespace("default").Resource("virtualmachineinstances").Body(vmi).Do(f.ctx).Into(out); err != nil {
			return err
		}
		_, err := f.kube.CoreV1().Pods("default").Create(f.ctx, launcherPod(out, d.node), metav1.CreateOptions{})
		return err
	})
	want := before0.Objects + 2*busyStarts
	for time.Since(started) < 30*time.Second && d.counters(b).Objects < want {
		time.Sleep(10 * time.Millisecond)
	}
	after := d.counters(b)
	return s, &Busy{Node: d.node, Starts: busyStarts, Objects: after.Objects - before0.Objects, Requests: after.Requests - before0.Requests, Seconds: time.Since(started).Seconds()}
}

// timeSeen changes the VMI name on d's node and returns how long until d's
// informer of its node's VMIs received it.
func (f *fleet) timeSeen(d *daemonProc, name string, tick int) time.Duration {
	f.b.Helper()
	sel := kubevirtv1.NodeNameLabel + "=" + d.node
	before := d.counters(f.b).BySelector[sel]
	patch := fmt.Sprintf(`{"metadata":{"labels":{"fleet.vmnic.io/tick":"%d"}}}`, tick)
	start := time.Now()
	if err := f.kv.Patch(types.MergePatchType).Namespace("default").Resource("virtualmachineinstances").Name(name).Body([]byte(patch)).Do(f.ctx).Error(); err != nil {
		f.b.Fatal(err)
	}
	for time.Since(start) < 10*time.Second {
		if d.counters(f.b).BySelector[sel] > before {
			return time.Since(start)
		}
		time.Sleep(time.Millisecond)
	}
	f.b.Fatalf("a change of %s did not reach the vmnicd of %s in 10 s", name, d.node)
	return 0
}

// readRequests is the API server's count of read requests (GET, LIST,
// WATCH) on pods and VMIs so far.
func (f *fleet) readRequests() float64 {
	total := 0
	for _, verb := range []string{"GET", "LIST", "WATCH"} {
		got, err := f.c.SumByResource(f.ctx, "apiserver_request_total", verb, "pods", "virtualmachineinstances")
		if err != nil {
			f.b.Fatal(err)
		}
		total += got["pods"] + got["virtualmachineinstances"]
	}
	return float64(total)
}

// daemonProc is one vmnicd process.
type daemonProc struct {
	node string
	n    *harness.Node
	p    *harness.DaemonProcess
	addr string
}

// startDaemon runs the vmnicd binary for node, as the chart starts it
// but for what a node without OVS or a CNI differs in.
func startDaemon(c *cluster.Cluster, node, dir string) (*daemonProc, error) {
	n := harness.NewHostNode(dir)
	p, err := n.StartVmnicd("--kubeconfig", c.Kubeconfig, "--node-name", node,
		"--metrics-addr", "127.0.0.1:0", "--capabilities=false", "--ovsdb", "", "--drain-timeout", "5s")
	if err != nil {
		n.Close()
		return nil, err
	}
	st, err := p.Status(context.Background())
	if err != nil {
		n.Close()
		return nil, err
	}
	return &daemonProc{node: node, n: n, p: p, addr: st.MetricsAddr}, nil
}

func (d *daemonProc) stop() {
	_ = d.p.Stop()
	d.n.Close()
}

func (d *daemonProc) rssKiB(b *testing.B) int64 {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", d.p.Cmd.Process.Pid))
	if err != nil {
		b.Fatal(err)
	}
	for l := range strings.Lines(string(raw)) {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			kib, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return kib
		}
	}
	b.Fatal("no VmRSS")
	return 0
}

// counters are what d says it received and asked.
func (d *daemonProc) counters(b *testing.B) harness.APICounters {
	resp, err := http.Get("http://" + d.addr + "/metrics")
	if err != nil {
		b.Fatal(err)
	}
	defer func() { _ = resp.Body.Close() }()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		b.Fatal(err)
	}
	return harness.ParseAPICounters(string(raw))
}

// parallel runs do(0..n-1) on writers goroutines and fails on the first
// error.
func parallel(b *testing.B, n int, do func(i int) error) {
	b.Helper()
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	next := make(chan int)
	for range writers {
		wg.Go(func() {
			for i := range next {
				if err := do(i); err != nil {
					select {
					case errs <- err:
					default:
					}
				}
			}
		})
	}
	for i := range n {
		next <- i
	}
	close(next)
	wg.Wait()
	select {
	case err := <-errs:
		b.Fatal(err)
	default:
	}
}

func logScale(b *testing.B, s Scale) {
	m := func(fig func(Daemon) float64) float64 { return Median(s.Daemons, fig, nil) }
	b.Logf("%d VMIs on %d nodes: per daemon RSS median %.1f MiB, objects median %.0f, bytes median %.0f, requests median %.0f; churn (%d changes in %.1fs): objects median %.0f, requests median %.0f; own VMI change seen median %.1f ms; watches per daemon %.2f; read requests %.2f per daemon-minute",
		s.VMIs, s.Nodes,
		m(func(d Daemon) float64 { return float64(d.RSSKiB) / 1024 }),
		m(func(d Daemon) float64 { return d.Objects }),
		m(func(d Daemon) float64 { return d.Bytes }),
		m(func(d Daemon) float64 { return d.Requests }),
		s.Changes, s.ChurnSeconds,
		m(func(d Daemon) float64 { return d.ChurnObjects }),
		m(func(d Daemon) float64 { return d.ChurnRequests }),
		Median(s.Daemons, func(d Daemon) float64 { return d.SeenMs }, OwnsVMI),
		s.WatchesPerDaemon, s.ReadRequestsPerMin)
}

func repoRoot(b *testing.B) string {
	root, err := harness.RepoRoot()
	if err != nil {
		b.Fatal(err)
	}
	return root
}
