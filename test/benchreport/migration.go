package main

import (
	"fmt"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"
)

// migMode is a live-migration test and the rows it feeds.
type migMode struct {
	test       string // the go test that logs the probe line
	label      string // the first row's figure
	switchover string // the switchover row's figure
	// v6: the test's IPv6 probe, whose lines start "IPv6: ".
	v6 bool
}

// key is where the mode's runs are kept.
func (m migMode) key() string {
	if m.v6 {
		return m.test + ipv6Key
	}
	return m.test
}

const ipv6Key = "/IPv6"

var migModes = []migMode{
	{
		"TestBridgeLiveMigration", "live migration, bridge mode (OVS, Spiderpool IP; ICMP probe every 50 ms from a peer pod): longest gap between answers",
		"vmnic's switchover: the target's hold released, after QEMU reported completion", false,
	},
	{
		"TestPasstLiveMigration", "live migration, passt on macvlan (Spiderpool IP; TCP connection every 50 ms to a port passt forwards, IPv4): longest gap between answers",
		"vmnic's switchover: the underlay's neighbour entry on the target, after QEMU reported completion", false,
	},
	{
		"TestPasstLiveMigration", "live migration, passt on macvlan, IPv6 (the same runs, dual-stack; TCP connection every 50 ms over IPv6): longest gap between answers",
		"vmnic's switchover: the underlay's IPv6 neighbour entry on the target, after QEMU reported completion", true,
	},
}

const (
	migPeers = "kube-ovn, OVN-Kubernetes: network downtime < 0.5 s after their fixes (13-26 s before)"
	// migrationNote follows the table: how its live-migration rows are
	// measured.
	migrationNote = "The live-migration rows come from `TestBridgeLiveMigration` and `TestPasstLiveMigration` (`go test ./test/integration -run LiveMigration -count N -v`; the runs row gives N): a real guest (QEMU under TCG) migrates between two sandbox nodes, each with its own vmnicd, while a peer probes it every 50 ms; each run logs the longest time between two answered probes, the probes lost and the downtime QEMU itself reports. The gap minus QEMU's downtime is what the network adds to the guest's pause, plus up to one probe interval (with no pause at all the longest gap is 50 ms). The switchover row is vmnic's own part of it: from QEMU reporting completion to the target taking the traffic (bridge: the target's hold released; passt: the underlay's neighbour entry for the VM's IP pointing at the target). In passt mode the rest of the gap comes after the underlay already sends to the target, between the target's passt and the guest. The passt runs are dual-stack: the IPv6 rows are the same runs' second probe, over IPv6."
)

// migRun is one run's probe line and the run's verdict.
type migRun struct {
	sent, answered, lost int
	gap, downtime        time.Duration
	// switchover: vmnic's part, from QEMU's completion to the target
	// taking the traffic (0: not logged).
	switchover time.Duration
	verdict    string // PASS, FAIL, or "" before the test's --- line
}

// migRuns is what the log holds of one test: its probe lines and verdicts.
// A run that failed without a probe line counts in failed only.
type migRuns struct {
	runs                    []migRun
	passed, failed, skipped int
}

// passedRuns is the probe lines of the runs that passed: a failed run's
// figures may be no migration's (say, the guest crashed after the
// switchover).
func (r *migRuns) passedRuns() []migRun {
	var out []migRun
	for _, run := range r.runs {
		if run.verdict == "PASS" {
			out = append(out, run)
		}
	}
	return out
}

// failures counts the failed runs, those whose log ends before their
// verdict (a timeout's panic) included.
func (r *migRuns) failures() int {
	n := r.failed
	for _, run := range r.runs {
		if run.verdict == "" {
			n++
		}
	}
	return n
}

var (
	testStart = regexp.MustCompile(`^=== (?:RUN|CONT|NAME)\s+(\S+)`)
	// The probe line of both tests: "probe every 50 ms: 812 sent, 808
	// answered, 4 lost; longest gap 350ms (ending 12:00:00.000); QEMU
	// downtime 120 ms", passt's with "TCP probe every 50 ms to ...".
	// The switchover line, before the probe line: bridge "hold released
	// 43ms after QEMU reported the migration completed", passt "the
	// underlay's neighbour entry moved to the target 36ms after ...".
	switchLine = regexp.MustCompile(`(?:hold released|neighbour entry moved to the target) (\S+) after QEMU reported the migration completed`)
	probeLine  = regexp.MustCompile(`probe every \d+ ms[^:]*: (\d+) sent, (\d+) answered, (\d+) lost; longest gap ([^ ;]+)(?: \([^)]*\))?; QEMU downtime (\d+) ms`)
)

// migKey is the test a line belongs to: the running top-level test, or
// when that is none of migModes', the test the probe line's wording names.
func migKey(test, l string) string {
	v6 := ""
	if strings.Contains(l, ": IPv6: ") {
		v6 = ipv6Key
	}
	top, _, _ := strings.Cut(test, "/")
	for _, m := range migModes {
		if m.test == top {
			return top + v6
		}
	}
	if strings.Contains(l, "TCP probe") {
		return "TestPasstLiveMigration" + v6
	}
	return "TestBridgeLiveMigration"
}

// migrationLine parses the go test -v log of the live-migration tests and
// returns the test running after l.
func (in *input) migrationLine(l, test string) string {
	if m := testStart.FindStringSubmatch(l); m != nil {
		return m[1]
	}
	runs := func(key string) *migRuns {
		r := in.mig[key]
		if r == nil {
			r = &migRuns{}
			in.mig[key] = r
		}
		return r
	}
	if m := outcome.FindStringSubmatch(l); m != nil {
		if !strings.Contains(m[2], "/") && strings.HasSuffix(m[2], "LiveMigration") {
			for _, mode := range migModes {
				if mode.test != m[2] {
					continue
				}
				r := runs(mode.key())
				switch m[1] {
				case "PASS":
					r.passed++
				case "FAIL":
					r.failed++
				case "SKIP":
					r.skipped++
				}
				// The verdict of the run whose probe line came before.
				if n := len(r.runs); n > 0 && r.runs[n-1].verdict == "" && m[1] != "SKIP" {
					r.runs[n-1].verdict = m[1]
				}
			}
		}
		return test
	}
	if m := switchLine.FindStringSubmatch(l); m != nil {
		if d, err := time.ParseDuration(m[1]); err == nil {
			in.migSwitch[migKey(test, l)] = d
		}
		return test
	}
	m := probeLine.FindStringSubmatch(l)
	if m == nil {
		return test
	}
	gap, err := time.ParseDuration(m[4])
	if err != nil {
		return test
	}
	var n [4]int
	for i, s := range []string{m[1], m[2], m[3], m[5]} {
		n[i], _ = strconv.Atoi(s)
	}
	key := migKey(test, l)
	r := runs(key)
	r.runs = append(r.runs, migRun{sent: n[0], answered: n[1], lost: n[2], gap: gap, downtime: time.Duration(n[3]) * time.Millisecond, switchover: in.migSwitch[key]})
	delete(in.migSwitch, key)
	return test
}

// medianOf is the median of xs (the upper one of an even count, as the
// integration benchmarks take it).
func medianOf[T int | time.Duration](xs []T) T {
	s := append([]T(nil), xs...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2]
}

func msOf(d time.Duration) string {
	return fmt.Sprintf("%d ms", d.Round(time.Millisecond).Milliseconds())
}

// migrationLines renders per test the medians over its passed runs: the
// longest gap, the gap minus QEMU's downtime, the probes lost, QEMU's
// downtime; and the count of runs.
func (in *input) migrationLines() []line {
	var out []line
	for _, mode := range migModes {
		r := in.mig[mode.key()]
		if r == nil {
			r = &migRuns{}
		}
		good, bad := r.passedRuns(), r.failures()
		var gaps, shares, downs, switches []time.Duration
		var lost, sent []int
		for _, run := range good {
			gaps = append(gaps, run.gap)
			shares = append(shares, run.gap-run.downtime)
			downs = append(downs, run.downtime)
			if run.switchover > 0 {
				switches = append(switches, run.switchover)
			}
			lost = append(lost, run.lost)
			sent = append(sent, run.sent)
		}
		val := func(f func() string) string {
			switch {
			case len(good) > 0:
				return f()
			case bad > 0:
				return failed
			case r.skipped > 0:
				return skipped
			}
			return notRun
		}
		runs := notRun
		switch {
		case bad > 0:
			runs = fmt.Sprintf("%d (%d failed, left out of the medians)", r.passed+bad, bad)
		case r.passed > 0:
			runs = strconv.Itoa(r.passed)
		case r.skipped > 0:
			runs = skipped
		}
		out = append(out,
			line{mode.label, val(func() string { return msOf(medianOf(gaps)) }), "QEMU downtime + < 100 ms", migPeers},
			line{"… longest gap minus QEMU downtime: what the network adds", val(func() string { return msOf(medianOf(shares)) }), "< 100 ms", ""},
			line{"… " + mode.switchover, val(func() string {
				if len(switches) == 0 {
					return notMeasured
				}
				return msOf(medianOf(switches))
			}), "< 100 ms", ""},
			line{"… probes lost", val(func() string { return fmt.Sprintf("%d of %d", medianOf(lost), medianOf(sent)) }), "", ""},
			line{"… QEMU downtime (its own report)", val(func() string { return msOf(medianOf(downs)) }), "", ""},
			line{"… runs", runs, "", ""},
		)
	}
	return out
}
