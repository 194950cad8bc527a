package integration

import (
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/vmnic/vmnic/pkg/failpoint"
	"github.com/vmnic/vmnic/pkg/netconf"
	"github.com/vmnic/vmnic/pkg/state"
	"github.com/vmnic/vmnic/plugins/masquerade"
	"github.com/vmnic/vmnic/test/harness"
)

func nftList(t testing.TB, p *harness.Pod, family string) (string, error) {
	t.Helper()
	out, err := exec.Command("nsenter", "--net="+p.NS.Path(), "nft", "list", "table", family, "vmnic").CombinedOutput()
	return string(out), err
}

func nftRun(t testing.TB, p *harness.Pod, args ...string) {
	t.Helper()
	out, err := exec.Command("nsenter", append([]string{"--net=" + p.NS.Path(), "nft"}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("nft %v: %v\n%s", args, err, out)
	}
}

var vm1 = map[string]any{"name": "vm1", "mac": "02:00:00:12:34:56", "queues": 2, "ports": []any{map[string]any{"port": 80}, map[string]any{"port": 53, "protocol": "UDP"}}}

// assertWired checks the pod netns holds exactly what masquerade promises.
func assertWired(t *testing.T, p *harness.Pod, dualStack bool) {
	t.Helper()
	links := podLinks(t, p)
	br, ok := links["k6t-eth0"].(*netlink.Bridge)
	if !ok {
		t.Fatalf("bridge k6t-eth0 missing or not a bridge: %v", links["k6t-eth0"])
	}
	eth0 := links["eth0"]
	if eth0 == nil {
		t.Fatal("eth0 missing")
	}
	if br.MTU != eth0.Attrs().MTU || br.MTU != 1480 {
		t.Errorf("bridge MTU %d, pod MTU %d, want both 1480", br.MTU, eth0.Attrs().MTU)
	}
	if br.HardwareAddr.String() != "02:00:00:00:00:00" {
		t.Errorf("bridge MAC %s", br.HardwareAddr)
	}
	if !strings.HasPrefix(br.Alias, masquerade.AliasPrefix) {
		t.Errorf("bridge alias %q lacks the owner mark", br.Alias)
	}
	tap, ok := links["tap0"].(*netlink.Tuntap)
	if !ok {
		t.Fatalf("tap0 missing or not a tuntap: %v", links["tap0"])
	}
	if tap.Owner != 107 || tap.Group != 107 {
		t.Errorf("tap owner %d:%d, want 107:107", tap.Owner, tap.Group)
	}
	if tap.Flags&netlink.TUNTAP_MULTI_QUEUE == 0 {
		t.Error("tap is not multiqueue although 2 queues were asked")
	}
	if tap.MasterIndex != br.Index {
		t.Error("tap0 not enslaved to k6t-eth0")
	}
	if tap.MTU != 1480 {
		t.Errorf("tap MTU %d", tap.MTU)
	}
	var addrs []string
	_ = p.NS.Do(func(ns.NetNS) error {
		as, _ := netlink.AddrList(br, netlink.FAMILY_ALL)
		for _, a := range as {
			addrs = append(addrs, a.IPNet.String())
		}
		return nil
	})
	want := []string{"10.0.2.1/24"}
	if dualStack {
		want = append(want, "fd10:0:2::1/120")
	}
	for _, w := range want {
		if !contains(addrs, w) {
			t.Errorf("bridge addresses %v lack %s", addrs, w)
		}
	}
	if v := sysctlIn(t, p, "net.ipv4.ip_forward"); v != "1" {
		t.Errorf("ip_forward = %s", v)
	}
	if v := sysctlIn(t, p, "net.ipv4.conf.k6t-eth0.route_localnet"); v != "1" {
		t.Errorf("route_localnet = %s", v)
	}
	if dualStack {
		if v := sysctlIn(t, p, "net.ipv6.conf.all.forwarding"); v != "1" {
			t.Errorf("ipv6 forwarding = %s", v)
		}
	}
	rules, err := nftList(t, p, "ip")
	if err != nil {
		t.Fatalf("nft table ip vmnic: %v\n%s", err, rules)
	}
	for _, w := range []string{
		"ip saddr 10.0.2.2 masquerade",
		`iifname "eth0" jump`,
		"tcp dport 80 dnat to 10.0.2.2",
		"udp dport 53 dnat to 10.0.2.2",
		"tcp dport 80 ip daddr 127.0.0.1 dnat to 10.0.2.2",
		"snat to 10.0.2.1",
	} {
		if !strings.Contains(rules, w) {
			t.Errorf("ip vmnic ruleset lacks %q:\n%s", w, rules)
		}
	}
	rules6, err := nftList(t, p, "ip6")
	if dualStack && (err != nil || !strings.Contains(rules6, "dnat to fd10:0:2::2")) {
		t.Errorf("ip6 vmnic ruleset wrong (%v):\n%s", err, rules6)
	}
	if !dualStack && err == nil {
		t.Errorf("single-stack pod got an ip6 vmnic table:\n%s", rules6)
	}
}

func contains(xs []string, x string) bool {
	for _, v := range xs {
		if v == x {
			return true
		}
	}
	return false
}

func assertClean(t *testing.T, p *harness.Pod, stateDir string) {
	t.Helper()
	links := podLinks(t, p)
	for _, n := range []string{"k6t-eth0", "tap0"} {
		if links[n] != nil {
			t.Errorf("%s left behind", n)
		}
	}
	if p.NS != nil {
		for _, fam := range []string{"ip", "ip6"} {
			if out, err := nftList(t, p, fam); err == nil {
				t.Errorf("nft table %s vmnic left behind:\n%s", fam, out)
			}
		}
	}
	if _, err := os.Stat(filepath.Join(stateDir, "attachments", p.ContainerID+"_"+p.IfName+".json")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("attachment record left behind (%v)", err)
	}
}

// TestMasqueradeLifecycle runs ADD, CHECK, STATUS, GC and DEL through libcni
// for every CNI version whose behaviour differs.
func TestMasqueradeLifecycle(t *testing.T) {
	for _, v := range []string{"0.3.1", "0.4.0", "1.0.0", "1.1.0"} {
		t.Run(v, func(t *testing.T) {
			ctx := ctxT(t)
			node, d := newNode(t, true)
			l := list(t, node, harness.NetOptions{CNIVersion: v, Vmnic: true, VM: vm1})
			pod := newPod(t, "virt-launcher-vm1-abcde")

			res, err := node.Add(ctx, l, pod)
			if err != nil {
				t.Fatalf("ADD: %v", err)
			}
			if res.Version() != v {
				t.Errorf("result version %s, want %s", res.Version(), v)
			}
			r, err := current.NewResultFromResult(res)
			if err != nil {
				t.Fatal(err)
			}
			var names []string
			for _, i := range r.Interfaces {
				names = append(names, i.Name)
			}
			for _, n := range []string{"eth0", "k6t-eth0", "tap0"} {
				if !contains(names, n) {
					t.Errorf("result interfaces %v lack %s", names, n)
				}
			}
			if len(r.IPs) != 2 {
				t.Errorf("result IPs %v: want the primary CNI's two", r.IPs)
			}
			assertWired(t, pod, true)
			if !d.Servers().Running(state.Key(pod.ContainerID, "eth0")) {
				t.Error("DHCP servers not running")
			}

			if v != "0.3.1" {
				if err := node.Check(ctx, l, pod); err != nil {
					t.Errorf("CHECK: %v", err)
				}
			}
			if v == "1.1.0" {
				if err := node.Status(ctx, l); err != nil {
					t.Errorf("STATUS: %v", err)
				}
				if err := node.GC(ctx, l, []types.GCAttachment{{ContainerID: pod.ContainerID, IfName: "eth0"}}); err != nil {
					t.Errorf("GC: %v", err)
				}
				assertWired(t, pod, true)
			}
			for i := 0; i < 3; i++ {
				if err := node.Del(ctx, l, pod); err != nil {
					t.Fatalf("DEL #%d: %v", i+1, err)
				}
			}
			assertClean(t, pod, node.StateDir())
			if d.Servers().Count() != 0 {
				t.Errorf("%d DHCP servers still running", d.Servers().Count())
			}
			// DEL once more after the runtime removed the netns.
			pod.Close()
			if err := node.Del(ctx, l, pod); err != nil {
				t.Errorf("DEL after netns removal: %v", err)
			}
		})
	}
}

func TestMasqueradeSingleStack(t *testing.T) {
	ctx := ctxT(t)
	node, _ := newNode(t, true)
	l := list(t, node, harness.NetOptions{Vmnic: true, VM: vm1, Subnet6: "-"})
	pod := newPod(t, "virt-launcher-vm1-v4only")
	if _, err := node.Add(ctx, l, pod); err != nil {
		t.Fatalf("ADD: %v", err)
	}
	assertWired(t, pod, false)
	if err := node.Check(ctx, l, pod); err != nil {
		t.Errorf("CHECK: %v", err)
	}
	if err := node.Del(ctx, l, pod); err != nil {
		t.Fatal(err)
	}
	assertClean(t, pod, node.StateDir())
}

// TestMasqueradeDelAfterNetnsGone covers a runtime that removed the netns
// before DEL: the DHCP servers still stop and the record goes.
func TestMasqueradeDelAfterNetnsGone(t *testing.T) {
	ctx := ctxT(t)
	node, d := newNode(t, true)
	l := list(t, node, harness.NetOptions{Vmnic: true, VM: vm1})
	pod := newPod(t, "virt-launcher-vm1-gone")
	if _, err := node.Add(ctx, l, pod); err != nil {
		t.Fatalf("ADD: %v", err)
	}
	pod.Close()
	if err := node.Del(ctx, l, pod); err != nil {
		t.Fatalf("DEL: %v", err)
	}
	if d.Servers().Count() != 0 {
		t.Error("DHCP servers still running after DEL")
	}
	assertClean(t, pod, node.StateDir())
}

// TestCheckDetectsTampering: CHECK passes on a fresh NIC and fails, naming
// the piece, after each piece is changed behind vmnic's back.
func TestCheckDetectsTampering(t *testing.T) {
	ctx := ctxT(t)
	node, d := newNode(t, true)
	l := list(t, node, harness.NetOptions{Vmnic: true, VM: vm1})
	linkDo := func(p *harness.Pod, f func(h netlinksafe.Handle) error) {
		t.Helper()
		if err := p.NS.Do(func(ns.NetNS) error {
			h, err := netlinksafe.NewHandle()
			if err != nil {
				return err
			}
			defer h.Close()
			return f(h)
		}); err != nil {
			t.Fatalf("tamper: %v", err)
		}
	}
	byName := func(h netlinksafe.Handle, n string) netlink.Link {
		l, err := h.LinkByName(n)
		if err != nil {
			t.Fatalf("link %s: %v", n, err)
		}
		return l
	}
	cases := []struct {
		name   string
		tamper func(p *harness.Pod)
		want   string
	}{
		{"bridge deleted", func(p *harness.Pod) {
			linkDo(p, func(h netlinksafe.Handle) error { return h.LinkDel(byName(h, "k6t-eth0")) })
		}, `bridge "k6t-eth0": missing`},
		{"tap deleted", func(p *harness.Pod) {
			linkDo(p, func(h netlinksafe.Handle) error { return h.LinkDel(byName(h, "tap0")) })
		}, `tuntap "tap0": missing`},
		{"tap detached", func(p *harness.Pod) {
			linkDo(p, func(h netlinksafe.Handle) error { return h.LinkSetNoMaster(byName(h, "tap0")) })
		}, `not attached to bridge`},
		{"tap down", func(p *harness.Pod) {
			linkDo(p, func(h netlinksafe.Handle) error { return h.LinkSetDown(byName(h, "tap0")) })
		}, `tuntap "tap0": down`},
		{"bridge MTU", func(p *harness.Pod) {
			linkDo(p, func(h netlinksafe.Handle) error { return h.LinkSetMTU(byName(h, "k6t-eth0"), 1400) })
		}, `MTU 1400`},
		{"owner mark", func(p *harness.Pod) {
			linkDo(p, func(h netlinksafe.Handle) error { return h.LinkSetAlias(byName(h, "tap0"), "someone-else") })
		}, `owner mark "someone-else"`},
		{"gateway address", func(p *harness.Pod) {
			linkDo(p, func(h netlinksafe.Handle) error {
				ip, n, _ := net.ParseCIDR("10.0.2.1/24")
				n.IP = ip
				return h.AddrDel(byName(h, "k6t-eth0"), &netlink.Addr{IPNet: n})
			})
		}, `address 10.0.2.1/24 missing`},
		{"ip_forward", func(p *harness.Pod) { writeSysctlIn(t, p, "net.ipv4.ip_forward", "0") }, `net.ipv4.ip_forward is 0`},
		{"route_localnet", func(p *harness.Pod) {
			writeSysctlIn(t, p, "net.ipv4.conf.k6t-eth0.route_localnet", "0")
		}, `route_localnet is 0`},
		{"nft rule", func(p *harness.Pod) { nftRun(t, p, "flush", "chain", "ip", "vmnic", "postrouting") }, `postrouting`},
		{"nft table", func(p *harness.Pod) { nftRun(t, p, "delete", "table", "ip6", "vmnic") }, `ip6`},
		{"dhcp server", func(p *harness.Pod) { d.Servers().Stop(state.Key(p.ContainerID, "eth0")) }, `DHCP servers on "k6t-eth0": not running`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			pod := newPod(t, "virt-launcher-vm1-tamper")
			if _, err := node.Add(ctx, l, pod); err != nil {
				t.Fatalf("ADD: %v", err)
			}
			if err := node.Check(ctx, l, pod); err != nil {
				t.Fatalf("CHECK before tampering: %v", err)
			}
			tc.tamper(pod)
			err := node.Check(ctx, l, pod)
			if err == nil {
				t.Fatalf("CHECK passed after %s", tc.name)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("CHECK error %q does not name %q", err, tc.want)
			}
			if err := node.Del(ctx, l, pod); err != nil {
				t.Errorf("DEL after tampering: %v", err)
			}
		})
	}
}

// TestAddFailureLeavesNothing forces a failure after each step of ADD and
// proves the pod netns, the daemon and the state dir are as before.
func TestAddFailureLeavesNothing(t *testing.T) {
	ctx := ctxT(t)
	node, d := newNode(t, true)
	l := list(t, node, harness.NetOptions{Vmnic: true, VM: vm1})
	t.Cleanup(func() { failpoint.Set(nil) })
	for _, step := range append(masquerade.Steps, failpoint.Record) {
		t.Run(step, func(t *testing.T) {
			failpoint.Set(func(mode, s string) error {
				if mode == netconf.ModeMasquerade && s == step {
					return errors.New("injected failure after " + s)
				}
				return nil
			})
			pod := newPod(t, "virt-launcher-vm1-fail")
			_, err := node.Add(ctx, l, pod)
			failpoint.Set(nil)
			if err == nil || !strings.Contains(err.Error(), "injected failure after "+step) {
				t.Fatalf("ADD error = %v, want the injected one", err)
			}
			assertClean(t, pod, node.StateDir())
			if d.Servers().Count() != 0 {
				t.Errorf("%d DHCP servers left", d.Servers().Count())
			}
			// The runtime answers a failed ADD with DEL (releasing the
			// primary's IP); then ADD works on the same pod.
			if err := node.Del(ctx, l, pod); err != nil {
				t.Fatalf("DEL after failed ADD: %v", err)
			}
			if _, err := node.Add(ctx, l, pod); err != nil {
				t.Fatalf("ADD after failure: %v", err)
			}
			if err := node.Del(ctx, l, pod); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestGCRemovesOnlyStale(t *testing.T) {
	ctx := ctxT(t)
	node, _ := newNode(t, true)
	l := list(t, node, harness.NetOptions{Vmnic: true, VM: vm1})
	keep := newPod(t, "virt-launcher-vm1-keep")
	stale := newPod(t, "virt-launcher-vm2-stale")
	for _, p := range []*harness.Pod{keep, stale} {
		if _, err := node.Add(ctx, l, p); err != nil {
			t.Fatalf("ADD %s: %v", p.Name, err)
		}
	}
	if err := node.GC(ctx, l, []types.GCAttachment{{ContainerID: keep.ContainerID, IfName: "eth0"}}); err != nil {
		t.Fatalf("GC: %v", err)
	}
	assertClean(t, stale, node.StateDir())
	if err := node.Check(ctx, l, keep); err != nil {
		t.Errorf("kept attachment broken by GC: %v", err)
	}
}

func TestDaemonRestartRestoresDHCP(t *testing.T) {
	ctx := ctxT(t)
	node, d := newNode(t, true)
	l := list(t, node, harness.NetOptions{Vmnic: true, VM: vm1})
	pod := newPod(t, "virt-launcher-vm1-restart")
	if _, err := node.Add(ctx, l, pod); err != nil {
		t.Fatalf("ADD: %v", err)
	}
	if err := d.Stop(); err != nil {
		t.Fatal(err)
	}
	d2 := startDaemon(t, node)
	if !d2.Servers().Running(state.Key(pod.ContainerID, "eth0")) {
		t.Error("DHCP servers not restored after restart")
	}
	if err := node.Check(ctx, l, pod); err != nil {
		t.Errorf("CHECK after restart: %v", err)
	}
	if err := node.Del(ctx, l, pod); err != nil {
		t.Fatal(err)
	}
}
