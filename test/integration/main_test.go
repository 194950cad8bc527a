// Package integration tests vmnic as a node runs it: libcni executing the
// shim and the reference plugins in a sandbox node namespace, the daemon
// serving, real pod namespaces, links, sysctls and nftables. Needs root.
package integration

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"k8s.io/client-go/kubernetes"

	"github.com/vmnic/vmnic/test/cluster"
	"github.com/vmnic/vmnic/test/harness"
)

func TestMain(m *testing.M) {
	if os.Geteuid() != 0 {
		if os.Getenv("CI") != "" {
			println("integration tests need root, and CI is set: failing")
			os.Exit(1)
		}
		println("SKIP: integration tests need root (network namespaces)")
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func logger(t testing.TB) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug})).With("test", t.Name())
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

func ctxT(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// kubeVirtCluster starts an API server with KubeVirt's CRDs and returns
// it, a client and the test's context.
func kubeVirtCluster(t testing.TB) (context.Context, *cluster.Cluster, kubernetes.Interface) {
	t.Helper()
	ctx := ctxT(t)
	c := cluster.StartT(t)
	if err := c.InstallKubeVirtCRDs(ctx); err != nil {
		t.Fatal(err)
	}
	kube, err := kubernetes.NewForConfig(c.Config)
	if err != nil {
		t.Fatal(err)
	}
	return ctx, c, kube
}

// newNode makes a sandbox node with a running daemon.
func newNode(t testing.TB, withDaemon bool) (*harness.Node, *harness.Daemon) {
	t.Helper()
	node, err := harness.NewNode(t.TempDir())
	if err != nil {
		t.Fatalf("node: %v", err)
	}
	t.Cleanup(node.Close)
	if !withDaemon {
		return node, nil
	}
	d := startDaemon(t, node)
	return node, d
}

func startDaemon(t testing.TB, node *harness.Node) *harness.Daemon {
	t.Helper()
	d, err := node.StartDaemon(logger(t))
	if err != nil {
		t.Fatalf("daemon: %v", err)
	}
	t.Cleanup(func() { _ = d.Stop() })
	return d
}

func newPod(t testing.TB, name string) *harness.Pod {
	t.Helper()
	p, err := harness.NewPod(name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	return p
}

func list(t testing.TB, node *harness.Node, o harness.NetOptions) *libcni.NetworkConfigList {
	t.Helper()
	data, err := node.ConfList(o)
	if err != nil {
		t.Fatal(err)
	}
	l, err := harness.List(data)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// podLinks returns the links in the pod netns by name.
func podLinks(t testing.TB, p *harness.Pod) map[string]netlink.Link {
	t.Helper()
	out := map[string]netlink.Link{}
	if p.NS == nil {
		return out
	}
	err := p.NS.Do(func(ns.NetNS) error {
		ls, err := netlinksafe.LinkList()
		if err != nil {
			return err
		}
		for _, l := range ls {
			out[l.Attrs().Name] = l
		}
		return nil
	})
	if err != nil {
		t.Fatalf("list links in pod: %v", err)
	}
	return out
}

func sysctlIn(t testing.TB, p *harness.Pod, name string) string {
	t.Helper()
	var v string
	err := p.NS.Do(func(ns.NetNS) error {
		b, err := os.ReadFile("/proc/sys/" + strings.ReplaceAll(name, ".", "/"))
		v = strings.TrimSpace(string(b))
		return err
	})
	if err != nil {
		t.Fatalf("read %s: %v", name, err)
	}
	return v
}

func writeSysctlIn(t testing.TB, p *harness.Pod, name, v string) {
	t.Helper()
	err := p.NS.Do(func(ns.NetNS) error {
		return os.WriteFile("/proc/sys/"+strings.ReplaceAll(name, ".", "/"), []byte(v), 0o644)
	})
	if err != nil {
		t.Fatalf("write %s: %v", name, err)
	}
}

func toMap(t testing.TB, v any) map[string]any {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	return m
}
