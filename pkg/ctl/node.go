package ctl

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/vmnic/vmnic/pkg/api"
	"github.com/vmnic/vmnic/pkg/proto"
)

// ErrStarting is returned when vmnicd answers "try again later" (CNI code
// 11): it listens but is starting (informers syncing, shim being installed)
// or stopping, and serves no request, introspection included.
var ErrStarting = errors.New("vmnicd is starting or stopping")

// ErrUnreachable wraps errors meaning that no vmnicd listens on the socket.
var ErrUnreachable = errors.New("vmnicd is not running")

// call sends one introspection command and decodes the answer into out.
func call(ctx context.Context, socket, command string, out any) error {
	resp, err := proto.Call(ctx, socket, &proto.Request{Command: command, Config: json.RawMessage("{}")})
	if err != nil {
		if proto.Unavailable(err) {
			return fmt.Errorf("%w: %w", ErrUnreachable, err)
		}
		return err
	}
	if e := resp.Error; e != nil {
		if e.Code == types.ErrTryAgainLater {
			return fmt.Errorf("%w: %s", ErrStarting, e.Msg)
		}
		return fmt.Errorf("%s: vmnicd answered CNI error %d: %s", command, e.Code, e.Msg)
	}
	if err := json.Unmarshal(resp.Result, out); err != nil {
		return fmt.Errorf("%s: decode answer: %w", command, err)
	}
	return nil
}

// Status asks vmnicd on socket for its status.
func Status(ctx context.Context, socket string) (*api.Status, error) {
	st := &api.Status{}
	if err := call(ctx, socket, api.CommandStatus, st); err != nil {
		return nil, err
	}
	return st, nil
}

// Attachments asks vmnicd on socket for the attachments it has on record.
func Attachments(ctx context.Context, socket string) (*api.Attachments, error) {
	a := &api.Attachments{}
	if err := call(ctx, socket, api.CommandAttachments, a); err != nil {
		return nil, err
	}
	return a, nil
}

// StatusReport is `status -o json`: State is "ready", "degraded" (ready,
// but a watch on the API server is down past the daemon's threshold),
// "starting" or "unreachable"; Daemon is what a ready daemon told.
type StatusReport struct {
	State    string      `json:"state"`
	Socket   string      `json:"socket"`
	Vmnicctl string      `json:"vmnicctl"`
	Daemon   *api.Status `json:"daemon,omitempty"`
	Error    string      `json:"error,omitempty"`
}

func runStatus(ctx context.Context, e *env, args []string) int {
	if !e.noArgs("status", args) {
		return ExitUsage
	}
	rep := StatusReport{Socket: e.common.socket, Vmnicctl: Version()}
	st, err := Status(ctx, e.common.socket)
	code := ExitOK
	switch {
	case err == nil:
		rep.State, rep.Daemon = "ready", st
		switch {
		case !st.Ready:
			rep.State, code = "starting", ExitStarting
		case slices.ContainsFunc(st.Watches, func(w api.Watch) bool { return w.Stale }):
			rep.State, code = "degraded", ExitDegraded
		}
	case errors.Is(err, ErrStarting):
		rep.State, rep.Error, code = "starting", err.Error(), ExitStarting
	default:
		rep.State, rep.Error, code = "unreachable", err.Error(), ExitFailed
	}
	if e.common.json() {
		if c := e.printJSON(rep); c != ExitOK {
			return c
		}
		return code
	}
	printStatus(e.stdout, rep, time.Now())
	return code
}

func printStatus(w io.Writer, rep StatusReport, now time.Time) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	defer func() { _ = tw.Flush() }()
	row := func(k, v string) { printf(tw, "%s:\t%s\n", k, v) }
	switch rep.State {
	case "starting":
		row("vmnicd", "starting (it listens, but requests get \"try again later\" until its informers synced and the shim is installed)")
		row("socket", rep.Socket)
		row("vmnicctl", rep.Vmnicctl)
		return
	case "unreachable":
		row("vmnicd", "not reachable")
		row("socket", rep.Socket)
		row("error", rep.Error)
		if !isRoot() {
			row("hint", "the socket is root's: run as root on the node, or kubectl exec into the vmnicd container")
		}
		return
	}
	st := rep.Daemon
	if rep.State == "degraded" {
		row("vmnicd", "degraded (it serves, but a watch on the API server is down: migrations wait on a stale cache)")
	} else {
		row("vmnicd", "ready")
	}
	row("version", fmt.Sprintf("vmnicd %s, vmnicctl %s", st.Version, rep.Vmnicctl))
	source := "standalone (VM facts from the network config)"
	if st.Source == "cluster" {
		source = "VM facts from the API server"
	}
	node := st.Node
	if node == "" {
		node = "-"
	}
	row("node", node+", "+source)
	row("socket", st.Socket)
	row("state dir", st.StateDir)
	row("up since", fmt.Sprintf("%s (%s)", st.Started.Format(time.RFC3339), age(now, st.Started)))
	row("attachments", attachmentSummary(st))
	if st.Incomplete > 0 || st.Unreadable > 0 {
		row("incomplete", fmt.Sprintf("%d (ADD never finished; DEL or GC removes them), %d unreadable records", st.Incomplete, st.Unreadable))
	}
	row("DHCP servers", fmt.Sprintf("%d running", st.DHCPServers))
	row("pending DELs", fmt.Sprintf("%d spooled", st.PendingDELs))
	if len(st.Requests) > 0 {
		row("requests", requestSummary(st.Requests))
	}
	if st.MetricsAddr != "" {
		row("metrics", "http://"+st.MetricsAddr+"/metrics")
	}
	for _, w := range st.Watches {
		row("watch "+watchName(w), watchSummary(w, time.Duration(st.WatchDownThreshold), now))
	}
}

// watchName is the short name of a watch of vmnicd: "pods", "VMIs" (on
// the node), or "VMIs incoming" (migrating to it; its selector names the
// label).
func watchName(w api.Watch) string {
	switch {
	case w.Resource != "virtualmachineinstances":
		return w.Resource
	case strings.HasPrefix(w.Selector, "kubevirt.io/migrationTargetNodeName="):
		return "VMIs incoming"
	}
	return "VMIs"
}

// watchSummary is one watch's line: "up, last event 12s ago" or "DOWN
// for 1m30s (over 1m0s): <error>".
func watchSummary(w api.Watch, threshold time.Duration, now time.Time) string {
	var s string
	switch {
	case !w.Synced:
		s = "not synced"
	case w.Watching:
		s = "up"
	case w.Stale:
		s = fmt.Sprintf("DOWN for %s (over %s)", time.Duration(w.Down).Round(time.Second), threshold)
	default:
		s = fmt.Sprintf("reconnecting for %s", time.Duration(w.Down).Round(time.Second))
	}
	if !w.LastEvent.IsZero() {
		s += ", last event " + age(now, w.LastEvent) + " ago"
	}
	if w.LastError != "" && !w.Watching {
		s += ": " + w.LastError
	}
	return s
}

func attachmentSummary(st *api.Status) string {
	total := st.TotalAttachments()
	var parts []string
	for _, m := range slices.Sorted(maps.Keys(st.Attachments)) {
		if n := st.Attachments[m]; n > 0 {
			parts = append(parts, fmt.Sprintf("%s %d", m, n))
		}
	}
	if len(parts) == 0 {
		return fmt.Sprint(total)
	}
	return fmt.Sprintf("%d (%s)", total, strings.Join(parts, ", "))
}

var verbOrder = []string{"ADD", "DEL", "CHECK", "STATUS", "GC", "other"}

func requestSummary(r map[string]map[string]uint64) string {
	verbs := slices.Sorted(maps.Keys(r))
	slices.SortStableFunc(verbs, func(a, b string) int {
		ia, ib := slices.Index(verbOrder, a), slices.Index(verbOrder, b)
		return ia - ib
	})
	var parts []string
	for _, v := range verbs {
		s := fmt.Sprintf("%s %d", v, r[v]["ok"])
		if n := r[v]["error"]; n > 0 {
			s += fmt.Sprintf(" (+%d failed)", n)
		}
		parts = append(parts, s)
	}
	return strings.Join(parts, ", ")
}

func runAttachments(ctx context.Context, e *env, args []string) int {
	if !e.noArgs("attachments", args) {
		return ExitUsage
	}
	list, err := Attachments(ctx, e.common.socket)
	if err != nil {
		e.errorf("%v", err)
		if errors.Is(err, ErrStarting) {
			return ExitStarting
		}
		return ExitFailed
	}
	if e.common.json() {
		return e.printJSON(list)
	}
	PrintAttachments(e.stdout, list.Items, e.common.output == "wide", time.Now())
	return ExitOK
}

// PrintAttachments writes the attachments as a table.
func PrintAttachments(w io.Writer, items []api.Attachment, wide bool, now time.Time) {
	if len(items) == 0 {
		printLine(w, "No attachments on this node.")
		return
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	defer func() { _ = tw.Flush() }()
	head := []string{"POD", "IF", "MODE", "VM", "TAP", "BRIDGE", "OVS PORT", "POD IPS", "GUEST IPS", "GUEST MAC", "DHCP", "MIGRATION"}
	if wide {
		head = append(head, "NETWORK", "CONTAINER", "AGE")
	}
	printLine(tw, strings.Join(head, "\t"))
	for _, a := range items {
		row := []string{
			a.Pod.Namespace + "/" + a.Pod.Name, a.IfName, a.Mode, dash(a.VM), dash(a.Tap), dash(a.Bridge),
			ovsPort(a.OVS), dash(strings.Join(a.PodIPs, ",")), dash(strings.Join(a.GuestIPs, ",")),
			dash(a.GuestMAC), LeaseState(a, now), migrationState(a),
		}
		if wide {
			row = append(row, a.Network, shortID(a.ContainerID), age(now, a.Created))
		}
		printLine(tw, strings.Join(row, "\t"))
	}
}

// LeaseState says what the guest got from the attachment's DHCP servers.
func LeaseState(a api.Attachment, now time.Time) string {
	switch {
	case !a.Complete:
		return "incomplete"
	case a.Mode == "passt":
		return "by passt" // KubeVirt's passt binding answers the guest's DHCP
	case !a.DHCP.Running:
		if a.Tap == "" {
			return "-" // not a VM: no DHCP
		}
		return "not running"
	}
	var parts []string
	if l := a.DHCP.V4Lease; l != nil {
		parts = append(parts, fmt.Sprintf("v4 %s %s ago", l.IP, age(now, l.Time)))
	}
	if l := a.DHCP.V6Lease; l != nil {
		parts = append(parts, fmt.Sprintf("v6 %s %s ago", l.IP, age(now, l.Time)))
	}
	if len(parts) == 0 {
		return "no lease yet"
	}
	return strings.Join(parts, "; ")
}

func migrationState(a api.Attachment) string {
	var s string
	if m := a.Migration; m != nil {
		s = m.Job
		if m.Phase != "" {
			s += " (" + m.Phase + ")"
		}
	}
	switch {
	case a.Held:
		s = strings.TrimSpace(s + " held")
	case a.Silenced:
		s = strings.TrimSpace(s + " silenced")
	}
	return dash(s)
}

func ovsPort(p *api.OVSPort) string {
	if p == nil {
		return "-"
	}
	s := p.Bridge + "/" + p.Port
	switch {
	case p.VLAN != nil:
		s += fmt.Sprintf(" vlan %d", *p.VLAN)
	case len(p.Trunks) > 0:
		s += " trunk " + trunkList(p.Trunks)
	}
	return s
}

// trunkList compresses sorted VLAN ids into ranges: 10,20-30.
func trunkList(ids []int) string {
	var parts []string
	for i := 0; i < len(ids); {
		j := i
		for j+1 < len(ids) && ids[j+1] == ids[j]+1 {
			j++
		}
		if j > i {
			parts = append(parts, fmt.Sprintf("%d-%d", ids[i], ids[j]))
		} else {
			parts = append(parts, fmt.Sprint(ids[i]))
		}
		i = j + 1
	}
	return strings.Join(parts, ",")
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func shortID(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}

// age is a duration the way kubectl prints it: 45s, 3m12s, 5h3m, 2d4h.
func age(now, t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	d := now.Sub(t)
	if d < 0 {
		d = 0
	}
	switch {
	case d < time.Minute:
		return fmt.Sprintf("%ds", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm%ds", int(d.Minutes()), int(d.Seconds())%60)
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh%dm", int(d.Hours()), int(d.Minutes())%60)
	}
	return fmt.Sprintf("%dd%dh", int(d.Hours())/24, int(d.Hours())%24)
}
