package daemon

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/vmnic/vmnic/pkg/api"
	"github.com/vmnic/vmnic/pkg/kubevirt"
	"github.com/vmnic/vmnic/pkg/proto"
)

// DefaultMetricsAddr is where vmnicd serves Prometheus metrics, /healthz
// and /readyz: node-local by default, the DaemonSet runs on the host
// network.
const DefaultMetricsAddr = "127.0.0.1:9961"

// MetricsHandler serves /metrics (Prometheus, metrics.go), /healthz (200
// while the CNI socket is this daemon's and answers, and attachment work is
// not wedged; 503 naming what is wrong) and /readyz (200 once the daemon
// serves CNI requests, 503 before).
func (d *Daemon) MetricsHandler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", d.metricsHandler())
	mux.HandleFunc("GET /healthz", d.serveHealthz)
	mux.HandleFunc("GET /readyz", d.serveReadyz)
	return mux
}

// ServeMetrics serves MetricsHandler on ln until ctx ends.
func (d *Daemon) ServeMetrics(ctx context.Context, ln net.Listener) error {
	srv := &http.Server{
		Handler:           d.MetricsHandler(),
		ReadHeaderTimeout: 10 * time.Second,
		WriteTimeout:      30 * time.Second,
	}
	stop := context.AfterFunc(ctx, func() {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	})
	defer stop()
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("serve metrics on %s: %w", ln.Addr(), err)
	}
	return nil
}

// serveHealthz answers the liveness probe.
func (d *Daemon) serveHealthz(w http.ResponseWriter, r *http.Request) {
	if err := d.health(r.Context()); err != nil {
		http.Error(w, err.Error(), http.StatusServiceUnavailable)
		return
	}
	_, _ = w.Write([]byte("ok\n"))
}

// serveReadyz answers the readiness probe: ready once the daemon serves
// CNI requests, and not while a watch on the API server has been down for
// longer than the threshold (the daemon then serves from a cache that no
// longer follows the cluster: migrations would wait on it).
func (d *Daemon) serveReadyz(w http.ResponseWriter, _ *http.Request) {
	if !d.ready.Load() {
		http.Error(w, "starting or stopping", http.StatusServiceUnavailable)
		return
	}
	if stale := d.staleWatches(time.Now()); len(stale) > 0 {
		http.Error(w, strings.Join(stale, "\n"), http.StatusServiceUnavailable)
		return
	}
	_, _ = w.Write([]byte("ok\n"))
}

// staleWatches describes each watch down for longer than the threshold.
func (d *Daemon) staleWatches(now time.Time) []string {
	var out []string
	for _, w := range d.watchViews(now) {
		if w.Stale {
			m := fmt.Sprintf("watch on %s (%s) down for %s (over %s)", w.Resource, w.Selector, time.Duration(w.Down).Round(time.Second), d.opts.WatchDownThreshold)
			if w.LastError != "" {
				m += ": " + w.LastError
			}
			out = append(out, m)
		}
	}
	return out
}

// watches is what the facts source says of its watches (none standalone).
func (d *Daemon) watches() []kubevirt.WatchHealth {
	if d.opts.Watches == nil {
		return nil
	}
	return d.opts.Watches()
}

// defaultHealthTimeout bounds one liveness check: under the chart's probe
// timeout (5 s), far above a healthy answer (milliseconds).
const defaultHealthTimeout = 4 * time.Second

// health is the liveness check behind /healthz. The daemon is alive when
//   - the socket path still holds the socket it listens on (a removed or
//     replaced socket leaves every pod start on the node waiting for the
//     shim's timeout, and only a restart makes it again),
//   - the socket answers a request (the accept loop and the request path
//     run; before ready the answer is "try again later", which counts),
//   - attachment work is not wedged: the GC lock, which every ADD, DEL and
//     GC takes, comes free within the timeout.
//
// Before Run listens, and while it drains, there is nothing to check.
func (d *Daemon) health(ctx context.Context) error {
	ino := d.socketIno.Load()
	if ino == 0 {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, d.healthTimeout)
	defer cancel()
	st, err := os.Stat(d.opts.Socket)
	if err != nil {
		return fmt.Errorf("CNI socket %s: %w", d.opts.Socket, err)
	}
	if sys, ok := st.Sys().(*syscall.Stat_t); ok && sys.Ino != ino {
		if d.socketIno.Load() == 0 {
			return nil // drained meanwhile; a newer daemon took the path
		}
		return fmt.Errorf("CNI socket %s is no longer this daemon's (replaced)", d.opts.Socket)
	}
	if _, err := proto.Call(ctx, d.opts.Socket, &proto.Request{Command: api.CommandStatus}); err != nil {
		if errors.Is(err, context.DeadlineExceeded) || ctx.Err() != nil {
			return fmt.Errorf("CNI socket %s did not answer within %s", d.opts.Socket, d.healthTimeout)
		}
		return fmt.Errorf("CNI socket %s: %w", d.opts.Socket, err)
	}
	free := make(chan struct{})
	go func() {
		d.gc.RLock()
		d.gc.RUnlock() //nolint:staticcheck // only whether it comes free
		close(free)
	}()
	select {
	case <-free:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("attachment work wedged: the lock ADD, DEL and GC take was not free within %s", d.healthTimeout)
	}
}
