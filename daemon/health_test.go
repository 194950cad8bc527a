package daemon

import (
	"context"
	"log/slog"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmnic/vmnic/pkg/kubevirt"
	"github.com/vmnic/vmnic/test/need"
)

// TestHealthz runs the daemon on a real socket and asks /healthz what the
// liveness probe asks: 200 while it serves; 503 naming the cause when the
// GC lock stays taken, and when the socket path was removed.
func TestHealthz(t *testing.T) {
	need.Root(t) // the check calls the socket the way the shim does
	dir := t.TempDir()
	ready := make(chan struct{})
	d, err := New(Options{
		Socket: filepath.Join(dir, "run", "s.sock"), StateDir: filepath.Join(dir, "state"), SpoolDir: filepath.Join(dir, "spool"),
		Logger: slog.New(slog.DiscardHandler), Ready: ready,
	})
	if err != nil {
		t.Fatal(err)
	}
	d.healthTimeout = 300 * time.Millisecond
	h := d.MetricsHandler()
	healthz := func() (int, string) {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest("GET", "/healthz", nil))
		return rec.Code, rec.Body.String()
	}
	if code, body := healthz(); code != 200 {
		t.Errorf("/healthz before Run = %d %s", code, body)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	select {
	case <-ready:
	case <-time.After(10 * time.Second):
		t.Fatal("daemon not ready")
	}
	if code, body := healthz(); code != 200 {
		t.Fatalf("/healthz of a serving daemon = %d %s", code, body)
	}

	d.gc.Lock() // a GC pass that never ends
	code, body := healthz()
	d.gc.Unlock()
	if code != 503 || !strings.Contains(body, "wedged") {
		t.Errorf("/healthz with the GC lock taken = %d %s", code, body)
	}
	if code, body := healthz(); code != 200 {
		t.Errorf("/healthz once the lock is free = %d %s", code, body)
	}

	if err := os.Remove(d.opts.Socket); err != nil {
		t.Fatal(err)
	}
	if code, body := healthz(); code != 503 || !strings.Contains(body, "CNI socket") {
		t.Errorf("/healthz with the socket removed = %d %s", code, body)
	}
}

// TestReadyzWatches: /readyz, the status and the metrics report the facts
// source's watches; readiness fails only for a watch down longer than the
// threshold, and names it.
func TestReadyzWatches(t *testing.T) {
	now := time.Now()
	watches := []kubevirt.WatchHealth{
		{Resource: "pods", Selector: "spec.nodeName=n1", Synced: true, Watching: true, LastEvent: now.Add(-3 * time.Second), Events: 7},
		{Resource: "virtualmachineinstances", Selector: "kubevirt.io/nodeName=n1", Synced: true, Watching: true, LastEvent: now.Add(-time.Second)},
		{Resource: "virtualmachineinstances", Selector: "kubevirt.io/migrationTargetNodeName=n1", Synced: true, Watching: true, LastEvent: now.Add(-time.Second)},
	}
	dir := t.TempDir()
	d, err := New(Options{
		Socket: filepath.Join(dir, "s.sock"), StateDir: filepath.Join(dir, "state"), SpoolDir: filepath.Join(dir, "spool"),
		Logger: slog.New(slog.DiscardHandler), Observe: ObserveOptions{Metrics: NewMetrics(), Cluster: true},
		Watches: func() []kubevirt.WatchHealth { return watches }, WatchDownThreshold: time.Minute,
	})
	if err != nil {
		t.Fatal(err)
	}
	h := d.MetricsHandler()
	get := func(path string) (int, string) {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest("GET", path, nil))
		return rec.Code, rec.Body.String()
	}
	if code, _ := get("/readyz"); code != 503 {
		t.Errorf("/readyz before ready = %d", code)
	}
	d.ready.Store(true)
	if code, body := get("/readyz"); code != 200 {
		t.Errorf("/readyz with every watch up = %d %s", code, body)
	}
	watches[1].Watching, watches[1].DownSince, watches[1].LastError = false, time.Now().Add(-30*time.Second), "watch: connection refused"
	if code, body := get("/readyz"); code != 200 {
		t.Errorf("/readyz with a watch down 30s (threshold 1m) = %d %s", code, body)
	}
	watches[1].DownSince = time.Now().Add(-90 * time.Second)
	code, body := get("/readyz")
	if code != 503 || !strings.Contains(body, "watch on virtualmachineinstances (kubevirt.io/nodeName=n1) down for 1m30s (over 1m0s): watch: connection refused") {
		t.Errorf("/readyz with a watch down 90s = %d %q", code, body)
	}
	st := d.status()
	if len(st.Watches) != 3 || st.Watches[0].Stale || st.Watches[2].Stale || !st.Watches[1].Stale || st.Watches[1].Watching ||
		time.Duration(st.Watches[1].Down) < 90*time.Second || time.Duration(st.WatchDownThreshold) != time.Minute {
		t.Errorf("status watches = %+v, threshold %s", st.Watches, time.Duration(st.WatchDownThreshold))
	}
	_, metrics := get("/metrics")
	for _, want := range []string{
		`vmnic_informer_synced{resource="pods",selector="spec.nodeName=n1"} 1`,
		`vmnic_informer_watch_up{resource="virtualmachineinstances",selector="kubevirt.io/nodeName=n1"} 0`,
		`vmnic_informer_watch_up{resource="virtualmachineinstances",selector="kubevirt.io/migrationTargetNodeName=n1"} 1`,
		`vmnic_informer_watch_up{resource="pods",selector="spec.nodeName=n1"} 1`,
		`vmnic_informer_watch_down_seconds{resource="pods",selector="spec.nodeName=n1"} 0`,
		`vmnic_informer_last_event_age_seconds{resource="pods",selector="spec.nodeName=n1"} 3`,
		`vmnic_informer_objects_received_total{resource="pods",selector="spec.nodeName=n1"} 7`,
	} {
		if !strings.Contains(metrics, want) {
			t.Errorf("metrics lack %s", want)
		}
	}
	if !strings.Contains(metrics, `vmnic_informer_watch_down_seconds{resource="virtualmachineinstances",selector="kubevirt.io/nodeName=n1"} 90`) {
		t.Errorf("metrics: no 90 s down for the VMI watch:\n%s", grepLines(metrics, "vmnic_informer"))
	}
}

func grepLines(s, substr string) string {
	var out []string
	for l := range strings.Lines(s) {
		if strings.Contains(l, substr) {
			out = append(out, strings.TrimSpace(l))
		}
	}
	return strings.Join(out, "\n")
}
