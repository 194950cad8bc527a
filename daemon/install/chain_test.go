package install

import (
	"bytes"
	"encoding/json"
	"errors"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestChainGolden chains every sample of testdata (shapes written by Calico,
// Cilium, Flannel, k3s, kindnet; one already chained; one with a stale and a
// duplicate vmnic entry; a single-plugin .conf) as a real file and compares
// with testdata/<sample>.golden (go test -update rewrites them). It also
// proves, per sample, what the runtime then loads, that a second Chain
// writes nothing, and that Unchain gives the original bytes back.
func TestChainGolden(t *testing.T) {
	samples, err := filepath.Glob("testdata/*.conf*")
	if err != nil || len(samples) == 0 {
		t.Fatalf("no samples: %v", err)
	}
	for _, sample := range samples {
		t.Run(filepath.Base(sample), func(t *testing.T) {
			orig := readFile(t, sample)
			origList := parseList(t, orig)
			hadVmnic := slices.Contains(pluginTypes(origList), BinaryName)
			dir := t.TempDir()
			name := "10-" + filepath.Base(sample)
			writeFile(t, filepath.Join(dir, name), orig, 0o644)
			opts := testOptions(t, dir)

			res, err := Chain(opts)
			if err != nil {
				t.Fatal(err)
			}
			got := readFile(t, res.File)
			golden := strings.TrimSuffix(sample, filepath.Ext(sample)) + ".golden"
			if *update {
				writeFile(t, golden, got, 0o644)
			}
			if want := readFile(t, golden); !bytes.Equal(got, want) {
				t.Errorf("%s differs from %s:\n%s", res.File, golden, got)
			}
			if wantChanged := !bytes.Equal(orig, got); res.Changed != wantChanged {
				t.Errorf("Changed = %v, want %v", res.Changed, wantChanged)
			}

			loaded, file := runtimeLoad(t, dir)
			if file != filepath.Base(res.File) {
				t.Errorf("runtime loads %s, vmnic chained %s", file, res.File)
			}
			checkChainedList(t, loaded, origList, DefaultEntry)

			ino := inode(t, res.File)
			res2, err := Chain(opts)
			if err != nil {
				t.Fatal(err)
			}
			if res2.Changed || res2.File != res.File || !bytes.Equal(readFile(t, res.File), got) || inode(t, res.File) != ino {
				t.Errorf("second Chain rewrote the file: %+v", res2)
			}

			if hadVmnic {
				return
			}
			if _, err := Unchain(opts); err != nil {
				t.Fatal(err)
			}
			if want := map[string]string{name: string(orig)}; !maps.Equal(dirFiles(t, dir), want) {
				t.Errorf("after Unchain the dir holds %v, want the original only", dirFiles(t, dir))
			}
		})
	}
}

// Samples of other files found in config dirs.
const (
	calicoList = `{"cniVersion":"0.3.1","name":"k8s-pod-network","plugins":[{"type":"calico","ipam":{"type":"calico-ipam"}},{"type":"portmap","capabilities":{"portMappings":true}}]}`
	ciliumList = `{"cniVersion":"0.3.1","name":"cilium","plugins":[{"type":"cilium-cni","enable-debug":false}]}`
	// Multus thin writes 00-multus.conf with the primary inlined.
	multusThin = `{"cniVersion":"0.3.1","name":"multus-cni-network","type":"multus","capabilities":{"portMappings":true},"kubeconfig":"/etc/cni/net.d/multus.d/multus.kubeconfig","delegates":[` + calicoList + `]}`
	// Multus thick's shim, under a name of the operator's choice.
	multusThick = `{"cniVersion":"0.3.1","name":"multus-cni-network","plugins":[{"type":"multus-shim","logLevel":"verbose","logToStderr":true,"clusterNetwork":"/host/etc/cni/net.d/10-calico.conflist"}]}`
	vmnicOnly   = `{"cniVersion":"1.0.0","name":"vmnic-test","plugins":[{"type":"vmnic","mode":"masquerade"}]}`
	bridgeConf  = `{"cniVersion":"1.0.0","name":"mynet","type":"bridge","bridge":"cni0","ipam":{"type":"host-local","subnet":"10.22.0.0/16"}}`
)

// TestChainPicksPrimary: the primary is the first config by name, the way
// containerd and CRI-O pick it, passing over Multus, vmnic-only configs,
// directories and other extensions; nothing else in the dir is touched, and
// on an error nothing at all.
func TestChainPicksPrimary(t *testing.T) {
	tests := []struct {
		name    string
		files   map[string]string // "/" makes a directory
		want    string            // the file chained
		wantErr error
	}{
		{"lowest name wins", map[string]string{"10-calico.conflist": calicoList, "05-cilium.conflist": ciliumList}, "05-cilium.conflist", nil},
		{"multus by name", map[string]string{"00-multus.conf": multusThin, "10-calico.conflist": calicoList}, "10-calico.conflist", nil},
		{"multus by name, half written", map[string]string{"00-multus.conf": `{"cniVersion":`, "10-calico.conflist": calicoList}, "10-calico.conflist", nil},
		{"multus by type", map[string]string{"01-multus.conf": multusThin, "10-calico.conflist": calicoList}, "10-calico.conflist", nil},
		{"multus-shim by type", map[string]string{"00-thick.conflist": multusThick, "10-calico.conflist": calicoList}, "10-calico.conflist", nil},
		{"vmnic-only config", map[string]string{"00-vmnic.conflist": vmnicOnly, "10-calico.conflist": calicoList}, "10-calico.conflist", nil},
		{"other extensions and dirs", map[string]string{
			"00-a.conflist.bak": "{", "01-b.conf.vmnic-orig": "{", "02-c.yaml": "{", "03-d.conflist": "/",
			".04-e.conflist.vmnic-tmp-1": "{", "10-calico.conflist": calicoList,
		}, "10-calico.conflist", nil},
		{".json single plugin", map[string]string{"10-bridge.json": bridgeConf, "20-calico.conflist": calicoList}, "10-bridge.json.conflist", nil},
		{".conf single plugin", map[string]string{"10-bridge.conf": bridgeConf, "20-calico.conflist": calicoList}, "10-bridge.conflist", nil},
		{".json list", map[string]string{"10-calico.json": calicoList}, "10-calico.json", nil},
		{"only multus", map[string]string{"00-multus.conf": multusThin}, "", ErrNoPrimary},
		{"empty dir", map[string]string{}, "", ErrNoPrimary},
		{"unparseable first file stops", map[string]string{"05-broken.conflist": `{"name":`, "10-calico.conflist": calicoList}, "", ErrInvalidConfig},
		{"empty first file stops", map[string]string{"05-empty.conflist": ``, "10-calico.conflist": calicoList}, "", ErrInvalidConfig},
		{"no plugins list", map[string]string{"10-x.conflist": `{"cniVersion":"1.1.0","name":"x"}`}, "", ErrInvalidConfig},
		{"empty plugins list", map[string]string{"10-x.conflist": `{"cniVersion":"1.1.0","name":"x","plugins":[]}`}, "", ErrInvalidConfig},
		{"duplicate key", map[string]string{"10-x.conflist": `{"cniVersion":"1.1.0","name":"x","plugins":[{"type":"a"}],"name":"y"}`}, "", ErrInvalidConfig},
		{"cniVersion 0.2.0", map[string]string{"10-old.conflist": strings.Replace(calicoList, "0.3.1", "0.2.0", 1)}, "", ErrUnsupportedVersion},
		{"no cniVersion", map[string]string{"10-old.conflist": strings.Replace(calicoList, `"cniVersion":"0.3.1",`, "", 1)}, "", ErrUnsupportedVersion},
		{"cniVersions beyond the shim", map[string]string{"10-new.conflist": strings.Replace(calicoList, `"cniVersion":"0.3.1"`, `"cniVersion":"1.1.0","cniVersions":["1.0.0","1.2.0"]`, 1)}, "", ErrUnsupportedVersion},
		{"cniVersions within the shim", map[string]string{"10-new.conflist": strings.Replace(calicoList, `"cniVersion":"0.3.1"`, `"cniVersions":["1.0.0","1.1.0"],"cniVersion":"1.1.0"`, 1)}, "10-new.conflist", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			for name, content := range tt.files {
				if content == "/" {
					if err := os.Mkdir(filepath.Join(dir, name), 0o755); err != nil {
						t.Fatal(err)
					}
					continue
				}
				writeFile(t, filepath.Join(dir, name), []byte(content), 0o644)
			}
			before := dirFiles(t, dir)
			res, err := Chain(testOptions(t, dir))
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("err = %v, want %v", err, tt.wantErr)
			}
			after := dirFiles(t, dir)
			if err != nil {
				if !maps.Equal(before, after) {
					t.Errorf("the dir changed on error:\n%v\n%v", before, after)
				}
				return
			}
			if res.File != filepath.Join(dir, tt.want) {
				t.Errorf("chained %s, want %s", res.File, tt.want)
			}
			for name, content := range before {
				if name == tt.want || convertedName(name) == tt.want {
					continue
				}
				if after[name] != content {
					t.Errorf("%s was changed", name)
				}
			}
			if !strings.Contains(after[tt.want], `"vmnic"`) {
				t.Errorf("%s has no vmnic entry: %s", tt.want, after[tt.want])
			}
		})
	}
}

// TestChainConvertsConf follows a single-plugin .conf (and .json) through
// conversion, re-chaining, the primary CNI rewriting it, and Unchain,
// checking at each step what the runtime loads.
func TestChainConvertsConf(t *testing.T) {
	for _, tt := range []struct{ name, list string }{
		{"10-flannel.conf", "10-flannel.conflist"},
		{"10-flannel.json", "10-flannel.json.conflist"},
	} {
		t.Run(tt.name, func(t *testing.T) { testConvert(t, tt.name, tt.list) })
	}
}

func testConvert(t *testing.T, name, listName string) {
	dir := t.TempDir()
	conf := filepath.Join(dir, name)
	list := filepath.Join(dir, listName)
	backup := conf + backupSuffix
	orig := readFile(t, "testdata/flannel-legacy.conf")
	writeFile(t, conf, orig, 0o640)
	opts := testOptions(t, dir)

	res, err := Chain(opts)
	if err != nil {
		t.Fatal(err)
	}
	if want := (ChainResult{File: list, Converted: conf, Changed: true}); res != want {
		t.Fatalf("Chain = %+v, want %+v", res, want)
	}
	if exists(t, conf) || !bytes.Equal(readFile(t, backup), orig) {
		t.Fatalf("the original is not set aside as %s: %v", backup, dirFiles(t, dir))
	}
	if fi, serr := os.Stat(list); serr != nil || fi.Mode().Perm() != 0o640 {
		t.Errorf("conflist mode %v (%v), want the original's 0640", fi.Mode(), serr)
	}
	loaded, file := runtimeLoad(t, dir)
	if file != listName {
		t.Fatalf("runtime loads %s", file)
	}
	checkChainedList(t, loaded, parseList(t, orig), DefaultEntry)

	// Again: nothing to do.
	chained := readFile(t, list)
	if res, err = Chain(opts); err != nil || res.Changed || res.File != list {
		t.Fatalf("second Chain = %+v, %v", res, err)
	}
	if !bytes.Equal(readFile(t, list), chained) {
		t.Fatal("second Chain rewrote the conflist")
	}

	// Flannel's installer writes its .conf again, now first in order.
	rewritten := bytes.Replace(orig, []byte(`"hairpinMode": true`), []byte(`"hairpinMode": false`), 1)
	writeFile(t, conf, rewritten, 0o644)
	if res, err = Chain(opts); err != nil || !res.Changed || res.Converted != conf {
		t.Fatalf("Chain after rewrite = %+v, %v", res, err)
	}
	if exists(t, conf) || !bytes.Equal(readFile(t, backup), rewritten) {
		t.Fatalf("the rewritten .conf is not set aside: %v", dirFiles(t, dir))
	}
	loaded, _ = runtimeLoad(t, dir)
	checkChainedList(t, loaded, parseList(t, rewritten), DefaultEntry)

	changed, err := Unchain(opts)
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{conf, list}; !slices.Equal(changed, want) {
		t.Errorf("Unchain changed %v, want %v", changed, want)
	}
	if want := map[string]string{name: string(rewritten)}; !maps.Equal(dirFiles(t, dir), want) {
		t.Errorf("after Unchain: %v", dirFiles(t, dir))
	}
}

// TestChainConvertFinishes: a Chain killed between writing the .conflist and
// renaming the .conf away is finished by the next one; a .conflist that is
// not vmnic's is never overwritten.
func TestChainConvertFinishes(t *testing.T) {
	t.Run("half done", func(t *testing.T) {
		dir := t.TempDir()
		conf := filepath.Join(dir, "10-bridge.conf")
		writeFile(t, conf, []byte(bridgeConf), 0o644)
		opts := testOptions(t, dir)
		if _, err := Chain(opts); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(conf+backupSuffix, conf); err != nil { // undo the last step
			t.Fatal(err)
		}
		res, err := Chain(opts)
		if err != nil || !res.Changed {
			t.Fatalf("Chain = %+v, %v", res, err)
		}
		if want := []string{"10-bridge.conf.vmnic-orig", "10-bridge.conflist"}; !slices.Equal(slices.Sorted(maps.Keys(dirFiles(t, dir))), want) {
			t.Errorf("dir holds %v", dirFiles(t, dir))
		}
	})
	t.Run("foreign conflist", func(t *testing.T) {
		dir := t.TempDir()
		writeFile(t, filepath.Join(dir, "10-bridge.conf"), []byte(bridgeConf), 0o644)
		writeFile(t, filepath.Join(dir, "10-bridge.conflist"), []byte(calicoList), 0o644)
		before := dirFiles(t, dir)
		if _, err := Chain(testOptions(t, dir)); !errors.Is(err, ErrConflict) {
			t.Fatalf("err = %v, want ErrConflict", err)
		}
		if !maps.Equal(before, dirFiles(t, dir)) {
			t.Error("the dir changed")
		}
	})
	t.Run("unchain after the primary rewrote its conf", func(t *testing.T) {
		dir := t.TempDir()
		conf := filepath.Join(dir, "10-bridge.conf")
		writeFile(t, conf, []byte(bridgeConf), 0o644)
		opts := testOptions(t, dir)
		if _, err := Chain(opts); err != nil {
			t.Fatal(err)
		}
		newer := strings.Replace(bridgeConf, "cni0", "cni1", 1)
		writeFile(t, conf, []byte(newer), 0o644)
		if _, err := Unchain(opts); err != nil {
			t.Fatal(err)
		}
		if want := map[string]string{"10-bridge.conf": newer}; !maps.Equal(dirFiles(t, dir), want) {
			t.Errorf("after Unchain: %v", dirFiles(t, dir))
		}
	})
}

// TestChainKeepsModeAndOwner: the rewritten file has the original's mode
// and (as root) owner, through a rename (a new inode).
func TestChainKeepsModeAndOwner(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "10-calico.conflist")
	writeFile(t, path, []byte(calicoList), 0o600)
	root := os.Geteuid() == 0
	if root {
		if err := os.Chown(path, 1234, 5678); err != nil {
			t.Fatal(err)
		}
	}
	ino := inode(t, path)
	if _, err := Chain(testOptions(t, dir)); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode() != 0o600 {
		t.Errorf("mode %v, want 0600", fi.Mode())
	}
	if inode(t, path) == ino {
		t.Error("the file was written in place, not replaced")
	}
	if !root {
		t.Log("not root: owner not checked")
		return
	}
	if st := fi.Sys().(*syscall.Stat_t); st.Uid != 1234 || st.Gid != 5678 {
		t.Errorf("owner %d:%d, want 1234:5678", st.Uid, st.Gid)
	}
}

// TestChainEntry: the entry is configurable, a changed entry is updated where
// it stands (not appended again), and an entry that is not vmnic's refused.
func TestChainEntry(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "10-calico.conflist")
	writeFile(t, path, readFile(t, "testdata/calico.conflist"), 0o644)
	opts := testOptions(t, dir)
	if _, err := Chain(opts); err != nil {
		t.Fatal(err)
	}
	// An admin puts something after vmnic; vmnic's entry stays where it is.
	withTuning := bytes.Replace(readFile(t, path), []byte("\n  ]\n}"), []byte(`,{"type":"tuning"}`+"\n  ]\n}"), 1)
	writeFile(t, path, withTuning, 0o644)

	opts.Entry = json.RawMessage(`{"type": "vmnic", "mode": "masquerade", "socket": "/run/vmnic/other.sock"}`)
	res, err := Chain(opts)
	if err != nil || !res.Changed {
		t.Fatalf("Chain = %+v, %v", res, err)
	}
	l := parseList(t, readFile(t, path))
	if got, want := pluginTypes(l), []string{"calico", "portmap", "bandwidth", "vmnic", "tuning"}; !slices.Equal(got, want) {
		t.Fatalf("plugins %v, want %v", got, want)
	}
	if !reflect.DeepEqual(jsonValue(t, l.Plugins[3].Bytes), jsonValue(t, opts.Entry)) {
		t.Errorf("entry %s, want %s", l.Plugins[3].Bytes, opts.Entry)
	}
	if res, err := Chain(opts); err != nil || res.Changed {
		t.Errorf("Chain with the same entry again = %+v, %v", res, err)
	}

	for _, bad := range []string{`{"type":"bridge"}`, `["vmnic"]`, `{"type":`} {
		opts.Entry = json.RawMessage(bad)
		if _, err := Chain(opts); err == nil {
			t.Errorf("entry %s accepted", bad)
		}
	}
}

// TestUnchain takes vmnic out of every config it is chained into and leaves
// the rest alone.
func TestUnchain(t *testing.T) {
	dir := t.TempDir()
	cilium := readFile(t, "testdata/cilium.conflist")
	calico := readFile(t, "testdata/calico.conflist")
	writeFile(t, filepath.Join(dir, "10-calico.conflist"), calico, 0o644)
	opts := testOptions(t, dir)
	if _, err := Chain(opts); err != nil { // the primary then
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(dir, "05-cilium.conflist"), cilium, 0o644)
	if _, err := Chain(opts); err != nil { // and now
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(dir, "00-multus.conf"), []byte(multusThin), 0o644)
	writeFile(t, filepath.Join(dir, "01-vmnic.conflist"), []byte(vmnicOnly), 0o644)
	writeFile(t, filepath.Join(dir, "notes.txt"), []byte(`{"type":"vmnic"}`), 0o644)

	changed, err := Unchain(opts)
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{filepath.Join(dir, "05-cilium.conflist"), filepath.Join(dir, "10-calico.conflist")}; !slices.Equal(changed, want) {
		t.Errorf("changed %v, want %v", changed, want)
	}
	want := map[string]string{
		"00-multus.conf":     multusThin,
		"01-vmnic.conflist":  vmnicOnly,
		"05-cilium.conflist": string(cilium),
		"10-calico.conflist": string(calico),
		"notes.txt":          `{"type":"vmnic"}`,
	}
	if got := dirFiles(t, dir); !maps.Equal(got, want) {
		t.Errorf("after Unchain:\n%v\nwant\n%v", got, want)
	}
	if changed, err := Unchain(opts); err != nil || len(changed) != 0 {
		t.Errorf("second Unchain = %v, %v", changed, err)
	}
	if changed, err := Unchain(testOptions(t, filepath.Join(dir, "missing"))); err != nil || changed != nil {
		t.Errorf("Unchain of a missing dir = %v, %v", changed, err)
	}
}

// TestSymlinks: a link in the config dir leading outside it is refused and
// the outside file untouched; a link inside is written through (the link
// stays a link); a config dir that is itself a link works.
func TestSymlinks(t *testing.T) {
	t.Run("escape refused", func(t *testing.T) {
		for _, target := range []string{"abs", "../outside/calico.conflist"} {
			root := t.TempDir()
			dir := filepath.Join(root, "net.d")
			outside := filepath.Join(root, "outside", "calico.conflist")
			writeFile(t, outside, []byte(calicoList), 0o644)
			if target == "abs" {
				target = outside
			}
			if err := os.MkdirAll(dir, 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.Symlink(target, filepath.Join(dir, "10-calico.conflist")); err != nil {
				t.Fatal(err)
			}
			opts := testOptions(t, dir)
			if _, err := Chain(opts); !errors.Is(err, ErrSymlinkEscape) {
				t.Errorf("%s: Chain err = %v, want ErrSymlinkEscape", target, err)
			}
			// Unchain refuses it too, and says so.
			writeFile(t, outside, bytes.Replace([]byte(calicoList), []byte(`]}`), []byte(`,{"type":"vmnic"}]}`), 1), 0o644)
			if _, err := Unchain(opts); !errors.Is(err, ErrSymlinkEscape) {
				t.Errorf("%s: Unchain err = %v, want ErrSymlinkEscape", target, err)
			}
			if got := readFile(t, outside); !bytes.Contains(got, []byte(`"vmnic"`)) {
				t.Errorf("%s: the outside file was changed", target)
			}
			if fi, err := os.Lstat(filepath.Join(dir, "10-calico.conflist")); err != nil || fi.Mode()&fs.ModeSymlink == 0 {
				t.Errorf("%s: the link was replaced", target)
			}
		}
	})
	t.Run("inside followed", func(t *testing.T) {
		dir := t.TempDir()
		real := filepath.Join(dir, "calico", "calico.conflist")
		writeFile(t, real, []byte(calicoList), 0o644)
		link := filepath.Join(dir, "10-calico.conflist")
		if err := os.Symlink("calico/calico.conflist", link); err != nil {
			t.Fatal(err)
		}
		res, err := Chain(testOptions(t, dir))
		if err != nil || res.File != link || !res.Changed {
			t.Fatalf("Chain = %+v, %v", res, err)
		}
		if fi, err := os.Lstat(link); err != nil || fi.Mode()&fs.ModeSymlink == 0 {
			t.Error("the link was replaced")
		}
		if !bytes.Contains(readFile(t, real), []byte(`"vmnic"`)) {
			t.Error("the link's target was not chained")
		}
	})
	t.Run("config dir is a link", func(t *testing.T) {
		root := t.TempDir()
		real := filepath.Join(root, "var", "net.d")
		writeFile(t, filepath.Join(real, "10-calico.conflist"), []byte(calicoList), 0o644)
		dir := filepath.Join(root, "net.d")
		if err := os.Symlink(real, dir); err != nil {
			t.Fatal(err)
		}
		res, err := Chain(testOptions(t, dir))
		if err != nil || res.File != filepath.Join(dir, "10-calico.conflist") {
			t.Fatalf("Chain = %+v, %v", res, err)
		}
		if !bytes.Contains(readFile(t, filepath.Join(real, "10-calico.conflist")), []byte(`"vmnic"`)) {
			t.Error("not chained")
		}
	})
}

// TestChainRace: a primary CNI rewriting its file between vmnic's read and
// rename wins: vmnic sees the change and chains the new content.
func TestChainRace(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "10-calico.conflist")
	writeFile(t, path, []byte(calicoList), 0o644)
	c, err := testOptions(t, dir).config()
	if err != nil {
		t.Fatal(err)
	}
	f, err := c.load(dir, "10-calico.conflist")
	if err != nil {
		t.Fatal(err)
	}
	newer := strings.Replace(calicoList, "portmap", "bandwidth", 1)
	writeFile(t, path, []byte(newer), 0o644)
	out, _ := f.doc.chained(c.entry, c.isEntry)
	if err := writeConf(f.real, out, f, f); !errors.Is(err, errRaced) {
		t.Fatalf("write over a changed file: %v, want errRaced", err)
	}
	if got := readFile(t, path); string(got) != newer {
		t.Fatalf("the primary's rewrite was overwritten: %s", got)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 1 {
		t.Errorf("temp file left behind: %v", dirFiles(t, dir))
	}
}

// TestStaleTempsRemoved: temp files a killed installer left are removed, a
// young one (another installer at work) is not.
func TestStaleTempsRemoved(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "10-calico.conflist"), []byte(calicoList), 0o644)
	old := filepath.Join(dir, ".10-calico.conflist"+tempMarker+"111")
	young := filepath.Join(dir, ".10-calico.conflist"+tempMarker+"222")
	writeFile(t, old, []byte("{"), 0o600)
	writeFile(t, young, []byte("{"), 0o600)
	past := time.Now().Add(-time.Hour)
	if err := os.Chtimes(old, past, past); err != nil {
		t.Fatal(err)
	}
	if _, err := Chain(testOptions(t, dir)); err != nil {
		t.Fatal(err)
	}
	if exists(t, old) || !exists(t, young) {
		t.Errorf("dir holds %v", slices.Sorted(maps.Keys(dirFiles(t, dir))))
	}
}
