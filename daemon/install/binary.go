package install

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
)

// binaryPerm is the shim's mode in the bin dir.
const binaryPerm fs.FileMode = 0o755

// InstallBinary copies opts.SourceBinary to <BinDir>/vmnic, root-owned, mode
// 0755, replacing the old one by rename so that the runtime exec'ing the
// plugin meanwhile runs either the old or the new binary, never half of
// one. It reports false, writing nothing, when the installed binary already
// has the same sha256, mode and owner. A vmnic in the bin dir that is a
// symlink leading outside the bin dir is refused; one inside is replaced by
// the regular file (never written through).
func InstallBinary(opts Options) (bool, error) {
	c, err := opts.config()
	if err != nil {
		return false, err
	}
	src, srcSum, err := openSource(c, "install")
	if err != nil {
		return false, err
	}
	defer func() { _ = src.Close() }()

	binDir, err := realDir(c.BinDir)
	if err != nil {
		return false, fmt.Errorf("bin dir: %w", err)
	}
	if cerr := removeStaleTemps(binDir); cerr != nil {
		c.Logger.Warn("bin dir cleanup", "err", cerr)
	}
	dst := filepath.Join(binDir, BinaryName)
	fi, err := os.Lstat(dst)
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return false, fmt.Errorf("stat %q: %w", dst, err)
	case fi.Mode()&fs.ModeSymlink != 0:
		if _, err = resolveIn(binDir, dst); err != nil {
			return false, fmt.Errorf("install %q: %w", dst, err)
		}
	case fi.Mode().IsRegular():
		var same bool
		if same, err = sameBinary(dst, fi, srcSum); err != nil {
			return false, err
		} else if same {
			c.Logger.Debug("shim binary up to date", "path", dst)
			return false, nil
		}
	default:
		return false, fmt.Errorf("install %q: exists and is not a regular file", dst)
	}

	err = writeAtomic(dst, writeSpec{
		perm: binaryPerm,
		fill: func(w io.Writer) error {
			if _, serr := src.Seek(0, io.SeekStart); serr != nil {
				return serr
			}
			h := sha256.New()
			if _, cerr := io.Copy(io.MultiWriter(w, h), src); cerr != nil {
				return cerr
			}
			// The source changing under us would install something
			// other than what was compared.
			if !bytes.Equal(h.Sum(nil), srcSum) {
				return fmt.Errorf("source binary %q changed while copying", c.SourceBinary)
			}
			return nil
		},
	})
	if err != nil {
		return false, fmt.Errorf("install %q: %w", dst, err)
	}
	c.Logger.Info("installed shim binary", "path", dst, "sha256", fmt.Sprintf("%x", srcSum))
	return true, nil
}

// openSource opens the regular file c.SourceBinary and returns it with its
// sha256 (verb names the caller's operation in the errors).
func openSource(c *config, verb string) (*os.File, []byte, error) {
	if c.SourceBinary == "" {
		return nil, nil, fmt.Errorf("%s %s: no source binary given", verb, BinaryName)
	}
	src, err := os.Open(c.SourceBinary)
	if err != nil {
		return nil, nil, fmt.Errorf("open source binary: %w", err)
	}
	sum, err := hashRegular(src)
	if err != nil {
		_ = src.Close()
		return nil, nil, fmt.Errorf("source binary %q: %w", c.SourceBinary, err)
	}
	return src, sum, nil
}

// hashRegular returns the sha256 of f, which must be a regular file.
func hashRegular(f *os.File) ([]byte, error) {
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !fi.Mode().IsRegular() {
		return nil, errors.New("not a regular file")
	}
	return hashReader(f)
}

// sameBinary reports whether the installed binary needs no rewrite.
func sameBinary(path string, fi fs.FileInfo, sum []byte) (bool, error) {
	if fi.Mode().Perm() != binaryPerm || fi.Mode()&(fs.ModeSetuid|fs.ModeSetgid|fs.ModeSticky) != 0 {
		return false, nil
	}
	if uid, gid := owner(fi); os.Geteuid() == 0 && (uid != 0 || gid != 0) {
		return false, nil
	}
	f, _, err := openNoFollow(path)
	if err != nil {
		return false, err
	}
	defer func() { _ = f.Close() }()
	got, err := hashReader(f)
	if err != nil {
		return false, fmt.Errorf("hash %q: %w", path, err)
	}
	return bytes.Equal(got, sum), nil
}

func hashReader(r io.Reader) ([]byte, error) {
	h := sha256.New()
	if _, err := io.Copy(h, r); err != nil {
		return nil, err
	}
	return h.Sum(nil), nil
}

// RemoveBinary removes <BinDir>/vmnic when it is opts.SourceBinary's copy
// (the same sha256): a shim another install put there is left alone. It
// reports whether it removed the file; a missing one is no error.
func RemoveBinary(opts Options) (bool, error) {
	c, err := opts.config()
	if err != nil {
		return false, err
	}
	src, sum, err := openSource(c, "remove")
	if err != nil {
		return false, err
	}
	_ = src.Close()
	dst := filepath.Join(c.BinDir, BinaryName)
	fi, err := os.Lstat(dst)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("stat %s: %w", dst, err)
	}
	if !fi.Mode().IsRegular() {
		return false, nil
	}
	same, err := sameBinary(dst, fi, sum)
	if err != nil || !same {
		return false, err
	}
	if err := os.Remove(dst); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return false, fmt.Errorf("remove %s: %w", dst, err)
	}
	return true, nil
}
