// Package fleet simulates a large cluster around real vmnicd processes: a
// real kube-apiserver and etcd holding 1,000 Node objects, up to 10,000
// VMIs with their launcher pods spread over them and 200 migrations
// between them, and 50 vmnicd processes, the shipped binary, each for a
// node of its own. It measures what one vmnicd costs as the cluster
// grows around a node whose own VMIs stay the same.
package fleet

import (
	"math"
	"slices"
)

// Daemon is one vmnicd's figures at a scale point.
type Daemon struct {
	Node string `json:"node"`
	// OwnVMIs run on its node.
	OwnVMIs int `json:"ownVMIs"`
	// RSSKiB once the churn is over.
	RSSKiB int64 `json:"rssKiB"`
	// Objects its informers received (lists and watch events), Requests
	// it made, Bytes it read from the API server, from its start.
	Objects  float64 `json:"objects"`
	Requests float64 `json:"requests"`
	Bytes    float64 `json:"bytes"`
	// ChurnObjects and ChurnRequests are those of the churn alone.
	ChurnObjects  float64 `json:"churnObjects"`
	ChurnRequests float64 `json:"churnRequests"`
	// SeenMs is how long a change of its own VMI took to reach it.
	SeenMs float64 `json:"seenMs,omitempty"`
}

// Scale is one scale point.
type Scale struct {
	VMIs  int `json:"vmis"`
	Nodes int `json:"nodes"`
	// Changes made to other nodes' VMIs during the churn.
	Changes int      `json:"changes"`
	Daemons []Daemon `json:"daemons"`
	// WatchesPerDaemon is the API server's count of watches with the
	// daemons running, less that without them, per daemon.
	WatchesPerDaemon float64 `json:"watchesPerDaemon"`
	// ReadRequestsPerMin is the API server's count of read requests
	// (get, list, watch) during the churn, per daemon and minute: the
	// benchmark itself only writes then.
	ReadRequestsPerMin float64 `json:"readRequestsPerMin"`
	ChurnSeconds       float64 `json:"churnSeconds"`
}

// Busy is one daemon's cost of VM starts on its own node, at the largest
// scale point: the VMIs and launcher pods made there (no CNI runs in the
// fleet, so no live read at ADD either).
type Busy struct {
	Node     string  `json:"node"`
	Starts   int     `json:"starts"`
	Objects  float64 `json:"objects"`
	Requests float64 `json:"requests"`
	Seconds  float64 `json:"seconds"`
}

// Report is what the benchmark writes for test/benchreport.
type Report struct {
	Nodes      int     `json:"nodes"`
	Daemons    int     `json:"daemons"`
	Migrations int     `json:"migrations"`
	Scales     []Scale `json:"scales"`
	Busy       *Busy   `json:"busy,omitempty"`
}

// WorstRatio is the largest ratio, over the daemons, of a figure at the
// last scale point to the same daemon's at the first: +Inf for one that
// was 0 and is not.
func WorstRatio(first, last Scale, fig func(Daemon) float64) float64 {
	worst := 0.0
	for i, d := range last.Daemons {
		base, now := fig(first.Daemons[i]), fig(d)
		switch {
		case base > 0:
			worst = max(worst, now/base)
		case now > 0:
			return math.Inf(1)
		}
	}
	return worst
}

// Median is the median of fig over the daemons that pick keeps (all
// when pick is nil).
func Median(ds []Daemon, fig func(Daemon) float64, pick func(Daemon) bool) float64 {
	var v []float64
	for _, d := range ds {
		if pick == nil || pick(d) {
			v = append(v, fig(d))
		}
	}
	if len(v) == 0 {
		return 0
	}
	slices.Sort(v)
	return v[len(v)/2]
}

// OwnsVMI picks the daemons whose node runs a VMI.
func OwnsVMI(d Daemon) bool { return d.OwnVMIs > 0 }
