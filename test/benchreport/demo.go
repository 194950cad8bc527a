package main

import (
	"fmt"
	"regexp"
	"strconv"
)

// demoFresh is test/demo-fresh.sh's result line.
var demoFresh = regexp.MustCompile(`^demo-fresh: make demo took (\d+) s \(packages installed: (yes|no)\)`)

// demoRun is what test/demo-fresh.sh reported.
type demoRun struct {
	secs      int
	installed string
	failed    bool
}

// demoLine parses test/demo-fresh.sh's output.
func (in *input) demoLine(l string) {
	if m := demoFresh.FindStringSubmatch(l); m != nil {
		secs, _ := strconv.Atoi(m[1])
		in.demo = &demoRun{secs: secs, installed: m[2]}
		return
	}
	if l == "demo-fresh: make demo failed" {
		in.demo = &demoRun{failed: true}
	}
}

// demoLines renders the demo's row.
func (in *input) demoLines() []line {
	what := "make demo on a fresh clone with empty Go module and build caches"
	val := notRun
	switch {
	case in.demo == nil:
	case in.demo.failed:
		val = failed
	default:
		if in.demo.installed == "yes" {
			what += " (its Debian packages already installed)"
		} else {
			what += " (its Debian packages installed by the run)"
		}
		val = fmt.Sprintf("%d min %02d s", in.demo.secs/60, in.demo.secs%60)
	}
	return []line{{what, val, "< 5 min", "no peer ships a local demo to time"}}
}
