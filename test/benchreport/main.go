// Command benchreport turns the output of vmnic's Go benchmarks (make bench)
// into docs/benchmarks.md: each figure next to its goal and the peers'
// figure, with the machine it ran on.
//
//	go run ./test/benchreport -o docs/benchmarks.md bench-integration.txt bench-ovsdb.txt ...
package main

import (
	"bufio"
	"flag"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"time"
)

// row is one line of the report: the metric a benchmark reported.
type row struct {
	bench, unit string // benchmark name (without -N) and ReportMetric unit
	what        string
	goal        string
	peers       string
	invert      bool // report 1/value (vsctl/libovsdb → libovsdb/vsctl)
	format      string
}

var rows = []row{
	{bench: "BenchmarkPassThroughOverhead", unit: "overhead-ms", what: "pass-through overhead of a non-VM pod (ADD+DEL, vmnic chained vs not)", goal: "< 2 ms", format: "%.1f ms"},
	{bench: "BenchmarkShimExec", unit: "shim-passthrough-ms-median", what: "one exec of the shim (pass-through)", goal: "—", peers: "loopback plugin and /bin/true in the next rows", format: "%.1f ms"},
	{bench: "BenchmarkShimExec", unit: "loopback-version-ms-median", what: "one exec of the loopback reference plugin (VERSION)", format: "%.1f ms"},
	{bench: "BenchmarkShimExec", unit: "bin-true-ms-median", what: "one exec of /bin/true", format: "%.1f ms"},
	{bench: "BenchmarkMasqueradeAddDel", unit: "add-ms-median", what: "masquerade VM NIC: ADD (ptp + host-local + vmnic)", goal: "pod start p99 ≤ 5 s", peers: "OVN-Kubernetes CNI p99 1.6-6.4 s at scale", format: "%.0f ms"},
	{bench: "BenchmarkMasqueradeAddDel", unit: "del-ms-median", what: "masquerade VM NIC: DEL", format: "%.0f ms"},
	{bench: "BenchmarkBridgeAddDel", unit: "plain-add-ms-median", what: "bridge mode, plain pod port: ADD (host-local IPAM)", format: "%.0f ms"},
	{bench: "BenchmarkBridgeAddDel", unit: "plain-del-ms-median", what: "bridge mode, plain pod port: DEL", format: "%.0f ms"},
	{bench: "BenchmarkBridgeAddDel", unit: "vm-add-ms-median", what: "bridge mode, VM NIC: ADD", format: "%.0f ms"},
	{bench: "BenchmarkBridgeAddDel", unit: "vm-del-ms-median", what: "bridge mode, VM NIC: DEL", format: "%.0f ms"},
	{bench: "BenchmarkAddDeletePort/bg=0", unit: "vsctl/libovsdb", invert: true, what: "OVS port add+delete: vmnic's libovsdb path / ovs-vsctl (empty bridge)", goal: "< 0.2", peers: "~30x (1/30) direct OVSDB vs ovs-vsctl in one published comparison", format: "%.2f"},
	{bench: "BenchmarkAddDeletePort/bg=100", unit: "vsctl/libovsdb", invert: true, what: "the same with 100 ports on the bridge", goal: "< 0.2", format: "%.2f"},
	{bench: "BenchmarkScaleMasquerade", unit: "add-first50-p50-ms", what: "250 masquerade VM NICs on one node: ADD p50 of the first 50", goal: "pod start p99 ≤ 5 s", format: "%.0f ms"},
	{bench: "BenchmarkScaleMasquerade", unit: "add-first50-p99-ms", what: "… ADD p99 of the first 50", format: "%.0f ms"},
	{bench: "BenchmarkScaleMasquerade", unit: "add-last50-p50-ms", what: "… ADD p50 of the last 50", format: "%.0f ms"},
	{bench: "BenchmarkScaleMasquerade", unit: "add-last50-p99-ms", what: "… ADD p99 of the last 50", format: "%.0f ms"},
	{bench: "BenchmarkScaleMasquerade", unit: "last/first-p50", what: "… last 50 / first 50 (p50)", goal: "flat", format: "%.2f"},
	{bench: "BenchmarkScaleMasquerade", unit: "vmnicd-rss-MiB-at-250", what: "… vmnicd RSS with the 250 attachments", format: "%.0f MiB"},
	{bench: "BenchmarkScaleMasquerade", unit: "gc-pass-ms", what: "… one CNI GC pass over the 250", format: "%.0f ms"},
	{bench: "BenchmarkScaleMasquerade", unit: "del-ms-median", what: "… DEL median", format: "%.0f ms"},
	{bench: "BenchmarkScaleBridge", unit: "add-first50-p50-ms", what: "250 VM NICs on one OVS bridge: ADD p50 of the first 50", format: "%.0f ms"},
	{bench: "BenchmarkScaleBridge", unit: "add-first50-p99-ms", what: "… ADD p99 of the first 50", format: "%.0f ms"},
	{bench: "BenchmarkScaleBridge", unit: "add-last50-p50-ms", what: "… ADD p50 of the last 50", format: "%.0f ms"},
	{bench: "BenchmarkScaleBridge", unit: "add-last50-p99-ms", what: "… ADD p99 of the last 50", format: "%.0f ms"},
	{bench: "BenchmarkScaleBridge", unit: "add-first25-ms-median", what: "… ADD median of the first 25", format: "%.0f ms"},
	{bench: "BenchmarkScaleBridge", unit: "add-last25-ms-median", what: "… of the last 25", format: "%.0f ms"},
	{bench: "BenchmarkScaleBridge", unit: "last/first", what: "… last 25 / first 25", goal: "flat, < 1.5", format: "%.2f"},
	{bench: "BenchmarkScaleBridge", unit: "ovs-apply-last25-ms-median", what: "… of which ovs-vswitchd's apply wait (last 25)", peers: "first 25 in the next row", format: "%.1f ms"},
	{bench: "BenchmarkScaleBridge", unit: "ovs-apply-first25-ms-median", what: "… ovs-vswitchd's apply wait (first 25)", format: "%.1f ms"},
	{bench: "BenchmarkScaleBridge", unit: "last/first-without-ovs-apply", what: "… last/first without the apply wait", format: "%.2f"},
	{bench: "BenchmarkScaleBridge", unit: "gc-pass-ms", what: "… one CNI GC pass over the 250", format: "%.0f ms"},
	{bench: "BenchmarkScaleBridge", unit: "del-ms-median", what: "… DEL median", format: "%.0f ms"},
	{bench: "BenchmarkInformerMemory", unit: "standalone-rss-MiB", what: "vmnicd RSS, standalone", format: "%.0f MiB"},
	{bench: "BenchmarkInformerMemory", unit: "cluster-250vm-rss-MiB", what: "vmnicd RSS with informers over 250 VM pods", format: "%.0f MiB"},
}

func main() {
	out := flag.String("o", "docs/benchmarks.md", "report file")
	flag.Parse()
	got := map[string]float64{}
	for _, f := range flag.Args() {
		if err := read(f, got); err != nil {
			fmt.Fprintln(os.Stderr, "benchreport:", err)
			os.Exit(1)
		}
	}
	var b strings.Builder
	fmt.Fprintf(&b, "# vmnic benchmarks\n\nGenerated by `make bench` on %s. Medians, arms interleaved in one run; the machines are noisy, so compare figures of one run with each other.\n\n", time.Now().UTC().Format("2006-01-02"))
	fmt.Fprintf(&b, "Machine: %s, %d CPUs, %s RAM, kernel %s, %s. OVS runs its userspace datapath (no kernel module); QEMU runs under TCG.\n\n", cpuModel(), runtime.NumCPU(), memTotal(), strings.TrimSpace(readFile("/proc/sys/kernel/osrelease")), runtime.Version())
	b.WriteString("| figure | value | goal | peers |\n|---|---|---|---|\n")
	missing := 0
	for _, r := range rows {
		v, ok := got[r.bench+" "+r.unit]
		val := "not measured"
		if ok {
			if r.invert && v != 0 {
				v = 1 / v
			}
			val = fmt.Sprintf(r.format, v)
		} else {
			missing++
		}
		fmt.Fprintf(&b, "| %s | %s | %s | %s |\n", r.what, val, dash(r.goal), dash(r.peers))
	}
	b.WriteString("\nLive migration (probe gap at the switchover) is measured by `TestBridgeLiveMigration` and `TestPasstLiveMigration` (`go test ./test/integration -run LiveMigration -v`), which log the longest gap between answered 50 ms probes next to QEMU's own downtime. Goal: the network adds under 100 ms to the guest's pause; peers (kube-ovn, OVN-Kubernetes) quote under 500 ms total.\n")
	if err := os.WriteFile(*out, []byte(b.String()), 0o644); err != nil {
		fmt.Fprintln(os.Stderr, "benchreport:", err)
		os.Exit(1)
	}
	fmt.Printf("benchreport: wrote %s (%d figures, %d not measured)\n", *out, len(rows)-missing, missing)
}

// read parses benchmark result lines: name-N  iterations  value unit ...
func read(path string, got map[string]float64) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer func() { _ = f.Close() }()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 4 || !strings.HasPrefix(fields[0], "Benchmark") {
			continue
		}
		name := fields[0]
		if i := strings.LastIndex(name, "-"); i > 0 {
			if _, err := strconv.Atoi(name[i+1:]); err == nil {
				name = name[:i]
			}
		}
		for i := 2; i+1 < len(fields); i += 2 {
			v, err := strconv.ParseFloat(fields[i], 64)
			if err != nil {
				continue
			}
			got[name+" "+fields[i+1]] = v
		}
	}
	return sc.Err()
}

func dash(s string) string {
	if s == "" {
		return "—"
	}
	return s
}

func readFile(p string) string {
	b, _ := os.ReadFile(p)
	return string(b)
}

func cpuModel() string {
	for _, l := range strings.Split(readFile("/proc/cpuinfo"), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "unknown CPU"
}

func memTotal() string {
	for _, l := range strings.Split(readFile("/proc/meminfo"), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok && k == "MemTotal" {
			kb, _ := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			return fmt.Sprintf("%.0f GiB", float64(kb)/(1<<20))
		}
	}
	return "unknown"
}
