package integration

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"k8s.io/client-go/kubernetes"

	"github.com/vmnic/vmnic/pkg/kubevirt"
	"github.com/vmnic/vmnic/test/cluster"
	"github.com/vmnic/vmnic/test/harness"
)

func rssKiB(pid int) (int, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "VmRSS:") {
			return strconv.Atoi(strings.Fields(l)[1])
		}
	}
	return 0, fmt.Errorf("no VmRSS for %d", pid)
}

func waitLog(path, needle string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if b, _ := os.ReadFile(path); strings.Contains(string(b), needle) {
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("%q not in %s after %s", needle, path, timeout)
}

// BenchmarkInformerMemory measures vmnicd's resident memory with 250 VM
// pods (and their VMIs) on its node and 250 pods on another node, against a
// real API server, next to the same binary running standalone. It runs
// once whatever b.N is.
func BenchmarkInformerMemory(b *testing.B) {
	ctx := context.Background()
	c := cluster.StartT(b)
	if err := c.InstallKubeVirtCRDs(ctx); err != nil {
		b.Fatal(err)
	}
	kube, err := kubernetes.NewForConfig(c.Config)
	if err != nil {
		b.Fatal(err)
	}
	const perNode = 250
	for i := 0; i < perNode; i++ {
		vmi := createVMI(ctx, b, c, fmt.Sprintf("vm-%03d", i), kubevirt.DefaultBinding)
		createLauncherPodOn(ctx, b, kube, vmi, fmt.Sprintf("virt-launcher-vm-%03d-abcde", i), "node-a")
		createLauncherPodOn(ctx, b, kube, vmi, fmt.Sprintf("virt-launcher-vm-%03d-other", i), "node-b")
	}
	measure := func(node *harness.Node, name string, args ...string) int {
		d, err := node.StartDaemonProcess(args...)
		if err != nil {
			b.Fatal(err)
		}
		defer func() { _ = d.Stop() }()
		if err := waitLog(d.Log, `"msg":"ready"`, time.Minute); err != nil {
			log, _ := os.ReadFile(d.Log)
			b.Fatalf("%v\n%s", err, log)
		}
		time.Sleep(2 * time.Second) // let the heap settle after the initial list
		kib, err := rssKiB(d.Cmd.Process.Pid)
		if err != nil {
			b.Fatal(err)
		}
		b.Logf("%s: RSS %d KiB", name, kib)
		return kib
	}
	node, _ := newNode(b, false)
	standalone := measure(node, "standalone")
	node2, _ := newNode(b, false)
	node2.DaemonInHostNetns = true // the API server listens on the host's loopback
	withInformers := measure(node2, "cluster, 250 VM pods", "--kubeconfig", c.Kubeconfig, "--node-name", "node-a")
	b.ReportMetric(float64(standalone)/1024, "standalone-rss-MiB")
	b.ReportMetric(float64(withInformers)/1024, "cluster-250vm-rss-MiB")
}
