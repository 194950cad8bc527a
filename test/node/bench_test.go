package node_test

import (
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/vmnic/vmnic/test/cluster"
	"github.com/vmnic/vmnic/test/guest"
	"github.com/vmnic/vmnic/test/need"
	"github.com/vmnic/vmnic/test/node"
)

// BenchmarkSandboxStart measures, on a real node with each primary CNI
// (Flannel; Calico and Cilium in node containers, with kube-proxy), the
// time from a pod's creation to Ready for a plain pod and a VM pod (made as
// KubeVirt's controller makes it), with vmnic chained and without, helm
// install to the DaemonSet Ready, and the CNI calls themselves: the
// primary's plugin and vmnic's shim, each timed from its exec to its exit
// (PluginTimer). Each of b.N rounds runs the pods without vmnic, then helm
// install, the same pods with vmnic, then helm uninstall, so the two arms
// alternate on one node. Medians over all rounds.
func BenchmarkSandboxStart(b *testing.B) {
	for _, p := range []struct {
		primary node.Primary
		plugin  string // the primary's own plugin, which the runtime runs first
	}{{node.Flannel, "flannel"}, {node.Calico, "calico"}, {node.Cilium, "cilium-cni"}} {
		b.Run(string(p.primary), func(b *testing.B) { benchSandboxStart(b, p.primary, p.plugin) })
	}
}

func benchSandboxStart(b *testing.B, primary node.Primary, plugin string) {
	opts := node.Options{Primary: primary}
	if primary == node.Flannel {
		need.NoError(b, node.Check())
	} else {
		need.NoError(b, node.CheckContainer())
		opts.Container = true
	}
	if primary == node.Cilium {
		root, err := cluster.RepoRoot()
		if err != nil {
			b.Fatal(err)
		}
		opts.CiliumValues = []string{filepath.Join(root, "deploy", "examples", "masquerade-cilium", "cilium-values.yaml")}
	}
	need.NoError(b, guest.Check())
	ctx := b.Context()
	n := node.StartT(b, opts)
	if err := n.Cluster.InstallKubeVirtCRDs(ctx); err != nil {
		b.Fatal(err)
	}
	if err := n.LabelSchedulable(ctx); err != nil {
		b.Fatal(err)
	}
	img, err := node.BuildVmnicImage(ctx, b.TempDir(), "bench")
	if err != nil {
		b.Fatal(err)
	}
	timer, err := n.TimePlugins(plugin)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = timer.Unwrap() })
	// 4 of each pod per arm and round: 12 samples of each in make bench's
	// 3 rounds.
	const perRound = 4
	times := map[string][]time.Duration{}
	seq := 0
	startPods := func(arm string) {
		for range perRound {
			seq++
			for _, kind := range []string{"plain", "vm"} {
				name := fmt.Sprintf("%s-%s-%d", kind, arm, seq)
				pod := node.PlainPod(name)
				if kind == "vm" {
					var err error
					if _, pod, err = launcherFor(ctx, n, vmnicVMI(name)); err != nil {
						b.Fatal(err)
					}
				}
				start := time.Now()
				created, err := n.Kube.CoreV1().Pods("default").Create(ctx, pod, metav1.CreateOptions{})
				if err != nil {
					b.Fatal(err)
				}
				if _, err := n.WaitPodReadyEvery(ctx, "default", created.Name, 2*time.Minute, 20*time.Millisecond); err != nil {
					b.Fatal(err)
				}
				times[kind+"-"+arm] = append(times[kind+"-"+arm], time.Since(start))
				if err := n.DeletePod(ctx, "default", created.Name, time.Minute); err != nil {
					b.Fatal(err)
				}
			}
		}
	}
	b.ResetTimer()
	for range b.N {
		startPods("unchained")
		start := time.Now()
		if err := n.InstallVmnic(ctx, img); err != nil {
			b.Fatal(err)
		}
		if _, err := n.WaitDaemonSet(ctx, 2*time.Minute); err != nil {
			b.Fatal(err)
		}
		times["helm-install"] = append(times["helm-install"], time.Since(start))
		if err := timer.Wrap("vmnic"); err != nil {
			b.Fatal(err)
		}
		startPods("chained")
		// The chart removes its own shim, not a wrapper.
		if err := timer.Unwrap(); err != nil {
			b.Fatal(err)
		}
		if _, err := n.Helm(ctx, "uninstall", node.Release, "--namespace", node.Namespace, "--wait", "--timeout", "2m"); err != nil {
			b.Fatal(err)
		}
		if err := waitUnchained(ctx, n); err != nil {
			b.Fatal(err)
		}
		if err := timer.Wrap(plugin); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	calls, err := timer.Calls()
	if err != nil {
		b.Fatal(err)
	}
	// Launcher pods are named virt-launcher-<vmi>-<suffix>; the VMIs
	// vm-<arm>-<n>.
	for _, c := range calls {
		if c.Failed {
			b.Errorf("%s %s for %s failed", c.Plugin, c.Command, c.Pod)
			continue
		}
		kind := "plain"
		if strings.HasPrefix(c.Pod, "virt-launcher-") {
			kind = "vm"
		}
		arm := "unchained"
		if strings.Contains(c.Pod, "-chained-") {
			arm = "chained"
		}
		who := "primary"
		if c.Plugin == "vmnic" {
			who = "vmnic"
		}
		k := fmt.Sprintf("%s-%s-%s-%s", who, strings.ToLower(c.Command), kind, arm)
		times[k] = append(times[k], c.Took)
	}
	for _, k := range []string{
		"plain-unchained", "plain-chained", "vm-unchained", "vm-chained", "helm-install",
		"primary-add-vm-unchained", "primary-add-vm-chained", "vmnic-add-vm-chained", "vmnic-del-vm-chained",
		"primary-del-vm-chained", "vmnic-add-plain-chained", "vmnic-del-plain-chained",
	} {
		if len(times[k]) == 0 {
			b.Errorf("no samples of %s", k)
			continue
		}
		b.ReportMetric(float64(median(times[k]).Microseconds())/1000, k+"-ms-median")
	}
}

// waitUnchained waits until the conflist no longer has vmnic's entry.
func waitUnchained(ctx context.Context, n *node.Node) error {
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		types, err := n.ConflistPlugins()
		if err == nil && !slices.Contains(types, "vmnic") {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("conflist still chained after helm uninstall")
}

func median(d []time.Duration) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	return s[len(s)/2]
}
