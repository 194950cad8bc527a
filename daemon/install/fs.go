package install

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/vmnic/vmnic/pkg/fsutil"
)

// tempMarker is in the name of every temporary file the installer creates,
// so that one left by a killed installer can be recognised and removed. Its
// extension is none the runtimes load.
const tempMarker = ".vmnic-tmp-"

// staleTempAge is how old a temporary file must be before it is removed as
// left over: an installer in another process may still be writing a younger one.
const staleTempAge = 10 * time.Minute

// realDir resolves dir itself (a hostPath may be a symlink, e.g. on distros
// that keep CNI files under /var/lib) and checks it is a directory.
func realDir(dir string) (string, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return "", fmt.Errorf("dir %q: %w", dir, err)
	}
	real, err := filepath.EvalSymlinks(abs)
	if err != nil {
		return "", fmt.Errorf("dir %q: %w", dir, err)
	}
	fi, err := os.Stat(real)
	if err != nil {
		return "", fmt.Errorf("dir %q: %w", dir, err)
	}
	if !fi.IsDir() {
		return "", fmt.Errorf("dir %q: not a directory", dir)
	}
	return real, nil
}

// within reports whether path is root or below it; both are clean and absolute.
func within(root, path string) bool {
	rel, err := filepath.Rel(root, path)
	return err == nil && rel != ".." && !strings.HasPrefix(rel, ".."+string(filepath.Separator)) && !filepath.IsAbs(rel)
}

// resolveIn resolves the symlinks of path, which is in root, and refuses a
// result outside root: the installer writes as root into host dirs and must
// not be steered into, say, /etc/shadow by a link planted in net.d.
func resolveIn(root, path string) (string, error) {
	real, err := filepath.EvalSymlinks(path)
	if err != nil {
		return "", fmt.Errorf("resolve %q: %w", path, err)
	}
	if !within(root, real) {
		return "", fmt.Errorf("%q resolves to %q, outside %q: %w", path, real, root, ErrSymlinkEscape)
	}
	return real, nil
}

// openNoFollow opens a resolved path for reading, refusing a symlink
// swapped in since it was resolved, and anything but a regular file.
func openNoFollow(path string) (*os.File, fs.FileInfo, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("open %q: %w", path, err)
	}
	fi, err := f.Stat()
	if err != nil {
		_ = f.Close()
		return nil, nil, fmt.Errorf("stat %q: %w", path, err)
	}
	if !fi.Mode().IsRegular() {
		_ = f.Close()
		return nil, nil, fmt.Errorf("%q is not a regular file", path)
	}
	return f, fi, nil
}

// readNoFollow reads a resolved path like openNoFollow.
func readNoFollow(path string) ([]byte, fs.FileInfo, error) {
	f, fi, err := openNoFollow(path)
	if err != nil {
		return nil, nil, err
	}
	defer func() { _ = f.Close() }()
	data, err := io.ReadAll(f)
	if err != nil {
		return nil, nil, fmt.Errorf("read %q: %w", path, err)
	}
	return data, fi, nil
}

// owner is the uid/gid of fi.
func owner(fi fs.FileInfo) (uid, gid int) {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return int(st.Uid), int(st.Gid)
	}
	return 0, 0
}

// writeSpec is how writeAtomic lays a file down.
type writeSpec struct {
	perm     fs.FileMode
	uid, gid int
	// fill writes the content.
	fill func(w io.Writer) error
	// precheck, if set, runs just before the rename; an error aborts it.
	precheck func() error
}

// writeAtomic replaces path: a temp file in the same directory, content,
// fchmod, fchown (as root; a test running unprivileged keeps its own uid),
// fsync, close, rename, fsync of the directory.
//
// The temp file is open for writing only while syscall.ForkLock is held for
// reading, so no fork of this process inherits the write descriptor: a child
// holding it between its fork and its exec would make an exec of the
// renamed binary fail with ETXTBSY (golang.org/issue/22315).
func writeAtomic(path string, spec writeSpec) (err error) {
	dir, base := filepath.Split(path)
	syscall.ForkLock.RLock()
	f, err := os.CreateTemp(dir, "."+base+tempMarker+"*")
	if err != nil {
		syscall.ForkLock.RUnlock()
		return fmt.Errorf("create temp file for %q: %w", path, err)
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			_ = os.Remove(tmp)
		}
	}()
	err = fillTemp(f, spec)
	syscall.ForkLock.RUnlock()
	if err != nil {
		return err
	}
	if spec.precheck != nil {
		if err = spec.precheck(); err != nil {
			return err
		}
	}
	if err = os.Rename(tmp, path); err != nil {
		return fmt.Errorf("rename %q to %q: %w", tmp, path, err)
	}
	return fsutil.SyncDir(dir)
}

// fillTemp writes, chmods, chowns, syncs and closes the temp file f.
func fillTemp(f *os.File, spec writeSpec) (err error) {
	defer func() {
		if err != nil {
			_ = f.Close()
		}
	}()
	if err = spec.fill(f); err != nil {
		return fmt.Errorf("write %q: %w", f.Name(), err)
	}
	if err = f.Chmod(spec.perm); err != nil {
		return fmt.Errorf("chmod %q: %w", f.Name(), err)
	}
	if os.Geteuid() == 0 {
		if err = f.Chown(spec.uid, spec.gid); err != nil {
			return fmt.Errorf("chown %q: %w", f.Name(), err)
		}
	}
	if err = f.Sync(); err != nil {
		return fmt.Errorf("sync %q: %w", f.Name(), err)
	}
	if err = f.Close(); err != nil {
		return fmt.Errorf("close %q: %w", f.Name(), err)
	}
	return nil
}

// removeStaleTemps removes the installer's temp files in dir that a killed
// installer left behind.
func removeStaleTemps(dir string) error {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("read dir %q: %w", dir, err)
	}
	var errs []error
	for _, e := range entries {
		if !e.Type().IsRegular() || !strings.HasPrefix(e.Name(), ".") || !strings.Contains(e.Name(), tempMarker) {
			continue
		}
		fi, err := e.Info()
		if err != nil || time.Since(fi.ModTime()) < staleTempAge {
			continue
		}
		if err := os.Remove(filepath.Join(dir, e.Name())); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, fmt.Errorf("remove stale temp file: %w", err))
		}
	}
	return errors.Join(errs...)
}
