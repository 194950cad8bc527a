package cluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
)

// buildMu serializes build.sh runs of this process; build.sh itself holds a
// file lock against other processes (parallel test packages).
var buildMu sync.Mutex

// Binaries returns the paths of the named tools (see test/tools/build.sh:
// kube-apiserver, etcd, cnitool, ...), building them from test/tools/go.mod
// into the repository's git-ignored .tools/bin when they are missing or were
// built from another test/tools/go.mod or go.sum. A warm check takes well
// under a second; a cold kube-apiserver build about 10 minutes on 2 cores,
// so run `test/tools/build.sh kube-apiserver etcd` before `go test` with
// its default 10-minute timeout. Build progress goes to os.Stderr.
//
// With ToolsBinEnv set, Binaries builds nothing and returns the binaries in
// that directory, which must hold them all (the node VM, test/nodevm, reads
// the repository read-only: its host builds them).
func Binaries(ctx context.Context, names ...string) ([]string, error) {
	if dir := os.Getenv(ToolsBinEnv); dir != "" {
		var paths []string
		for _, n := range names {
			p := filepath.Join(dir, n)
			if _, err := os.Stat(p); err != nil {
				return nil, fmt.Errorf("%s=%s: %w", ToolsBinEnv, dir, err)
			}
			paths = append(paths, p)
		}
		return paths, nil
	}
	root, err := RepoRoot()
	if err != nil {
		return nil, err
	}
	buildMu.Lock()
	defer buildMu.Unlock()

	var out bytes.Buffer
	cmd := exec.CommandContext(ctx, "bash", append([]string{filepath.Join(root, "test", "tools", "build.sh")}, names...)...)
	cmd.Dir = root
	cmd.Stdout = &out
	cmd.Stderr = os.Stderr
	// build.sh removes its temporary output when terminated.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("test/tools/build.sh %s: %w", strings.Join(names, " "), err)
	}
	paths := strings.Fields(out.String())
	if len(paths) != len(names) {
		return nil, fmt.Errorf("test/tools/build.sh %s: want %d paths, got %q", strings.Join(names, " "), len(names), out.String())
	}
	return paths, nil
}

// ToolsBinEnv names a directory of prebuilt tool binaries for Binaries.
const ToolsBinEnv = "VMNIC_TEST_TOOLS_BIN"

// RepoRoot finds the repository root (the directory of the go.mod of module
// github.com/vmnic/vmnic) at or above the working directory.
func RepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("working directory: %w", err)
	}
	for {
		data, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && strings.HasPrefix(string(data), "module github.com/vmnic/vmnic\n") {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("repository root (go.mod of github.com/vmnic/vmnic) not found above the working directory")
		}
		dir = parent
	}
}
