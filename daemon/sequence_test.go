package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/vmnic/vmnic/pkg/mode"
	"github.com/vmnic/vmnic/pkg/netconf"
	"github.com/vmnic/vmnic/pkg/proto"
	"github.com/vmnic/vmnic/pkg/state"
)

// The daemon's one ADD/DEL/GC sequence, with a fake mode: what it records,
// when it undoes, and what it asks of the mode. No root needed.

// fakeMode records what the daemon asks of it. It registers as
// masquerade, a name the config parser accepts.
type fakeMode struct {
	calls    []string
	passAll  bool  // Plan passes every request through
	addErr   error // Add fails after save
	orphan   bool  // Orphan returns an attachment
	recorded func() (*state.Record, error)
}

type fakeAttachment struct {
	m     *fakeMode
	Name  string `json:"name"`
	Saved bool   `json:"saved"`
	// InResult makes Result fail.
	BadResult bool `json:"badResult"`
}

func (m *fakeMode) Name() string { return netconf.ModeMasquerade }

func (m *fakeMode) Plan(req *mode.Request) (mode.Attachment, error) {
	m.calls = append(m.calls, "plan "+req.Key)
	if m.passAll || req.Facts == nil || !req.Facts.Serve {
		return nil, nil
	}
	return &fakeAttachment{m: m, Name: req.Key, BadResult: strings.Contains(req.Pod.Name, "badresult")}, nil
}

func (m *fakeMode) Load(spec json.RawMessage) (mode.Attachment, error) {
	a := &fakeAttachment{m: m}
	if err := json.Unmarshal(spec, a); err != nil {
		return nil, err
	}
	return a, nil
}

func (m *fakeMode) Orphan(req *mode.Request) mode.Attachment {
	m.calls = append(m.calls, "orphan "+req.Key)
	if !m.orphan {
		return nil
	}
	return &fakeAttachment{m: m, Name: "orphan:" + req.Key}
}

func (a *fakeAttachment) Add(_ context.Context, key string, save func() error) error {
	a.Saved = true
	if err := save(); err != nil {
		return err
	}
	// The record written by save is there while the mode wires.
	if rec, err := a.m.recorded(); err != nil || !savedSpec(rec) {
		return fmt.Errorf("no saved record during Add: %v", err)
	}
	a.m.calls = append(a.m.calls, "add "+key)
	if a.m.addErr != nil {
		return a.m.addErr
	}
	return nil
}

func (a *fakeAttachment) Result(prev *current.Result) (types.Result, error) {
	if a.BadResult {
		return nil, errors.New("no result")
	}
	return prev, nil
}

func (a *fakeAttachment) Del(_ context.Context, key string) error {
	a.m.calls = append(a.m.calls, "del "+a.Name)
	return nil
}

func (a *fakeAttachment) Check(context.Context, string) error   { return nil }
func (a *fakeAttachment) Restore(context.Context, string) error { return nil }
func (a *fakeAttachment) View() mode.View                       { return mode.View{} }

// savedSpec: the record holds the attachment as Add saved it.
func savedSpec(rec *state.Record) bool {
	var a fakeAttachment
	return json.Unmarshal(rec.Spec, &a) == nil && a.Saved
}

func newFakeDaemon(t *testing.T, m *fakeMode) *Daemon {
	t.Helper()
	dir := t.TempDir()
	d, err := New(Options{
		Socket: filepath.Join(dir, "s.sock"), StateDir: filepath.Join(dir, "state"), SpoolDir: filepath.Join(dir, "spool"),
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
		Modes:  func(mode.Env) []mode.Mode { return []mode.Mode{m} },
	})
	if err != nil {
		t.Fatal(err)
	}
	d.ready.Store(true)
	return d
}

const fakePrev = `"prevResult":{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/var/run/netns/x"}],"ips":[{"address":"198.18.0.2/24","interface":0}]}`

func fakeRequest(cmd, cid, pod string) *proto.Request {
	return &proto.Request{
		Command: cmd, ContainerID: cid, IfName: "eth0", Netns: "/var/run/netns/x",
		Args:   "K8S_POD_NAMESPACE=default;K8S_POD_NAME=" + pod,
		Config: json.RawMessage(`{"cniVersion":"1.0.0","name":"podnet","type":"vmnic","mode":"masquerade",` + fakePrev + `}`),
	}
}

func TestSequence(t *testing.T) {
	ctx := context.Background()
	vm := "virt-launcher-vm1-x"
	t.Run("ADD records before and after, DEL removes", func(t *testing.T) {
		m := &fakeMode{}
		d := newFakeDaemon(t, m)
		m.recorded = func() (*state.Record, error) { return d.store.Get(state.Key("c1", "eth0")) }
		if r := d.Handle(ctx, fakeRequest("ADD", "c1", vm)); r.Error != nil {
			t.Fatalf("ADD: %v", r.Error)
		}
		rec, err := d.store.Get(state.Key("c1", "eth0"))
		if err != nil || len(rec.Result) == 0 || !savedSpec(rec) {
			t.Fatalf("record after ADD: %+v %v", rec, err)
		}
		if r := d.Handle(ctx, fakeRequest("DEL", "c1", vm)); r.Error != nil {
			t.Fatalf("DEL: %v", r.Error)
		}
		if _, err := d.store.Get(state.Key("c1", "eth0")); !errors.Is(err, state.ErrNotFound) {
			t.Errorf("record after DEL: %v", err)
		}
		if want := []string{"plan c1/eth0", "add c1/eth0", "del c1/eth0"}; !slices.Equal(m.calls, want) {
			t.Errorf("calls %v, want %v", m.calls, want)
		}
	})
	t.Run("a failed Add leaves no record", func(t *testing.T) {
		m := &fakeMode{addErr: errors.New("boom")}
		d := newFakeDaemon(t, m)
		m.recorded = func() (*state.Record, error) { return d.store.Get(state.Key("c2", "eth0")) }
		if r := d.Handle(ctx, fakeRequest("ADD", "c2", vm)); r.Error == nil {
			t.Fatal("ADD succeeded")
		}
		if _, err := d.store.Get(state.Key("c2", "eth0")); !errors.Is(err, state.ErrNotFound) {
			t.Errorf("record left: %v", err)
		}
	})
	t.Run("a failure after Add undoes the wiring", func(t *testing.T) {
		m := &fakeMode{}
		d := newFakeDaemon(t, m)
		m.recorded = func() (*state.Record, error) { return d.store.Get(state.Key("c3", "eth0")) }
		if r := d.Handle(ctx, fakeRequest("ADD", "c3", vm+"-badresult")); r.Error == nil {
			t.Fatal("ADD succeeded")
		}
		if _, err := d.store.Get(state.Key("c3", "eth0")); !errors.Is(err, state.ErrNotFound) {
			t.Errorf("record left: %v", err)
		}
		if !slices.Contains(m.calls, "del c3/eth0") {
			t.Errorf("calls %v: no undo", m.calls)
		}
	})
	t.Run("a retried ADD removes the old attachment first", func(t *testing.T) {
		m := &fakeMode{}
		d := newFakeDaemon(t, m)
		m.recorded = func() (*state.Record, error) { return d.store.Get(state.Key("c4", "eth0")) }
		for range 2 {
			if r := d.Handle(ctx, fakeRequest("ADD", "c4", vm)); r.Error != nil {
				t.Fatalf("ADD: %v", r.Error)
			}
		}
		if want := []string{"plan c4/eth0", "add c4/eth0", "plan c4/eth0", "del c4/eth0", "add c4/eth0"}; !slices.Equal(m.calls, want) {
			t.Errorf("calls %v, want %v", m.calls, want)
		}
	})
	t.Run("pass-through: prevResult, no record", func(t *testing.T) {
		m := &fakeMode{passAll: true}
		d := newFakeDaemon(t, m)
		r := d.Handle(ctx, fakeRequest("ADD", "c5", vm))
		if r.Error != nil || !strings.Contains(string(r.Result), "198.18.0.2/24") {
			t.Fatalf("ADD = %s, %v; want prevResult", r.Result, r.Error)
		}
		if recs, _, _ := d.store.List(); len(recs) != 0 {
			t.Errorf("%d records", len(recs))
		}
	})
	t.Run("DEL without a record asks the mode what may be left", func(t *testing.T) {
		m := &fakeMode{orphan: true}
		d := newFakeDaemon(t, m)
		req := fakeRequest("DEL", "c6", vm)
		req.Netns = ""
		if r := d.Handle(ctx, req); r.Error != nil {
			t.Fatalf("DEL: %v", r.Error)
		}
		if want := []string{"orphan c6/eth0", "del orphan:c6/eth0"}; !slices.Equal(m.calls, want) {
			t.Errorf("calls %v, want %v", m.calls, want)
		}
		m.orphan = false
		m.calls = nil
		if r := d.Handle(ctx, req); r.Error != nil || !slices.Equal(m.calls, []string{"orphan c6/eth0"}) {
			t.Errorf("DEL with nothing left: %v, calls %v", r.Error, m.calls)
		}
	})
}

// TestStaleRecords: GC removes the records of its network that the
// runtime does not list, under either key, and nothing else.
func TestStaleRecords(t *testing.T) {
	rec := func(cid, network string) *state.Record {
		return &state.Record{ContainerID: cid, IfName: "eth0", Network: network}
	}
	recs := []*state.Record{rec("a", "podnet"), rec("b", "podnet"), rec("c", "podnet"), rec("d", "other")}
	conf, err := netconf.Parse([]byte(`{"cniVersion":"1.1.0","name":"podnet","type":"vmnic","mode":"masquerade",
		"cni.dev/valid-attachments":[{"containerID":"a","ifname":"eth0"}],
		"cni.dev/attachments":[{"containerID":"b","ifname":"eth0"}]}`))
	if err != nil {
		t.Fatal(err)
	}
	raw := []byte(`{"cni.dev/attachments":[{"containerID":"b","ifname":"eth0"}]}`)
	var got []string
	for _, r := range staleRecords(recs, "podnet", validAttachments(conf, raw)) {
		got = append(got, r.ContainerID)
	}
	if !slices.Equal(got, []string{"c"}) {
		t.Errorf("stale %v, want [c]: a is valid, b is valid under the legacy key, d is another network's", got)
	}
}
