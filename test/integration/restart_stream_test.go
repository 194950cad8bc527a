package integration

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vmnic/vmnic/pkg/ctl"
	"github.com/vmnic/vmnic/pkg/state"
	"github.com/vmnic/vmnic/test/harness"
)

// TestDaemonRestartsDuringStream runs 500 CNI operations (ADD and DEL of
// masquerade VM NICs, two at a time) through libcni while vmnicd is
// restarted every 1.5 s, alternately with SIGTERM and SIGKILL. No
// operation fails (the shim waits for the daemon within readyTimeout and
// spools DELs); at the end the spool is replayed, only the long-lived
// attachments are on record, and their DHCP servers run again.
func TestDaemonRestartsDuringStream(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	t.Cleanup(cancel)
	node, _ := newNode(t, false)
	d, err := node.StartDaemonProcess("--metrics-addr=")
	if err != nil {
		t.Fatal(err)
	}
	bin := d.Cmd.Path
	l := list(t, node, harness.NetOptions{Vmnic: true, VM: vm1, Subnet6: "-"})

	// Long-lived VM pods whose DHCP servers must survive every restart.
	var keep []*harness.Pod
	for i := range 3 {
		p := newPod(t, fmt.Sprintf("virt-launcher-keep%d-x", i))
		if _, err := node.Add(ctx, l, p); err != nil {
			t.Fatal(err)
		}
		keep = append(keep, p)
	}

	const total = 500
	var ops, restarts atomic.Int64
	var mu sync.Mutex
	var failures []string
	stop := make(chan struct{})
	var dmu sync.Mutex
	restarter := make(chan struct{})
	go func() {
		defer close(restarter)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			case <-time.After(1500 * time.Millisecond):
			}
			dmu.Lock()
			if i%2 == 0 {
				_ = d.Stop()
			} else {
				d.Kill()
			}
			nd, err := node.StartDaemonBinary(bin, fmt.Sprintf("vmnicd-%d.log", i), "--metrics-addr=")
			if err != nil {
				mu.Lock()
				failures = append(failures, "restart: "+err.Error())
				mu.Unlock()
				dmu.Unlock()
				return
			}
			d = nd
			dmu.Unlock()
			restarts.Add(1)
		}
	}()
	var wg sync.WaitGroup
	for w := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; ops.Load() < total; i += 2 {
				p, err := harness.NewPod(fmt.Sprintf("virt-launcher-s%d-x", i%50))
				if err != nil {
					t.Error(err)
					return
				}
				_, aerr := node.Add(ctx, l, p)
				derr := node.Del(ctx, l, p)
				p.Close()
				ops.Add(2)
				if aerr != nil || derr != nil {
					mu.Lock()
					failures = append(failures, fmt.Sprintf("op %d: ADD %v, DEL %v", i, aerr, derr))
					mu.Unlock()
				}
			}
		}()
	}
	wg.Wait()
	close(stop)
	<-restarter
	t.Logf("%d operations across %d daemon restarts", ops.Load(), restarts.Load())
	for _, f := range failures {
		t.Error(f)
	}
	if restarts.Load() < 5 {
		t.Errorf("only %d restarts happened: the stream was not exercised", restarts.Load())
	}

	// The last daemon replays what is spooled and restores the DHCP
	// servers of the live attachments.
	deadline := time.Now().Add(30 * time.Second)
	var st *struct{ servers, pending int }
	for time.Now().Before(deadline) {
		s, err := ctl.Status(ctx, node.Socket())
		if err == nil && s.Ready {
			st = &struct{ servers, pending int }{s.DHCPServers, s.PendingDELs}
			if s.PendingDELs == 0 && s.DHCPServers == len(keep) {
				break
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
	if st == nil || st.pending != 0 || st.servers != len(keep) {
		t.Errorf("after the stream: %+v, want 0 spooled DELs and %d DHCP servers", st, len(keep))
	}
	store, err := state.Open(filepath.Join(node.StateDir(), "attachments"))
	if err != nil {
		t.Fatal(err)
	}
	recs, bad, err := store.List()
	if err != nil || len(bad) != 0 || len(recs) != len(keep) {
		t.Errorf("records after the stream: %d (unreadable %v, %v), want the %d long-lived ones", len(recs), bad, err, len(keep))
	}
	if ents, _ := os.ReadDir(node.SpoolDir()); len(ents) != 0 {
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		t.Errorf("spool not empty: %v", names)
	}
	for _, p := range keep {
		links := podLinks(t, p)
		if links["k6t-eth0"] == nil || links["tap0"] == nil {
			t.Errorf("long-lived %s lost its NIC: %v", p.Name, keys(links))
		}
		if err := node.Check(ctx, l, p); err != nil {
			t.Errorf("CHECK %s after the stream: %v", p.Name, err)
		}
		if err := node.Del(ctx, l, p); err != nil {
			t.Fatal(err)
		}
	}
	dmu.Lock()
	defer dmu.Unlock()
	_ = d.Stop()
}
