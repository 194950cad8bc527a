package kubevirt

import (
	"context"
	"errors"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/tools/cache"
)

// fakeLW hands out the watches and errors a test queues.
type fakeLW struct {
	listErr  error
	watches  []*watch.FakeWatcher
	watchErr error
}

func (f *fakeLW) List(metav1.ListOptions) (runtime.Object, error) {
	return &corev1.PodList{Items: make([]corev1.Pod, 2)}, f.listErr
}

func (f *fakeLW) Watch(metav1.ListOptions) (watch.Interface, error) {
	if f.watchErr != nil {
		return nil, f.watchErr
	}
	w := watch.NewFake()
	f.watches = append(f.watches, w)
	return w, nil
}

var _ cache.ListerWatcher = &fakeLW{}

// TestWatchTracker: the tracker sees what the reflector's lists and
// watches do: down from the start until a watch opens, up while one is,
// down again (since when, and why) once it ends or fails; every list and
// event is the API server heard from.
func TestWatchTracker(t *testing.T) {
	lw := &fakeLW{}
	tr := newWatchTracker(lw, "pods", nil)
	now := time.Date(2026, 12, 4, 12, 0, 0, 0, time.UTC)
	tr.now = func() time.Time { return now }
	synced := false
	tr.synced = func() bool { return synced }
	if h := tr.health(); h.Watching || !h.DownSince.IsZero() || h.Down(now) != 0 {
		t.Fatalf("before start: %+v", h)
	}
	tr.started()
	now = now.Add(time.Second)
	if h := tr.health(); h.Watching || h.Down(now) != time.Second || h.Synced {
		t.Fatalf("started, no watch yet: %+v, down %s", h, h.Down(now))
	}

	lw.listErr = errors.New("connection refused")
	if _, err := tr.List(metav1.ListOptions{}); err == nil {
		t.Fatal("list error lost")
	}
	if h := tr.health(); h.LastError != "list: connection refused" || !h.LastEvent.IsZero() {
		t.Fatalf("after a failed list: %+v", h)
	}
	lw.listErr = nil
	if _, err := tr.ListWithContext(context.Background(), metav1.ListOptions{}); err != nil {
		t.Fatal(err)
	}
	if h := tr.health(); h.LastError != "" || !h.LastEvent.Equal(now) {
		t.Fatalf("after a list: %+v", h)
	}

	w, err := tr.WatchWithContext(context.Background(), metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	synced = true
	if h := tr.health(); !h.Watching || !h.DownSince.IsZero() || !h.Synced {
		t.Fatalf("watch open: %+v", h)
	}
	now = now.Add(time.Minute)
	go lw.watches[0].Add(&corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "p"}})
	ev := <-w.ResultChan()
	if ev.Type != watch.Added || ev.Object.(*corev1.Pod).Name != "p" {
		t.Fatalf("event passed on: %+v", ev)
	}
	if h := tr.health(); !h.LastEvent.Equal(now) {
		t.Fatalf("event not seen: %+v", h)
	}
	// A bookmark is heard from the API server, but carries no object.
	go lw.watches[0].Action(watch.Bookmark, &corev1.Pod{})
	<-w.ResultChan()
	if h := tr.health(); h.Events != 3 {
		t.Fatalf("objects received = %d, want 3 (two listed, one event; no bookmark)", h.Events)
	}

	// The API server ends the watch: down from then.
	lw.watches[0].Stop()
	if _, ok := <-w.ResultChan(); ok {
		t.Fatal("result channel open after the watch ended")
	}
	waitDown(t, tr)
	ended := now
	now = now.Add(5 * time.Second)
	lw.watchErr = errors.New("connection refused")
	if _, err := tr.Watch(metav1.ListOptions{}); err == nil {
		t.Fatal("watch error lost")
	}
	if h := tr.health(); h.Watching || !h.DownSince.Equal(ended) || h.Down(now) != 5*time.Second || h.LastError != "watch: connection refused" {
		t.Fatalf("after the watch ended and a new one failed: %+v", h)
	}

	// A new watch, stopped by the reflector.
	lw.watchErr = nil
	w2, err := tr.Watch(metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if h := tr.health(); !h.Watching || h.LastError != "" {
		t.Fatalf("watch open again: %+v", h)
	}
	w2.Stop()
	w2.Stop() // twice is fine
	if _, ok := <-w2.ResultChan(); ok {
		t.Fatal("result channel open after Stop")
	}
	waitDown(t, tr)
}

func waitDown(t *testing.T, tr *watchTracker) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		if h := tr.health(); !h.Watching && !h.DownSince.IsZero() {
			return
		}
	}
	t.Fatalf("watch end not seen: %+v", tr.health())
}
