package main

import (
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"

	"github.com/vmnic/vmnic/test/fleet"
)

// readFleet keeps test/fleet's report.
func (in *input) readFleet(path string) error {
	raw, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	var rep fleet.Report
	if err := json.Unmarshal(raw, &rep); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	in.fleet = &rep
	return nil
}

// fleetSection is the fleet's figures against their goals, its table per
// scale point and its plot, which it writes beside the report (svgPath).
func (in *input) fleetSection(svgPath string) (string, error) {
	rep := in.fleet
	if rep == nil || len(rep.Scales) == 0 {
		return "## Fleet\n\nNot run: `make bench` (or `make bench-fleet` alone) writes it from test/fleet's BenchmarkFleet.\n", nil
	}
	var b strings.Builder
	fmt.Fprintf(&b, "## Fleet\n\nA real kube-apiserver and etcd with %d Node objects, VMIs with their launcher pods spread over them as KubeVirt labels them, %d migrations between nodes without a daemon at each scale point (each through KubeVirt's steps on the VMI, with its VMIM), and %d vmnicd processes, the shipped binary, each for its own node, started afresh at each scale point. %d of those nodes run one VMI each at every scale point, the others none. Per daemon: RSS once the churn is over; objects its informers received, requests it made and bytes it read from the API server since its start, and during the churn alone; the time from a change of its own VMI to its informer. At the API server: watches per daemon, and read requests (get, list, watch) on pods and VMIs per daemon and minute during the churn, when the benchmark only writes.\n\n", rep.Nodes, rep.Migrations, rep.Daemons, countOwners(rep.Scales[0]))
	first, last := rep.Scales[0], rep.Scales[len(rep.Scales)-1]
	fmt.Fprintf(&b, "| figure | value | goal |\n|---|---|---|\n")
	fmt.Fprintf(&b, "| each vmnicd's RSS at %d VMIs over its own at %d, with the same VMIs on its node; the worst daemon | %s | ≤ 1.1 |\n", last.VMIs, first.VMIs, ratioText(fleet.WorstRatio(first, last, func(d fleet.Daemon) float64 { return float64(d.RSSKiB) })))
	fmt.Fprintf(&b, "| … objects its informers received (lists and watch events, the churn included); the worst daemon | %s | ≤ 1.1 |\n", ratioText(fleet.WorstRatio(first, last, func(d fleet.Daemon) float64 { return d.Objects })))
	fmt.Fprintf(&b, "| watches the API server counts per vmnicd, at each scale point (the most) | %.2f | ≤ 3 |\n", maxWatches(rep.Scales))
	fmt.Fprintf(&b, "| vmnicd's RSS at %d VMIs (median) | %.1f MiB | |\n", last.VMIs, fleet.Median(last.Daemons, func(d fleet.Daemon) float64 { return float64(d.RSSKiB) / 1024 }, nil))
	fmt.Fprintf(&b, "| a change of a VMI on its node to its vmnicd's informer, at %d VMIs (median) | %.1f ms | |\n\n", last.VMIs, fleet.Median(last.Daemons, func(d fleet.Daemon) float64 { return d.SeenMs }, fleet.OwnsVMI))
	b.WriteString("| VMIs | RSS MiB (median, max) | objects received (median, max) | KiB read (median, max) | requests (median, max) | during the churn: objects, requests (max) | own VMI change seen, ms (median, max) | watches per daemon | read requests per daemon-minute |\n|---|---|---|---|---|---|---|---|---|\n")
	for _, s := range rep.Scales {
		all := func(f func(fleet.Daemon) float64) (float64, float64) {
			return fleet.Median(s.Daemons, f, nil), maxOf(s.Daemons, f, nil)
		}
		rssMed, rssMax := all(func(d fleet.Daemon) float64 { return float64(d.RSSKiB) / 1024 })
		objMed, objMax := all(func(d fleet.Daemon) float64 { return d.Objects })
		kibMed, kibMax := all(func(d fleet.Daemon) float64 { return d.Bytes / 1024 })
		reqMed, reqMax := all(func(d fleet.Daemon) float64 { return d.Requests })
		seenMed := fleet.Median(s.Daemons, func(d fleet.Daemon) float64 { return d.SeenMs }, fleet.OwnsVMI)
		seenMax := maxOf(s.Daemons, func(d fleet.Daemon) float64 { return d.SeenMs }, fleet.OwnsVMI)
		fmt.Fprintf(&b, "| %d | %.1f, %.1f | %.0f, %.0f | %.1f, %.1f | %.0f, %.0f | %.0f, %.0f | %.1f, %.1f | %.2f | %.2f |\n",
			s.VMIs, rssMed, rssMax, objMed, objMax, kibMed, kibMax, reqMed, reqMax,
			maxOf(s.Daemons, func(d fleet.Daemon) float64 { return d.ChurnObjects }, nil),
			maxOf(s.Daemons, func(d fleet.Daemon) float64 { return d.ChurnRequests }, nil),
			seenMed, seenMax, s.WatchesPerDaemon, s.ReadRequestsPerMin)
	}
	if bz := rep.Busy; bz != nil {
		fmt.Fprintf(&b, "\nAt %d VMIs, %d VM starts (VMI and launcher pod) on %s, whose vmnicd had none: it received %.0f objects and made %.0f requests in %.1f s. (No CNI runs in the fleet; on a real node each VM pod's ADD adds at most a read of its pod and of its VMI when the caches have not seen them yet.)\n", rep.Scales[len(rep.Scales)-1].VMIs, bz.Starts, bz.Node, bz.Objects, bz.Requests, bz.Seconds)
	}
	if err := os.WriteFile(svgPath, []byte(fleetPlot(rep)), 0o644); err != nil {
		return "", err
	}
	fmt.Fprintf(&b, "\n![vmnicd's RSS and objects received against the cluster's VMIs](%s)\n", filepath.Base(svgPath))
	return b.String(), nil
}

// ratioText is a ratio, or says a daemon that had none now has some.
func ratioText(r float64) string {
	if math.IsInf(r, 1) {
		return "grew from 0"
	}
	return fmt.Sprintf("%.2fx", r)
}

func maxWatches(ss []fleet.Scale) float64 {
	m := 0.0
	for _, s := range ss {
		m = max(m, s.WatchesPerDaemon)
	}
	return m
}

func countOwners(s fleet.Scale) int {
	n := 0
	for _, d := range s.Daemons {
		if fleet.OwnsVMI(d) {
			n++
		}
	}
	return n
}

func maxOf(ds []fleet.Daemon, f func(fleet.Daemon) float64, pick func(fleet.Daemon) bool) float64 {
	m := 0.0
	for _, d := range ds {
		if pick == nil || pick(d) {
			m = max(m, f(d))
		}
	}
	return m
}

// fleetPlot draws two panels against the cluster's VMIs (log scale):
// vmnicd's RSS and the objects it received, median and max over the
// daemons, each on a scale from 0.
func fleetPlot(rep *fleet.Report) string {
	const w, h, pad, panelW = 760, 300, 50, 330
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="12">`+"\n", w, h)
	b.WriteString(`<rect width="100%" height="100%" fill="white"/>` + "\n")
	panels := []struct {
		title string
		fig   func(fleet.Daemon) float64
		unit  string
	}{
		{"vmnicd RSS (MiB)", func(d fleet.Daemon) float64 { return float64(d.RSSKiB) / 1024 }, "MiB"},
		{"objects received per vmnicd", func(d fleet.Daemon) float64 { return d.Objects }, ""},
	}
	minV, maxV := math.Log10(float64(rep.Scales[0].VMIs)), math.Log10(float64(rep.Scales[len(rep.Scales)-1].VMIs))
	for p, panel := range panels {
		x0 := pad + p*(panelW+pad)
		top := 0.0
		for _, s := range rep.Scales {
			top = max(top, maxOf(s.Daemons, panel.fig, nil))
		}
		top = niceCeil(top)
		x := func(vmis int) float64 {
			if maxV == minV {
				return float64(x0)
			}
			return float64(x0) + (math.Log10(float64(vmis))-minV)/(maxV-minV)*float64(panelW-20)
		}
		y := func(v float64) float64 { return float64(h-pad) - v/top*float64(h-2*pad) }
		fmt.Fprintf(&b, `<text x="%d" y="20" font-weight="bold">%s</text>`+"\n", x0, panel.title)
		fmt.Fprintf(&b, `<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="black"/>`+"\n", x0, h-pad, x0+panelW-10, h-pad)
		fmt.Fprintf(&b, `<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="black"/>`+"\n", x0, pad, x0, h-pad)
		for _, v := range []float64{0, top / 2, top} {
			fmt.Fprintf(&b, `<text x="%d" y="%.0f" text-anchor="end">%s</text>`+"\n", x0-4, y(v)+4, trimFloat(v))
		}
		for _, s := range rep.Scales {
			fmt.Fprintf(&b, `<text x="%.0f" y="%d" text-anchor="middle">%d</text>`+"\n", x(s.VMIs), h-pad+16, s.VMIs)
		}
		fmt.Fprintf(&b, `<text x="%d" y="%d" text-anchor="middle">VMIs in the cluster (log scale)</text>`+"\n", x0+panelW/2, h-pad+34)
		for _, series := range []struct {
			color string
			val   func(fleet.Scale) float64
			label string
		}{
			{"#1f77b4", func(s fleet.Scale) float64 { return fleet.Median(s.Daemons, panel.fig, nil) }, "median"},
			{"#d62728", func(s fleet.Scale) float64 { return maxOf(s.Daemons, panel.fig, nil) }, "max"},
		} {
			var pts []string
			for _, s := range rep.Scales {
				pts = append(pts, fmt.Sprintf("%.1f,%.1f", x(s.VMIs), y(series.val(s))))
			}
			fmt.Fprintf(&b, `<polyline fill="none" stroke="%s" stroke-width="2" points="%s"/>`+"\n", series.color, strings.Join(pts, " "))
			for _, s := range rep.Scales {
				fmt.Fprintf(&b, `<circle cx="%.1f" cy="%.1f" r="3" fill="%s"/>`+"\n", x(s.VMIs), y(series.val(s)), series.color)
			}
		}
		fmt.Fprintf(&b, `<text x="%d" y="40" fill="#1f77b4">median</text><text x="%d" y="40" fill="#d62728">max</text>`+"\n", x0+10, x0+70)
	}
	b.WriteString("</svg>\n")
	return b.String()
}

// niceCeil rounds v up to 1, 2 or 5 times a power of ten.
func niceCeil(v float64) float64 {
	if v <= 0 {
		return 1
	}
	p := math.Pow(10, math.Floor(math.Log10(v)))
	for _, m := range []float64{1, 2, 5, 10} {
		if v <= m*p {
			return m * p
		}
	}
	return 10 * p
}

func trimFloat(v float64) string {
	return strings.TrimSuffix(strings.TrimRight(fmt.Sprintf("%.1f", v), "0"), ".")
}

// replaceFleetSection puts section in place of the report's Fleet section
// (the report's last), or after it when it has none.
func replaceFleetSection(report, section string) string {
	if i := strings.Index(report, "\n## Fleet\n"); i >= 0 {
		report = report[:i+1]
	}
	return strings.TrimRight(report, "\n") + "\n\n" + section
}
