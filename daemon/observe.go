package daemon

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/vmnic/vmnic/pkg/api"
	"github.com/vmnic/vmnic/pkg/netconf"
	"github.com/vmnic/vmnic/pkg/proto"
)

// ObserveOptions configure what the daemon reports about itself: metrics,
// Kubernetes events, and facts for vmnicctl. The zero value reports
// nothing but what introspection reads from the records.
type ObserveOptions struct {
	// Metrics count the CNI requests and more (NewMetrics); nil counts
	// nothing. Serve them with MetricsHandler or ServeMetrics.
	Metrics *Metrics
	// Events reports failed ADDs as Kubernetes Events (NewEvents, with
	// Events.Run started); nil reports none (standalone).
	Events *Events
	// Node is this node's name; Cluster tells that VM facts come from an
	// API server; MetricsAddr is where metrics are served. VMNIC_STATUS
	// reports them.
	Node        string
	Cluster     bool
	MetricsAddr string
}

// requestInfo is what observe needs of a request. It comes from the config
// dispatch parsed; only for a config that did not parse (which may be why
// the request failed) is the name and mode decoded here.
type requestInfo struct {
	verb        string
	mode        string
	network     string
	ifName      string
	containerID string
	pod         eventPod
}

func infoOf(req *proto.Request, conf *netconf.Conf, modes []string) requestInfo {
	in := requestInfo{verb: req.Command, ifName: req.IfName, containerID: req.ContainerID, mode: "unknown"}
	c := struct {
		Name string `json:"name"`
		Mode string `json:"mode"`
	}{}
	if conf != nil {
		c.Name, c.Mode = conf.Name, conf.Mode
	} else if json.Unmarshal(req.Config, &c) != nil {
		c.Name, c.Mode = "", ""
	}
	in.network = c.Name
	if slices.Contains(modes, c.Mode) {
		in.mode = c.Mode
	}
	if p, err := netconf.ParseArgs(req.Args); err == nil {
		in.pod = eventPod{namespace: p.Namespace, name: p.Name, uid: p.UID}
	}
	return in
}

// observe is called after every CNI request with its outcome.
func (d *Daemon) observe(req *proto.Request, conf *netconf.Conf, err error, elapsed time.Duration) {
	if isIntrospect(req.Command) {
		return
	}
	m, ev := d.opts.Observe.Metrics, d.opts.Observe.Events
	if m == nil && (ev == nil || err == nil) {
		return
	}
	in := infoOf(req, conf, d.modeNames)
	m.request(in.verb, in.mode, err, elapsed)
	if m != nil && (req.Command == "ADD" || req.Command == "DEL") {
		// Catch the counters of a server about to go, or just started.
		m.updateDHCP(d.servers.runningServers())
	}
	if err != nil && req.Command == "ADD" {
		if f, ok := failureOf(in, err, time.Now()); ok {
			ev.enqueue(f)
		}
	}
}

// introspectPrefix starts the commands vmnicctl sends on the socket.
const introspectPrefix = "VMNIC_"

func isIntrospect(cmd string) bool { return strings.HasPrefix(cmd, introspectPrefix) }

// introspect answers vmnicctl's requests (pkg/api).
func (d *Daemon) introspect(_ context.Context, req *proto.Request) (json.RawMessage, error) {
	var v any
	switch req.Command {
	case api.CommandStatus:
		v = d.status()
	case api.CommandAttachments:
		v = d.attachments()
	default:
		return nil, types.NewError(types.ErrInvalidEnvironmentVariables, fmt.Sprintf("CNI_COMMAND: unknown command %q", req.Command), "")
	}
	out, err := json.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("encode %s answer: %w", req.Command, err)
	}
	return out, nil
}
