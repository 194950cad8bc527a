package daemon

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/vmnic/vmnic/pkg/mode"
	"github.com/vmnic/vmnic/pkg/proto"
	"github.com/vmnic/vmnic/plugins"
)

func launcherPod() *corev1.Pod {
	yes := true
	return &corev1.Pod{ObjectMeta: metav1.ObjectMeta{
		Name: "virt-launcher-vm1-abcde", Namespace: "vms", UID: "pod-uid",
		OwnerReferences: []metav1.OwnerReference{{APIVersion: "kubevirt.io/v1", Kind: "VirtualMachineInstance", Name: "vm1", UID: "vmi-uid", Controller: &yes}},
	}}
}

func listEvents(t *testing.T, c *fake.Clientset, ns string) []corev1.Event {
	t.Helper()
	l, err := c.CoreV1().Events(ns).List(context.Background(), metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return l.Items
}

func failedAdd(podName string) *proto.Request {
	return &proto.Request{
		Command: "ADD", ContainerID: "c1", IfName: "pod31afc46bc04",
		Args:   "IgnoreUnknown=1;K8S_POD_NAMESPACE=vms;K8S_POD_NAME=" + podName + ";K8S_POD_UID=pod-uid",
		Config: []byte(`{"cniVersion":"1.0.0","name":"ovs-vlan100","type":"vmnic","mode":"bridge"}`),
	}
}

// TestEventsOnPodAndVMI: a failed ADD makes one Warning event on the pod
// and one on its VMI; the runtime's retries of the same failure count in
// the events' series.
func TestEventsOnPodAndVMI(t *testing.T) {
	client := fake.NewClientset(launcherPod())
	m := NewMetrics()
	ev := NewEvents(EventsOptions{Client: client, Node: "node-a", Logger: slog.New(slog.DiscardHandler), Metrics: m})
	ctx := context.Background()
	failure := types.NewError(types.ErrInternal, "add port vmn1 to bridge \"br1\": no such bridge", "")
	f, ok := failureOf(infoOf(failedAdd("virt-launcher-vm1-abcde"), nil, registeredModes()), failure, time.Now())
	if !ok {
		t.Fatal("failure not reportable")
	}
	ev.report(ctx, f)

	events := listEvents(t, client, "vms")
	if len(events) != 2 {
		t.Fatalf("want 2 events, got %d: %+v", len(events), events)
	}
	var onPod, onVMI *corev1.Event
	for i := range events {
		switch events[i].InvolvedObject.Kind {
		case "Pod":
			onPod = &events[i]
		case "VirtualMachineInstance":
			onVMI = &events[i]
		}
	}
	if onPod == nil || onVMI == nil {
		t.Fatalf("events regard %+v", events)
	}
	wantNote := `vmnic could not wire interface pod31afc46bc04 (network "ovs-vlan100", mode bridge) on node node-a: add port vmn1 to bridge "br1": no such bridge (CNI error 999)`
	if onPod.Type != corev1.EventTypeWarning || onPod.Reason != ReasonWiringFailed || onPod.Message != wantNote ||
		onPod.InvolvedObject.Name != "virt-launcher-vm1-abcde" || onPod.InvolvedObject.UID != "pod-uid" || onPod.Related == nil || onPod.Related.Name != "vm1" ||
		onPod.ReportingController != "vmnic.io/vmnicd" || onPod.ReportingInstance != "vmnic.io/vmnicd-node-a" || onPod.Action != "WireNIC" ||
		onPod.Source.Component != "vmnicd" || onPod.Source.Host != "node-a" || onPod.Count != 1 || onPod.FirstTimestamp.IsZero() {
		t.Errorf("pod event = %+v", onPod)
	}
	if onVMI.InvolvedObject.Name != "vm1" || onVMI.InvolvedObject.UID != "vmi-uid" || onVMI.InvolvedObject.APIVersion != "kubevirt.io/v1" ||
		onVMI.Related == nil || onVMI.Related.Kind != "Pod" || !strings.Contains(onVMI.Message, "of pod virt-launcher-vm1-abcde") {
		t.Errorf("VMI event = %+v", onVMI)
	}

	// The runtime retries: same failure, same events, counted.
	f.observed = f.observed.Add(10 * time.Second)
	ev.report(ctx, f)
	ev.report(ctx, f)
	events = listEvents(t, client, "vms")
	if len(events) != 2 {
		t.Fatalf("repeats made new events: %d", len(events))
	}
	for _, e := range events {
		if e.Count != 3 || !e.LastTimestamp.After(e.FirstTimestamp.Time) {
			t.Errorf("event on %s: count %d, first %s, last %s; want 3 and later", e.InvolvedObject.Kind, e.Count, e.FirstTimestamp, e.LastTimestamp)
		}
	}
	if m.events["recorded"] != 6 {
		t.Errorf("recorded events counted %d, want 6", m.events["recorded"])
	}
}

func TestEventsClassification(t *testing.T) {
	for code, want := range map[uint]string{
		types.ErrInvalidNetworkConfig: ReasonConfigInvalid, types.ErrDecodingFailure: ReasonConfigInvalid,
		types.ErrInvalidEnvironmentVariables: ReasonConfigInvalid, types.ErrTryAgainLater: ReasonNotReady,
		types.ErrInternal: ReasonWiringFailed, types.ErrIOFailure: ReasonWiringFailed,
	} {
		if got := reasonFor(code); got != want {
			t.Errorf("reasonFor(%d) = %s, want %s", code, got, want)
		}
	}
	// A pod that is no VM gets the event on itself only; a plain error
	// is code 999; a request naming no pod makes no event.
	client := fake.NewClientset(&corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "vms", UID: "pod-uid"}})
	ev := NewEvents(EventsOptions{Client: client, Node: "n", Logger: slog.New(slog.DiscardHandler)})
	f, ok := failureOf(infoOf(failedAdd("web"), nil, nil), errors.New("boom"), time.Now())
	if !ok || f.code != types.ErrInternal {
		t.Fatalf("failure = %+v %v", f, ok)
	}
	ev.report(context.Background(), f)
	if events := listEvents(t, client, "vms"); len(events) != 1 || events[0].InvolvedObject.Kind != "Pod" || events[0].Related != nil {
		t.Errorf("events = %+v", events)
	}
	noPod := failedAdd("x")
	noPod.Args = ""
	if _, ok := failureOf(infoOf(noPod, nil, nil), errors.New("boom"), time.Now()); ok {
		t.Error("a request without pod made an event")
	}
	// A pod already gone: nothing to report on.
	f, _ = failureOf(infoOf(failedAdd("gone"), nil, nil), errors.New("boom"), time.Now())
	ev.report(context.Background(), f)
	if events := listEvents(t, client, "vms"); len(events) != 1 {
		t.Errorf("event for a pod that does not exist: %+v", events)
	}
}

// TestEventsNeverBlock: with nobody draining the queue, failed ADDs are
// dropped (and counted), the request is not held up.
func TestEventsNeverBlock(t *testing.T) {
	m := NewMetrics()
	ev := NewEvents(EventsOptions{Client: fake.NewClientset(), QueueSize: 2, Logger: slog.New(slog.DiscardHandler), Metrics: m})
	d := newTestDaemon(t, ObserveOptions{Metrics: m, Events: ev})
	d.ready.Store(true)
	start := time.Now()
	for range 5 {
		// No prevResult: refused before anything is done.
		d.Handle(context.Background(), failedAdd("virt-launcher-vm1-abcde"))
	}
	if time.Since(start) > 2*time.Second {
		t.Errorf("failed ADDs took %s", time.Since(start))
	}
	if len(ev.queue) != 2 || m.events["dropped"] != 3 {
		t.Errorf("queued %d, dropped %d; want 2 and 3", len(ev.queue), m.events["dropped"])
	}
	var nilEv *Events
	nilEv.enqueue(wiringFailure{})
}

// registeredModes are the names of the modes vmnicd registers.
func registeredModes() []string {
	var names []string
	for _, m := range plugins.Modes(mode.Env{}) {
		names = append(names, m.Name())
	}
	return names
}

// TestGapEventOnVMI: a migration's gap is one Normal event on the target
// pod's VMI, and none on the pod; a pod that is gone gets none.
func TestGapEventOnVMI(t *testing.T) {
	client := fake.NewClientset(launcherPod())
	ev := NewEvents(EventsOptions{Client: client, Node: "node-b", Logger: slog.New(slog.DiscardHandler), Metrics: NewMetrics()})
	ctx := context.Background()
	note := `live migration mig-1, interface eth0 (network "podnet", mode masquerade): network gap 212ms, from ...`
	ev.reportGap(ctx, gapNotice{pod: eventPod{namespace: "vms", name: "virt-launcher-vm1-abcde", uid: "pod-uid"}, note: note, observed: time.Now()})
	ev.reportGap(ctx, gapNotice{pod: eventPod{namespace: "vms", name: "gone", uid: "x"}, note: note, observed: time.Now()})
	events := listEvents(t, client, "vms")
	if len(events) != 1 {
		t.Fatalf("want 1 event, got %d: %+v", len(events), events)
	}
	e := events[0]
	if e.InvolvedObject.Kind != "VirtualMachineInstance" || e.InvolvedObject.UID != "vmi-uid" || e.Related == nil || e.Related.Name != "virt-launcher-vm1-abcde" {
		t.Errorf("event on %+v (related %+v), want on VMI vm1 related to its pod", e.InvolvedObject, e.Related)
	}
	if e.Type != corev1.EventTypeNormal || e.Reason != ReasonMigrationNetworkGap || e.Message != note || e.Action != gapAction {
		t.Errorf("event %s %s %q action %s", e.Type, e.Reason, e.Message, e.Action)
	}
}
