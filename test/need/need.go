// Package need states what a test needs from the machine. Outside CI a
// missing piece skips the test with the reason; in CI (CI set) it fails it,
// because CI installs everything and a skip there would hide a gap.
package need

import (
	"os"
	"os/exec"
	"testing"
)

func missing(t testing.TB, format string, a ...any) {
	t.Helper()
	if os.Getenv("CI") != "" {
		t.Fatalf("CI is set and a prerequisite is missing: "+format, a...)
	}
	t.Skipf("SKIPPING: "+format, a...)
}

// Root needs euid 0 (namespaces, links, nftables).
func Root(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		missing(t, "needs root (network namespaces, links, nftables)")
	}
}

// Binary needs an executable on PATH.
func Binary(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		missing(t, "needs the %s binary (make deps): %v", name, err)
	}
	return p
}

// NoError needs a prerequisite check to pass.
func NoError(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		missing(t, "%v", err)
	}
}

// NodeVMEnv is set (to 1) in the environment of the tests the node VM runs
// (test/nodevm): a Debian kernel with every feature the suite uses.
const NodeVMEnv = "VMNIC_TEST_NODEVM"

// InNodeVM reports whether the test runs inside the node VM.
func InNodeVM() bool { return os.Getenv(NodeVMEnv) == "1" }

// KernelFeature needs the running kernel to have feature (ok says whether
// it does). This project's machines lack some (ipvlan, the openvswitch
// module, 802.1q): there the test skips, naming the feature, even in CI,
// because CI runs those tests again inside the node VM, where a missing
// feature fails the test.
func KernelFeature(t testing.TB, ok bool, feature string) {
	t.Helper()
	if ok {
		return
	}
	if InNodeVM() {
		t.Fatalf("the node VM's kernel lacks %s", feature)
	}
	t.Skipf("the kernel has no %s: this runs in the node VM (test/nodevm)", feature)
}
