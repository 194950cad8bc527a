// Package spool keeps the DEL requests the shim could not hand to the daemon.
// The shim writes one file per attachment and returns success, because a DEL
// must never fail; the daemon replays the spool when it starts and on every
// resync, and removes each entry once the DEL is done.
package spool

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/vmnic/vmnic/pkg/fsutil"
	"github.com/vmnic/vmnic/pkg/proto"
)

const suffix = ".del.json"

// Entry is one spooled DEL.
type Entry struct {
	Path    string
	Request proto.Request
	// ModTime is when the entry was (last) written.
	ModTime time.Time
}

// name is stable per attachment and network, so a repeated DEL overwrites
// its own entry instead of piling up.
func name(req *proto.Request, network string) string {
	h := sha256.Sum256([]byte(req.ContainerID + "\x00" + req.IfName + "\x00" + network))
	return hex.EncodeToString(h[:12]) + suffix
}

// Write records req in dir (created 0700 if missing).
func Write(dir, network string, req *proto.Request) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create spool dir %q: %w", dir, err)
	}
	data, err := json.Marshal(req)
	if err != nil {
		return fmt.Errorf("encode spooled DEL: %w", err)
	}
	return fsutil.WriteFileAtomic(filepath.Join(dir, name(req, network)), data, 0o600)
}

// List returns the entries in dir, oldest name first. A missing dir is empty.
// Unreadable entries are returned in bad so the caller can log and drop them.
func List(dir string) (entries []Entry, bad []string, err error) {
	des, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil, nil
	}
	if err != nil {
		return nil, nil, fmt.Errorf("read spool dir %q: %w", dir, err)
	}
	for _, de := range des {
		if de.IsDir() || !strings.HasSuffix(de.Name(), suffix) {
			continue
		}
		p := filepath.Join(dir, de.Name())
		data, err := os.ReadFile(p)
		if err != nil {
			bad = append(bad, p)
			continue
		}
		var req proto.Request
		if err := json.Unmarshal(data, &req); err != nil || req.Command != "DEL" {
			bad = append(bad, p)
			continue
		}
		var mtime time.Time
		if info, ierr := de.Info(); ierr == nil {
			mtime = info.ModTime()
		}
		entries = append(entries, Entry{Path: p, Request: req, ModTime: mtime})
	}
	sort.Slice(entries, func(i, j int) bool { return entries[i].Path < entries[j].Path })
	return entries, bad, nil
}

// Remove deletes an entry; a missing one is fine.
func Remove(path string) error {
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove spool entry %q: %w", path, err)
	}
	return nil
}
