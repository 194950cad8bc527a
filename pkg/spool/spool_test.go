package spool

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/vmnic/vmnic/pkg/proto"
)

func TestSpool(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "spool")
	req := &proto.Request{Command: "DEL", ContainerID: "c1", IfName: "eth0", Config: []byte(`{"name":"podnet"}`)}
	// The same DEL twice is one entry.
	for i := 0; i < 2; i++ {
		if err := Write(dir, "podnet", req); err != nil {
			t.Fatal(err)
		}
	}
	if err := Write(dir, "podnet", &proto.Request{Command: "DEL", ContainerID: "c2", IfName: "eth0"}); err != nil {
		t.Fatal(err)
	}
	if st, _ := os.Stat(dir); st.Mode().Perm() != 0o700 {
		t.Errorf("spool dir mode %v", st.Mode().Perm())
	}
	_ = os.WriteFile(filepath.Join(dir, "junk.del.json"), []byte("not json"), 0o600)
	_ = os.WriteFile(filepath.Join(dir, "add.del.json"), []byte(`{"command":"ADD"}`), 0o600)
	entries, bad, err := List(dir)
	if err != nil || len(entries) != 2 || len(bad) != 2 {
		t.Fatalf("List = %d entries, bad %v, %v", len(entries), bad, err)
	}
	for _, e := range entries {
		if err := Remove(e.Path); err != nil {
			t.Fatal(err)
		}
		if err := Remove(e.Path); err != nil {
			t.Fatalf("second Remove: %v", err)
		}
	}
	if entries, _, _ := List(filepath.Join(dir, "missing")); len(entries) != 0 {
		t.Error("missing dir is not empty")
	}
}
