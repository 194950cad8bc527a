package daemon_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/vmnic/vmnic/daemon"
	"github.com/vmnic/vmnic/pkg/kubevirt"
	"github.com/vmnic/vmnic/pkg/netconf"
	"github.com/vmnic/vmnic/pkg/proto"
	"github.com/vmnic/vmnic/pkg/state"
	"github.com/vmnic/vmnic/plugins/masquerade"
)

// preloaded are the attachments on record before each fuzzed request, so
// that DEL, CHECK and GC (valid-attachments, legacy attachments) have
// something to work on.
var preloaded = []struct{ cid, ifName, network string }{
	{"c1", "eth0", "podnet"},
	{"c2", "eth0", "podnet"},
	{"c3", "eth0", "other"},
}

// FuzzHandle feeds Daemon.Handle requests as the shim forwards them. The
// daemon is never Run (there is no exported way to mark it ready), so every
// request is Spooled, which bypasses the readiness check.
//
// Nothing may touch the host: Netns always points to a path under the test's
// temp dir that does not exist, so the masquerade plugin never enters a
// namespace, and requests whose ContainerID/IfName would lead the state
// store out of its directory are skipped (see the report on
// state.Key path traversal). Seeds: testdata/fuzz/FuzzHandle.
func FuzzHandle(f *testing.F) {
	// One daemon per fuzzing process; the state dir is reset before each
	// input. Records are written without the store's fsyncs, for speed.
	tmp := f.TempDir()
	stateDir := filepath.Join(tmp, "state")
	attDir := filepath.Join(stateDir, "attachments")
	ghost := filepath.Join(tmp, "no-such-netns")
	d, err := daemon.New(daemon.Options{
		Socket:   filepath.Join(tmp, "vmnic.sock"),
		StateDir: stateDir,
		SpoolDir: filepath.Join(tmp, "spool"),
		Facts:    kubevirt.Standalone{},
		Logger:   slog.New(slog.DiscardHandler),
	})
	if err != nil {
		f.Fatal(err)
	}
	store, err := state.Open(attDir)
	if err != nil {
		f.Fatal(err)
	}
	records := preloadRecords(f, ghost)

	f.Fuzz(func(t *testing.T, data []byte) {
		req := &proto.Request{}
		// Inputs that are no request, or whose IDs would reach outside
		// the temp dir, are not interesting here (TestHandleRefusesBadIDs
		// covers the latter): drop them without a skip.
		if err := proto.Decode(bytes.NewReader(data), req); err != nil {
			return
		}
		if escapes(attDir, req.ContainerID, req.IfName) {
			return
		}
		if req.Command == "ADD" || req.Netns != "" {
			req.Netns = ghost
		}
		req.Spooled = true
		if err := os.RemoveAll(attDir); err != nil {
			t.Fatal(err)
		}
		if err := os.Mkdir(attDir, 0o700); err != nil {
			t.Fatal(err)
		}
		for name, rec := range records {
			if err := os.WriteFile(filepath.Join(attDir, name), rec, 0o600); err != nil {
				t.Fatal(err)
			}
		}

		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		resp := d.Handle(ctx, req)

		if _, err := os.Lstat(ghost); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("netns path %s exists after Handle: %v", ghost, err)
		}
		if resp == nil {
			t.Fatal("Handle returned nil")
		}
		if e := resp.Error; e != nil {
			if resp.Result != nil {
				t.Errorf("response has both a result and error %v", e)
			}
			if e.Code == types.ErrUnknown || e.Msg == "" {
				t.Errorf("error without a CNI code or message: %+v", e)
			}
			if e.Code == types.ErrTryAgainLater {
				t.Errorf("spooled request told to try again: %v", e)
			}
			return
		}
		if resp.Result != nil {
			if req.Command != "ADD" {
				t.Errorf("%s returned a result", req.Command)
			}
			if !json.Valid(resp.Result) {
				t.Errorf("result is not JSON: %q", resp.Result)
			}
		}
		if req.Command == "GC" {
			checkGC(t, store, req.Config)
		}
	})
}

// escapes reports whether the record of (cid, ifName) would lie outside dir.
func escapes(dir, cid, ifName string) bool {
	st, err := state.Open(dir)
	if err != nil {
		return true
	}
	return filepath.Dir(st.Path(state.Key(cid, ifName))) != dir
}

// preloadRecords returns the files of the preloaded records by name.
func preloadRecords(f *testing.F, netns string) map[string][]byte {
	out := map[string][]byte{}
	for _, p := range preloaded {
		spec, err := json.Marshal(&masquerade.Spec{
			Netns: netns, PodIf: p.ifName, IPv4: true,
			Bridge: kubevirt.BridgeName(p.ifName), Tap: kubevirt.TapName(p.ifName, p.ifName == kubevirt.PodNetworkInterface),
			Owner: masquerade.Alias(p.cid, p.ifName),
		})
		if err != nil {
			f.Fatal(err)
		}
		rec, err := json.Marshal(&state.Record{
			Version: state.RecordVersion, ContainerID: p.cid, IfName: p.ifName,
			Network: p.network, Netns: netns, Mode: netconf.ModeMasquerade,
			CNIVersion: "1.0.0", Spec: spec,
			Result: json.RawMessage(`{"cniVersion":"1.0.0"}`), Created: time.Now().UTC(),
		})
		if err != nil {
			f.Fatal(err)
		}
		out[p.cid+"_"+p.ifName+".json"] = rec
	}
	return out
}

// checkGC: after a successful GC, the records of the network that neither
// cni.dev/valid-attachments nor the legacy cni.dev/attachments lists are
// gone, and all others are still there.
func checkGC(t *testing.T, store *state.Store, raw []byte) {
	t.Helper()
	conf, cerr := netconf.Parse(raw)
	if cerr != nil {
		t.Fatalf("GC succeeded on a config Parse refuses: %v", cerr)
	}
	valid := map[string]bool{}
	for _, a := range conf.ValidAttachments {
		valid[state.Key(a.ContainerID, a.IfName)] = true
	}
	var legacy struct {
		Attachments []types.GCAttachment `json:"cni.dev/attachments"`
	}
	if json.Unmarshal(raw, &legacy) == nil {
		for _, a := range legacy.Attachments {
			valid[state.Key(a.ContainerID, a.IfName)] = true
		}
	}
	for _, p := range preloaded {
		key := state.Key(p.cid, p.ifName)
		_, err := store.Get(key)
		gone := errors.Is(err, state.ErrNotFound)
		if err != nil && !gone {
			t.Fatal(err)
		}
		if want := p.network == conf.Name && !valid[key]; gone != want {
			t.Errorf("GC of network %q (valid %v): record %s (network %q) removed = %t, want %t",
				conf.Name, valid, key, p.network, gone, want)
		}
	}
}
