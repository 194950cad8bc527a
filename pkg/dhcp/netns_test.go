package dhcp

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"github.com/vishvananda/netlink"
	"github.com/vmnic/vmnic/test/need"
	"golang.org/x/sys/unix"
)

const (
	bridgeName = "k6t-eth0"
	guestIf    = "eth0"
)

var (
	bridgeMAC = net.HardwareAddr{0x02, 0, 0, 0, 0, 0}
	guestMAC  = net.HardwareAddr{0x02, 0, 0, 0, 0, 0x02}
	otherMAC  = net.HardwareAddr{0x02, 0, 0, 0, 0, 0x99}

	serverV4 = net.ParseIP("10.0.2.1").To4()
	guestV4  = net.ParseIP("10.0.2.2").To4()
	guestV6  = net.ParseIP("fd10:0:2::2")
)

// testNet is a pod namespace with bridge k6t-eth0 (10.0.2.1/24,
// fd10:0:2::1/120) and a guest namespace whose eth0 is plugged into it
// through a veth, as a VM's tap would be.
type testNet struct {
	pod, guest ns.NetNS
}

type netOpts struct {
	// podDAD keeps duplicate address detection on the bridge, so its
	// link-local address starts tentative.
	podDAD bool
}

func requireRoot(t *testing.T) {
	t.Helper()
	need.Root(t)
}

func newTestNet(t *testing.T, o netOpts) *testNet {
	t.Helper()
	requireRoot(t)
	tn := &testNet{}
	var err error
	if tn.pod, err = testutils.NewNS(); err != nil {
		t.Fatalf("create pod netns: %v", err)
	}
	t.Cleanup(func() { closeNS(tn.pod) })
	if tn.guest, err = testutils.NewNS(); err != nil {
		t.Fatalf("create guest netns: %v", err)
	}
	t.Cleanup(func() { closeNS(tn.guest) })

	err = tn.pod.Do(func(ns.NetNS) error {
		if err := linkUp("lo"); err != nil {
			return err
		}
		br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: bridgeName, HardwareAddr: bridgeMAC}}
		if err := netlink.LinkAdd(br); err != nil {
			return fmt.Errorf("add bridge: %w", err)
		}
		if !o.podDAD {
			if err := sysctl(bridgeName, "accept_dad", "0"); err != nil {
				return err
			}
		}
		veth := &netlink.Veth{
			LinkAttrs:        netlink.LinkAttrs{Name: "tap0", MasterIndex: 0},
			PeerName:         guestIf,
			PeerHardwareAddr: guestMAC,
			PeerNamespace:    netlink.NsFd(int(tn.guest.Fd())),
		}
		if err := netlink.LinkAdd(veth); err != nil {
			return fmt.Errorf("add veth: %w", err)
		}
		brLink, err := netlink.LinkByName(bridgeName)
		if err != nil {
			return err
		}
		tap, err := netlink.LinkByName("tap0")
		if err != nil {
			return err
		}
		if err := netlink.LinkSetMaster(tap, brLink); err != nil {
			return fmt.Errorf("enslave tap0: %w", err)
		}
		for _, cidr := range []string{"10.0.2.1/24", "fd10:0:2::1/120"} {
			addr, _ := netlink.ParseAddr(cidr)
			if err := netlink.AddrAdd(brLink, addr); err != nil {
				return fmt.Errorf("add %s: %w", cidr, err)
			}
		}
		if err := linkUp(bridgeName); err != nil {
			return err
		}
		return linkUp("tap0")
	})
	if err != nil {
		t.Fatalf("set up pod netns: %v", err)
	}

	err = tn.guest.Do(func(ns.NetNS) error {
		if err := linkUp("lo"); err != nil {
			return err
		}
		// Usable link-local address at once; take router advertisements
		// even if forwarding is on; solicit nothing by itself, so that each
		// advertisement seen has a known cause.
		for k, v := range map[string]string{"accept_dad": "0", "accept_ra": "2", "router_solicitations": "0"} {
			if err := sysctl(guestIf, k, v); err != nil {
				return err
			}
		}
		return linkUp(guestIf)
	})
	if err != nil {
		t.Fatalf("set up guest netns: %v", err)
	}
	// Until the kernel's link watcher saw the carrier, the veth drops what
	// it is given and IPv6 has no link-local address yet.
	for _, l := range []struct {
		netns ns.NetNS
		name  string
	}{{tn.guest, guestIf}, {tn.pod, bridgeName}} {
		poll(t, 5*time.Second, l.name+" operationally up", func() bool {
			up := false
			_ = l.netns.Do(func(ns.NetNS) error {
				link, err := netlink.LinkByName(l.name)
				up = err == nil && link.Attrs().OperState == netlink.OperUp
				return nil
			})
			return up
		})
	}
	// Even without DAD, a new address is tentative until a work queue ran.
	poll(t, 5*time.Second, "usable guest link-local address", func() bool {
		return usableLinkLocal(tn.guest, guestIf) != nil
	})
	return tn
}

// usableLinkLocal returns the non-tentative link-local address of ifname in
// netns n, nil if there is none.
func usableLinkLocal(n ns.NetNS, ifname string) net.IP {
	var ll net.IP
	_ = n.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName(ifname)
		if err != nil {
			return err
		}
		addrs, err := netlink.AddrList(l, netlink.FAMILY_V6)
		for _, a := range addrs {
			if a.IP.IsLinkLocalUnicast() && a.Flags&unix.IFA_F_TENTATIVE == 0 {
				ll = a.IP
			}
		}
		return err
	})
	return ll
}

func closeNS(n ns.NetNS) {
	n.Close()
	testutils.UnmountNS(n)
}

func linkUp(name string) error {
	l, err := netlink.LinkByName(name)
	if err != nil {
		return fmt.Errorf("find %s: %w", name, err)
	}
	if err := netlink.LinkSetUp(l); err != nil {
		return fmt.Errorf("set %s up: %w", name, err)
	}
	return nil
}

// sysctl writes net.ipv6.conf.<ifname>.<key> of the current thread's netns.
func sysctl(ifname, key, value string) error {
	p := filepath.Join("/proc/sys/net/ipv6/conf", ifname, key)
	if err := os.WriteFile(p, []byte(value), 0o644); err != nil {
		return fmt.Errorf("write %s: %w", p, err)
	}
	return nil
}

// testLogger logs to the test's output.
func testLogger(t *testing.T) *slog.Logger {
	return slog.New(testHandler(t))
}

func testHandler(t *testing.T) slog.Handler {
	return slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug})
}

// logCounts counts log records by message.
type logCounts struct {
	mu sync.Mutex
	m  map[string]int
}

func (c *logCounts) get(msg string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.m[msg]
}

type countingHandler struct {
	slog.Handler
	c *logCounts
}

func (h countingHandler) Handle(ctx context.Context, r slog.Record) error {
	h.c.mu.Lock()
	h.c.m[r.Message]++
	h.c.mu.Unlock()
	return h.Handler.Handle(ctx, r)
}

func (h countingHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return countingHandler{h.Handler.WithAttrs(as), h.c}
}

func (h countingHandler) WithGroup(name string) slog.Handler {
	return countingHandler{h.Handler.WithGroup(name), h.c}
}

// countingLogger logs to the test's output and counts the records.
func countingLogger(t *testing.T) (*slog.Logger, *logCounts) {
	c := &logCounts{m: map[string]int{}}
	return slog.New(countingHandler{testHandler(t), c}), c
}

func v4Config() *V4 {
	return &V4{
		Address:   net.IPNet{IP: guestV4, Mask: net.CIDRMask(24, 32)},
		ServerID:  serverV4,
		Router:    serverV4,
		DNS:       []net.IP{net.ParseIP("10.96.0.10")},
		Search:    []string{"default.svc.cluster.local", "svc.cluster.local"},
		MTU:       1400,
		Hostname:  "vm1",
		LeaseTime: time.Hour,
	}
}

func v6Config() *V6 {
	return &V6{
		Address: guestV6,
		DNS:     []net.IP{net.ParseIP("fd00:10:96::a")},
		Search:  []string{"default.svc.cluster.local", "cluster.local"},
	}
}

// start starts a server in the pod netns and stops it when the test ends.
func (tn *testNet) start(t *testing.T, cfg Config) *Server {
	t.Helper()
	cfg.NetnsPath = tn.pod.Path()
	if cfg.IfName == "" {
		cfg.IfName = bridgeName
	}
	if cfg.Logger == nil {
		cfg.Logger = testLogger(t)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s, err := Start(ctx, cfg)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(s.Stop)
	return s
}

// inGuest runs f inside the guest netns.
func (tn *testNet) inGuest(t *testing.T, f func() error) {
	t.Helper()
	if err := tn.guest.Do(func(ns.NetNS) error { return f() }); err != nil {
		t.Fatal(err)
	}
}

// bridgeLinkLocal waits for the bridge's link-local address to be usable.
func (tn *testNet) bridgeLinkLocal(t *testing.T) net.IP {
	t.Helper()
	var ll net.IP
	poll(t, 5*time.Second, "bridge link-local address", func() bool {
		ll = usableLinkLocal(tn.pod, bridgeName)
		return ll != nil
	})
	return ll
}

// poll calls cond every 20ms until it holds or timeout passes.
func poll(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
