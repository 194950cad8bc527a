package install

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// waitTimeout bounds every wait on Watch.
const waitTimeout = 10 * time.Second

// watcher runs Watch on opts for one test and records its Chain results.
type watcher struct {
	t      *testing.T
	cancel context.CancelFunc
	done   chan error

	mu      sync.Mutex
	calls   int
	written []string // File of every Chain that wrote
}

func startWatch(t *testing.T, opts Options) *watcher {
	t.Helper()
	w := &watcher{t: t, done: make(chan error, 1)}
	opts.OnChain = func(res ChainResult, err error) {
		w.mu.Lock()
		defer w.mu.Unlock()
		w.calls++
		if err == nil && res.Changed {
			w.written = append(w.written, filepath.Base(res.File))
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	w.cancel = cancel
	go func() { w.done <- Watch(ctx, opts) }()
	t.Cleanup(w.stop)
	return w
}

// stop cancels Watch and checks it returns promptly and cleanly.
func (w *watcher) stop() {
	w.t.Helper()
	if w.cancel == nil {
		return
	}
	w.cancel()
	w.cancel = nil
	select {
	case err := <-w.done:
		if err != nil {
			w.t.Errorf("Watch returned %v", err)
		}
	case <-time.After(waitTimeout):
		w.t.Error("Watch did not return after cancel")
	}
}

func (w *watcher) stats() (int, []string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.calls, append([]string(nil), w.written...)
}

// waitChained waits until path carries vmnic's entry.
func waitChained(t *testing.T, path string) {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	for time.Now().Before(deadline) {
		if data, err := os.ReadFile(path); err == nil && bytes.Contains(data, []byte(`"vmnic"`)) {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("%s not chained within %v", path, waitTimeout)
}

// waitQuiet waits until Watch has made no Chain call for a while, and
// returns the stats then.
func (w *watcher) waitQuiet(quiet time.Duration) (int, []string) {
	w.t.Helper()
	deadline := time.Now().Add(waitTimeout)
	calls, _ := w.stats()
	for time.Now().Before(deadline) {
		time.Sleep(quiet)
		now, written := w.stats()
		if now == calls {
			return now, written
		}
		calls = now
	}
	w.t.Fatalf("Watch still chaining after %v: it loops", waitTimeout)
	return 0, nil
}

// TestWatch: Watch chains at start, chains again when the primary CNI
// rewrites its file (by rename, and in place), chains a new primary that
// appears first in order, and does not loop on its own writes.
func TestWatch(t *testing.T) {
	dir := t.TempDir()
	calico := filepath.Join(dir, "10-calico.conflist")
	orig := readFile(t, "testdata/calico.conflist")
	writeFile(t, calico, orig, 0o644)
	opts := testOptions(t, dir)
	opts.Debounce = 20 * time.Millisecond
	opts.Resync = time.Hour // events only
	w := startWatch(t, opts)

	waitChained(t, calico)
	chained := readFile(t, calico)
	w.waitQuiet(200 * time.Millisecond)

	// Calico's agent restarts and writes its conflist again, by rename.
	replaceFile(t, calico, orig)
	waitChained(t, calico)
	w.waitQuiet(200 * time.Millisecond)
	if !bytes.Equal(readFile(t, calico), chained) {
		t.Errorf("re-chained file differs:\n%s", readFile(t, calico))
	}

	// And in place.
	if err := os.WriteFile(calico, orig, 0o644); err != nil {
		t.Fatal(err)
	}
	waitChained(t, calico)
	w.waitQuiet(200 * time.Millisecond)

	// Cilium comes, first in order.
	cilium := filepath.Join(dir, "05-cilium.conflist")
	replaceFile(t, cilium, readFile(t, "testdata/cilium.conflist"))
	waitChained(t, cilium)

	calls, written := w.waitQuiet(300 * time.Millisecond)
	want := []string{"10-calico.conflist", "10-calico.conflist", "10-calico.conflist", "05-cilium.conflist"}
	if len(written) != len(want) {
		t.Errorf("Watch wrote %v, want %v", written, want)
	}
	// Each change is one Chain that writes and one, for that write's own
	// event, that does not; a few more when events straddle the debounce.
	if calls > 3*len(want) {
		t.Errorf("%d Chain calls for %d changes", calls, len(want))
	}
	t.Logf("%d Chain calls, wrote %v", calls, written)
}

// TestWatchDirAppears: a config dir missing at start (the primary CNI not
// installed yet) is watched once it appears.
func TestWatchDirAppears(t *testing.T) {
	old := watchRetry
	watchRetry = 20 * time.Millisecond
	t.Cleanup(func() { watchRetry = old })

	dir := filepath.Join(t.TempDir(), "net.d")
	opts := testOptions(t, dir)
	opts.Debounce = 20 * time.Millisecond
	opts.Resync = time.Hour
	w := startWatch(t, opts)
	time.Sleep(100 * time.Millisecond)

	calico := filepath.Join(dir, "10-calico.conflist")
	writeFile(t, calico, []byte(calicoList), 0o644)
	waitChained(t, calico)

	// The dir goes and comes back: watched again.
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	writeFile(t, calico, []byte(calicoList), 0o644)
	waitChained(t, calico)
	w.stop()
}

// TestWatchResync: what inotify cannot see (a file behind a symlink into a
// subdirectory changes) is chained by the periodic resync.
func TestWatchResync(t *testing.T) {
	dir := t.TempDir()
	real := filepath.Join(dir, "calico", "calico.conflist")
	writeFile(t, real, []byte(calicoList), 0o644)
	if err := os.Symlink("calico/calico.conflist", filepath.Join(dir, "10-calico.conflist")); err != nil {
		t.Fatal(err)
	}
	opts := testOptions(t, dir)
	opts.Debounce = 20 * time.Millisecond
	opts.Resync = 100 * time.Millisecond
	startWatch(t, opts)
	waitChained(t, real)

	replaceFile(t, real, []byte(calicoList)) // no event in the watched dir
	waitChained(t, real)
}
