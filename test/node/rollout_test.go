package node_test

import (
	"context"
	"crypto/sha256"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/vmnic/vmnic/test/guest"
	"github.com/vmnic/vmnic/test/node"
)

// testRolloutUnderLoad runs helm upgrade to a new image while plain pods and
// VM pods are created and deleted in a loop, and a live VM (vm, whose guest
// runs on tap with mac) asks for a DHCP lease every half second. In the end
// no pod has failed to start, the Node was Ready throughout, the conflist
// held vmnic's entry exactly once at every sample, the runtime never failed
// to exec the shim (no half-written binary), the new shim is the new
// image's, and the live VM's DHCP server serves again after the rollout.
func testRolloutUnderLoad(ctx context.Context, t *testing.T, n *node.Node, vm *corev1.Pod, tap, mac string) {
	imgDir := t.TempDir()
	img2, err := node.BuildVmnicImage(ctx, imgDir, "v2")
	if err != nil {
		t.Fatal(err)
	}
	// The live VM: a guest on vm's tap renewing its lease.
	netns, err := n.PodNetns(vm.Namespace, vm.Name)
	if err != nil {
		t.Fatal(err)
	}
	gimg, err := guest.Build(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var leases []leaseSample
	script := `
udhcpc -i eth0 -q -f -n -t 10 -T 2 || echo DHCP4-FAILED
echo LOOP-START
i=0; while [ $i -lt 2000 ]; do
  if udhcpc -i eth0 -q -n -t 2 -T 1 -s /bin/true >/dev/null 2>&1; then echo LEASE-OK; else echo LEASE-FAIL; fi
  sleep 0.5; i=$((i+1))
done
`
	g, err := guest.Start(ctx, gimg, guest.Options{
		NetnsPath: netns, Tap: tap, MAC: mac, Script: script, Timeout: 10 * time.Minute,
		Log: func(line string) {
			switch {
			case strings.Contains(line, "LEASE-OK"):
				mu.Lock()
				leases = append(leases, leaseSample{time.Now(), true})
				mu.Unlock()
			case strings.Contains(line, "LEASE-FAIL"):
				mu.Lock()
				leases = append(leases, leaseSample{time.Now(), false})
				mu.Unlock()
			}
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Kill()
	if _, err := g.WaitFor(ctx, regexp.MustCompile(`LEASE-OK`)); err != nil {
		t.Fatalf("the live VM never renewed its lease: %v\n%s", err, g.Output())
	}

	// Samplers: Node readiness and the conflist, every 50 ms.
	ready := n.WatchReady(ctx)
	stop := make(chan struct{})
	var samplers sync.WaitGroup
	var badChain []string
	samplers.Go(func() {
		for {
			b, err := os.ReadFile(n.ConflistPath())
			if err == nil {
				if c := strings.Count(string(b), `"type":"vmnic"`) + strings.Count(string(b), `"type": "vmnic"`); c != 1 {
					badChain = append(badChain, fmt.Sprintf("%s: %d vmnic entries", time.Now().Format("15:04:05.000"), c))
				}
			} else {
				badChain = append(badChain, err.Error())
			}
			select {
			case <-stop:
				return
			case <-time.After(50 * time.Millisecond):
			}
		}
	})
	// The load: two workers, each starting a plain pod and a VM pod at a
	// time (created, Ready, deleted), from before the upgrade until 5 s
	// after the rollout.
	var failed []string
	var fmu sync.Mutex
	rounds := 0
	stopLoad := make(chan struct{})
	var load sync.WaitGroup
	for w := range 2 {
		load.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-stopLoad:
					return
				default:
				}
				var wg sync.WaitGroup
				for _, kind := range []string{"plain", "vm"} {
					wg.Go(func() {
						name := fmt.Sprintf("load-%s-%d-%d", kind, w, i)
						var err error
						if kind == "plain" {
							err = loadPlainPod(ctx, n, name)
						} else {
							err = loadVMPod(ctx, n, name)
						}
						if err != nil {
							fmu.Lock()
							failed = append(failed, err.Error())
							fmu.Unlock()
						}
					})
				}
				wg.Wait()
				fmu.Lock()
				rounds++
				fmu.Unlock()
			}
		})
	}

	time.Sleep(3 * time.Second)
	upgradeStart := time.Now()
	if err := n.UpgradeVmnic(ctx, img2); err != nil {
		t.Fatal(err)
	}
	if _, err := n.WaitDaemonSet(ctx, 3*time.Minute); err != nil {
		t.Fatal(err)
	}
	rolledAt := time.Now()
	t.Logf("helm upgrade to v2 rolled out in %v", rolledAt.Sub(upgradeStart).Round(time.Millisecond))
	time.Sleep(5 * time.Second)
	close(stopLoad)
	load.Wait()
	close(stop)
	samplers.Wait()
	worst := ready.Stop()
	t.Logf("%d load rounds (a plain pod and a VM pod each, two workers); longest Node not-Ready span %v", rounds, worst)

	if len(failed) > 0 {
		t.Errorf("pods failed to start during the rollout:\n%s", strings.Join(failed, "\n"))
	}
	if worst > 0 {
		t.Errorf("the Node was not Ready for %v during the rollout", worst)
	}
	if len(badChain) > 0 {
		t.Errorf("the conflist did not hold vmnic exactly once: %v", badChain)
	}
	// containerd never failed to exec the shim.
	logb, _ := os.ReadFile(filepath.Join(n.Dir, "containerd.log"))
	for _, bad := range []string{"exec format error", "text file busy", "fork/exec " + filepath.Join(n.CNIBinDir, "vmnic")} {
		if strings.Contains(string(logb), bad) {
			t.Errorf("containerd's log has %q: the runtime met a shim it could not run", bad)
		}
	}
	shim, err := os.ReadFile(filepath.Join(n.CNIBinDir, "vmnic"))
	if err != nil {
		t.Fatal(err)
	}
	want, err := os.ReadFile(filepath.Join(imgDir, "image-v2", "bin", "vmnic"))
	if err != nil {
		t.Fatal(err)
	}
	if sha256.Sum256(shim) != sha256.Sum256(want) {
		t.Errorf("the shim after the rollout is not the v2 image's")
	}
	// The live VM's DHCP server serves again: leases after the rollout,
	// and the longest span without one.
	waitFor(ctx, t, time.Minute, "a lease after the rollout", func() (bool, string) {
		mu.Lock()
		defer mu.Unlock()
		for _, l := range leases {
			if l.ok && l.at.After(rolledAt) {
				return true, ""
			}
		}
		return false, fmt.Sprintf("%d samples", len(leases))
	})
	mu.Lock()
	gap, fails := leaseGap(leases)
	mu.Unlock()
	t.Logf("live VM's DHCP during the rollout: %d renewals, %d failed, longest span without a lease %v", len(leases), fails, gap.Round(time.Millisecond))
}

type leaseSample struct {
	at time.Time
	ok bool
}

// leaseGap returns the longest time between two successful renewals and
// the number of failed ones.
func leaseGap(ls []leaseSample) (time.Duration, int) {
	var last time.Time
	var worst time.Duration
	fails := 0
	for _, l := range ls {
		if !l.ok {
			fails++
			continue
		}
		if !last.IsZero() && l.at.Sub(last) > worst {
			worst = l.at.Sub(last)
		}
		last = l.at
	}
	return worst, fails
}

// loadPlainPod starts a plain pod, waits until it is Ready and deletes it.
func loadPlainPod(ctx context.Context, n *node.Node, name string) error {
	return loadPod(ctx, n, node.PlainPod(name))
}

// loadVMPod does the same with a VMI and its launcher pod.
func loadVMPod(ctx context.Context, n *node.Node, name string) error {
	_, pod, err := launcherFor(ctx, n, vmnicVMI(name))
	if err != nil {
		return err
	}
	return loadPod(ctx, n, pod)
}

func loadPod(ctx context.Context, n *node.Node, pod *corev1.Pod) error {
	created, err := n.Kube.CoreV1().Pods("default").Create(ctx, pod, metav1.CreateOptions{})
	if err != nil {
		return err
	}
	if _, err := n.WaitPodReady(ctx, "default", created.Name, 2*time.Minute); err != nil {
		return err
	}
	return n.DeletePod(ctx, "default", created.Name, time.Minute)
}
