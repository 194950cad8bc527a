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
