package virt

import (
	"hash/crc32"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
)

// TestPadDiskCRC32: padding brings a disk's CRC-32 under 2^31 with whole
// zeroed sectors, and leaves the data before them as it was.
func TestPadDiskCRC32(t *testing.T) {
	padded := 0
	for seed := range uint64(16) {
		r := rand.New(rand.NewPCG(seed, 1))
		data := make([]byte, 64<<10)
		for i := range data {
			data[i] = byte(r.Uint32())
		}
		path := filepath.Join(t.TempDir(), "disk.img")
		if err := os.WriteFile(path, data, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := padDiskCRC32(path); err != nil {
			t.Fatal(err)
		}
		got, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if crc := crc32.ChecksumIEEE(got); crc > math.MaxInt32 {
			t.Errorf("seed %d: CRC-32 %#x after padding", seed, crc)
		}
		if len(got)%512 != 0 || string(got[:len(data)]) != string(data) {
			t.Errorf("seed %d: %d bytes after padding, or the data changed", seed, len(got))
		}
		for _, b := range got[len(data):] {
			if b != 0 {
				t.Fatalf("seed %d: padding not zero", seed)
			}
		}
		if len(got) > len(data) {
			padded++
		}
	}
	if padded == 0 {
		t.Error("no disk of 16 needed padding: the test checks nothing")
	}
}
