package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	k8stypes "k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
)

// Event reasons vmnicd gives its Warning events.
const (
	// ReasonConfigInvalid: the network config or the request is wrong
	// (CNI codes 1, 2, 4, 6, 7); retrying will not help.
	ReasonConfigInvalid = "VMNICConfigInvalid"
	// ReasonNotReady: the VM could not be looked up yet (code 11); the
	// runtime retries.
	ReasonNotReady = "VMNICNotReady"
	// ReasonWiringFailed: creating the NIC failed (links, OVS, nftables,
	// IPAM, DHCP).
	ReasonWiringFailed = "VMNICWiringFailed"
	// ReasonMigrationNetworkGap (Normal, on the VMI): a live migration's
	// network gap as the target's vmnicd measured it.
	ReasonMigrationNetworkGap = "VMNICMigrationNetworkGap"
)

// Event constants.
const (
	eventComponent  = "vmnicd"
	eventController = "vmnic.io/vmnicd"
	eventAction     = "WireNIC"
	gapAction       = "MeasureMigrationGap"
	// eventSeriesWindow: a repeat of the same failure within it (the
	// runtime retrying the sandbox) counts in the first event's series
	// instead of making a new event.
	eventSeriesWindow = 30 * time.Minute
	maxEventNote      = 1024
	defaultEventQueue = 256
	eventCallTimeout  = 5 * time.Second
	maxSeriesCache    = 1024
)

// EventsOptions configure Events.
type EventsOptions struct {
	// Client writes the events and reads the pod (to find its VMI).
	Client kubernetes.Interface
	// Node is this node's name, in the event's note and reporting instance.
	Node   string
	Logger *slog.Logger
	// Metrics count the events recorded, dropped and failed (optional).
	Metrics *Metrics
	// QueueSize bounds the failures waiting to be reported; more are
	// dropped (default 256).
	QueueSize int
}

// Events reports wiring failures as Kubernetes Events (core v1, which
// `kubectl describe` shows) on the pod and, when the pod belongs to a VMI,
// on the VMI. Reporting is
// asynchronous and best effort: a request only enqueues, without blocking;
// Run does the API calls.
type Events struct {
	opts  EventsOptions
	log   *slog.Logger
	queue chan queued
	now   func() time.Time

	mu     sync.Mutex
	series map[seriesKey]*seriesEntry
}

// wiringFailure is one failed ADD.
type wiringFailure struct {
	pod      eventPod
	ifName   string
	network  string
	mode     string
	code     uint
	msg      string
	observed time.Time
}

// eventPod identifies the pod as CNI_ARGS named it.
type eventPod struct{ namespace, name, uid string }

type seriesKey struct {
	namespace, name, uid, reason, note string
}

type seriesEntry struct {
	event *corev1.Event
	first time.Time
}

// NewEvents returns Events; Run starts reporting.
func NewEvents(opts EventsOptions) *Events {
	if opts.QueueSize <= 0 {
		opts.QueueSize = defaultEventQueue
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	return &Events{
		opts:   opts,
		log:    opts.Logger.With("subsystem", "events"),
		queue:  make(chan queued, opts.QueueSize),
		now:    time.Now,
		series: map[seriesKey]*seriesEntry{},
	}
}

// queued is what Run reports: a failed ADD, a migration's gap.
type queued interface {
	send(ctx context.Context, e *Events)
	podOf() eventPod
}

func (f wiringFailure) send(ctx context.Context, e *Events) { e.report(ctx, f) }
func (f wiringFailure) podOf() eventPod                     { return f.pod }

// gapNotice is a migration's network gap, reported as a Normal event on
// the VMI of the target pod.
type gapNotice struct {
	pod      eventPod
	note     string
	observed time.Time
}

func (n gapNotice) send(ctx context.Context, e *Events) { e.reportGap(ctx, n) }
func (n gapNotice) podOf() eventPod                     { return n.pod }

// enqueue hands a report to Run without ever blocking the caller.
func (e *Events) enqueue(q queued) {
	if e == nil {
		return
	}
	select {
	case e.queue <- q:
	default:
		e.opts.Metrics.event("dropped")
		p := q.podOf()
		e.log.Debug("event queue full: not reported", "pod", p.namespace+"/"+p.name)
	}
}

// Run reports queued failures until ctx ends.
func (e *Events) Run(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case q := <-e.queue:
			q.send(ctx, e)
		}
	}
}

// reasonFor classifies a CNI error code.
func reasonFor(code uint) string {
	switch code {
	case types.ErrIncompatibleCNIVersion, types.ErrUnsupportedField, types.ErrInvalidEnvironmentVariables,
		types.ErrDecodingFailure, types.ErrInvalidNetworkConfig:
		return ReasonConfigInvalid
	case types.ErrTryAgainLater:
		return ReasonNotReady
	}
	return ReasonWiringFailed
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n-3] + "..."
}

// refs reads the pod to reference it and the VMI that controls it (nil
// when none does); ok is false when the pod is gone.
func (e *Events) refs(ctx context.Context, p eventPod) (podRef, vmiRef *corev1.ObjectReference, ok bool) {
	podRef = &corev1.ObjectReference{APIVersion: "v1", Kind: "Pod", Namespace: p.namespace, Name: p.name, UID: k8stypes.UID(p.uid)}
	gctx, cancel := context.WithTimeout(ctx, eventCallTimeout)
	pod, err := e.opts.Client.CoreV1().Pods(p.namespace).Get(gctx, p.name, metav1.GetOptions{})
	cancel()
	switch {
	case err == nil:
		podRef.UID = pod.UID
		if owner := metav1.GetControllerOf(pod); owner != nil && owner.Kind == "VirtualMachineInstance" {
			vmiRef = &corev1.ObjectReference{APIVersion: owner.APIVersion, Kind: owner.Kind, Namespace: pod.Namespace, Name: owner.Name, UID: owner.UID}
		}
	case apierrors.IsNotFound(err):
		// The pod went away; its event would be garbage anyway.
		e.log.Debug("pod not found: no event", "pod", p.namespace+"/"+p.name)
		return nil, nil, false
	default:
		e.log.Debug("read pod for an event", "pod", p.namespace+"/"+p.name, "err", err)
	}
	return podRef, vmiRef, true
}

// report writes the events of one failure: on the pod and on its VMI.
func (e *Events) report(ctx context.Context, f wiringFailure) {
	podRef, vmiRef, ok := e.refs(ctx, f.pod)
	if !ok {
		return
	}
	reason := reasonFor(f.code)
	where := fmt.Sprintf("interface %s (network %q, mode %s) on node %s", f.ifName, f.network, f.mode, e.opts.Node)
	podNote := fmt.Sprintf("vmnic could not wire %s: %s (CNI error %d)", where, f.msg, f.code)
	e.record(ctx, podRef, vmiRef, corev1.EventTypeWarning, reason, podNote, f.observed)
	if vmiRef != nil {
		vmiNote := fmt.Sprintf("vmnic could not wire %s of pod %s: %s (CNI error %d)", where, f.pod.name, f.msg, f.code)
		e.record(ctx, vmiRef, podRef, corev1.EventTypeWarning, reason, vmiNote, f.observed)
	}
}

// reportGap writes a migration's gap on the target pod's VMI.
func (e *Events) reportGap(ctx context.Context, n gapNotice) {
	podRef, vmiRef, ok := e.refs(ctx, n.pod)
	if !ok || vmiRef == nil {
		return
	}
	e.record(ctx, vmiRef, podRef, corev1.EventTypeNormal, ReasonMigrationNetworkGap, n.note, n.observed)
}

// record creates the event, or counts a repeat in the previous identical
// one (count and lastTimestamp, as client-go's recorder does: kubectl
// shows "(x3 over 2m)").
func (e *Events) record(ctx context.Context, regarding, related *corev1.ObjectReference, typ, reason, note string, at time.Time) {
	note = truncate(note, maxEventNote)
	key := seriesKey{regarding.Namespace, regarding.Name, string(regarding.UID), reason, note}
	cctx, cancel := context.WithTimeout(ctx, eventCallTimeout)
	defer cancel()
	client := e.opts.Client.CoreV1().Events(regarding.Namespace)

	e.mu.Lock()
	prev := e.series[key]
	e.mu.Unlock()
	if prev != nil && at.Sub(prev.first) < eventSeriesWindow {
		count := prev.event.Count + 1
		patch, _ := json.Marshal(map[string]any{"count": count, "lastTimestamp": metav1.NewTime(at)})
		updated, err := client.Patch(cctx, prev.event.Name, k8stypes.StrategicMergePatchType, patch, metav1.PatchOptions{})
		if err == nil {
			e.remember(key, &seriesEntry{event: updated, first: prev.first})
			e.opts.Metrics.event("recorded")
			return
		}
		if !apierrors.IsNotFound(err) {
			e.opts.Metrics.event("failed")
			e.log.Debug("update event", "regarding", regarding.Kind+" "+regarding.Namespace+"/"+regarding.Name, "err", err)
			return
		}
		// The event expired or was deleted: start a new one.
	}
	ev := &corev1.Event{
		ObjectMeta: metav1.ObjectMeta{
			Name:      fmt.Sprintf("%s.%x", regarding.Name, at.UnixNano()),
			Namespace: regarding.Namespace,
		},
		InvolvedObject:      *regarding,
		Related:             related,
		Reason:              reason,
		Message:             note,
		Type:                typ,
		Source:              corev1.EventSource{Component: eventComponent, Host: e.opts.Node},
		FirstTimestamp:      metav1.NewTime(at),
		LastTimestamp:       metav1.NewTime(at),
		Count:               1,
		Action:              actionOf(reason),
		ReportingController: eventController,
		ReportingInstance:   truncate(eventController+"-"+e.opts.Node, 128),
	}
	created, err := client.Create(cctx, ev, metav1.CreateOptions{})
	if err != nil {
		e.opts.Metrics.event("failed")
		e.log.Debug("create event", "regarding", regarding.Kind+" "+regarding.Namespace+"/"+regarding.Name, "err", err)
		return
	}
	e.opts.Metrics.event("recorded")
	e.remember(key, &seriesEntry{event: created, first: at})
}

// actionOf is an event's action: what vmnicd was doing.
func actionOf(reason string) string {
	if reason == ReasonMigrationNetworkGap {
		return gapAction
	}
	return eventAction
}

func (e *Events) remember(key seriesKey, s *seriesEntry) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if len(e.series) >= maxSeriesCache {
		now := e.now()
		for k, v := range e.series {
			if now.Sub(v.first) >= eventSeriesWindow {
				delete(e.series, k)
			}
		}
		if len(e.series) >= maxSeriesCache {
			clear(e.series)
		}
	}
	e.series[key] = s
}

// failureOf builds the event input of a failed ADD; ok is false when the
// request names no pod.
func failureOf(req requestInfo, err error, at time.Time) (wiringFailure, bool) {
	if req.pod.namespace == "" || req.pod.name == "" {
		return wiringFailure{}, false
	}
	code, msg := uint(types.ErrInternal), err.Error()
	var te *types.Error
	if errors.As(err, &te) {
		code, msg = te.Code, te.Msg
		if te.Details != "" {
			msg += ": " + te.Details
		}
	}
	return wiringFailure{
		pod: req.pod, ifName: req.ifName, network: req.network, mode: req.mode,
		code: code, msg: strings.TrimSpace(msg), observed: at,
	}, true
}
