package integration

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/vmnic/vmnic/pkg/spool"
	"github.com/vmnic/vmnic/test/harness"
)

func orNow(t time.Time) time.Time {
	if t.IsZero() {
		return time.Now()
	}
	return t
}

// TestRollout upgrades vmnic under load, as a DaemonSet rolling update does:
// the old vmnicd serves a stream of CNI ADD/DEL of VM pods through the shim
// it installed, is stopped (SIGTERM), and the new version installs its shim
// over the old one and takes over. Every operation must succeed (the shim's
// bounded readiness wait and the DEL spool absorb the gap), no exec may hit
// a half-written binary, and the conflist must hold vmnic exactly once.
func TestRollout(t *testing.T) {
	ctx := ctxT(t)
	node, _ := newNode(t, false)
	binDir, confDir := t.TempDir(), t.TempDir()
	v1Shim, v1Daemon, err := harness.BuildVersion(t.TempDir(), "v1")
	if err != nil {
		t.Fatal(err)
	}
	v2Shim, v2Daemon, err := harness.BuildVersion(t.TempDir(), "v2")
	if err != nil {
		t.Fatal(err)
	}
	// The primary CNI's own conflist, without vmnic.
	primary, err := node.ConfList(harness.NetOptions{Subnet6: "-"})
	if err != nil {
		t.Fatal(err)
	}
	confFile := filepath.Join(confDir, "10-ptp.conflist")
	if err := os.WriteFile(confFile, primary, 0o644); err != nil {
		t.Fatal(err)
	}
	args := []string{"--install-from", "", "--cni-bin-dir", binDir, "--cni-conf-dir", confDir}
	start := func(shimBin, daemonBin, logName string) *harness.DaemonProcess {
		t.Helper()
		a := append([]string(nil), args...)
		a[1] = shimBin
		d, err := node.StartDaemonBinary(daemonBin, logName, a...)
		if err != nil {
			t.Fatal(err)
		}
		return d
	}
	old := start(v1Shim, v1Daemon, "v1.log")
	stopped := false
	t.Cleanup(func() {
		if !stopped {
			_ = old.Stop()
		}
	})

	// The runtime: it execs plugins from the host bin dir first, and reads
	// the conflist from disk before every operation.
	cni := libcni.NewCNIConfigWithCacheDir([]string{binDir, node.BinDir}, filepath.Join(node.Dir, "rollout-cache"), nil)
	var (
		mu       sync.Mutex
		failures []string
		ops      int
		// The window with no daemon at all, and the operations that ran
		// into it.
		gapStart, gapEnd time.Time
		inGap            int
	)
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		if b, _ := os.ReadFile(confFile); bytes.Contains(b, []byte(`"vmnic"`)) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	runOne := func(i int) {
		l, err := libcni.ConfListFromFile(confFile)
		if err != nil {
			mu.Lock()
			failures = append(failures, "read conflist: "+err.Error())
			mu.Unlock()
			return
		}
		pod, err := harness.NewPod("virt-launcher-vm" + string(rune('a'+i%26)) + "-roll")
		if err != nil {
			t.Error(err)
			return
		}
		defer pod.Close()
		began := time.Now()
		err = node.NS.Do(func(ns.NetNS) error {
			if _, err := cni.AddNetworkList(ctx, l, pod.Runtime()); err != nil {
				return err
			}
			return cni.DelNetworkList(ctx, l, pod.Runtime())
		})
		ended := time.Now()
		mu.Lock()
		ops += 2
		if !gapStart.IsZero() && began.Before(orNow(gapEnd)) && ended.After(gapStart) {
			inGap++
		}
		if err != nil {
			failures = append(failures, err.Error())
		}
		mu.Unlock()
	}

	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := 0; w < 2; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; ; i += 2 {
				select {
				case <-stop:
					return
				default:
				}
				runOne(i)
			}
		}()
	}
	time.Sleep(2 * time.Second)
	if err := old.Stop(); err != nil {
		t.Errorf("old daemon exit: %v", err)
	}
	stopped = true
	mu.Lock()
	gapStart = time.Now()
	mu.Unlock()
	// A DaemonSet's old pod is gone before the new one starts: leave a
	// window with no daemon at all.
	time.Sleep(1500 * time.Millisecond)
	newD := start(v2Shim, v2Daemon, "v2.log")
	mu.Lock()
	gapEnd = time.Now()
	mu.Unlock()
	t.Cleanup(func() { _ = newD.Stop() })
	time.Sleep(3 * time.Second)
	close(stop)
	wg.Wait()

	t.Logf("%d CNI operations across the upgrade, %d ADD+DEL pairs overlapped the %s without a daemon", ops, inGap, gapEnd.Sub(gapStart).Round(time.Millisecond))
	if ops < 10 || inGap == 0 {
		t.Errorf("the upgrade was not exercised: %d operations, %d in the gap", ops, inGap)
	}
	for _, f := range failures {
		t.Errorf("operation failed: %s", f)
	}
	got, _ := os.ReadFile(filepath.Join(binDir, "vmnic"))
	want, _ := os.ReadFile(v2Shim)
	if !bytes.Equal(got, want) {
		t.Error("the installed shim is not the new version's")
	}
	var list struct {
		Plugins []map[string]any `json:"plugins"`
	}
	b, _ := os.ReadFile(confFile)
	if err := json.Unmarshal(b, &list); err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, p := range list.Plugins {
		if p["type"] == "vmnic" {
			n++
		}
	}
	if n != 1 || len(list.Plugins) != 2 {
		t.Errorf("conflist has %d vmnic entries among %d plugins, want exactly one after ptp", n, len(list.Plugins))
	}
	// DELs spooled during the gap are replayed by the new daemon.
	deadline = time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if e, _, _ := spool.List(node.SpoolDir()); len(e) == 0 {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if e, _, _ := spool.List(node.SpoolDir()); len(e) != 0 {
		t.Errorf("%d spooled DELs not replayed", len(e))
	}
	if recs, _ := os.ReadDir(filepath.Join(node.StateDir(), "attachments")); len(recs) != 0 {
		var names []string
		for _, r := range recs {
			names = append(names, r.Name())
		}
		t.Errorf("attachment records left: %s", strings.Join(names, ", "))
	}
}
