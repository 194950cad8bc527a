package capabilities

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
)

// Run defaults.
const (
	DefaultResync   = 5 * time.Minute
	DefaultPoll     = 2 * time.Second
	DefaultDebounce = 500 * time.Millisecond
	// retryMin and retryMax pace retries of a failed publish.
	retryMin = time.Second
	retryMax = time.Minute
	// resubscribeDelay spaces attempts to re-subscribe to link events.
	resubscribeDelay = 5 * time.Second
)

// Sink receives reports to publish; *Publisher is the real one.
type Sink interface {
	Publish(ctx context.Context, r Report) error
}

// LinkWatcher tells when links of the host network namespace change.
type LinkWatcher interface {
	// Watch returns a channel that receives a value after link changes
	// and is closed when watching fails (and after ctx ends).
	Watch(ctx context.Context) (<-chan struct{}, error)
}

// RunOptions configure a Runner.
type RunOptions struct {
	// Probe is what to probe.
	Probe ProbeOptions
	// Sink publishes reports; nil only keeps the last report (standalone
	// vmnicd).
	Sink Sink
	// Links tells of host link changes; nil subscribes through netlink
	// in the caller's network namespace. Use NoLinkWatch to switch it off.
	Links LinkWatcher
	// Resync is the period of the full re-probe and re-publish, the
	// fallback for anything no event tells of (DefaultResync).
	Resync time.Duration
	// Poll is how often the OVS database cache and the Spiderpool agent
	// are read between resyncs (DefaultPoll): pkg/ovsdb offers no change
	// notification, so this is how OVS changes show up.
	Poll time.Duration
	// Debounce lets a burst of link events settle (DefaultDebounce).
	Debounce time.Duration
	// OnReport, if set, is called (from Run's goroutine) with each new
	// report and the publish result (nil when not published because
	// nothing changed or there is no sink).
	OnReport func(r Report, changed bool, publishErr error)
}

// Runner probes the node, keeps the last report and publishes it when it
// changes. Its methods are safe for concurrent use.
type Runner struct {
	opts  RunOptions
	probe ProbeOptions
	log   *slog.Logger

	trigger chan struct{}

	mu   sync.Mutex
	last Report
	have bool
}

// NewRunner returns a Runner; Run starts it.
func NewRunner(opts RunOptions) *Runner {
	if opts.Resync <= 0 {
		opts.Resync = DefaultResync
	}
	if opts.Poll <= 0 {
		opts.Poll = DefaultPoll
	}
	if opts.Debounce <= 0 {
		opts.Debounce = DefaultDebounce
	}
	if opts.Links == nil {
		opts.Links = NetlinkWatcher{}
	}
	p := opts.Probe.withDefaults()
	return &Runner{
		opts:    opts,
		probe:   p,
		log:     p.Log.With("subsystem", "capabilities"),
		trigger: make(chan struct{}, 1),
	}
}

// Run probes and publishes until ctx ends, then returns nil.
func Run(ctx context.Context, opts RunOptions) error { return NewRunner(opts).Run(ctx) }

// Last returns the last report, and false before the first probe finished.
func (r *Runner) Last() (Report, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return *r.last.DeepCopy(), r.have
}

// Trigger asks for a full re-probe now (coalesced with one already asked).
func (r *Runner) Trigger() {
	select {
	case r.trigger <- struct{}{}:
	default:
	}
}

// what a pending probe has to cover.
type scope struct{ full, nics, local bool }

func (s scope) any() bool { return s.full || s.nics || s.local }

// Run probes at start, then on triggers, link changes, OVS or agent changes
// seen by the poll, and every resync, until ctx ends.
func (r *Runner) Run(ctx context.Context) error {
	r.log.Info("capability probe starting", "resync", r.opts.Resync, "poll", r.opts.Poll)
	links := r.watchLinks(ctx)
	var resubscribe <-chan time.Time

	resync := time.NewTicker(r.opts.Resync)
	defer resync.Stop()
	poll := time.NewTicker(r.opts.Poll)
	defer poll.Stop()
	debounce := time.NewTimer(0) // the first probe: now
	pending := scope{full: true}
	var retry *time.Timer
	var retryC <-chan time.Time
	backoff := retryMin
	publishDue := false // a publish failed or a resync asked for one

	for {
		select {
		case <-ctx.Done():
			debounce.Stop()
			if retry != nil {
				retry.Stop()
			}
			return nil
		case _, ok := <-links:
			if !ok {
				r.log.Warn("link events stopped; resubscribing", "in", resubscribeDelay)
				links = nil
				resubscribe = time.After(resubscribeDelay)
				continue
			}
			if !pending.any() {
				debounce.Reset(r.opts.Debounce)
			}
			pending.nics = true
		case <-resubscribe:
			resubscribe = nil
			links = r.watchLinks(ctx)
			// Changes while nobody listened are not lost: look again.
			pending.nics = true
			debounce.Reset(0)
		case <-r.trigger:
			pending.full = true
			debounce.Reset(0)
		case <-resync.C:
			pending.full = true
			// Re-check the published objects too: repairs what was
			// changed behind our back.
			publishDue = r.opts.Sink != nil
			debounce.Reset(0)
		case <-poll.C:
			if !pending.any() {
				debounce.Reset(0)
			}
			pending.local = true
		case <-retryC:
			retryC, retry = nil, nil
			publishDue = true
			if !pending.any() {
				debounce.Reset(0)
			}
		case <-debounce.C:
			s := pending
			pending = scope{}
			if !s.any() && !publishDue {
				continue
			}
			report := r.next(ctx, s)
			if ctx.Err() != nil {
				return nil // a probe cut short says nothing about the node
			}
			changed := r.store(report)
			var err error
			if r.opts.Sink != nil && (changed || publishDue) {
				err = r.opts.Sink.Publish(ctx, report)
				publishDue = err != nil
				if err != nil && ctx.Err() == nil {
					r.log.Error("publish node capabilities", "err", err, "retry in", backoff)
					retry = time.NewTimer(backoff)
					retryC = retry.C
					backoff = min(2*backoff, retryMax)
				} else {
					backoff = retryMin
				}
			}
			if changed {
				r.log.Info("node capabilities changed", "modes", modeSummary(report))
			}
			if r.opts.OnReport != nil {
				r.opts.OnReport(report, changed, err)
			}
		}
	}
}

// next is the report after probing what s covers, reusing the rest of the
// last report.
func (r *Runner) next(ctx context.Context, s scope) Report {
	last, have := r.Last()
	if s.full || !have {
		return Probe(ctx, r.probe)
	}
	rep := last
	if s.nics {
		rep.NICs = probeNICs(r.probe.Links, r.probe.Log)
	}
	if s.local {
		rep.OVS = probeOVS(ctx, r.probe.OVS, r.probe.Timeout)
		crds, crdsErr := rep.Spiderpool.CRDs, rep.Spiderpool.CRDsError
		rep.Spiderpool.AgentSocket, rep.Spiderpool.Healthy, rep.Spiderpool.AgentError = probeAgent(ctx, r.probe.SpiderpoolSocket, r.probe.Timeout)
		rep.Spiderpool.CRDs, rep.Spiderpool.CRDsError = crds, crdsErr
	}
	return finish(rep, r.probe.Now())
}

// store keeps rep as the last report and says whether it differs from the
// one before (timestamps aside).
func (r *Runner) store(rep Report) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	changed := !r.have || !Same(r.last, rep)
	r.last, r.have = rep, true
	return changed
}

func (r *Runner) watchLinks(ctx context.Context) <-chan struct{} {
	ch, err := r.opts.Links.Watch(ctx)
	if err != nil {
		r.log.Warn("cannot watch host links; relying on the resync", "err", err)
		closed := make(chan struct{})
		close(closed)
		return closed
	}
	return ch
}

// NetlinkWatcher is the real LinkWatcher: an RTNLGRP_LINK subscription in
// the caller's network namespace.
type NetlinkWatcher struct{}

// Watch implements LinkWatcher. The channel closes when the subscription
// ends (a receive error such as ENOBUFS after an event burst: events were
// lost, and the caller should look again and re-subscribe).
func (NetlinkWatcher) Watch(ctx context.Context) (<-chan struct{}, error) {
	updates := make(chan netlink.LinkUpdate, 64)
	done := make(chan struct{})
	if err := netlink.LinkSubscribeWithOptions(updates, done, netlink.LinkSubscribeOptions{}); err != nil {
		return nil, fmt.Errorf("subscribe to link events: %w", err)
	}
	out := make(chan struct{}, 1)
	go func() {
		defer close(out)
		defer func() {
			close(done) // closes the socket
			// netlink's receiver may be blocked sending: let it finish.
			go func() {
				for range updates {
				}
			}()
		}()
		for {
			select {
			case <-ctx.Done():
				return
			case _, ok := <-updates:
				if !ok {
					return
				}
				select {
				case out <- struct{}{}:
				default: // one pending notice covers any number of events
				}
			}
		}
	}()
	return out, nil
}

// NoLinkWatch is a LinkWatcher that never reports anything.
type NoLinkWatch struct{}

// Watch implements LinkWatcher.
func (NoLinkWatch) Watch(context.Context) (<-chan struct{}, error) {
	return make(chan struct{}), nil
}

// Compile-time checks.
var (
	_ Sink        = (*Publisher)(nil)
	_ LinkWatcher = NetlinkWatcher{}
	_ OVS         = (*LazyOVS)(nil)
)
