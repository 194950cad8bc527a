package guest

import (
	"bytes"
	"fmt"
	"io/fs"
)

// Mode bits of the newc format (the S_IF* values of stat(2)).
const (
	cpioDir     = 0o040000
	cpioFile    = 0o100000
	cpioSymlink = 0o120000
	cpioCharDev = 0o020000
)

// cpioWriter writes a "newc" (SVR4, no checksum) cpio archive, the format the
// Linux kernel unpacks as an initramfs. Parent directories must be added
// before their entries; the kernel does not create them implicitly.
type cpioWriter struct {
	buf    bytes.Buffer
	ino    uint32
	closed bool
}

// add appends one entry. mode holds both the file type and permission bits.
func (w *cpioWriter) add(name string, mode uint32, rdevMajor, rdevMinor uint32, data []byte) {
	w.ino++
	// nlink stays 1: the kernel treats entries with nlink >= 2 as hard
	// links of each other when their inode numbers match.
	const nlink = 1
	fmt.Fprintf(&w.buf, "070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		w.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdevMajor, rdevMinor, len(name)+1, 0)
	w.buf.WriteString(name)
	w.buf.WriteByte(0)
	w.pad(4)
	w.buf.Write(data)
	w.pad(4)
}

func (w *cpioWriter) pad(n int) {
	for w.buf.Len()%n != 0 {
		w.buf.WriteByte(0)
	}
}

// Dir adds a directory.
func (w *cpioWriter) Dir(name string, perm fs.FileMode) {
	w.add(name, cpioDir|uint32(perm.Perm()), 0, 0, nil)
}

// File adds a regular file.
func (w *cpioWriter) File(name string, perm fs.FileMode, data []byte) {
	w.add(name, cpioFile|uint32(perm.Perm()), 0, 0, data)
}

// Symlink adds a symbolic link name -> target.
func (w *cpioWriter) Symlink(name, target string) {
	w.add(name, cpioSymlink|0o777, 0, 0, []byte(target))
}

// CharDev adds a character device node.
func (w *cpioWriter) CharDev(name string, perm fs.FileMode, major, minor uint32) {
	w.add(name, cpioCharDev|uint32(perm.Perm()), major, minor, nil)
}

// Bytes writes the trailer (on the first call) and returns the archive,
// padded to 512 bytes so that further archives can be appended to it. No
// entries may be added afterwards.
func (w *cpioWriter) Bytes() []byte {
	if !w.closed {
		w.add("TRAILER!!!", 0, 0, 0, nil)
		w.pad(512)
		w.closed = true
	}
	return w.buf.Bytes()
}
