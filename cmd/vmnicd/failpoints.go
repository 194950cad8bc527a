//go:build failpoints

package main

// Built only with -tags failpoints (the hardening tests): VMNIC_FAILPOINT
// names one step of one mode's ADD and what happens after it,
// "<mode>/<step>=kill" (the process SIGKILLs itself, as a node losing it
// would) or "<mode>/<step>=error" (the ADD fails there). Released binaries
// have no such hook.

import (
	"fmt"
	"os"
	"strings"
	"syscall"

	"github.com/vmnic/vmnic/pkg/failpoint"
)

func init() {
	v := os.Getenv("VMNIC_FAILPOINT")
	if v == "" {
		return
	}
	at, action, ok := strings.Cut(v, "=")
	if !ok || (action != "kill" && action != "error") || !strings.Contains(at, "/") {
		fmt.Fprintf(os.Stderr, "VMNIC_FAILPOINT=%q: want <mode>/<step>=kill|error\n", v)
		os.Exit(2)
	}
	failpoint.Set(func(mode, step string) error {
		if mode+"/"+step != at {
			return nil
		}
		if action == "kill" {
			_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
			select {} // the signal is on its way
		}
		return fmt.Errorf("injected failure after %s", at)
	})
}
