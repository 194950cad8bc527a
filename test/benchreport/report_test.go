package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func write(t *testing.T, name, text string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// value is the rendered value of the first row whose figure starts with
// what.
func value(t *testing.T, lines []line, what string) string {
	t.Helper()
	for _, l := range lines {
		if strings.HasPrefix(l.what, what) {
			return l.val
		}
	}
	t.Fatalf("no row %q", what)
	return ""
}

func TestBenchLines(t *testing.T) {
	in := newInput()
	p := write(t, "bench.txt", `goos: linux
BenchmarkConcurrentAddDel-2   	       3	9873778311 ns/op	        20.87 ADD/s	        19.69 DEL/s	      4792 add-burst-ms
BenchmarkPeerBridgeAddDel
--- FAIL: BenchmarkPeerBridgeAddDel-2
    bench_peer_test.go:71: boom
BenchmarkAddDeletePort/bg=0-2         	      50	   1000 ns/op	 8.000 vsctl/libovsdb	 4.000 vsctl-ms/op
BenchmarkPeerScaleBridge-2   	       1	 1000 ns/op	 1.20 vmnic-last/first	 1.60 ovscni-last/first	 30.0 vmnic-add250-ms-median	 40.0 ovscni-add250-ms-median
`)
	if err := in.read(p); err != nil {
		t.Fatal(err)
	}
	lines := in.benchLines()
	for what, want := range map[string]string{
		"100 concurrent CNI ADDs":           "20.9/s",
		"… then their 100 DELs":             "19.7/s",
		"… wall time of the 100-ADD burst":  "4792 ms",
		"… one DEL in the burst: p99":       notMeasured,
		"bridge mode, a VM NIC":             failed,
		"OVS port add+delete":               "0.12",
		"the same with 100 ports":           notRun,
		"masquerade VM NIC: ADD (ptp + hos": notRun,
	} {
		if got := value(t, lines, what); got != want {
			t.Errorf("%s: %q, want %q", what, got, want)
		}
	}
}

// TestPeerText: a row's peers are figures of the same run, with the ratio
// where the row asks for one, and say "not run" when the peer did not run.
func TestPeerText(t *testing.T) {
	in := newInput()
	p := write(t, "bench.txt", `BenchmarkPeerScaleBridge-2   	       1	 1000 ns/op	 1.20 vmnic-last/first	 1.60 ovscni-last/first	 30.0 vmnic-add250-ms-median	 40.0 ovscni-add250-ms-median
BenchmarkAddDeletePort/bg=0-2         	      50	   1000 ns/op	 8.000 vsctl/libovsdb	 4.000 vsctl-ms/op
`)
	if err := in.read(p); err != nil {
		t.Fatal(err)
	}
	peersOf := func(what string) string {
		for _, l := range in.benchLines() {
			if strings.HasPrefix(l.what, what) {
				return l.peers
			}
		}
		t.Fatalf("no row %q", what)
		return ""
	}
	for what, want := range map[string]string{
		"250 ports one after the other":     peerOVSCNI + ": 1.60",
		"… ADD of the 250th port":           "ovs-cni: 40.0 ms (vmnic 0.75x)",
		"OVS port add+delete":               "ovs-vsctl: 4.0 ms/op; libovsdb: not run; ~30x",
		"masquerade VM NIC: ADD (ptp + hos": peerPrimary + ": not run; " + noPeerHere,
	} {
		if got := peersOf(what); !strings.HasPrefix(got, want) {
			t.Errorf("%s: peers %q, want it to start with %q", what, got, want)
		}
	}
}

func TestMigrationLines(t *testing.T) {
	in := newInput()
	// Three runs of each test (a -count 3 log), one failed after its
	// probe line (left out of the medians); daemon debug lines in between.
	var b strings.Builder
	for i, r := range []struct{ bridge, passt, verdict string }{
		{"probe every 50 ms: 162 sent, 160 answered, 2 lost; longest gap 205ms (ending 22:14:04.623); QEMU downtime 8 ms", "TCP probe every 50 ms to a port passt forwards: 193 sent, 191 answered, 2 lost; longest gap 279ms; QEMU downtime 7 ms", "PASS"},
		{"probe every 50 ms: 170 sent, 166 answered, 4 lost; longest gap 1.25s (ending 22:16:04.623); QEMU downtime 30 ms", "TCP probe every 50 ms to a port passt forwards: 200 sent, 195 answered, 5 lost; longest gap 300ms; QEMU downtime 9 ms", "PASS"},
		{"probe every 50 ms: 150 sent, 149 answered, 1 lost; longest gap 100ms (ending 22:18:04.623); QEMU downtime 10 ms", "TCP probe every 50 ms to a port passt forwards: 190 sent, 190 answered, 0 lost; longest gap 150ms; QEMU downtime 8 ms", "FAIL"},
	} {
		b.WriteString("=== RUN   TestBridgeLiveMigration\ntime=x level=DEBUG msg=\"request done\" test=TestBridgeLiveMigration\n")
		fmt.Fprintf(&b, "    live_migration_test.go:276: hold released %dms after QEMU reported the migration completed\n", 40+10*i)
		b.WriteString("    live_migration_test.go:296: " + r.bridge + "\n--- " + r.verdict + ": TestBridgeLiveMigration (26.54s)\n")
		b.WriteString("=== RUN   TestPasstLiveMigration\n")
		if i == 1 { // only one passt run logs its switchover
			b.WriteString("    passt_migration_test.go:323: the underlay's neighbour entry moved to the target 36ms after QEMU reported the migration completed\n")
		}
		b.WriteString("    passt_migration_test.go:335: " + r.passt + "\n")
		// The same run's IPv6 probe, its gap 100 ms longer.
		fmt.Fprintf(&b, "    passt_migration_test.go:337: IPv6: the underlay's neighbour entry moved to the target %dms after QEMU reported the migration completed\n", 30+i)
		fmt.Fprintf(&b, "    passt_migration_test.go:339: IPv6: TCP probe every 50 ms to a port passt forwards: 190 sent, 180 answered, %d lost; longest gap %dms; QEMU downtime 8 ms\n", 10+i, 400+100*i)
		b.WriteString("--- PASS: TestPasstLiveMigration (30.19s)\n")
	}
	if err := in.read(write(t, "migration.txt", b.String())); err != nil {
		t.Fatal(err)
	}
	lines := in.migrationLines()
	want := []string{
		// bridge: the passed runs' gaps 205 and 1250 ms, minus downtime
		// 197 and 1220 ms, switchovers 40 and 50 ms; the upper median of
		// two.
		"1250 ms", "1220 ms", "50 ms", "4 of 170", "30 ms", "3 (1 failed, left out of the medians)",
		"279 ms", "272 ms", "36 ms", "2 of 193", "8 ms", "3",
		// passt's IPv6 probe: gaps 400, 500, 600 ms; switchovers 30-32.
		"500 ms", "492 ms", "31 ms", "11 of 190", "8 ms", "3",
	}
	if len(lines) != len(want) {
		t.Fatalf("%d rows, want %d", len(lines), len(want))
	}
	for i, l := range lines {
		if l.val != want[i] {
			t.Errorf("row %d %q: %q, want %q", i, l.what, l.val, want[i])
		}
	}
	if lines[1].goal != "< 100 ms" || !strings.Contains(lines[0].peers, "< 0.5 s") {
		t.Errorf("goal %q, peers %q", lines[1].goal, lines[0].peers)
	}

	// Nothing ran, or the machine lacks QEMU.
	empty := newInput()
	if err := empty.read(write(t, "skip.txt", "=== RUN   TestPasstLiveMigration\n--- SKIP: TestPasstLiveMigration (0.01s)\n")); err != nil {
		t.Fatal(err)
	}
	lines = empty.migrationLines()
	if lines[0].val != notRun || lines[6].val != skipped || lines[11].val != skipped || lines[12].val != skipped {
		t.Errorf("bridge %q, passt %q %q, IPv6 %q: want not run, skipped", lines[0].val, lines[6].val, lines[11].val, lines[12].val)
	}

	// A log cut short after the probe line (a timeout's panic): a failure.
	cut := newInput()
	if err := cut.read(write(t, "cut.txt", "=== RUN   TestBridgeLiveMigration\n    live_migration_test.go:296: probe every 50 ms: 150 sent, 149 answered, 1 lost; longest gap 100ms (ending 22:18:04.623); QEMU downtime 10 ms\npanic: test timed out after 30m0s\n")); err != nil {
		t.Fatal(err)
	}
	lines = cut.migrationLines()
	if lines[0].val != failed || lines[5].val != "1 (1 failed, left out of the medians)" {
		t.Errorf("cut log: gap %q, runs %q", lines[0].val, lines[5].val)
	}
}

func TestFuzzLines(t *testing.T) {
	in := newInput()
	if got := in.fuzzLines(); len(got) != 1 || got[0].val != notRun {
		t.Errorf("without fuzz output: %+v", got)
	}
	p := write(t, "fuzz.txt", `== FuzzParse (./pkg/netconf, 10s)
fuzz: elapsed: 0s, gathering baseline coverage: 0/204 completed
fuzz: elapsed: 3s, execs: 43534 (14508/sec), new interesting: 1 (total: 205)
fuzz: elapsed: 10s, execs: 1234567 (0/sec), new interesting: 1 (total: 205)
PASS
ok  	github.com/vmnic/vmnic/pkg/netconf	10.374s
== FuzzHandle (./daemon, 10s)
fuzz: elapsed: 2s, gathering baseline coverage: 54/54 completed, now fuzzing with 2 workers
fuzz: elapsed: 3s, execs: 76 (25/sec), new interesting: 0 (total: 54)
--- FAIL: FuzzHandle (3.10s)
FAIL
== FuzzDecodeRequest (./pkg/proto, 10s)
FAIL	github.com/vmnic/vmnic/pkg/proto [build failed]
== FuzzParseArgs (./pkg/netconf, 10s)
fuzz: elapsed: 10s, execs: 5000 (0/sec), new interesting: 0 (total: 9)
--- FAIL: FuzzParseArgs (10.20s)
    context deadline exceeded
FAIL

== fuzz summary (fuzztime 10s)
FuzzParse          ok    execs: 1234567
FuzzHandle         FAIL  execs: 76
FuzzDecodeRequest  FAIL  execs: ?
FuzzParseArgs      ok    execs: 5000 (ended by the coordinator deadline race, golang/go#75804; no crasher)
`)
	if err := in.read(p); err != nil {
		t.Fatal(err)
	}
	lines := in.fuzzLines()
	want := []string{
		"1,234,567 (123,456/s)", "failed after 76 executions (crasher in the package's testdata/fuzz/)", failed,
		"5,000 (500/s), ended by Go's fuzzing-deadline race (golang/go#75804), no crasher",
	}
	if len(lines) != len(want) {
		t.Fatalf("rows %+v", lines)
	}
	for i, l := range lines {
		if l.val != want[i] {
			t.Errorf("row %d %q: %q, want %q", i, l.what, l.val, want[i])
		}
	}
	if lines[0].what != "fuzzing FuzzParse (pkg/netconf) for 10s: executions" {
		t.Errorf("figure %q", lines[0].what)
	}
}

func TestMissingFileIsNotRun(t *testing.T) {
	in := newInput()
	if err := in.read(filepath.Join(t.TempDir(), "none.txt")); !os.IsNotExist(err) {
		t.Fatalf("read of a missing file: %v, want not exist", err)
	}
	for _, l := range append(append(in.benchLines(), in.migrationLines()...), in.fuzzLines()...) {
		if l.val != notRun {
			t.Errorf("%q: %q, want %q", l.what, l.val, notRun)
		}
	}
}

func TestDemoLine(t *testing.T) {
	in := newInput()
	if got := in.demoLines()[0].val; got != notRun {
		t.Errorf("no demo output: %q, want %q", got, notRun)
	}
	if err := in.read(write(t, "demo.txt", "deps: ready for the demo\ndemo-fresh: make demo took 248 s (packages installed: no)\n")); err != nil {
		t.Fatal(err)
	}
	l := in.demoLines()[0]
	if l.val != "4 min 08 s" || !strings.Contains(l.what, "installed by the run") {
		t.Errorf("demo row %+v", l)
	}
}

// TestSplitBenchLine: a benchmark that printed while it ran has its figures
// on a line of their own after that output.
func TestSplitBenchLine(t *testing.T) {
	in := newInput()
	p := write(t, "bench.txt", "BenchmarkPeerConcurrentAdd-2   \tbench: 23 of 100 failed at their first try\nbench: 33 of 100 failed\n       3\t13967530980 ns/op\t       300.0 adds-per-arm\t        69.43 ovscni-ADD/s\t       100.5 vmnic-plain-ADD/s\n")
	if err := in.read(p); err != nil {
		t.Fatal(err)
	}
	if got := in.bench["BenchmarkPeerConcurrentAdd vmnic-plain-ADD/s"]; got != 100.5 {
		t.Errorf("vmnic-plain-ADD/s = %v, want 100.5", got)
	}
	if got := in.bench["BenchmarkPeerConcurrentAdd ovscni-ADD/s"]; got != 69.43 {
		t.Errorf("ovscni-ADD/s = %v, want 69.43", got)
	}
}

// TestKeepOld: with -keep a row without a figure in this run takes the
// previous report's value and peers, matched by its text (and, for a row
// continuing another, by both); a row measured now keeps its new figure; a
// row of the previous report this run does not write stays in its place.
func TestKeepOld(t *testing.T) {
	old := "# vmnic benchmarks\n\nGenerated by `make bench` on 2026-12-02. Medians.\n\n" +
		"| figure | value | goal | peers |\n|---|---|---|---|\n" +
		"| shim exec | 3.1 ms | — | Go: 2.0 ms |\n" +
		"| … its DEL | 9 ms | — | — |\n" +
		"| real node | 500 ms | — | alone: 480 ms |\n" +
		"| … its DEL | 70 ms | — | — |\n" +
		"| gone row | 1 ms | — | — |\n"
	lines := []line{
		{what: "shim exec", val: notRun},
		{what: "… its DEL", val: notRun},
		{what: "real node", val: "510 ms", peers: "alone: 490 ms"},
		{what: "… its DEL", val: "60 ms"},
		{what: "new row", val: notRun},
	}
	lines = keepOld(lines, old)
	want := []line{
		{what: "shim exec", val: "3.1 ms", peers: "Go: 2.0 ms"},
		{what: "… its DEL", val: "9 ms", peers: "—"},
		{what: "real node", val: "510 ms", peers: "alone: 490 ms"},
		{what: "… its DEL", val: "60 ms"},
		// Not a row of this run: kept after the line it followed.
		{what: "gone row", val: "1 ms", peers: "—"},
		{what: "new row", val: notRun},
	}
	if len(lines) != len(want) {
		t.Fatalf("%d lines, want %d: %+v", len(lines), len(want), lines)
	}
	for i := range want {
		if lines[i].val != want[i].val || lines[i].peers != want[i].peers {
			t.Errorf("line %d %q: %q, %q; want %q, %q", i, lines[i].what, lines[i].val, lines[i].peers, want[i].val, want[i].peers)
		}
	}
	if got := generatedOn(old); got != "2026-12-02" {
		t.Errorf("generatedOn = %q", got)
	}
	again := "# vmnic benchmarks\n\nGenerated by `make bench`; 18 rows updated on 2026-12-07 by a run of part of it, the others from earlier runs (the oldest on 2026-12-02). Medians.\n\nMachine: 2026-01-01\n"
	if got := generatedOn(again); got != "2026-12-02" {
		t.Errorf("generatedOn after a partial run = %q, want the oldest date of the first paragraph", got)
	}
}
