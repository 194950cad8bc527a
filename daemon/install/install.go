// Package install puts vmnic on a node and keeps it there: it copies the CNI
// shim into the host's CNI bin dir and chains vmnic's entry into the primary
// CNI's network config (Calico, Cilium, Flannel, …), then watches the config
// dir so that a primary CNI rewriting its file, or a new primary appearing
// first, gets vmnic chained again. The DaemonSet runs InstallBinary and Chain
// as its init step; vmnicd runs them again at start and then Watch.
//
// Every write is a temporary file in the target's directory, fsync, rename,
// fsync of the directory: kubelet/containerd exec'ing the plugin or loading
// the config never sees half a file. Edits to a conflist are splices: every
// byte outside vmnic's entry stays as it was, so the file reads as the
// original plus one plugin and Unchain gives the original back.
package install

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"reflect"
	"sync"
	"time"
)

// Defaults.
const (
	DefaultBinDir   = "/opt/cni/bin"
	DefaultConfDir  = "/etc/cni/net.d"
	DefaultDebounce = 250 * time.Millisecond
	DefaultResync   = time.Minute

	// BinaryName is the shim's file name in the bin dir; it is also the
	// "type" of vmnic's entry, which is how the entry is recognised.
	BinaryName = "vmnic"
)

// DefaultEntry is the plugin entry chained after the primary CNI.
var DefaultEntry = json.RawMessage(`{"type":"vmnic","mode":"masquerade","capabilities":{"dns":true}}`)

// DefaultCNIVersions are the spec versions the shim speaks (pkg/shim's
// Supported). A primary config asking for another version is not chained:
// the runtime would call the shim with a version it refuses, and every pod on
// the node would fail, not only the VMs.
var DefaultCNIVersions = []string{"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"}

// Errors callers can test with errors.Is.
var (
	// ErrNoPrimary: the config dir holds no primary network config (yet).
	ErrNoPrimary = errors.New("no primary CNI network config")
	// ErrSymlinkEscape: a symlink in a CNI dir leads outside that dir.
	ErrSymlinkEscape = errors.New("symlink leads outside the CNI dir")
	// ErrUnsupportedVersion: the primary config's cniVersion is not one the shim speaks.
	ErrUnsupportedVersion = errors.New("cniVersion not supported by the vmnic shim")
	// ErrInvalidConfig: a network config file that cannot be parsed or chained.
	ErrInvalidConfig = errors.New("invalid network config")
	// ErrConflict: the file a .conf would be converted to belongs to someone else.
	ErrConflict = errors.New("conflicting network config file")
)

// Options configure the installer. The zero value installs into the default
// host paths; a container sees the host dirs at its mount paths.
type Options struct {
	// BinDir is the CNI bin dir as this process sees it (DefaultBinDir).
	BinDir string
	// ConfDir is the CNI config dir as this process sees it (DefaultConfDir).
	ConfDir string
	// SourceBinary is the shim to install; required by InstallBinary.
	SourceBinary string
	// Entry is the plugin entry to chain (DefaultEntry); a JSON object
	// whose "type" is "vmnic".
	Entry json.RawMessage
	// CNIVersions the shim supports (DefaultCNIVersions).
	CNIVersions []string
	// Logger (slog.Default()).
	Logger *slog.Logger

	// Debounce is how long Watch lets a burst of changes settle (DefaultDebounce).
	Debounce time.Duration
	// Resync is Watch's periodic re-chain, the fallback for anything
	// inotify cannot see (DefaultResync).
	Resync time.Duration
	// OnChain, if set, is called by Watch after every Chain attempt.
	OnChain func(ChainResult, error)
}

// config is Options with defaults applied and the entry checked.
type config struct {
	Options
	entry    []byte // compact
	entryVal any    // for semantic comparison
	versions map[string]bool
}

func (o Options) config() (*config, error) {
	c := &config{Options: o}
	if c.BinDir == "" {
		c.BinDir = DefaultBinDir
	}
	if c.ConfDir == "" {
		c.ConfDir = DefaultConfDir
	}
	if c.Entry == nil {
		c.Entry = DefaultEntry
	}
	if c.CNIVersions == nil {
		c.CNIVersions = DefaultCNIVersions
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.Debounce <= 0 {
		c.Debounce = DefaultDebounce
	}
	if c.Resync <= 0 {
		c.Resync = DefaultResync
	}
	var buf bytes.Buffer
	if err := json.Compact(&buf, c.Entry); err != nil {
		return nil, fmt.Errorf("entry: %w", err)
	}
	c.entry = buf.Bytes()
	if pluginType(c.entry) != BinaryName {
		return nil, fmt.Errorf("entry: must be a JSON object with \"type\": %q: %w", BinaryName, ErrInvalidConfig)
	}
	if err := json.Unmarshal(c.entry, &c.entryVal); err != nil {
		return nil, fmt.Errorf("entry: %w", err)
	}
	c.versions = make(map[string]bool, len(c.CNIVersions))
	for _, v := range c.CNIVersions {
		c.versions[v] = true
	}
	return c, nil
}

// isEntry reports whether raw is semantically the desired entry.
func (c *config) isEntry(raw []byte) bool {
	var v any
	return json.Unmarshal(raw, &v) == nil && reflect.DeepEqual(v, c.entryVal)
}

// mu serialises this process's writers; different processes (init container,
// daemon) run one after the other, and a rewrite racing with the primary
// CNI's is detected by comparing the file before the rename.
var mu sync.Mutex
