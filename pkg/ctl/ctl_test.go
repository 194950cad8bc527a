package ctl

import (
	"bytes"
	"encoding/json"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/vmnic/vmnic/pkg/api"
	"github.com/vmnic/vmnic/pkg/proto"
	"github.com/vmnic/vmnic/test/need"
)

func run(argv ...string) (int, string, string) {
	var out, errOut bytes.Buffer
	code := Main(argv, &out, &errOut)
	return code, out.String(), errOut.String()
}

func TestMainUsage(t *testing.T) {
	if code, out, _ := run("vmnicctl"); code != ExitUsage || !strings.Contains(out, "Usage: vmnicctl COMMAND") {
		t.Errorf("no args: %d\n%s", code, out)
	}
	if code, out, _ := run("/usr/local/bin/kubectl-vmnic", "help"); code != ExitOK || !strings.Contains(out, "Usage: kubectl vmnic COMMAND") {
		t.Errorf("as kubectl plugin: %d\n%s", code, out)
	}
	if code, _, errOut := run("vmnicctl", "frobnicate"); code != ExitUsage || !strings.Contains(errOut, `unknown command "frobnicate"`) {
		t.Errorf("unknown command: %d %s", code, errOut)
	}
	if code, _, errOut := run("vmnicctl", "status", "-o", "yaml"); code != ExitUsage || !strings.Contains(errOut, "want json or wide") {
		t.Errorf("-o yaml: %d %s", code, errOut)
	}
	if code, _, errOut := run("vmnicctl", "status", "extra"); code != ExitUsage || !strings.Contains(errOut, "takes no arguments") {
		t.Errorf("extra argument: %d %s", code, errOut)
	}
	if code, out, _ := run("vmnicctl", "version", "-o", "json"); code != ExitOK || !strings.Contains(out, `"vmnicctl": "dev"`) {
		t.Errorf("version: %d %s", code, out)
	}
	if code, _, errOut := run("vmnicctl", "doctor", "--mode", "nat"); code != ExitUsage || !strings.Contains(errOut, `--mode "nat"`) {
		t.Errorf("doctor --mode nat: %d %s", code, errOut)
	}
	if code, _, errOut := run("vmnicctl", "doctor", "--kubeconfig", filepath.Join(t.TempDir(), "none")); code != ExitFailed || errOut == "" {
		t.Errorf("doctor without a cluster: %d %s", code, errOut)
	}
}

func TestParseInterleaved(t *testing.T) {
	code, _, errOut := run("vmnicctl", "capabilities", "a", "b")
	if code != ExitUsage || !strings.Contains(errOut, "at most one NODE") {
		t.Errorf("two nodes: %d %s", code, errOut)
	}
}

// fakeDaemon answers every request on a unix socket with resp.
func fakeDaemon(t *testing.T, resp func(req *proto.Request) *proto.Response) string {
	t.Helper()
	need.Root(t) // vmnicctl trusts only a socket owned by root
	sock := filepath.Join(t.TempDir(), "vmnic.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			req := &proto.Request{}
			if proto.Decode(c, req) == nil {
				_ = proto.Encode(c, resp(req))
			}
			_ = c.Close()
		}
	}()
	return sock
}

func TestStatusStates(t *testing.T) {
	starting := fakeDaemon(t, func(*proto.Request) *proto.Response {
		return &proto.Response{Error: types.NewError(types.ErrTryAgainLater, "vmnic daemon is starting or stopping", "")}
	})
	code, out, _ := run("vmnicctl", "status", "--socket", starting)
	if code != ExitStarting || !strings.Contains(out, "vmnicd:    starting") {
		t.Errorf("starting daemon: %d\n%s", code, out)
	}
	code, out, _ = run("vmnicctl", "status", "--socket", starting, "-o", "json")
	if code != ExitStarting || !strings.Contains(out, `"state": "starting"`) {
		t.Errorf("starting daemon, json: %d\n%s", code, out)
	}
	if c, _, errOut := run("vmnicctl", "attachments", "--socket", starting); c != ExitStarting || !strings.Contains(errOut, "starting") {
		t.Errorf("attachments of a starting daemon: %d %s", c, errOut)
	}

	code, out, _ = run("vmnicctl", "status", "--socket", filepath.Join(t.TempDir(), "none.sock"))
	if code != ExitFailed || !strings.Contains(out, "not reachable") {
		t.Errorf("no daemon: %d\n%s", code, out)
	}

	st := api.Status{
		Version: "v1.2.3", Ready: true, Node: "node-a", Source: "cluster", Socket: "/run/vmnic/vmnic.sock", StateDir: "/var/lib/vmnic",
		Started:     time.Now().Add(-90 * time.Minute),
		Attachments: map[string]int{"masquerade": 2, "bridge": 1, "passt": 0}, DHCPServers: 3, PendingDELs: 1,
		Requests:    map[string]map[string]uint64{"DEL": {"ok": 4}, "ADD": {"ok": 5, "error": 1}},
		MetricsAddr: "127.0.0.1:9961",
	}
	ready := fakeDaemon(t, func(req *proto.Request) *proto.Response {
		if req.Command != api.CommandStatus {
			return &proto.Response{Error: types.NewError(4, "unknown", "")}
		}
		b, _ := json.Marshal(st)
		return &proto.Response{Result: b}
	})
	code, out, _ = run("vmnicctl", "status", "--socket", ready)
	for _, want := range []string{
		"vmnicd:        ready", "version:       vmnicd v1.2.3, vmnicctl dev", "node:          node-a, VM facts from the API server",
		"attachments:   3 (bridge 1, masquerade 2)", "DHCP servers:  3 running", "pending DELs:  1 spooled",
		"requests:      ADD 5 (+1 failed), DEL 4", "metrics:       http://127.0.0.1:9961/metrics", "(1h30m)",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("status lacks %q:\n%s", want, out)
		}
	}
	if code != ExitOK {
		t.Errorf("ready daemon: exit %d", code)
	}
}

func TestPrintAttachments(t *testing.T) {
	now := time.Date(2026, 10, 1, 12, 0, 0, 0, time.UTC)
	vlan := 100
	items := []api.Attachment{
		{
			ContainerID: "0123456789abcdef", IfName: "eth0", Network: "podnet", Mode: "masquerade",
			Pod: api.Pod{Namespace: "default", Name: "virt-launcher-vm1-abcde"}, VM: "vm1", Complete: true, Created: now.Add(-3 * time.Hour),
			Tap: "tap0", Bridge: "k6t-eth0", PodIPs: []string{"198.18.0.5/24"}, GuestIPs: []string{"10.0.2.2"}, GuestMAC: "02:00:00:12:34:56",
			DHCP: api.DHCP{Running: true, V4Lease: &api.Lease{IP: "10.0.2.2", MAC: "02:00:00:12:34:56", Time: now.Add(-42 * time.Second)}},
		},
		{
			ContainerID: "c2", IfName: "pod31afc46bc04", Network: "ovs-vlan100", Mode: "bridge",
			Pod: api.Pod{Namespace: "vms", Name: "virt-launcher-vm2-x"}, VM: "vm2", Complete: true,
			Tap: "tap31afc46bc04", Bridge: "k6t-pod31afc46bc04", OVS: &api.OVSPort{Bridge: "br1", Port: "vmn01", VLAN: &vlan},
			GuestIPs: []string{"10.100.0.100/24"}, GuestMAC: "02:76:0a:64:00:64", DHCP: api.DHCP{Running: true},
			Migration: &api.Migration{Job: "vm2-mig", Phase: "Running"}, Held: true,
		},
		{
			ContainerID: "c3", IfName: "net1", Mode: "bridge", Pod: api.Pod{Namespace: "default", Name: "web"},
			Complete: true, OVS: &api.OVSPort{Bridge: "br1", Port: "vmn02", Trunks: []int{10, 20, 21, 22, 30}}, PodIPs: []string{"10.0.0.5/24"},
		},
		{ContainerID: "c4", IfName: "eth0", Mode: "masquerade", Pod: api.Pod{Namespace: "default", Name: "virt-launcher-vm3-y"}, Tap: "tap0"},
		{ContainerID: "c5", IfName: "eth0", Mode: "passt", Pod: api.Pod{Namespace: "default", Name: "virt-launcher-vm4-z"}, Complete: true, PodIPs: []string{"172.16.10.100/24"}, GuestIPs: []string{"172.16.10.100"}},
	}
	var b bytes.Buffer
	PrintAttachments(&b, items, true, now)
	lines := strings.Split(strings.TrimSpace(b.String()), "\n")
	if len(lines) != 6 {
		t.Fatalf("table:\n%s", b.String())
	}
	for i, want := range [][]string{
		{"POD", "IF", "MODE", "VM", "TAP", "BRIDGE", "OVS PORT", "POD IPS", "GUEST IPS", "GUEST MAC", "DHCP", "MIGRATION", "NETWORK", "CONTAINER", "AGE"},
		{"default/virt-launcher-vm1-abcde", "eth0", "masquerade", "vm1", "tap0", "k6t-eth0", "198.18.0.5/24", "10.0.2.2", "02:00:00:12:34:56", "v4 10.0.2.2 42s ago", "podnet", "0123456789ab", "3h0m"},
		{"vms/virt-launcher-vm2-x", "br1/vmn01 vlan 100", "10.100.0.100/24", "no lease yet", "vm2-mig (Running) held"},
		{"default/web", "br1/vmn02 trunk 10,20-22,30", "10.0.0.5/24"},
		{"default/virt-launcher-vm3-y", "incomplete"},
		{"default/virt-launcher-vm4-z", "passt", "172.16.10.100/24", "172.16.10.100", "by passt"},
	} {
		for _, w := range want {
			if !strings.Contains(lines[i], w) {
				t.Errorf("line %d lacks %q: %s", i, w, lines[i])
			}
		}
	}
	b.Reset()
	PrintAttachments(&b, nil, false, now)
	if !strings.Contains(b.String(), "No attachments") {
		t.Errorf("empty: %s", b.String())
	}
}

func TestAge(t *testing.T) {
	now := time.Now()
	for d, want := range map[time.Duration]string{
		5 * time.Second: "5s", 3*time.Minute + 12*time.Second: "3m12s", 5*time.Hour + 3*time.Minute: "5h3m", 50 * time.Hour: "2d2h", -time.Second: "0s",
	} {
		if got := age(now, now.Add(-d)); got != want {
			t.Errorf("age(%s) = %s, want %s", d, got, want)
		}
	}
}
