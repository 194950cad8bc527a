package dhcp

import (
	"context"
	"net"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

func allServers() Config {
	return Config{ClientMAC: guestMAC, V4: v4Config(), V6: v6Config(), RA: &RA{Prefix: podPrefix, RouterLifetime: time.Minute}}
}

// stopWithin fails the test if Stop takes longer than d.
func stopWithin(t *testing.T, s *Server, d time.Duration) {
	t.Helper()
	done := make(chan struct{})
	go func() { s.Stop(); close(done) }()
	select {
	case <-done:
	case <-time.After(d):
		t.Fatalf("Stop did not return within %s", d)
	}
}

func TestStopIdempotent(t *testing.T) {
	tn := newTestNet(t, netOpts{})
	s := tn.start(t, allServers())
	var wg sync.WaitGroup
	for range 3 {
		wg.Go(func() { stopWithin(t, s, 2*time.Second) })
	}
	wg.Wait()
	stopWithin(t, s, time.Second)
	_ = s.Stats()
	if g := serverGoroutines(); g != "" {
		t.Errorf("goroutines left after Stop:\n%s", g)
	}
	// The sockets are gone: a new server can take the ports.
	tn.start(t, allServers())
}

// TestStopAfterNetnsDeleted removes the bridge and the pod netns under
// running servers, as a pod deletion does: the servers must keep calm (the
// advertiser polls for its link-local address instead of spinning) and stop.
func TestStopAfterNetnsDeleted(t *testing.T) {
	tn := newTestNet(t, netOpts{})
	cfg := allServers()
	cfg.RA.Interval = 20 * time.Millisecond
	logger, logs := countingLogger(t)
	cfg.Logger = logger
	s := tn.start(t, cfg)
	poll(t, 2*time.Second, "RAs", func() bool { return s.Stats().RAsSent > 1 })

	// The advertiser may already have waited once, at start, for the
	// bridge's link-local address to pass DAD (on a busy machine it often
	// does): count from here.
	const waiting = "waiting for a usable link-local address"
	before := logs.get(waiting)
	cpu0, start := cpuTime(t), time.Now()
	err := tn.pod.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName(bridgeName)
		if err != nil {
			return err
		}
		return netlink.LinkDel(l)
	})
	if err != nil {
		t.Fatalf("delete bridge: %v", err)
	}
	closeNS(tn.pod)
	poll(t, 2*time.Second, "advertiser to notice", func() bool { return logs.get(waiting) > before })
	// Two poll rounds of the advertiser.
	poll(t, time.Second, "two link-local polls", func() bool { return time.Since(start) > 2*linkLocalPoll })
	cpu, wall := cpuTime(t)-cpu0, time.Since(start)
	if cpu > wall/2 {
		t.Errorf("used %s of CPU in %s with the netns gone: something spins", cpu, wall)
	}
	if n := logs.get(waiting) - before; n != 1 {
		t.Errorf("logged %q %d times with the netns gone, want once", waiting, n)
	}
	stopWithin(t, s, 2*time.Second)
	if g := serverGoroutines(); g != "" {
		t.Errorf("goroutines left after Stop:\n%s", g)
	}
}

// serverGoroutines returns the stacks of goroutines running Server methods.
func serverGoroutines() string {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	var left []string
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "pkg/dhcp.(*Server)") && !strings.Contains(g, "pkg/dhcp.(*Server).Stop") {
			left = append(left, g)
		}
	}
	return strings.Join(left, "\n\n")
}

// cpuTime is the CPU time the test process used so far.
func cpuTime(t *testing.T) time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		t.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func TestStartErrors(t *testing.T) {
	tn := newTestNet(t, netOpts{})
	cancelled, cancel := context.WithCancel(context.Background())
	cancel()
	badV4 := v4Config()
	badV4.Address.IP = guestV6
	for _, tc := range []struct {
		name string
		ctx  context.Context
		cfg  Config
		want string // in the error
	}{
		{"no such netns", nil, Config{NetnsPath: "/var/run/netns/vmnic-does-not-exist", IfName: bridgeName, V4: v4Config()}, "vmnic-does-not-exist"},
		{"no such interface", nil, Config{NetnsPath: tn.pod.Path(), IfName: "nope0", V4: v4Config()}, "nope0"},
		{"nothing to serve", nil, Config{NetnsPath: tn.pod.Path(), IfName: bridgeName}, "no server"},
		{"ipv6 address for dhcpv4", nil, Config{NetnsPath: tn.pod.Path(), IfName: bridgeName, V4: badV4}, "not an IPv4 address"},
		{"ipv4 address for dhcpv6", nil, Config{NetnsPath: tn.pod.Path(), IfName: bridgeName, V6: &V6{Address: guestV4}}, "not a unicast IPv6"},
		{"cancelled context", cancelled, Config{NetnsPath: tn.pod.Path(), IfName: bridgeName, V4: v4Config()}, "context canceled"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := tc.ctx
			if ctx == nil {
				ctx = context.Background()
			}
			s, err := Start(ctx, tc.cfg)
			if err == nil {
				s.Stop()
				t.Fatal("Start succeeded")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not contain %q", err, tc.want)
			}
		})
	}
}

// TestStartCleansUp makes the DHCPv6 socket fail after the DHCPv4 one was
// opened; the DHCPv4 port must be free again afterwards. It also checks that
// a second server on the same interface is refused.
func TestStartCleansUp(t *testing.T) {
	tn := newTestNet(t, netOpts{})
	var blocker net.PacketConn
	err := tn.pod.Do(func(ns.NetNS) error {
		var err error
		blocker, err = net.ListenPacket("udp6", "[::]:547")
		return err
	})
	if err != nil {
		t.Fatalf("take the dhcpv6 port: %v", err)
	}
	cfg := Config{NetnsPath: tn.pod.Path(), IfName: bridgeName, V4: v4Config(), V6: v6Config(), Logger: testLogger(t)}
	s, err := Start(context.Background(), cfg)
	if err == nil {
		s.Stop()
		t.Fatal("Start succeeded with the dhcpv6 port taken")
	}
	if !strings.Contains(err.Error(), "address already in use") || !strings.Contains(err.Error(), "dhcpv6") {
		t.Errorf("error %q, want dhcpv6 address already in use", err)
	}
	blocker.Close()

	tn.start(t, cfg)
	if s2, err := Start(context.Background(), cfg); err == nil {
		s2.Stop()
		t.Fatal("a second server on the same interface started")
	} else if !strings.Contains(err.Error(), "address already in use") {
		t.Errorf("second server: %v, want address already in use", err)
	}
}

func TestConfigValidate(t *testing.T) {
	base := func() Config { return Config{NetnsPath: "/x", IfName: "k6t-eth0", V4: v4Config()} }
	for _, tc := range []struct {
		name string
		mod  func(*Config)
		want string // "" = valid
	}{
		{"valid", func(*Config) {}, ""},
		{"valid with 16-byte v4 mask", func(c *Config) { c.V4.Address.Mask = net.CIDRMask(120, 128) }, ""},
		{"no netns", func(c *Config) { c.NetnsPath = "" }, "netns path is empty"},
		{"no interface", func(c *Config) { c.IfName = "" }, "interface name is empty"},
		{"bad client mac", func(c *Config) { c.ClientMAC = net.HardwareAddr{1, 2} }, "not an Ethernet address"},
		{"no server id", func(c *Config) { c.V4.ServerID = nil }, "server id"},
		{"server id is the guest", func(c *Config) { c.V4.ServerID = guestV4 }, "equals the guest address"},
		{"v6 router", func(c *Config) { c.V4.Router = guestV6 }, "router"},
		{"v6 route", func(c *Config) { c.V4.Routes = []Route{{Dst: podPrefix}} }, "route destination"},
		{"v6 dns", func(c *Config) { c.V4.DNS = []net.IP{guestV6} }, "dns server"},
		{"bad search", func(c *Config) { c.V4.Search = []string{"a..b"} }, "search domain"},
		{"tiny mtu", func(c *Config) { c.V4.MTU = 10 }, "mtu"},
		{"negative lease", func(c *Config) { c.V4.LeaseTime = -time.Second }, "lease time"},
		{"v4 dns for v6", func(c *Config) { c.V6 = v6Config(); c.V6.DNS = []net.IP{guestV4} }, "dns server"},
		{"v4 ra prefix", func(c *Config) {
			c.RA = &RA{Prefix: net.IPNet{IP: guestV4, Mask: net.CIDRMask(24, 32)}}
		}, "not an IPv6 prefix"},
		{"small ra mtu", func(c *Config) { c.RA = &RA{MTU: 1000} }, "mtu"},
		{"long router lifetime", func(c *Config) { c.RA = &RA{RouterLifetime: 24 * time.Hour} }, "router lifetime"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := base()
			tc.mod(&c)
			err := c.validate()
			switch {
			case tc.want == "" && err != nil:
				t.Errorf("unexpected error: %v", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Errorf("error = %v, want one containing %q", err, tc.want)
			}
		})
	}
}
