// Package failpoint lets tests stop an ADD after a named step, to prove that
// a failure or a daemon killed at that point leaves nothing behind.
//
// Product code calls Hit after each step; with no hook installed (always, in
// a released binary) Hit is one atomic load. Tests install a hook with Set,
// in process, or build vmnicd with the "failpoints" tag, which installs one
// from the VMNIC_FAILPOINT environment variable (see cmd/vmnicd).
package failpoint

import "sync/atomic"

// Record is the daemon's last step of every mode's ADD: after the wiring,
// before the attachment's record (with the result) is written.
const Record = "record"

// Func is called with the mode and the step just completed; a non-nil error
// fails the ADD as if the step had.
type Func func(mode, step string) error

var hook atomic.Pointer[Func]

// Set installs f (tests only); nil removes the hook.
func Set(f Func) {
	if f == nil {
		hook.Store(nil)
		return
	}
	hook.Store(&f)
}

// Hit reports that mode's ADD completed step.
func Hit(mode, step string) error {
	if f := hook.Load(); f != nil {
		return (*f)(mode, step)
	}
	return nil
}
