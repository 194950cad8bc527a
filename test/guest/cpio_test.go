package guest

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/vmnic/vmnic/test/need"
)

// TestCPIO checks the newc writer against the cpio tool, including two
// concatenated archives as Start produces them.
func TestCPIO(t *testing.T) {
	need.Binary(t, "cpio")
	var a cpioWriter
	a.Dir("etc", 0o755)
	a.File("etc/hello", 0o644, []byte("hello world\n"))
	a.Symlink("etc/link", "hello")
	var b cpioWriter
	b.File("script.sh", 0o755, []byte("echo hi\n"))
	first := a.Bytes()
	archive := append(append([]byte(nil), first...), b.Bytes()...)
	if len(archive)%512 != 0 {
		t.Errorf("archive length %d not a multiple of 512", len(archive))
	}

	dir := t.TempDir()
	// Each cpio -i run reads one archive; the second starts after the
	// first's padding.
	for _, part := range [][]byte{archive[:len(first)], archive[len(first):]} {
		cmd := exec.Command("cpio", "-i", "-d", "--quiet")
		cmd.Dir = dir
		cmd.Stdin = bytes.NewReader(part)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("cpio -i: %v\n%s", err, out)
		}
	}
	if got, err := os.ReadFile(filepath.Join(dir, "etc/hello")); err != nil || string(got) != "hello world\n" {
		t.Errorf("etc/hello = %q, %v", got, err)
	}
	if got, err := os.Readlink(filepath.Join(dir, "etc/link")); err != nil || got != "hello" {
		t.Errorf("etc/link -> %q, %v", got, err)
	}
	if st, err := os.Stat(filepath.Join(dir, "script.sh")); err != nil || st.Mode().Perm() != 0o755 {
		t.Errorf("script.sh: %v, %v", st, err)
	}
}
