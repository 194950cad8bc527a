package integration

import (
	"bytes"
	"encoding/json"
	"errors"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"

	"github.com/vmnic/vmnic/test/harness"
)

// What containerd (and CRI-O) send, beyond what libcni's defaults do: STATUS
// on the node's primary network, DEL twice per sandbox, CNI_ARGS in any
// order (the harness shuffles them for every pod), and requests for a
// sandbox whose network namespace is already gone.

// TestStatusChainedNeedsNoDaemon: STATUS of the chained primary conflist,
// which decides the node's NetworkReady, succeeds with vmnicd away and
// never contacts its socket, in masquerade and passt mode alike.
func TestStatusChainedNeedsNoDaemon(t *testing.T) {
	for _, mode := range []string{"masquerade", "passt"} {
		t.Run(mode, func(t *testing.T) {
			ctx := ctxT(t)
			node, _ := newNode(t, false)
			l := list(t, node, harness.NetOptions{Vmnic: true, Extra: map[string]any{"mode": mode}})
			if err := node.Status(ctx, l); err != nil {
				t.Errorf("STATUS with no daemon socket at all: %v", err)
			}
			conns := countingSocket(t, node.Socket())
			if err := node.Status(ctx, l); err != nil {
				t.Errorf("STATUS with a socket nobody answers on: %v", err)
			}
			if n := conns.Load(); n != 0 {
				t.Errorf("STATUS contacted the daemon socket %d times; it must not wait on vmnicd", n)
			}
		})
	}
}

// TestStatusBridge: bridge mode is a network's main plugin, so its STATUS
// is the daemon's: ready with vmnicd, its OVS bridge and its IPAM plugin;
// code 50 naming what is missing otherwise.
func TestStatusBridge(t *testing.T) {
	ctx := ctxT(t)
	n := newOVSNode(t)
	ipam := n.hostLocal("10.100.0.10", "10.100.0.50")
	if err := n.Status(ctx, n.bridgeList(t, "st", map[string]any{"vlan": 100}, ipam)); err != nil {
		t.Errorf("STATUS of a ready bridge network: %v", err)
	}
	wantNotReady := func(what string, l *libcni.NetworkConfigList, msg string) {
		t.Helper()
		err := n.Status(ctx, l)
		var te *types.Error
		if !errors.As(err, &te) || te.Code != types.ErrPluginNotAvailable || !strings.Contains(te.Msg, msg) {
			t.Errorf("STATUS %s = %v, want code 50 naming %q", what, err, msg)
		}
	}
	wantNotReady("without its OVS bridge", n.bridgeList(t, "st", map[string]any{"bridge": "nobr"}, ipam), `"nobr"`)
	wantNotReady("with an IPAM plugin that is not installed", n.bridgeList(t, "st", nil, map[string]any{"type": "no-such-ipam"}), "no-such-ipam")
	if err := n.stop(); err != nil {
		t.Fatal(err)
	}
	wantNotReady("with vmnicd away", n.bridgeList(t, "st", nil, ipam), "daemon unavailable")
}

// TestContainerdDelSequence: each mode's VM NIC survives containerd's two
// DELs (sandbox stop with the netns and the cached result, sandbox removal
// with neither) and leaves nothing: no link, record, port or address. So
// does a failed sandbox creation (ADD, then the two DELs).
func TestContainerdDelSequence(t *testing.T) {
	t.Run("masquerade", func(t *testing.T) {
		ctx := ctxT(t)
		node, _ := newNode(t, true)
		l := list(t, node, harness.NetOptions{Vmnic: true, VM: vm1})
		p := newPod(t, "virt-launcher-vm1-deltwice")
		if _, err := node.Add(ctx, l, p); err != nil {
			t.Fatalf("ADD: %v", err)
		}
		if err := node.DelAsContainerd(ctx, l, p); err != nil {
			t.Fatal(err)
		}
		if links := podLinks(t, p); len(links) != 1 {
			t.Errorf("links left after the two DELs: %v", keys(links))
		}
		if recs, _, _ := stateList(t, node); len(recs) != 0 {
			t.Errorf("%d records left", len(recs))
		}
		if ips := hostLocalIPs(t, filepath.Join(node.Dir, "host-local", "podnet")); len(ips) != 0 {
			t.Errorf("primary's addresses left: %v", ips)
		}
	})
	t.Run("bridge", func(t *testing.T) {
		ctx := ctxT(t)
		n := newOVSNode(t)
		l := n.bridgeList(t, "deltwice", map[string]any{"vlan": 100}, n.hostLocal("10.100.0.10", "10.100.0.50"))
		vm, _ := n.addPod(t, l, "virt-launcher-vm1-deltwice")
		plain, _ := n.addPod(t, l, "plain-deltwice")
		for _, p := range []*harness.Pod{vm, plain} {
			if err := n.DelAsContainerd(ctx, l, p); err != nil {
				t.Fatalf("%s: %v", p.Name, err)
			}
			if links := podLinks(t, p); len(links) != 1 {
				t.Errorf("%s: links left: %v", p.Name, keys(links))
			}
		}
		n.assertNothingLeft(t, "deltwice")

		// A sandbox whose ADD failed (no such OVS bridge) gets the same
		// two DELs.
		bad := n.bridgeList(t, "deltwice", map[string]any{"bridge": "nobr"}, n.hostLocal("10.100.0.10", "10.100.0.50"))
		p := newPod(t, "virt-launcher-vm2-failed")
		p.IfName = "net1"
		if _, err := n.Add(ctx, bad, p); err == nil {
			t.Fatal("ADD on a missing OVS bridge succeeded")
		}
		if err := n.DelAsContainerd(ctx, bad, p); err != nil {
			t.Fatalf("DELs after a failed ADD: %v", err)
		}
		n.assertNothingLeft(t, "deltwice")
	})
	t.Run("passt", func(t *testing.T) {
		ctx := ctxT(t)
		node, _ := newNode(t, true)
		underlay(t, node)
		ipamDir := filepath.Join(node.Dir, "ipam")
		ipam := map[string]any{
			"type": "host-local", "dataDir": ipamDir,
			"ranges": []any{[]any{map[string]any{"subnet": "10.50.0.0/24", "rangeStart": "10.50.0.10", "rangeEnd": "10.50.0.50"}}},
		}
		l := passtList(t, node, "1.1.0", ipam, nil)
		p := newPod(t, "virt-launcher-vm1-deltwice")
		if _, err := node.Add(ctx, l, p); err != nil {
			t.Fatalf("ADD: %v", err)
		}
		if err := node.DelAsContainerd(ctx, l, p); err != nil {
			t.Fatal(err)
		}
		if recs, _, _ := stateList(t, node); len(recs) != 0 {
			t.Errorf("%d records left", len(recs))
		}
		if ips := hostLocalIPs(t, filepath.Join(ipamDir, "macvlan-passt")); len(ips) != 0 {
			t.Errorf("underlay addresses left: %v", ips)
		}
	})
}

// assertNothingLeft: no vmnic port, node veth, record or address of network.
func (n *ovsNode) assertNothingLeft(t *testing.T, network string) {
	t.Helper()
	if ports := n.vmnicPorts(t); len(ports) != 0 {
		t.Errorf("OVS ports left: %v", ports)
	}
	if ips := n.allocated(t, network); len(ips) != 0 {
		t.Errorf("addresses left: %v", ips)
	}
	if recs, _, _ := stateList(t, n.Node); len(recs) != 0 {
		t.Errorf("%d records left", len(recs))
	}
}

// TestVanishedSandbox: an ADD or CHECK into a CNI_NETNS that no longer
// exists answers code 3 (the container is unknown; the runtime needs no
// cleanup) in every mode, and leaves nothing behind.
func TestVanishedSandbox(t *testing.T) {
	ctx := ctxT(t)
	n := newOVSNode(t)
	gone := newPod(t, "virt-launcher-vm1-gone")
	gonePath := gone.NS.Path()
	gone.Close()

	wantGone := func(t *testing.T, what string, err error) {
		t.Helper()
		var te *types.Error
		if !errors.As(err, &te) || te.Code != types.ErrUnknownContainer || !strings.Contains(te.Msg, "CNI_NETNS") {
			t.Errorf("%s into a vanished netns = %v, want code 3 naming CNI_NETNS", what, err)
		}
	}
	// Chained modes come after the primary plugin, which would fail first
	// on a vanished netns: the shim is executed alone, as the runtime
	// would in the chain, with a prevResult.
	for _, mode := range []string{"masquerade", "passt"} {
		t.Run(mode, func(t *testing.T) {
			wantGone(t, "ADD", execShim(t, n.Node, "ADD", gonePath, mode))
			wantGone(t, "CHECK", execShim(t, n.Node, "CHECK", gonePath, mode))
			if recs, _, _ := stateList(t, n.Node); len(recs) != 0 {
				t.Errorf("%d records left", len(recs))
			}
		})
	}
	t.Run("bridge", func(t *testing.T) {
		l := n.bridgeList(t, "gone", map[string]any{"vlan": 100}, n.hostLocal("10.100.0.10", "10.100.0.50"))
		for _, name := range []string{"virt-launcher-vm1-gone", "plain-gone"} {
			p := &harness.Pod{ContainerID: "cgone" + strings.ReplaceAll(name, "-", ""), Namespace: "default", Name: name, IfName: "net1"}
			rt := p.Runtime()
			rt.NetNS = gonePath
			err := n.In(func() error {
				_, err := n.CNI.AddNetworkList(ctx, l, rt)
				return err
			})
			wantGone(t, "ADD of "+name, err)
		}
		n.assertNothingLeft(t, "gone")

		// CHECK of a wired NIC whose sandbox went away.
		vm, _ := n.addPod(t, l, "virt-launcher-vm3-checkgone")
		rt := vm.Runtime()
		path := vm.NS.Path()
		vm.Close()
		rt.NetNS = path
		err := n.In(func() error { return n.CNI.CheckNetworkList(ctx, l, rt) })
		wantGone(t, "CHECK", err)
		if err := n.DelAsContainerd(ctx, l, vm); err != nil {
			t.Fatal(err)
		}
		n.assertNothingLeft(t, "gone")
	})
}

// execShim runs the shim once as the runtime runs the last plugin of a
// chained list, for a VM pod, with a prevResult, and returns its CNI error.
func execShim(t *testing.T, node *harness.Node, cmd, netnsPath, mode string) error {
	t.Helper()
	bin, err := harness.BinDir()
	if err != nil {
		t.Fatal(err)
	}
	conf, err := json.Marshal(map[string]any{
		"cniVersion": "1.1.0", "name": "podnet", "type": "vmnic", "mode": mode,
		"socket": node.Socket(), "spoolDir": node.SpoolDir(), "readyTimeout": "5s",
		"prevResult": map[string]any{
			"cniVersion": "1.1.0",
			"interfaces": []any{map[string]any{"name": "eth0", "mac": "02:00:00:00:10:01", "sandbox": netnsPath}},
			"ips":        []any{map[string]any{"address": "198.18.0.77/24", "gateway": "198.18.0.1", "interface": 0}},
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	c := exec.Command(filepath.Join(bin, "vmnic"))
	c.Env = []string{
		"CNI_COMMAND=" + cmd, "CNI_CONTAINERID=cshim" + mode, "CNI_NETNS=" + netnsPath, "CNI_IFNAME=eth0", "CNI_PATH=" + bin,
		"CNI_ARGS=K8S_POD_UID=u1;K8S_POD_NAME=virt-launcher-vm1-shim;IgnoreUnknown=1;K8S_POD_INFRA_CONTAINER_ID=cshim;K8S_POD_NAMESPACE=default",
	}
	c.Stdin = bytes.NewReader(conf)
	out, err := c.Output()
	if err == nil {
		return nil
	}
	te := &types.Error{}
	if jerr := json.Unmarshal(out, te); jerr != nil || te.Code == 0 {
		t.Fatalf("shim %s: %v, output %q", cmd, err, out)
	}
	return te
}
