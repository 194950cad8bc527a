package daemon

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/vmnic/vmnic/pkg/proto"
)

// TestHandleRefusesBadIDs: a container ID or interface name that could name
// a file outside the state dir is refused with code 4, and nothing outside
// is read or removed.
func TestHandleRefusesBadIDs(t *testing.T) {
	dir := t.TempDir()
	d, err := New(Options{
		Socket: filepath.Join(dir, "s.sock"), StateDir: filepath.Join(dir, "state"), SpoolDir: filepath.Join(dir, "spool"),
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	victim := filepath.Join(dir, "state", "victim_eth0.json")
	if err := os.WriteFile(victim, []byte(`{}`), 0o600); err != nil {
		t.Fatal(err)
	}
	conf := json.RawMessage(`{"cniVersion":"1.0.0","name":"podnet","type":"vmnic","mode":"masquerade"}`)
	for _, tc := range []struct{ cmd, id, ifName string }{
		{"DEL", "../victim", "eth0"},
		{"CHECK", "../victim", "eth0"},
		{"ADD", "../../x", "eth0"},
		{"DEL", "c1", "../eth0"},
		{"DEL", "", "eth0"},
	} {
		resp := d.Handle(context.Background(), &proto.Request{Command: tc.cmd, ContainerID: tc.id, IfName: tc.ifName, Config: conf, Spooled: true})
		if resp.Error == nil || resp.Error.Code != types.ErrInvalidEnvironmentVariables {
			t.Errorf("%s %q/%q = %+v, want CNI error 4", tc.cmd, tc.id, tc.ifName, resp.Error)
		}
	}
	if _, err := os.Stat(victim); err != nil {
		t.Errorf("file outside the attachments dir touched: %v", err)
	}
}
