// Package watch holds the long test of vmnicd's watches: the vmnicd
// binary against a real API server for over ten minutes, longer than
// client-go's reflector keeps one watch open (5 to 10 minutes), so every
// watch has ended and been opened again. It is a package of its own so
// that `go test ./...` runs it beside the other packages: it spends its
// time waiting, not computing.
package watch

import (
	"bufio"
	"context"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/vmnic/vmnic/pkg/kubevirt"
	"github.com/vmnic/vmnic/test/cluster"
	"github.com/vmnic/vmnic/test/harness"
	"github.com/vmnic/vmnic/test/need"
)

// resources are what vmnicd watches, and how many watches it opens on
// each: the pods of its node; the VMIs on its node and those migrating to
// it.
var (
	resources = []string{"pods", "virtualmachineinstances"}
	watches   = map[string]int{"pods": 1, "virtualmachineinstances": 2}
)

// holdFor is how long the test watches vmnicd: past the reflector's
// longest watch (10 minutes) with room for its renewal.
const holdFor = 10*time.Minute + 30*time.Second

func counts(ctx context.Context, t *testing.T, c *cluster.Cluster, metric string) map[string]int {
	t.Helper()
	got, err := c.SumByResource(ctx, metric, "WATCH", resources...)
	if err != nil {
		t.Fatal(err)
	}
	return got
}

// informerMetric is vmnicd's metric for its informer of resource with
// selector, from its metrics endpoint.
func informerMetric(ctx context.Context, t *testing.T, p *harness.DaemonProcess, metric, resource, selector string) float64 {
	t.Helper()
	st, err := p.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+st.MetricsAddr+"/metrics", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = resp.Body.Close() }()
	sc := bufio.NewScanner(resp.Body)
	prefix := metric + `{resource="` + resource + `",selector="` + selector + `"} `
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), prefix); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatal(err)
			}
			return f
		}
	}
	t.Fatalf("vmnicd's metrics have no %s", strings.TrimSpace(prefix))
	return 0
}

// TestWatchesTenMinutes: the API server counts vmnicd's watches on pods
// and VMIs 30 s after it is ready and again after ten and a half
// minutes, by which time each of them has ended and been opened again
// (the API server counts ended watch requests too); a VMI made then on
// its node reaches vmnicd at once, and one on another node not at all;
// and when vmnicd stops, the watches go.
func TestWatchesTenMinutes(t *testing.T) {
	need.Root(t)
	ctx, cancel := context.WithTimeout(t.Context(), holdFor+3*time.Minute)
	defer cancel()
	c := cluster.StartT(t)
	if err := c.InstallKubeVirtCRDs(ctx); err != nil {
		t.Fatal(err)
	}
	node := harness.NewHostNode(t.TempDir())
	t.Cleanup(node.Close)
	base := counts(ctx, t, c, "apiserver_longrunning_requests")
	p, err := node.StartVmnicd("--kubeconfig", c.Kubeconfig, "--node-name", "node-a",
		"--metrics-addr", "127.0.0.1:0", "--capabilities=false", "--ovsdb", "", "--drain-timeout", "5s")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.Stop() })
	ready := time.Now()

	check := func(when string) map[string]int {
		t.Helper()
		got := counts(ctx, t, c, "apiserver_longrunning_requests")
		for _, r := range resources {
			if got[r] < base[r]+watches[r] {
				t.Fatalf("%s: the API server counts %d watches on %s, %d before vmnicd started; vmnicd opens %d", when, got[r], r, base[r], watches[r])
			}
		}
		st, err := p.Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, w := range st.Watches {
			if !w.Watching || !w.Synced {
				t.Errorf("%s: vmnicd says its watch on %s is not open: %+v", when, w.Resource, w)
			}
		}
		t.Logf("%s: the API server counts watches %v (%v before vmnicd)", when, got, base)
		return got
	}
	time.Sleep(time.Until(ready.Add(30 * time.Second)))
	check("30 s after ready")
	ended30 := counts(ctx, t, c, "apiserver_request_total")

	time.Sleep(time.Until(ready.Add(holdFor)))
	with := check(holdFor.String() + " after ready")
	ended := counts(ctx, t, c, "apiserver_request_total")
	for _, r := range resources {
		if ended[r] <= ended30[r] {
			t.Errorf("after %s no watch on %s ended (%d ended at 30 s, %d now): the reflector renews a watch within 10 minutes", holdFor, r, ended30[r], ended[r])
		}
	}
	t.Logf("watch requests ended since 30 s after ready: %v -> %v (each renewed)", ended30, ended)

	// A VMI made now on vmnicd's node reaches it at once: its VMI
	// informer hears of it. One on another node does not reach it at all.
	kv, err := kubevirt.KubeVirtClient(c.Config)
	if err != nil {
		t.Fatal(err)
	}
	const onNode = kubevirtv1.NodeNameLabel + "=node-a"
	objects := func() float64 {
		return informerMetric(ctx, t, p, "vmnic_informer_objects_received_total", "virtualmachineinstances", onNode)
	}
	makeVMI := func(name, node string) {
		t.Helper()
		vmi := &kubevirtv1.VirtualMachineInstance{
			TypeMeta:   metav1.TypeMeta{APIVersion: "kubevirt.io/v1", Kind: "VirtualMachineInstance"},
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default", Labels: map[string]string{kubevirtv1.NodeNameLabel: node}},
		}
		if err := kv.Post().Namespace("default").Resource("virtualmachineinstances").Body(vmi).Do(ctx).Into(&kubevirtv1.VirtualMachineInstance{}); err != nil {
			t.Fatal(err)
		}
	}
	before := objects()
	makeVMI("vm-elsewhere", "node-b")
	made := time.Now()
	makeVMI("vm-late", "node-a")
	for {
		age := informerMetric(ctx, t, p, "vmnic_informer_last_event_age_seconds", "virtualmachineinstances", onNode)
		since := time.Since(made)
		if time.Duration(age*float64(time.Second)) < since {
			t.Logf("a VMI made on its node after %s reached vmnicd's informer within %s", holdFor, (since - time.Duration(age*float64(time.Second))).Round(time.Millisecond))
			break
		}
		if since > 2*time.Second {
			t.Fatalf("a VMI made after %s did not reach vmnicd within 2 s (its last VMI event is %.1fs old)", holdFor, age)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if got := objects() - before; got != 1 {
		t.Errorf("vmnicd's VMI informer received %v objects for one VMI on its node and one on another, want 1", got)
	}

	// Those watches were vmnicd's.
	if err := p.Stop(); err != nil {
		t.Fatal(err)
	}
	gone, err := c.WaitFewerWatches(ctx, with, resources, 10*time.Second)
	if err != nil {
		t.Fatalf("vmnicd stopped: %v: they were not vmnicd's", err)
	}
	t.Logf("vmnicd stopped: watches %v (with it %v)", gone, with)
}
