package state

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

func TestStore(t *testing.T) {
	s, err := Open(filepath.Join(t.TempDir(), "attachments"))
	if err != nil {
		t.Fatal(err)
	}
	if st, _ := os.Stat(s.Dir()); st.Mode().Perm() != 0o700 {
		t.Errorf("state dir mode %v", st.Mode().Perm())
	}
	r := &Record{ContainerID: "c1", IfName: "eth0", Network: "podnet", Mode: "masquerade", Spec: json.RawMessage(`{"a":1}`)}
	if err := s.Put(r); err != nil {
		t.Fatal(err)
	}
	got, err := s.Get(Key("c1", "eth0"))
	var spec map[string]int
	if err == nil {
		err = json.Unmarshal(got.Spec, &spec)
	}
	if err != nil || got.Network != "podnet" || got.Version != RecordVersion || spec["a"] != 1 {
		t.Fatalf("Get = %+v, %v", got, err)
	}
	// A corrupt record is reported, not fatal to the listing.
	if err := os.WriteFile(filepath.Join(s.Dir(), "bad_eth0.json"), []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	// A temp file of an interrupted write is ignored.
	_ = os.WriteFile(filepath.Join(s.Dir(), ".c2_eth0.json.tmp-1"), []byte("{"), 0o600)
	recs, bad, err := s.List()
	if err != nil || len(recs) != 1 || len(bad) != 1 {
		t.Fatalf("List = %d records, bad %v, %v", len(recs), bad, err)
	}
	for i := 0; i < 2; i++ {
		if err := s.Delete(Key("c1", "eth0")); err != nil {
			t.Fatalf("Delete #%d: %v", i+1, err)
		}
	}
	if _, err := s.Get(Key("c1", "eth0")); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get after Delete: %v", err)
	}
}

func TestStoreRefusesEscapingKeys(t *testing.T) {
	base := t.TempDir()
	s, err := Open(filepath.Join(base, "attachments"))
	if err != nil {
		t.Fatal(err)
	}
	victim := filepath.Join(base, "victim_eth0.json")
	if err := os.WriteFile(victim, []byte(`{"containerID":"victim"}`), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, key := range []string{Key("../victim", "eth0"), Key("..", "x"), Key("a/b", "eth0"), ""} {
		if _, err := s.Get(key); !errors.Is(err, ErrNotFound) {
			t.Errorf("Get(%q) = %v, want not found", key, err)
		}
		if err := s.Put(&Record{ContainerID: key, IfName: "eth0"}); err == nil && key != "" {
			t.Errorf("Put with container ID %q succeeded", key)
		}
		_ = s.Delete(key)
	}
	if _, err := os.Stat(victim); err != nil {
		t.Errorf("file outside the store touched: %v", err)
	}
}

// TestKeyAndPath: one key format, "<container ID>/<ifname>", and the file
// name every release gave a record, so an upgraded vmnicd reads the
// records the last one wrote; keys that are not an attachment's stay in
// the directory.
func TestKeyAndPath(t *testing.T) {
	s, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if k := Key("c1", "net1"); k != "c1/net1" {
		t.Errorf("Key = %q", k)
	}
	if p := s.Path(Key("c1", "net1")); p != filepath.Join(s.Dir(), "c1_net1.json") {
		t.Errorf("Path = %q", p)
	}
	for _, bad := range []string{"", "c1", "/net1", "c1/", "c1/a/b", "../x/eth0", ".hidden/eth0"} {
		if p := s.Path(bad); filepath.Dir(p) == s.Dir() {
			t.Errorf("Path(%q) = %q, inside the directory", bad, p)
		}
	}
}
