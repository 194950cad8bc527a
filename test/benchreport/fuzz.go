package main

import (
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// fuzzNote follows the table: how its fuzzing rows are measured.
const fuzzNote = "The fuzzing rows come from `test/fuzz.sh` (`FUZZTIME=<time> bash test/fuzz.sh`, the time in each row), which runs each Go fuzz target in turn on all CPUs; executions and rate are from go's last `fuzz: elapsed: …, execs: …` line of the target (rate = executions / elapsed, the baseline coverage pass included)."

// fuzzRun is what test/fuzz.sh printed of one target.
type fuzzRun struct {
	name, pkg, fuzztime string
	execs               int64
	elapsed             time.Duration
	rate                int64 // go's own, of its last interval
	seen                bool  // a fuzz: elapsed line with execs
	status              string
	raced               bool // ended by Go's coordinator deadline race, no crasher
}

var (
	// "== FuzzParse (./pkg/netconf, 10s)": test/fuzz.sh starts a target.
	fuzzHeader = regexp.MustCompile(`^== (Fuzz\w*) \(([^,]+), ([^)]+)\)$`)
	// "fuzz: elapsed: 10s, execs: 123456 (12345/sec), new interesting: ..."
	fuzzStats = regexp.MustCompile(`fuzz: elapsed: (\S+), execs: (\d+) \((\d+)/sec\)`)
	// "FuzzParse          ok    execs: 123456": test/fuzz.sh's summary.
	fuzzSummary = regexp.MustCompile(`^(Fuzz\w*)\s+(ok|FAIL)\s+execs:`)
)

// fuzzLine parses test/fuzz.sh's output and returns the target running
// after l.
func (in *input) fuzzLine(l string, cur *fuzzRun) *fuzzRun {
	if m := fuzzHeader.FindStringSubmatch(l); m != nil {
		r := &fuzzRun{name: m[1], pkg: m[2], fuzztime: m[3]}
		if in.fuzz[r.name] == nil {
			in.fuzzes = append(in.fuzzes, r.name)
		}
		in.fuzz[r.name] = r
		return r
	}
	if strings.HasPrefix(l, "== ") { // the summary's heading
		return nil
	}
	if m := fuzzSummary.FindStringSubmatch(l); m != nil {
		if r := in.fuzz[m[1]]; r != nil {
			r.status = m[2]
			r.raced = strings.Contains(l, "golang/go#75804")
		}
		return cur
	}
	if cur == nil {
		return nil
	}
	if m := outcome.FindStringSubmatch(l); m != nil && m[2] == cur.name && m[1] == "FAIL" {
		cur.status = "FAIL"
		return cur
	}
	m := fuzzStats.FindStringSubmatch(l)
	if m == nil {
		return cur
	}
	elapsed, err := time.ParseDuration(m[1])
	if err != nil {
		return cur
	}
	cur.elapsed = elapsed
	cur.execs, _ = strconv.ParseInt(m[2], 10, 64)
	cur.rate, _ = strconv.ParseInt(m[3], 10, 64)
	cur.seen = true
	return cur
}

// thousands writes n with separators: 1,234,567.
func thousands(n int64) string {
	s := strconv.FormatInt(n, 10)
	var b strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	return b.String()
}

// fuzzLines renders a row per fuzz target: its executions and rate, or
// its failure.
func (in *input) fuzzLines() []line {
	if len(in.fuzzes) == 0 {
		return []line{{"fuzzing (test/fuzz.sh): executions per target", notRun, "no crasher", ""}}
	}
	var out []line
	for _, name := range in.fuzzes {
		r := in.fuzz[name]
		what := fmt.Sprintf("fuzzing %s (%s) for %s: executions", r.name, strings.TrimPrefix(r.pkg, "./"), r.fuzztime)
		val := notMeasured
		if r.seen {
			rate := r.rate
			if r.elapsed > 0 {
				rate = int64(float64(r.execs) / r.elapsed.Seconds())
			}
			val = fmt.Sprintf("%s (%s/s)", thousands(r.execs), thousands(rate))
			if r.raced {
				val += ", ended by Go's fuzzing-deadline race (golang/go#75804), no crasher"
			}
		}
		if r.status == "FAIL" {
			val = failed
			if r.seen {
				val = fmt.Sprintf("failed after %s executions (crasher in the package's testdata/fuzz/)", thousands(r.execs))
			}
		}
		out = append(out, line{what, val, "no crasher", ""})
	}
	return out
}
