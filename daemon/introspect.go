package daemon

import (
	"encoding/json"
	"net"
	"sort"
	"time"

	"github.com/vmnic/vmnic/pkg/api"
	"github.com/vmnic/vmnic/pkg/dhcp"
	"github.com/vmnic/vmnic/pkg/spool"
	"github.com/vmnic/vmnic/pkg/state"
	"github.com/vmnic/vmnic/pkg/version"
)

// resultView is the part of a CNI result (any version from 0.3.0) that
// names the addresses and their interfaces.
type resultView struct {
	Interfaces []struct {
		Name    string `json:"name"`
		Sandbox string `json:"sandbox"`
	} `json:"interfaces"`
	IPs []resultIP `json:"ips"`
}

type resultIP struct {
	Address   string `json:"address"`
	Interface *int   `json:"interface"`
}

// attachmentView describes one record for vmnicctl: what the record says,
// and what its mode shows of its spec. DHCP state is added by the caller.
func (d *Daemon) attachmentView(rec *state.Record) api.Attachment {
	a := api.Attachment{
		ContainerID: rec.ContainerID, IfName: rec.IfName, Network: rec.Network, Mode: rec.Mode,
		Pod:   api.Pod{Namespace: rec.Pod.Namespace, Name: rec.Pod.Name, UID: rec.Pod.UID},
		VM:    rec.VMName,
		Netns: rec.Netns, Created: rec.Created, Complete: len(rec.Result) > 0,
	}
	if m := rec.Migration; m != nil {
		a.Migration = &api.Migration{Job: m.Job, UID: m.UID, Phase: m.Phase}
	}
	att, err := d.load(rec)
	if err != nil {
		return a // a spec that does not decode shows what the record has
	}
	v := att.View()
	a.Tap, a.Bridge, a.GuestMAC, a.OVS = v.Tap, v.Bridge, v.GuestMAC, v.OVS
	a.Held, a.Silenced = v.Held, v.Silenced
	a.PodIPs, a.GuestIPs = v.PodIPs, v.GuestIPs
	if v.PodIPsFromResult {
		a.PodIPs = podIPs(rec.Result, rec.IfName)
	}
	return a
}

// podIPs returns the addresses of the CNI result that belong to the pod
// interface ifName (or to no interface in particular).
func podIPs(result json.RawMessage, ifName string) []string {
	if len(result) == 0 {
		return nil
	}
	var r resultView
	if json.Unmarshal(result, &r) != nil {
		return nil
	}
	var out []string
	for _, ip := range r.IPs {
		if i := ip.Interface; i != nil && *i >= 0 && *i < len(r.Interfaces) {
			if itf := r.Interfaces[*i]; itf.Name != ifName || itf.Sandbox == "" {
				continue
			}
		}
		out = append(out, ip.Address)
	}
	return out
}

// attachmentViews lists the attachments on record, sorted by pod and
// interface, and the number of unreadable records.
func (d *Daemon) attachmentViews() ([]api.Attachment, int) {
	recs, bad, err := d.store.List()
	if err != nil {
		d.log.Warn("introspection: list attachment records", "err", err)
		return nil, 0
	}
	out := make([]api.Attachment, 0, len(recs))
	for _, rec := range recs {
		out = append(out, d.attachmentView(rec))
	}
	sort.SliceStable(out, func(i, j int) bool {
		a, b := out[i], out[j]
		if a.Pod.Namespace != b.Pod.Namespace {
			return a.Pod.Namespace < b.Pod.Namespace
		}
		if a.Pod.Name != b.Pod.Name {
			return a.Pod.Name < b.Pod.Name
		}
		return a.IfName < b.IfName
	})
	return out, len(bad)
}

// attachments answers VMNIC_ATTACHMENTS.
func (d *Daemon) attachments() api.Attachments {
	views, _ := d.attachmentViews()
	running := d.servers.runningServers()
	d.Metrics().updateDHCP(running)
	for i := range views {
		a := &views[i]
		srv := running[state.Key(a.ContainerID, a.IfName)]
		if srv == nil {
			continue
		}
		a.DHCP = dhcpView(srv.Stats())
	}
	return api.Attachments{Items: views}
}

func dhcpView(st dhcp.Stats) api.DHCP {
	return api.DHCP{
		Running: true,
		V4Lease: leaseView(st.LastV4Lease), V6Lease: leaseView(st.LastV6Lease),
		V4Acks: st.V4Acks, V4Naks: st.V4Naks, V6Replies: st.V6Replies, RAsSent: st.RAsSent,
	}
}

func leaseView(l dhcp.Lease) *api.Lease {
	if l.IP == nil {
		return nil
	}
	out := &api.Lease{IP: l.IP.String(), Time: l.Time.UTC()}
	if len(l.HWAddr) > 0 {
		out.MAC = net.HardwareAddr(l.HWAddr).String()
	}
	return out
}

// pendingDELs counts the spooled DELs not replayed yet.
func (d *Daemon) pendingDELs() int {
	entries, bad, err := spool.List(d.opts.SpoolDir)
	if err != nil {
		return 0
	}
	return len(entries) + len(bad)
}

// status answers VMNIC_STATUS.
func (d *Daemon) status() api.Status {
	st := d.nodeState()
	source := "standalone"
	if d.opts.Observe.Cluster {
		source = "cluster"
	}
	return api.Status{
		Version: version.Version, Ready: st.ready, Node: d.opts.Observe.Node, Source: source,
		Socket: d.opts.Socket, StateDir: d.opts.StateDir, SpoolDir: d.opts.SpoolDir,
		Started:     processStart.UTC(),
		Attachments: st.attachments, Incomplete: st.incomplete, Unreadable: st.unreadable,
		DHCPServers: st.dhcpServers, PendingDELs: st.pendingDELs,
		Requests:    d.Metrics().requestCounts(),
		MetricsAddr: d.opts.Observe.MetricsAddr,
		Watches:     d.watchViews(time.Now()),

		WatchDownThreshold: api.Duration(d.opts.WatchDownThreshold),
	}
}

// watchViews are the watches for VMNIC_STATUS.
func (d *Daemon) watchViews(now time.Time) []api.Watch {
	hs := d.watches()
	if len(hs) == 0 {
		return nil
	}
	out := make([]api.Watch, 0, len(hs))
	for _, h := range hs {
		down := h.Down(now)
		out = append(out, api.Watch{
			Resource: h.Resource, Selector: h.Selector, Events: h.Events, Synced: h.Synced, Watching: h.Watching,
			Down: api.Duration(down), LastEvent: h.LastEvent.UTC(), LastError: h.LastError,
			Stale: down > d.opts.WatchDownThreshold,
		})
	}
	return out
}
