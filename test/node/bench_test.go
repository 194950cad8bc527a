package node_test

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/vmnic/vmnic/test/guest"
	"github.com/vmnic/vmnic/test/need"
	"github.com/vmnic/vmnic/test/node"
)

// BenchmarkSandboxStart measures, on the real node, the time from a pod's
// creation to Ready for a plain pod and a VM pod (made as KubeVirt's
// controller makes it), with vmnic chained and without, and helm install to
// the DaemonSet Ready. Each of b.N rounds runs the pods without vmnic, then
// helm install, the same pods with vmnic, then helm uninstall, so the two
// arms alternate on one node. Medians over all rounds.
func BenchmarkSandboxStart(b *testing.B) {
	need.NoError(b, node.Check())
	need.NoError(b, guest.Check())
	ctx := b.Context()
	n := node.StartT(b, node.Options{})
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
	const perRound = 3
	times := map[string][]time.Duration{}
	seq := 0
	startPods := func(arm string) {
		for range perRound {
			seq++
			for _, kind := range []string{"plain", "vm"} {
				name := fmt.Sprintf("%s-%d", kind, seq)
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
		startPods("chained")
		if _, err := n.Helm(ctx, "uninstall", node.Release, "--namespace", node.Namespace, "--wait", "--timeout", "2m"); err != nil {
			b.Fatal(err)
		}
		if err := waitUnchained(ctx, n); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	for _, k := range []string{"plain-unchained", "plain-chained", "vm-unchained", "vm-chained", "helm-install"} {
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
