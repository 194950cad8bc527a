// Package state keeps one record per VM NIC that vmnic wired (an
// attachment), on disk under the daemon's state directory. DEL, CHECK, GC and
// a restarted daemon work from these records rather than from guesses about
// the kernel, and every write is atomic.
package state

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/vmnic/vmnic/pkg/fsutil"
)

// RecordVersion is the schema version written into records.
const RecordVersion = 1

// Record is one attachment: a container's interface on one network.
type Record struct {
	Version     int    `json:"version"`
	ContainerID string `json:"containerID"`
	IfName      string `json:"ifName"`
	Network     string `json:"network"`
	Netns       string `json:"netns"`
	Mode        string `json:"mode"`
	CNIVersion  string `json:"cniVersion"`
	Pod         Pod    `json:"pod"`
	VMName      string `json:"vmName,omitempty"`
	// Migration names the live migration this pod is the target of.
	Migration *Migration      `json:"migration,omitempty"`
	Spec      json.RawMessage `json:"spec"`
	Result    json.RawMessage `json:"result,omitempty"`
	Created   time.Time       `json:"created"`
}

// Pod identifies the pod of an attachment.
type Pod struct {
	Namespace string `json:"namespace,omitempty"`
	Name      string `json:"name,omitempty"`
	UID       string `json:"uid,omitempty"`
}

// Migration is the live migration a target pod belongs to.
type Migration struct {
	Job   string `json:"job,omitempty"`
	UID   string `json:"uid,omitempty"`
	Phase string `json:"phase,omitempty"`
	// FirstFrame is when the guest's first frame left this target (after
	// its hold, if any); GapReported that the migration's network gap was
	// reported (or found unmeasurable).
	FirstFrame  time.Time `json:"firstFrame,omitzero"`
	GapReported bool      `json:"gapReported,omitempty"`
}

// Key names an attachment: "<container ID>/<ifname>", the one format of
// the records' index, the owner marks on links (after "vmnic:"), the OVS
// ports' external_ids, the DHCP servers, logs and events.
func Key(containerID, ifName string) string { return containerID + "/" + ifName }

// Store is a directory of records.
type Store struct{ dir string }

// Open creates dir (0700) if needed.
func Open(dir string) (*Store, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create state dir %q: %w", dir, err)
	}
	return &Store{dir: dir}, nil
}

// Dir is the store's directory.
func (s *Store) Dir() string { return s.dir }

// Path maps a key to its file, "<container ID>_<ifname>.json" (the name
// every vmnic release gave it). A key that is not a container ID and an
// interface name, or could leave the directory, maps to a name that cannot
// exist, so it reads as "not found" and writes fail.
func (s *Store) Path(key string) string {
	cid, ifName, ok := strings.Cut(key, "/")
	if !ok || cid == "" || ifName == "" || strings.ContainsAny(ifName, "/\x00") ||
		strings.ContainsRune(cid, 0) || strings.HasPrefix(cid, ".") {
		return filepath.Join(s.dir, ".invalid-key", "x")
	}
	return filepath.Join(s.dir, cid+"_"+ifName+".json")
}

// Put writes r atomically.
func (s *Store) Put(r *Record) error {
	r.Version = RecordVersion
	data, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return fmt.Errorf("encode record %s: %w", Key(r.ContainerID, r.IfName), err)
	}
	return fsutil.WriteFileAtomic(s.Path(Key(r.ContainerID, r.IfName)), data, 0o600)
}

// ErrNotFound is returned by Get for a missing record.
var ErrNotFound = errors.New("attachment record not found")

// Get reads the record of key.
func (s *Store) Get(key string) (*Record, error) {
	r, err := read(s.Path(key))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%s: %w", key, ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("record %s: %w", key, err)
	}
	return r, nil
}

func read(path string) (*Record, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	r := &Record{}
	if err := json.Unmarshal(data, r); err != nil {
		return nil, fmt.Errorf("decode %s: %w", filepath.Base(path), err)
	}
	return r, nil
}

// Delete removes the record of key; a missing one is fine.
func (s *Store) Delete(key string) error {
	if err := os.Remove(s.Path(key)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove record %s: %w", key, err)
	}
	return nil
}

// List returns every readable record, sorted by key, and the paths of
// records that could not be read.
func (s *Store) List() ([]*Record, []string, error) {
	des, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, nil, fmt.Errorf("read state dir %q: %w", s.dir, err)
	}
	var out []*Record
	var bad []string
	for _, de := range des {
		n := de.Name()
		if de.IsDir() || strings.HasPrefix(n, ".") || !strings.HasSuffix(n, ".json") {
			continue
		}
		r, err := read(filepath.Join(s.dir, n))
		if err != nil {
			bad = append(bad, filepath.Join(s.dir, n))
			continue
		}
		out = append(out, r)
	}
	sort.Slice(out, func(i, j int) bool {
		return Key(out[i].ContainerID, out[i].IfName) < Key(out[j].ContainerID, out[j].IfName)
	})
	return out, bad, nil
}
