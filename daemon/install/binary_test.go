package install

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/vmnic/vmnic/test/need"
)

// TestInstallBinary: a fresh install, a skipped identical one, a replaced
// one, and a repaired mode and owner; all 0755, root-owned, by rename.
func TestInstallBinary(t *testing.T) {
	src := t.TempDir()
	one, two := filepath.Join(src, "one"), filepath.Join(src, "two")
	writeFile(t, one, []byte("#!/bin/sh\necho one\n"), 0o600)
	writeFile(t, two, []byte("#!/bin/sh\necho two\n"), 0o600)
	binDir := t.TempDir()
	dst := filepath.Join(binDir, BinaryName)
	opts := testOptions(t, t.TempDir())
	opts.BinDir = binDir
	root := os.Geteuid() == 0

	check := func(want string) {
		t.Helper()
		if got := readFile(t, dst); string(got) != string(readFile(t, want)) {
			t.Errorf("installed %q, want %s", got, want)
		}
		fi, err := os.Lstat(dst)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode() != 0o755 {
			t.Errorf("mode %v, want 0755", fi.Mode())
		}
		if st := fi.Sys().(*syscall.Stat_t); root && (st.Uid != 0 || st.Gid != 0) {
			t.Errorf("owner %d:%d, want root", st.Uid, st.Gid)
		}
	}
	install := func(src string, wantChanged bool) {
		t.Helper()
		opts.SourceBinary = src
		changed, err := InstallBinary(opts)
		if err != nil {
			t.Fatal(err)
		}
		if changed != wantChanged {
			t.Errorf("InstallBinary(%s) changed = %v, want %v", filepath.Base(src), changed, wantChanged)
		}
		check(src)
	}

	install(one, true)
	ino := inode(t, dst)
	install(one, false)
	if inode(t, dst) != ino {
		t.Error("an identical binary was rewritten")
	}
	install(two, true)
	if inode(t, dst) == ino {
		t.Error("the binary was written in place, not replaced")
	}

	if err := os.Chmod(dst, 0o700); err != nil {
		t.Fatal(err)
	}
	install(two, true)
	if root {
		if err := os.Chown(dst, 1234, 1234); err != nil {
			t.Fatal(err)
		}
		install(two, true)
	}
	if entries, _ := os.ReadDir(binDir); len(entries) != 1 {
		t.Errorf("bin dir holds %v", dirFiles(t, binDir))
	}

	opts.SourceBinary = filepath.Join(src, "missing")
	if _, err := InstallBinary(opts); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing source: %v", err)
	}
	opts.SourceBinary = ""
	if _, err := InstallBinary(opts); err == nil {
		t.Error("no source accepted")
	}
}

// TestInstallBinarySymlinks: a vmnic in the bin dir that links outside is
// refused and its target untouched; one linking inside is replaced by the
// binary, its target untouched too.
func TestInstallBinarySymlinks(t *testing.T) {
	src := filepath.Join(t.TempDir(), "vmnic")
	writeFile(t, src, []byte("#!/bin/sh\necho new\n"), 0o755)

	binDir := t.TempDir()
	outside := filepath.Join(t.TempDir(), "sh")
	writeFile(t, outside, []byte("precious"), 0o755)
	if err := os.Symlink(outside, filepath.Join(binDir, BinaryName)); err != nil {
		t.Fatal(err)
	}
	opts := testOptions(t, t.TempDir())
	opts.BinDir, opts.SourceBinary = binDir, src
	if _, err := InstallBinary(opts); !errors.Is(err, ErrSymlinkEscape) {
		t.Errorf("err = %v, want ErrSymlinkEscape", err)
	}
	if string(readFile(t, outside)) != "precious" {
		t.Error("the link's target outside was written")
	}

	binDir = t.TempDir()
	old := filepath.Join(binDir, "vmnic-1.0")
	writeFile(t, old, []byte("old"), 0o755)
	if err := os.Symlink("vmnic-1.0", filepath.Join(binDir, BinaryName)); err != nil {
		t.Fatal(err)
	}
	opts.BinDir = binDir
	if changed, err := InstallBinary(opts); err != nil || !changed {
		t.Fatalf("InstallBinary = %v, %v", changed, err)
	}
	if fi, err := os.Lstat(filepath.Join(binDir, BinaryName)); err != nil || !fi.Mode().IsRegular() {
		t.Errorf("vmnic is not a regular file: %v", err)
	}
	if string(readFile(t, old)) != "old" {
		t.Error("written through the link")
	}
}

// buildTiny builds a Go program printing msg.
func buildTiny(t *testing.T, msg string) string {
	t.Helper()
	goBin := need.Binary(t, "go")
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "go.mod"), []byte("module tiny\n\ngo 1.22\n"), 0o644)
	writeFile(t, filepath.Join(dir, "main.go"), fmt.Appendf(nil, "package main\n\nimport \"fmt\"\n\nfunc main() { fmt.Println(%q) }\n", msg), 0o644)
	out := filepath.Join(dir, "tiny")
	cmd := exec.Command(goBin, "build", "-o", out, ".")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOWORK=off", "GOFLAGS=")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, b)
	}
	return out
}

// TestInstallBinaryConcurrentExec: installing the shim over and over,
// alternating two builds, while other goroutines exec it in a tight loop:
// every exec runs a whole binary, old or new, never failing with ETXTBSY
// (a binary open for writing) or ENOEXEC (half a binary). The installer
// runs in this same process as the execs, which is the harder case: a fork
// for an exec must not inherit the installer's write descriptor.
func TestInstallBinaryConcurrentExec(t *testing.T) {
	one, two := buildTiny(t, "one"), buildTiny(t, "two")
	binDir := t.TempDir()
	dst := filepath.Join(binDir, BinaryName)
	opts := testOptions(t, t.TempDir())
	opts.BinDir, opts.SourceBinary = binDir, one
	opts.Logger = slog.New(slog.DiscardHandler) // hundreds of installs
	if _, err := InstallBinary(opts); err != nil {
		t.Fatal(err)
	}

	// Until enough of both happened, on a slow disk too (every install
	// fsyncs), within a bound.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var execs atomic.Int64
	var seen sync.Map
	errs := make(chan error, 8)
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for ctx.Err() == nil {
				out, err := exec.Command(dst).Output()
				if err != nil {
					errs <- fmt.Errorf("exec after %d runs (ETXTBSY: %v, ENOEXEC: %v): %w",
						execs.Load(), errors.Is(err, syscall.ETXTBSY), errors.Is(err, syscall.ENOEXEC), err)
					cancel()
					return
				}
				if s := string(out); s != "one\n" && s != "two\n" {
					errs <- fmt.Errorf("exec printed %q", s)
					cancel()
					return
				}
				seen.Store(string(out), true)
				execs.Add(1)
			}
		})
	}
	installs := 0
	for ctx.Err() == nil && (installs < 40 || execs.Load() < 200) {
		opts.SourceBinary = []string{two, one}[installs%2]
		changed, err := InstallBinary(opts)
		if err != nil {
			t.Errorf("install %d: %v", installs, err)
			break
		}
		if !changed {
			t.Errorf("install %d: a different binary was not installed", installs)
		}
		installs++
	}
	cancel()
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	_, sawOne := seen.Load("one\n")
	_, sawTwo := seen.Load("two\n")
	t.Logf("%d installs, %d execs", installs, execs.Load())
	if installs < 10 || execs.Load() < 10 || !sawOne || !sawTwo {
		t.Errorf("too little overlap to prove anything: %d installs, %d execs, saw one %v two %v", installs, execs.Load(), sawOne, sawTwo)
	}
}

// TestRemoveBinary: the shim goes only when it is the source's copy; a shim
// another install put there, and a missing one, are left as they are.
func TestRemoveBinary(t *testing.T) {
	src := t.TempDir()
	one, two := filepath.Join(src, "one"), filepath.Join(src, "two")
	writeFile(t, one, []byte("#!/bin/sh\necho one\n"), 0o600)
	writeFile(t, two, []byte("#!/bin/sh\necho two\n"), 0o600)
	binDir := t.TempDir()
	dst := filepath.Join(binDir, BinaryName)
	opts := testOptions(t, t.TempDir())
	opts.BinDir, opts.SourceBinary = binDir, one
	if _, err := InstallBinary(opts); err != nil {
		t.Fatal(err)
	}
	other := opts
	other.SourceBinary = two
	if removed, err := RemoveBinary(other); err != nil || removed || !exists(t, dst) {
		t.Fatalf("RemoveBinary of another source: removed %v, err %v; want the shim left", removed, err)
	}
	if removed, err := RemoveBinary(opts); err != nil || !removed || exists(t, dst) {
		t.Fatalf("RemoveBinary: removed %v, err %v, still there %v", removed, err, exists(t, dst))
	}
	if removed, err := RemoveBinary(opts); err != nil || removed {
		t.Fatalf("RemoveBinary of a missing shim: removed %v, err %v; want false, nil", removed, err)
	}
}
