package nodevm_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/vmnic/vmnic/test/cluster"
	"github.com/vmnic/vmnic/test/need"
	"github.com/vmnic/vmnic/test/nodevm"
	"github.com/vmnic/vmnic/test/ovs"
)

// suite is one test binary the node VM runs and the tests it must pass
// there: the ones this machine's kernel skips or runs on the userspace
// datapath only.
type suite struct {
	pkg   string // package directory, from the repository root
	tests []string
	env   []string
}

var suites = []suite{
	{
		pkg: "test/integration",
		tests: []string{
			// passt over ipvlan: the mode table's ipvlan row.
			"TestPasstIpvlan",
			"TestPasstIpvlanTwoNICs",
			"TestPasstIpvlanMigrationHold",
			// deploy/examples/passt-ipvlan through the NAD the real
			// spiderpool-controller makes of it.
			"TestPasstIpvlanExample",
			// passt over macvlan on an 802.1q sub-interface.
			"TestPasstMacvlanOnVLAN",
			// bridge mode on the kernel datapath: VLAN reachability.
			"TestBridgePlainPods",
			"TestBridgeTrunk",
		},
		env: []string{ovs.DatapathEnv + "=system"},
	},
	{
		// The capability report against the API server and Spiderpool's
		// agent: PasstIpvlanReady=True with ipvlan in the kernel.
		pkg:   "pkg/capabilities",
		tests: []string{"TestPublishToAPIServer"},
	},
}

// TestNodeVM runs the suites inside the node VM, which boots Debian's
// kernel (ipvlan, openvswitch and 8021q modules loaded), each test in it
// as a subtest here. A test that skips inside the VM fails: the VM exists
// to have what the host lacks.
func TestNodeVM(t *testing.T) {
	need.Root(t)
	need.Binary(t, "qemu-system-x86_64")
	root, err := cluster.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	img, err := nodevm.FindImage(root)
	need.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Minute)
	defer cancel()

	dir, err := os.MkdirTemp("", "nodevm")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	var picked []suite
	var pkgs []string
	for _, s := range suites {
		if s.tests = only(t, s.tests); len(s.tests) > 0 {
			picked = append(picked, s)
			pkgs = append(pkgs, s.pkg)
		}
	}
	start := time.Now()
	setup, err := nodevm.Prepare(ctx, root, dir, pkgs...)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("test binaries and tools built in %s", time.Since(start).Round(100*time.Millisecond))
	var runs []nodevm.Run
	for _, s := range picked {
		runs = append(runs, setup.Run(strings.ReplaceAll(s.pkg, "/", "_"), s.pkg, s.env,
			"-test.v", "-test.count=1", "-test.timeout=30m", "-test.run", "^("+strings.Join(s.tests, "|")+")$"))
	}
	console, err := os.Create(filepath.Join(dir, "console.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = console.Close() }()
	opts := setup.Options
	opts.Console = console
	res, err := nodevm.Boot(ctx, img, dir, opts, runs)
	if res != nil {
		t.Logf("node VM (%s): booted in %s, ran for %s in all", res.Accel, res.Boot.Round(100*time.Millisecond), res.Wall.Round(time.Second))
	}
	if err != nil {
		t.Fatalf("node VM: %v", err)
	}
	for i, s := range picked {
		r := res.Runs[i]
		t.Logf("%s: exit %d after %s", s.pkg, r.Exit, r.Duration.Round(100*time.Millisecond))
		for _, name := range s.tests {
			t.Run(name, func(t *testing.T) { checkResult(t, r, name) })
		}
		if r.Exit != 0 && !t.Failed() {
			t.Errorf("%s exited %d with every listed test passed:\n%s", s.pkg, r.Exit, tailLines(r.Output, 60))
		}
	}
}

// RunEnv narrows the tests the VM runs to those matching a regular
// expression, for work on one of them.
const RunEnv = "VMNIC_TEST_NODEVM_RUN"

func only(t *testing.T, tests []string) []string {
	re := os.Getenv(RunEnv)
	if re == "" {
		return tests
	}
	r, err := regexp.Compile(re)
	if err != nil {
		t.Fatalf("%s: %v", RunEnv, err)
	}
	var out []string
	for _, n := range tests {
		if r.MatchString(n) {
			out = append(out, n)
		}
	}
	return out
}

// checkResult passes when the run's verbose output says name passed.
func checkResult(t *testing.T, r nodevm.RunResult, name string) {
	m := regexp.MustCompile(`(?m)^--- (PASS|FAIL|SKIP): ` + regexp.QuoteMeta(name) + ` \(([^)]*)\)`).FindStringSubmatch(r.Output)
	switch {
	case m == nil:
		t.Fatalf("no result in the node VM (exit %d); its output ends:\n%s", r.Exit, tailLines(r.Output, 80))
	case m[1] == "PASS":
		t.Logf("passed in the node VM in %s", m[2])
		for _, l := range logLine.FindAllString(testOutput(r.Output, name), -1) {
			t.Log("in the VM:" + l)
		}
	default:
		t.Fatalf("%s in the node VM:\n%s", m[1], testOutput(r.Output, name))
	}
}

// logLine is a line a test logged (t.Logf) in the VM's verbose output.
var logLine = regexp.MustCompile(`(?m) +\w+_test\.go:\d+: .*$`)

// testOutput is the verbose output of one top-level test and its subtests.
func testOutput(out, name string) string {
	i := strings.Index(out, "=== RUN   "+name+"\n")
	if i < 0 {
		return tailLines(out, 80)
	}
	rest := out[i:]
	if j := strings.Index(rest[1:], "\n=== RUN   Test"); j >= 0 {
		rest = rest[:j+1]
	}
	return tailLines(rest, 200)
}

func tailLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = append([]string{fmt.Sprintf("[%d lines before]", len(lines)-n)}, lines[len(lines)-n:]...)
	}
	return strings.Join(lines, "\n")
}
