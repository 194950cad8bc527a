package integration

import (
	"bytes"
	"encoding/json"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/vmnic/vmnic/pkg/ctl"
	"github.com/vmnic/vmnic/pkg/spool"
	"github.com/vmnic/vmnic/test/harness"
)

// countingSocket listens where the daemon would and counts connections, to
// prove the fast path never contacts the daemon.
func countingSocket(t *testing.T, path string) *atomic.Int64 {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	var n atomic.Int64
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			n.Add(1)
			_ = c.Close()
		}
	}()
	return &n
}

// TestNonVMPodPassThrough: with the daemon stopped, a non-VM pod's result
// through the chained list is exactly the primary plugin's, and the daemon's
// socket is never touched.
func TestNonVMPodPassThrough(t *testing.T) {
	for _, v := range []string{"0.3.1", "0.4.0", "1.0.0", "1.1.0"} {
		t.Run(v, func(t *testing.T) {
			ctx := ctxT(t)
			node, _ := newNode(t, false)
			conns := countingSocket(t, node.Socket())

			// The primary alone, for the reference result.
			plain := list(t, node, harness.NetOptions{CNIVersion: v, Name: "podnet"})
			ref := newPod(t, "nginx-ref")
			want, err := node.Add(ctx, plain, ref)
			if err != nil {
				t.Fatalf("primary-only ADD: %v", err)
			}

			chained := list(t, node, harness.NetOptions{CNIVersion: v, Name: "podnet", Vmnic: true})
			pod := newPod(t, "nginx-7d9f8")
			got, err := node.Add(ctx, chained, pod)
			if err != nil {
				t.Fatalf("chained ADD with the daemon down: %v", err)
			}
			// Same shape, same version; only the allocated addresses and
			// the sandbox path differ between the two pods.
			if got.Version() != want.Version() {
				t.Errorf("version %s, want %s", got.Version(), want.Version())
			}
			gm, wm := toMap(t, got), toMap(t, want)
			if len(gm["ips"].([]any)) != len(wm["ips"].([]any)) || len(gm["interfaces"].([]any)) != len(wm["interfaces"].([]any)) {
				t.Errorf("chained result %v differs in shape from the primary's %v", gm, wm)
			}
			if v != "0.3.1" {
				if err := node.Check(ctx, chained, pod); err != nil {
					t.Errorf("CHECK: %v", err)
				}
			}
			if err := node.Del(ctx, chained, pod); err != nil {
				t.Errorf("DEL: %v", err)
			}
			_ = node.Del(ctx, plain, ref)
			if n := conns.Load(); n != 0 {
				t.Errorf("the fast path contacted the daemon socket %d times", n)
			}
		})
	}
}

// TestShimOutputIsPrevResult execs the shim with a real prevResult and
// compares its stdout with it, for each version.
func TestShimOutputIsPrevResult(t *testing.T) {
	bin, err := harness.BinDir()
	if err != nil {
		t.Fatal(err)
	}
	prevs := map[string]string{
		"0.3.1": `{"cniVersion":"0.3.1","interfaces":[{"name":"eth0","mac":"aa:bb:cc:dd:ee:ff","sandbox":"/var/run/netns/p"}],"ips":[{"version":"4","address":"198.18.0.5/24","gateway":"198.18.0.1","interface":0},{"version":"6","address":"fd00:198:18::5/64","interface":0}],"routes":[{"dst":"0.0.0.0/0"}],"dns":{"nameservers":["198.18.0.53"]}}`,
		"1.0.0": `{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","mac":"aa:bb:cc:dd:ee:ff","sandbox":"/var/run/netns/p"}],"ips":[{"address":"198.18.0.5/24","gateway":"198.18.0.1","interface":0}],"routes":[{"dst":"0.0.0.0/0","gw":"198.18.0.1"}],"dns":{"nameservers":["198.18.0.53"],"search":["svc.cluster.local"]}}`,
		"1.1.0": `{"cniVersion":"1.1.0","interfaces":[{"name":"eth0","mac":"aa:bb:cc:dd:ee:ff","mtu":1480,"sandbox":"/var/run/netns/p","socketPath":"/x"}],"ips":[{"address":"fd00:198:18::5/64","interface":0}],"routes":[{"dst":"::/0","mtu":1400,"advmss":1360,"priority":10,"table":100,"scope":0}]}`,
	}
	for v, prev := range prevs {
		t.Run(v, func(t *testing.T) {
			conf := `{"cniVersion":"` + v + `","name":"podnet","type":"vmnic","mode":"masquerade","socket":"/nonexistent/vmnic.sock","prevResult":` + prev + `}`
			cmd := exec.Command(filepath.Join(bin, "vmnic"))
			cmd.Env = []string{
				"CNI_COMMAND=ADD", "CNI_CONTAINERID=c1", "CNI_NETNS=/proc/1/ns/net", "CNI_IFNAME=eth0",
				"CNI_PATH=" + bin, "CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0",
			}
			cmd.Stdin = bytes.NewBufferString(conf)
			out, err := cmd.Output()
			if err != nil {
				t.Fatalf("shim ADD: %v (%s)", err, out)
			}
			var got, want any
			if err := json.Unmarshal(out, &got); err != nil {
				t.Fatalf("shim output %q: %v", out, err)
			}
			_ = json.Unmarshal([]byte(prev), &want)
			if !reflect.DeepEqual(got, want) {
				t.Errorf("shim output differs from prevResult:\n got %s\nwant %s", out, prev)
			}
		})
	}
}

// TestVMPodDaemonDown: ADD of a VM pod waits for the daemon up to
// readyTimeout, then fails with code 11 (try again later).
func TestVMPodDaemonDown(t *testing.T) {
	ctx := ctxT(t)
	node, _ := newNode(t, false)
	l := list(t, node, harness.NetOptions{Vmnic: true, VM: vm1, ReadyTimeout: "1s"})
	pod := newPod(t, "virt-launcher-vm1-nodaemon")
	start := time.Now()
	_, err := node.Add(ctx, l, pod)
	elapsed := time.Since(start)
	var te *types.Error
	if !errors.As(err, &te) || te.Code != types.ErrTryAgainLater {
		t.Fatalf("ADD with the daemon down = %v, want CNI error 11", err)
	}
	// Bounded: the shim gives up after readyTimeout (1s); the slack covers
	// the primary plugin and a loaded machine, not a second wait.
	if elapsed > 15*time.Second {
		t.Errorf("ADD took %s with readyTimeout 1s", elapsed)
	}
	t.Logf("ADD failed with code 11 after %s (readyTimeout 1s): %v", elapsed.Round(time.Millisecond), te)
	_ = node.Del(ctx, l, pod) // spooled; the pod was never wired
}

// TestDelSpooledWhileDaemonDown: DEL succeeds while the daemon is away, is
// spooled, and the daemon replays it when it starts.
func TestDelSpooledWhileDaemonDown(t *testing.T) {
	ctx := ctxT(t)
	node, d := newNode(t, true)
	l := list(t, node, harness.NetOptions{Vmnic: true, VM: vm1})
	pod := newPod(t, "virt-launcher-vm1-spool")
	if _, err := node.Add(ctx, l, pod); err != nil {
		t.Fatalf("ADD: %v", err)
	}
	if err := d.Stop(); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 2; i++ {
		if err := node.Del(ctx, l, pod); err != nil {
			t.Fatalf("DEL #%d with the daemon down: %v", i+1, err)
		}
	}
	entries, _, err := spool.List(node.SpoolDir())
	if err != nil || len(entries) != 1 {
		t.Fatalf("spool has %d entries (%v), want 1", len(entries), err)
	}
	if podLinks(t, pod)["k6t-eth0"] == nil {
		t.Fatal("bridge gone before the daemon came back: DEL was not spooled but done?")
	}
	startDaemon(t, node)
	assertClean(t, pod, node.StateDir())
	if entries, _, _ := spool.List(node.SpoolDir()); len(entries) != 0 {
		t.Errorf("spool not emptied: %d entries", len(entries))
	}
}

// TestDelSpooledAfterDaemonStart: a DEL the shim spooled while a new
// daemon was starting, after that daemon's first replay (the old one's
// socket gone, the new one's not there yet), is replayed within seconds,
// not at the next resync minutes later. The entry is held outside the
// spool directory while the daemon starts, and put back once it is ready.
func TestDelSpooledAfterDaemonStart(t *testing.T) {
	ctx := ctxT(t)
	node, d := newNode(t, true)
	l := list(t, node, harness.NetOptions{Vmnic: true, VM: vm1})
	pod := newPod(t, "virt-launcher-vm1-late")
	if _, err := node.Add(ctx, l, pod); err != nil {
		t.Fatalf("ADD: %v", err)
	}
	if err := d.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := node.Del(ctx, l, pod); err != nil {
		t.Fatalf("DEL with the daemon down: %v", err)
	}
	entries, _, err := spool.List(node.SpoolDir())
	if err != nil || len(entries) != 1 {
		t.Fatalf("spool has %d entries (%v), want 1", len(entries), err)
	}
	held := filepath.Join(t.TempDir(), filepath.Base(entries[0].Path))
	if err := os.Rename(entries[0].Path, held); err != nil {
		t.Fatal(err)
	}
	startDaemon(t, node)
	// Ready: the daemon's first replay is behind it.
	for ready := false; !ready; {
		st, err := ctl.Status(ctx, node.Socket())
		ready = err == nil && st.Ready
		if ctx.Err() != nil {
			t.Fatal("the daemon did not become ready")
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err := os.Rename(held, entries[0].Path); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		left, _, _ := spool.List(node.SpoolDir())
		if len(left) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("a DEL spooled after the daemon's start is still spooled after 10 s")
		}
		time.Sleep(100 * time.Millisecond)
	}
	assertClean(t, pod, node.StateDir())
}

// TestSocketNotOwnedByRoot: the shim refuses a socket another user owns.
func TestSocketNotOwnedByRoot(t *testing.T) {
	ctx := ctxT(t)
	node, _ := newNode(t, true)
	if err := os.Chown(node.Socket(), 65534, 65534); err != nil {
		t.Fatal(err)
	}
	l := list(t, node, harness.NetOptions{Vmnic: true, VM: vm1, ReadyTimeout: "1s"})
	pod := newPod(t, "virt-launcher-vm1-untrusted")
	_, err := node.Add(ctx, l, pod)
	var te *types.Error
	if !errors.As(err, &te) || te.Code != types.ErrIOFailure {
		t.Fatalf("ADD through a socket owned by uid 65534 = %v, want CNI error 5", err)
	}
	_ = os.Chown(node.Socket(), 0, 0)
	_ = node.Del(ctx, l, pod)
}

func TestSocketPermissions(t *testing.T) {
	node, _ := newNode(t, true)
	st, err := os.Stat(node.Socket())
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 || st.Mode().Type() != os.ModeSocket {
		t.Errorf("socket mode %v, want socket 0600", st.Mode())
	}
	dst, err := os.Stat(filepath.Dir(node.Socket()))
	if err != nil {
		t.Fatal(err)
	}
	if dst.Mode().Perm() != 0o700 {
		t.Errorf("socket dir mode %v, want 0700", dst.Mode().Perm())
	}
}

// TestDaemonProcessSIGTERM runs the real vmnicd binary: it serves, and on
// SIGTERM exits cleanly and removes its socket.
func TestDaemonProcessSIGTERM(t *testing.T) {
	ctx := ctxT(t)
	node, _ := newNode(t, false)
	d, err := node.StartDaemonProcess()
	if err != nil {
		t.Fatal(err)
	}
	l := list(t, node, harness.NetOptions{Vmnic: true, VM: vm1})
	pod := newPod(t, "virt-launcher-vm1-proc")
	if _, err := node.Add(ctx, l, pod); err != nil {
		t.Fatalf("ADD via the vmnicd process: %v", err)
	}
	if err := node.Del(ctx, l, pod); err != nil {
		t.Fatalf("DEL: %v", err)
	}
	if err := d.Stop(); err != nil {
		log, _ := os.ReadFile(d.Log)
		t.Fatalf("vmnicd exit after SIGTERM: %v\n%s", err, log)
	}
	if _, err := os.Stat(node.Socket()); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket left after SIGTERM: %v", err)
	}
}

// TestDaemonInstallsAndChains: vmnicd started as the DaemonSet starts it
// installs the shim and chains vmnic into the primary's conflist before it
// is ready, and re-chains when the primary rewrites its file.
func TestDaemonInstallsAndChains(t *testing.T) {
	node, _ := newNode(t, false)
	binDir, confDir := t.TempDir(), t.TempDir()
	calico := `{"cniVersion":"1.0.0","name":"k8s-pod-network","plugins":[{"type":"calico","ipam":{"type":"calico-ipam"}},{"type":"portmap","capabilities":{"portMappings":true}}]}`
	primary := filepath.Join(confDir, "10-calico.conflist")
	if err := os.WriteFile(primary, []byte(calico), 0o644); err != nil {
		t.Fatal(err)
	}
	d, err := node.StartDaemonProcess("--install-from", filepath.Join(node.BinDir, "vmnic"), "--cni-bin-dir", binDir, "--cni-conf-dir", confDir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = d.Stop() })
	chainedTypes := func() []string {
		var l struct {
			Plugins []struct {
				Type string `json:"type"`
			} `json:"plugins"`
		}
		b, _ := os.ReadFile(primary)
		_ = json.Unmarshal(b, &l)
		var ts []string
		for _, p := range l.Plugins {
			ts = append(ts, p.Type)
		}
		return ts
	}
	// Ready (socket answering) implies the install finished; give the
	// readiness a moment since the socket listens before Prepare ends.
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) && len(chainedTypes()) != 3 {
		time.Sleep(50 * time.Millisecond)
	}
	if got := chainedTypes(); !reflect.DeepEqual(got, []string{"calico", "portmap", "vmnic"}) {
		t.Fatalf("conflist plugins %v, want calico, portmap, vmnic", got)
	}
	if st, err := os.Stat(filepath.Join(binDir, "vmnic")); err != nil || st.Mode().Perm() != 0o755 {
		t.Fatalf("shim not installed: %v", err)
	}
	// The primary CNI rewrites its file without vmnic: re-chained.
	if err := os.WriteFile(primary+".tmp", []byte(calico), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(primary+".tmp", primary); err != nil {
		t.Fatal(err)
	}
	deadline = time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) && len(chainedTypes()) != 3 {
		time.Sleep(50 * time.Millisecond)
	}
	if got := chainedTypes(); !reflect.DeepEqual(got, []string{"calico", "portmap", "vmnic"}) {
		t.Errorf("after the primary's rewrite: plugins %v", got)
	}
}
