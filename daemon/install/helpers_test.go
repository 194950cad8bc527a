package install

import (
	"encoding/json"
	"errors"
	"flag"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"sort"
	"strings"
	"syscall"
	"testing"

	"github.com/containernetworking/cni/libcni"
)

var update = flag.Bool("update", false, "rewrite testdata/*.golden")

// testOptions are Options on dir with a logger writing to the test's output.
func testOptions(t *testing.T, confDir string) Options {
	t.Helper()
	return Options{
		ConfDir: confDir,
		BinDir:  filepath.Join(t.TempDir(), "bin"),
		Logger:  slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
}

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func writeFile(t *testing.T, path string, data []byte, perm fs.FileMode) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, data, perm); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, perm); err != nil { // past the umask
		t.Fatal(err)
	}
}

// replaceFile writes path the way most CNI agents do: temp file and rename.
func replaceFile(t *testing.T, path string, data []byte) {
	t.Helper()
	tmp := path + ".agent-tmp"
	writeFile(t, tmp, data, 0o644)
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

func inode(t *testing.T, path string) uint64 {
	t.Helper()
	fi, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Sys().(*syscall.Stat_t).Ino
}

func exists(t *testing.T, path string) bool {
	t.Helper()
	_, err := os.Lstat(path)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		t.Fatal(err)
	}
	return err == nil
}

// dirFiles maps every file name of dir to its content ("->target" for a
// symlink, "/" for a directory).
func dirFiles(t *testing.T, dir string) map[string]string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]string{}
	for _, e := range entries {
		p := filepath.Join(dir, e.Name())
		switch {
		case e.Type()&fs.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				t.Fatal(err)
			}
			m[e.Name()] = "->" + target
		case e.IsDir():
			m[e.Name()] = "/"
		default:
			m[e.Name()] = string(readFile(t, p))
		}
	}
	return m
}

// runtimeLoad is the network containerd (go-cni) and CRI-O (ocicni) would
// use from dir with libcni: the first file by name with a config
// extension, a .conflist as a list, anything else as one plugin, upconverted.
func runtimeLoad(t *testing.T, dir string) (*libcni.NetworkConfigList, string) {
	t.Helper()
	files, err := libcni.ConfFiles(dir, []string{".conf", ".conflist", ".json"})
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(files)
	if len(files) == 0 {
		t.Fatalf("the runtime finds no network config in %s", dir)
	}
	f := files[0]
	if strings.HasSuffix(f, ".conflist") {
		l, lerr := libcni.NetworkConfFromFile(f)
		if lerr != nil {
			t.Fatalf("runtime loading %s: %v", f, lerr)
		}
		return l, filepath.Base(f)
	}
	// The deprecated calls are the ones go-cni and ocicni make for a
	// single-plugin file: what the runtime sees is the point.
	c, err := libcni.ConfFromFile(f) //nolint:staticcheck // as the runtimes do
	if err != nil {
		t.Fatalf("runtime loading %s: %v", f, err)
	}
	l, err := libcni.ConfListFromConf(c) //nolint:staticcheck // as the runtimes do
	if err != nil {
		t.Fatalf("runtime upconverting %s: %v", f, err)
	}
	return l, filepath.Base(f)
}

// parseList reads config bytes as libcni does (a single plugin upconverted).
func parseList(t *testing.T, data []byte) *libcni.NetworkConfigList {
	t.Helper()
	var probe map[string]any
	if err := json.Unmarshal(data, &probe); err != nil {
		t.Fatal(err)
	}
	if _, ok := probe["plugins"]; ok {
		l, err := libcni.NetworkConfFromBytes(data)
		if err != nil {
			t.Fatal(err)
		}
		return l
	}
	c, err := libcni.ConfFromBytes(data) //nolint:staticcheck // as the runtimes do
	if err != nil {
		t.Fatal(err)
	}
	l, err := libcni.ConfListFromConf(c) //nolint:staticcheck // as the runtimes do
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// jsonValue decodes raw for semantic comparison.
func jsonValue(t *testing.T, raw []byte) any {
	t.Helper()
	var v any
	if err := json.Unmarshal(raw, &v); err != nil {
		t.Fatalf("%s: %v", raw, err)
	}
	return v
}

// pluginValues are the plugins of l other than vmnic's, decoded.
func pluginValues(t *testing.T, l *libcni.NetworkConfigList) []any {
	t.Helper()
	var vs []any
	for _, p := range l.Plugins {
		if p.Network.Type != BinaryName {
			vs = append(vs, jsonValue(t, p.Bytes))
		}
	}
	return vs
}

// checkChainedList checks the runtime's view of a chained network: the
// original's name, version and plugins, and vmnic's entry once.
func checkChainedList(t *testing.T, got, orig *libcni.NetworkConfigList, entry []byte) {
	t.Helper()
	if got.Name != orig.Name || got.CNIVersion != orig.CNIVersion {
		t.Errorf("network %q version %q, want %q %q", got.Name, got.CNIVersion, orig.Name, orig.CNIVersion)
	}
	n := 0
	for _, p := range got.Plugins {
		if p.Network.Type == BinaryName {
			n++
		}
	}
	// Appended last, unless the original had one: that is updated in place.
	at := len(got.Plugins) - 1
	if i := slices.Index(pluginTypes(orig), BinaryName); i >= 0 {
		at = i
	}
	if n != 1 || got.Plugins[at].Network.Type != BinaryName {
		t.Fatalf("want vmnic's entry once, at %d, plugins: %v", at, pluginTypes(got))
	}
	if e := got.Plugins[at]; !reflect.DeepEqual(jsonValue(t, e.Bytes), jsonValue(t, entry)) {
		t.Errorf("vmnic's entry is %s, want %s", e.Bytes, entry)
	}
	if g, w := pluginValues(t, got), pluginValues(t, orig); !reflect.DeepEqual(g, w) {
		t.Errorf("other plugins changed:\n got %v\nwant %v", g, w)
	}
}

func pluginTypes(l *libcni.NetworkConfigList) []string {
	var ts []string
	for _, p := range l.Plugins {
		ts = append(ts, p.Network.Type)
	}
	return ts
}
