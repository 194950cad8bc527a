// Package libnbd is a stand-in for the libnbd Go binding with the API that
// KubeVirt v1.8.2's virt-launcher compiles against. No NBD client is in it:
// Create returns an error, and every method of a handle (which Create never
// returns) panics. Backup and changed-block tracking therefore fail with a
// clear error in a build with this stand-in; nothing else calls it.
package libnbd

import (
	"errors"
	"fmt"
	"os"
)

// ErrStandIn is what Create returns.
var ErrStandIn = errors.New("libnbd stand-in: this KubeVirt build has no NBD client (backup and changed-block tracking are not supported)")

// Meta contexts and block-status flags, as libnbd defines them.
const (
	CONTEXT_BASE_ALLOCATION   = "base:allocation"
	CONTEXT_QEMU_DIRTY_BITMAP = "qemu:dirty-bitmap:"

	STATE_HOLE  = uint32(0x01)
	STATE_ZERO  = uint32(0x02)
	STATE_DIRTY = uint32(0x01)
)

// Libnbd is a handle; the stand-in never makes one.
type Libnbd struct{}

// LibnbdError is libnbd's error type.
type LibnbdError struct {
	Op     string
	Errmsg string
	Errno  int
}

func (e *LibnbdError) Error() string { return e.Op + ": " + e.Errmsg }

// LibnbdExtent is one extent of a block-status reply.
type LibnbdExtent struct {
	Length uint64
	Flags  uint64
}

// Extent64Callback receives the extents of BlockStatus64.
type Extent64Callback func(metacontext string, offset uint64, entries []LibnbdExtent, error *int) int

// PreadOptargs and BlockStatus64Optargs are the optional arguments.
type (
	PreadOptargs         struct{}
	BlockStatus64Optargs struct{}
)

// Create fails: there is no NBD client in this build.
func Create() (*Libnbd, error) {
	fmt.Fprintln(os.Stderr, ErrStandIn.Error())
	return nil, ErrStandIn
}

func standIn(op string) {
	panic("libnbd stand-in: " + op + " called: " + ErrStandIn.Error())
}

func (h *Libnbd) Close() *LibnbdError              { standIn("Close"); return nil }
func (h *Libnbd) AddMetaContext(name string) error { standIn("AddMetaContext"); return nil }
func (h *Libnbd) CanMetaContext(name string) (bool, error) {
	standIn("CanMetaContext")
	return false, nil
}
func (h *Libnbd) GetSize() (uint64, error)        { standIn("GetSize"); return 0, nil }
func (h *Libnbd) SetExportName(name string) error { standIn("SetExportName"); return nil }
func (h *Libnbd) ConnectUnix(path string) error   { standIn("ConnectUnix"); return nil }

func (h *Libnbd) Pread(buf []byte, offset uint64, optargs *PreadOptargs) error {
	standIn("Pread")
	return nil
}

func (h *Libnbd) BlockStatus64(count, offset uint64, extent64 Extent64Callback, optargs *BlockStatus64Optargs) error {
	standIn("BlockStatus64")
	return nil
}
