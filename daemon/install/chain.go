package install

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/vmnic/vmnic/pkg/fsutil"
)

// confExts are the extensions containerd, CRI-O and Multus load from the
// config dir. Everything else there (vmnic's backups and temp files among
// them) is invisible to them.
var confExts = []string{".conf", ".conflist", ".json"}

const (
	// multusConf is the file Multus writes for itself.
	multusConf = "00-multus.conf"
	// backupSuffix renames a converted single-plugin config out of the
	// runtimes' sight; Unchain renames it back.
	backupSuffix = ".vmnic-orig"
)

// errRaced: the file changed between reading it and renaming over it.
var errRaced = errors.New("file changed while being rewritten")

// ChainResult says where vmnic's entry is.
type ChainResult struct {
	// File is the primary network's config file carrying vmnic's entry.
	File string
	// Converted is the single-plugin .conf/.json that File was made from
	// (and that is now renamed to Converted+".vmnic-orig"), "" if none.
	Converted string
	// Changed is false when File already carried the entry and nothing
	// was written.
	Changed bool
}

// Chain puts vmnic's entry into the primary network config of opts.ConfDir:
// the first file by name with a .conf, .conflist or .json extension, the
// order containerd and CRI-O load them in, passing over Multus' config and
// configs that start with vmnic. The entry is appended to the plugins once;
// an existing vmnic entry is updated where it stands. Every other byte of the
// file stays; its mode and owner too.
//
// A single-plugin .conf/.json has no list to append to: Chain writes a
// conflist beside it (the plugin, then vmnic, with the plugin's name and
// cniVersion; see convertedName) and renames the original to
// <name>.vmnic-orig, an extension no runtime loads. The conflist sorts right
// after the original, so until that rename the runtime loads the original,
// after it the chained list; never nothing. When the primary CNI writes its
// original again, that is first in order again and converted again.
//
// Chain refuses a primary whose cniVersion the shim does not speak
// (ErrUnsupportedVersion), an unreadable primary rather than chaining the
// next file (ErrInvalidConfig), and a symlink leading out of the dir
// (ErrSymlinkEscape). Chaining a chained file writes nothing.
func Chain(opts Options) (ChainResult, error) {
	c, err := opts.config()
	if err != nil {
		return ChainResult{}, err
	}
	mu.Lock()
	defer mu.Unlock()
	for attempt := 1; ; attempt++ {
		res, err := c.chain()
		if !errors.Is(err, errRaced) || attempt == 3 {
			return res, err
		}
		c.Logger.Info("config changed while chaining, again", "err", err)
	}
}

func (c *config) chain() (ChainResult, error) {
	dir, err := realDir(c.ConfDir)
	if errors.Is(err, fs.ErrNotExist) {
		return ChainResult{}, fmt.Errorf("%w: %w", ErrNoPrimary, err)
	}
	if err != nil {
		return ChainResult{}, fmt.Errorf("config dir: %w", err)
	}
	if cerr := removeStaleTemps(dir); cerr != nil {
		c.Logger.Warn("config dir cleanup", "err", cerr)
	}
	f, err := c.primary(dir)
	if err != nil {
		return ChainResult{}, err
	}
	if err := c.checkVersions(f); err != nil {
		return ChainResult{}, err
	}
	if !f.doc.isList() {
		return c.convert(dir, f)
	}
	res := ChainResult{File: f.path}
	out, changed := f.doc.chained(c.entry, c.isEntry)
	if !changed {
		c.Logger.Debug("already chained", "file", f.path)
		return res, nil
	}
	if err := writeConf(f.real, out, f, f); err != nil {
		return res, fmt.Errorf("chain into %q: %w", f.path, err)
	}
	res.Changed = true
	c.Logger.Info("chained vmnic", "file", f.path)
	return res, nil
}

// convert chains a single-plugin config, see Chain.
func (c *config) convert(dir string, f *confFile) (ChainResult, error) {
	listName := convertedName(f.name)
	res := ChainResult{File: filepath.Join(c.ConfDir, listName), Converted: f.path}
	out, err := f.doc.converted(c.entry)
	if err != nil {
		return res, fmt.Errorf("convert %q: %w: %w", f.path, ErrInvalidConfig, err)
	}
	target := filepath.Join(dir, listName)
	existing, err := c.load(dir, listName)
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return res, fmt.Errorf("convert %q: %w", f.path, err)
	case !slices.Contains(existing.doc.types, BinaryName):
		// Not a conversion of ours (those carry vmnic's entry): it
		// is someone's network, not to be overwritten.
		return res, fmt.Errorf("convert %q: %q exists and is not vmnic's: %w", f.path, existing.path, ErrConflict)
	default:
		target = existing.real
	}
	if existing == nil || !bytes.Equal(existing.data, out) {
		if err := writeConf(target, out, f, nil); err != nil {
			return res, fmt.Errorf("convert %q: %w", f.path, err)
		}
	}
	if err := unchanged(f.real, f.data)(); err != nil {
		return res, err
	}
	// The link itself when f is one: nothing is written through it.
	from := filepath.Join(dir, f.name)
	if err := os.Rename(from, from+backupSuffix); err != nil {
		return res, fmt.Errorf("convert %q: set the original aside: %w", f.path, err)
	}
	if err := fsutil.SyncDir(dir); err != nil {
		return res, err
	}
	res.Changed = true
	c.Logger.Info("chained vmnic into a conflist made from a single-plugin config", "file", res.File, "original", f.path+backupSuffix)
	return res, nil
}

// convertedName is the conflist a single-plugin config becomes: it sorts
// right after the original (10-flannel.conf, 10-flannel.conflist;
// 10-bridge.json, 10-bridge.json.conflist), so an original its owner writes
// again is first in order again, and chained again.
func convertedName(name string) string {
	if base, ok := strings.CutSuffix(name, ".conf"); ok {
		return base + ".conflist"
	}
	return name + ".conflist"
}

// writeConf replaces path with data, with the mode and owner of like; if
// was is set, the rename happens only if was's file still holds was's bytes.
func writeConf(path string, data []byte, like, was *confFile) error {
	uid, gid := owner(like.info)
	spec := writeSpec{
		perm: like.info.Mode().Perm(),
		uid:  uid,
		gid:  gid,
		fill: func(w io.Writer) error { _, err := w.Write(data); return err },
	}
	if was != nil {
		spec.precheck = unchanged(was.real, was.data)
	}
	return writeAtomic(path, spec)
}

// unchanged checks that path still holds data: the primary CNI rewriting its
// file while vmnic edits it must win, not be overwritten with what vmnic read
// before.
func unchanged(path string, data []byte) func() error {
	return func() error {
		now, _, err := readNoFollow(path)
		if err != nil {
			return fmt.Errorf("%q: %w: %w", path, errRaced, err)
		}
		if !bytes.Equal(now, data) {
			return fmt.Errorf("%q: %w", path, errRaced)
		}
		return nil
	}
}

func (c *config) checkVersions(f *confFile) error {
	vs, err := f.doc.versions()
	if err != nil {
		return fmt.Errorf("%q: %w: %w", f.path, ErrInvalidConfig, err)
	}
	for _, v := range vs {
		if !c.versions[v] {
			return fmt.Errorf("%q: cniVersion %q (the shim speaks %s): %w", f.path, v, strings.Join(c.CNIVersions, ", "), ErrUnsupportedVersion)
		}
	}
	return nil
}

// confFile is a network config file of the config dir.
type confFile struct {
	name string // in the dir
	path string // under ConfDir as given, for messages and results
	real string // symlinks resolved, inside the dir
	data []byte
	info fs.FileInfo // of real
	doc  *document
}

// load reads and parses the config file name of the (resolved) dir.
func (c *config) load(dir, name string) (*confFile, error) {
	f := &confFile{name: name, path: filepath.Join(c.ConfDir, name)}
	var err error
	if f.real, err = resolveIn(dir, filepath.Join(dir, name)); err != nil {
		return nil, err
	}
	if f.data, f.info, err = readNoFollow(f.real); err != nil {
		return nil, err
	}
	if f.doc, err = parseDocument(f.data); err != nil {
		return nil, fmt.Errorf("parse %q: %w: %w", f.path, ErrInvalidConfig, err)
	}
	return f, nil
}

// primary finds the primary network's config in dir.
func (c *config) primary(dir string) (*confFile, error) {
	entries, err := os.ReadDir(dir) // sorted by name, as the runtimes sort
	if err != nil {
		return nil, fmt.Errorf("read config dir %q: %w", c.ConfDir, err)
	}
	for _, e := range entries {
		name := e.Name()
		if !isConfName(name) || e.IsDir() {
			continue
		}
		if name == multusConf {
			continue
		}
		// A file that does not parse stops the search: the runtime
		// would not pass over it either, and chaining the next file
		// would chain a network nobody uses.
		f, err := c.load(dir, name)
		if err != nil {
			return nil, err
		}
		if f.doc.isMultus() || f.doc.isVmnic() {
			c.Logger.Debug("not a primary network config", "file", f.path, "types", f.doc.types)
			continue
		}
		return f, nil
	}
	return nil, fmt.Errorf("%q: %w", c.ConfDir, ErrNoPrimary)
}

func isConfName(name string) bool { return slices.Contains(confExts, filepath.Ext(name)) }

// Unchain takes vmnic's entry out of every network config of opts.ConfDir
// and undoes Chain's conversions of single-plugin configs: the original
// comes back under its name (unless the primary CNI has written a new one
// since), then the .conflist made from it goes. Multus' configs and configs
// that start with vmnic are left alone. It returns the files it changed and
// goes on past a file it cannot fix, returning all the errors.
func Unchain(opts Options) ([]string, error) {
	c, err := opts.config()
	if err != nil {
		return nil, err
	}
	mu.Lock()
	defer mu.Unlock()
	dir, err := realDir(c.ConfDir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("config dir: %w", err)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("read config dir %q: %w", c.ConfDir, err)
	}
	var changed []string
	var errs []error
	for _, e := range entries {
		orig, ok := strings.CutSuffix(e.Name(), backupSuffix)
		if !ok || !isConfName(orig) {
			continue
		}
		done, rerr := c.restore(dir, e.Name(), orig)
		changed = append(changed, done...)
		if rerr != nil {
			errs = append(errs, rerr)
		}
	}
	if entries, err = os.ReadDir(dir); err != nil {
		return changed, fmt.Errorf("read config dir %q: %w", c.ConfDir, err)
	}
	for _, e := range entries {
		name := e.Name()
		if !isConfName(name) || e.IsDir() || name == multusConf {
			continue
		}
		f, err := c.load(dir, name)
		if err != nil {
			errs = append(errs, fmt.Errorf("unchain: %w", err))
			continue
		}
		if !f.doc.isList() || f.doc.isMultus() || f.doc.isVmnic() {
			continue
		}
		out, ok := f.doc.unchained()
		if !ok {
			continue
		}
		if err := writeConf(f.real, out, f, f); err != nil {
			errs = append(errs, fmt.Errorf("unchain %q: %w", f.path, err))
			continue
		}
		changed = append(changed, f.path)
		c.Logger.Info("unchained vmnic", "file", f.path)
	}
	return changed, errors.Join(errs...)
}

// restore undoes one conversion: backup is the original orig set aside.
func (c *config) restore(dir, backup, orig string) ([]string, error) {
	var changed []string
	origPath := filepath.Join(dir, orig)
	_, err := os.Lstat(origPath)
	switch {
	case err == nil:
		// The primary CNI has written its config again since: that
		// one is current, the backup is not.
		if err = os.Remove(filepath.Join(dir, backup)); err != nil {
			return nil, fmt.Errorf("remove %q: %w", filepath.Join(c.ConfDir, backup), err)
		}
	case errors.Is(err, fs.ErrNotExist):
		// The original sorts before the .conflist made from it, so the
		// runtime goes back to it at this rename.
		if err = os.Rename(filepath.Join(dir, backup), origPath); err != nil {
			return nil, fmt.Errorf("restore %q: %w", filepath.Join(c.ConfDir, orig), err)
		}
		changed = append(changed, filepath.Join(c.ConfDir, orig))
	default:
		return nil, fmt.Errorf("stat %q: %w", filepath.Join(c.ConfDir, orig), err)
	}
	if err = fsutil.SyncDir(dir); err != nil {
		return changed, err
	}
	listName := convertedName(orig)
	list, err := c.load(dir, listName)
	if errors.Is(err, fs.ErrNotExist) {
		return changed, nil
	}
	if err != nil {
		return changed, fmt.Errorf("restore %q: %w", filepath.Join(c.ConfDir, orig), err)
	}
	if !slices.Contains(list.doc.types, BinaryName) {
		return changed, nil // not, or no longer, vmnic's
	}
	if err := os.Remove(filepath.Join(dir, listName)); err != nil {
		return changed, fmt.Errorf("remove %q: %w", list.path, err)
	}
	changed = append(changed, list.path)
	c.Logger.Info("restored single-plugin config", "file", filepath.Join(c.ConfDir, orig), "removed", list.path)
	return changed, fsutil.SyncDir(dir)
}
