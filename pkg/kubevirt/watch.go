package kubevirt

import (
	"context"
	"sync"
	"time"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/watchlist"
)

// WatchHealth is how one informer of the Cluster source stands: whether it
// has synced, whether a watch is open on the API server now, and when it
// last heard from it.
type WatchHealth struct {
	// Resource is the API resource watched: pods or
	// virtualmachineinstances.
	Resource string
	// Selector is the watch's field or label selector, which scopes it
	// to the node: spec.nodeName=<node> (pods), kubevirt.io/nodeName=<node>
	// (the VMIs that run here), kubevirt.io/migrationTargetNodeName=<node>
	// (the VMIs migrating here).
	Selector string
	// Events counts the objects the API server sent: the items of each
	// list and the events of each watch, not its bookmarks.
	Events uint64
	// Synced: the first list reached the cache.
	Synced bool
	// Watching: a watch request is open on the API server now.
	Watching bool
	// DownSince is when the last watch ended (or the first one was tried)
	// with none open since; zero while Watching.
	DownSince time.Time
	// LastEvent is when the API server last sent anything on this
	// resource: a list answered, a watch opened, an event or a bookmark
	// (the API server sends one about every minute on a quiet watch), so
	// its age bounds how stale the cache can be.
	LastEvent time.Time
	// LastError is the last list or watch error ("" after a success).
	LastError string
}

// Down is how long the watch has been down at now (0 while watching).
func (h WatchHealth) Down(now time.Time) time.Duration {
	if h.Watching || h.DownSince.IsZero() {
		return 0
	}
	return now.Sub(h.DownSince)
}

// watchTracker wraps an informer's ListerWatcher and records what the
// reflector's lists and watches do: each watch.Interface it hands out is
// wrapped so that its events and its end are seen too.
type watchTracker struct {
	inner    cache.ListerWatcherWithContext
	resource string
	selector string
	now      func() time.Time
	// noWatchList forwards the inner client's answer to the reflector's
	// question whether it may use streaming lists.
	noWatchList bool

	mu        sync.Mutex
	open      int
	downSince time.Time
	lastEvent time.Time
	lastErr   string
	events    uint64
	synced    func() bool
}

// newWatchTracker wraps lw, whose requests client makes.
func newWatchTracker(lw cache.ListerWatcher, resource string, client any) *watchTracker {
	return &watchTracker{
		inner:       cache.ToListerWatcherWithContext(lw),
		resource:    resource,
		now:         time.Now,
		noWatchList: watchlist.DoesClientNotSupportWatchListSemantics(client),
	}
}

// IsWatchListSemanticsUnSupported tells the reflector what the wrapped
// client said.
func (t *watchTracker) IsWatchListSemanticsUnSupported() bool { return t.noWatchList }

func (t *watchTracker) List(o metav1.ListOptions) (runtime.Object, error) {
	return t.ListWithContext(context.Background(), o)
}

func (t *watchTracker) ListWithContext(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
	obj, err := t.inner.ListWithContext(ctx, o)
	t.mu.Lock()
	defer t.mu.Unlock()
	if err != nil {
		t.lastErr = "list: " + err.Error()
		return obj, err
	}
	if items, ierr := meta.ExtractList(obj); ierr == nil {
		t.events += uint64(len(items))
	}
	t.lastEvent, t.lastErr = t.now(), ""
	return obj, nil
}

func (t *watchTracker) Watch(o metav1.ListOptions) (watch.Interface, error) {
	return t.WatchWithContext(context.Background(), o)
}

func (t *watchTracker) WatchWithContext(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
	w, err := t.inner.WatchWithContext(ctx, o)
	t.mu.Lock()
	defer t.mu.Unlock()
	if err != nil {
		t.lastErr = "watch: " + err.Error()
		if t.open == 0 && t.downSince.IsZero() {
			t.downSince = t.now()
		}
		return w, err
	}
	t.open++
	t.downSince = time.Time{}
	t.lastEvent, t.lastErr = t.now(), ""
	return newTrackedWatch(w, t), nil
}

// event records that the API server sent something on an open watch; an
// ERROR event (410 Gone, say) ends that watch and is recorded as the error.
func (t *watchTracker) event(ev watch.Event) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.lastEvent = t.now()
	if ev.Type != watch.Bookmark {
		t.events++
	}
	if ev.Type == watch.Error {
		if st, ok := ev.Object.(*metav1.Status); ok {
			t.lastErr = "watch: " + st.Message
		} else {
			t.lastErr = "watch: error event"
		}
	}
}

// closed records the end of one watch.
func (t *watchTracker) closed() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.open--
	if t.open == 0 {
		t.downSince = t.now()
	}
}

// health is the tracker's view; a tracker never asked for a watch yet is
// down since it was asked to start.
func (t *watchTracker) health() WatchHealth {
	t.mu.Lock()
	defer t.mu.Unlock()
	h := WatchHealth{
		Resource: t.resource, Selector: t.selector, Events: t.events,
		Watching: t.open > 0, DownSince: t.downSince,
		LastEvent: t.lastEvent, LastError: t.lastErr,
	}
	if t.synced != nil {
		h.Synced = t.synced()
	}
	return h
}

// started marks the tracker as down from now until its first watch.
func (t *watchTracker) started() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.open == 0 && t.downSince.IsZero() {
		t.downSince = t.now()
	}
}

// trackedWatch passes a watch's events on and tells its tracker about
// them and about the watch's end.
type trackedWatch struct {
	inner watch.Interface
	out   chan watch.Event
	stop  chan struct{}
	once  sync.Once
}

func newTrackedWatch(w watch.Interface, t *watchTracker) *trackedWatch {
	tw := &trackedWatch{inner: w, out: make(chan watch.Event), stop: make(chan struct{})}
	go func() {
		defer t.closed()
		defer close(tw.out)
		in := w.ResultChan()
		for {
			select {
			case ev, ok := <-in:
				if !ok {
					return
				}
				t.event(ev)
				select {
				case tw.out <- ev:
				case <-tw.stop:
					return
				}
			case <-tw.stop:
				return
			}
		}
	}()
	return tw
}

func (w *trackedWatch) Stop() {
	w.once.Do(func() {
		close(w.stop)
		w.inner.Stop()
	})
}

func (w *trackedWatch) ResultChan() <-chan watch.Event { return w.out }
