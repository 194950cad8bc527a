// Command bench runs, inside the node VM (test/nodevm), the OVS benchmarks
// on both datapaths of one ovs-vswitchd build, one after the other in one
// boot: BenchmarkScaleBridge (250 VM NICs on one bridge) and
// BenchmarkAddDeletePort (libovsdb against ovs-vsctl at 0 and 100 ports),
// each on the kernel datapath (system) and on the userspace one (netdev).
// It writes their output to -o with the benchmarks renamed
// BenchmarkNodeVMSystem… and BenchmarkNodeVMNetdev…, for test/benchreport.
//
//	go run ./test/nodevm/bench -o .tools/bench/nodevm.txt
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/vmnic/vmnic/test/cluster"
	"github.com/vmnic/vmnic/test/nodevm"
	"github.com/vmnic/vmnic/test/ovs"
)

func main() {
	out := flag.String("o", "nodevm.txt", "output file")
	flag.Parse()
	if err := run(*out); err != nil {
		log.Fatal(err)
	}
}

var benchRE = regexp.MustCompile(`\bBenchmark([A-Z])`)

func run(out string) error {
	root, err := cluster.RepoRoot()
	if err != nil {
		return err
	}
	img, err := nodevm.FindImage(root)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Minute)
	defer cancel()
	dir, err := os.MkdirTemp("", "nodevm")
	if err != nil {
		return err
	}
	defer func() { _ = os.RemoveAll(dir) }()
	s, err := nodevm.Prepare(ctx, root, dir, "test/integration", "pkg/ovsdb")
	if err != nil {
		return err
	}
	var runs []nodevm.Run
	for _, dp := range []string{"system", "netdev"} {
		env := []string{ovs.DatapathEnv + "=" + dp}
		runs = append(runs,
			s.Run("scale-"+dp, "test/integration", env, "-test.run", "^$", "-test.bench", "^BenchmarkScaleBridge$", "-test.benchtime", "1x", "-test.timeout", "40m"),
			s.Run("ovsdb-"+dp, "pkg/ovsdb", env, "-test.run", "^$", "-test.bench", "^BenchmarkAddDeletePort$", "-test.benchtime", "50x", "-test.timeout", "40m"),
		)
	}
	console, err := os.Create(filepath.Join(dir, "console.log"))
	if err != nil {
		return err
	}
	defer func() { _ = console.Close() }()
	opts := s.Options
	opts.Console = console
	res, err := nodevm.Boot(ctx, img, dir, opts, runs)
	if err != nil {
		return err
	}
	var b strings.Builder
	fmt.Fprintf(&b, "nodevm: accel=%s boot=%.1fs wall=%.0fs\n", res.Accel, res.Boot.Seconds(), res.Wall.Seconds())
	failed := false
	for _, r := range res.Runs {
		dp := "Netdev"
		if strings.HasSuffix(r.Name, "-system") {
			dp = "System"
		}
		fmt.Fprintf(&b, "nodevm: %s exit=%d %.0fs\n", r.Name, r.Exit, r.Duration.Seconds())
		b.WriteString(benchRE.ReplaceAllString(r.Output, "BenchmarkNodeVM"+dp+"$1"))
		if r.Exit != 0 {
			failed = true
		}
	}
	if err := os.WriteFile(out, []byte(b.String()), 0o644); err != nil {
		return err
	}
	fmt.Print(b.String())
	if failed {
		return fmt.Errorf("a benchmark failed in the node VM (see %s)", out)
	}
	return nil
}
