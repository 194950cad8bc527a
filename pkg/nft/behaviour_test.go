package nft

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Topology of TestNATBehaviour (all namespaces made by the test):
//
//	outside: out0 198.18.0.1/24 fd00:198:18::1/64
//	   | veth
//	pod:     eth0 198.18.0.2/24 fd00:198:18::2/64   <- the vmnic ruleset
//	         k6t-eth0 (bridge) 10.0.2.1/24 fd10:0:2::1/120, port tap0
//	   | veth
//	guest:   eth0 10.0.2.2/24 fd10:0:2::2/120, default via the bridge
const (
	outsideV4 = "198.18.0.1"
	podV4     = "198.18.0.2"
	outsideV6 = "fd00:198:18::1"
	podV6     = "fd00:198:18::2"
)

func must(t *testing.T, what string, err error) {
	t.Helper()
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

func addAddr(t *testing.T, link netlink.Link, cidr string) {
	t.Helper()
	a, err := netlink.ParseAddr(cidr)
	must(t, "parse "+cidr, err)
	a.Flags = unix.IFA_F_NODAD // no duplicate address detection delay for v6
	must(t, "addr add "+cidr, netlink.AddrAdd(link, a))
}

func linkUp(t *testing.T, name string) netlink.Link {
	t.Helper()
	l, err := netlink.LinkByName(name)
	must(t, "link "+name, err)
	must(t, "link up "+name, netlink.LinkSetUp(l))
	return l
}

func sysctl(t *testing.T, path, value string) {
	t.Helper()
	must(t, "sysctl "+path, os.WriteFile(path, []byte(value), 0o644))
}

func doIn(t *testing.T, n ns.NetNS, f func() error) {
	t.Helper()
	must(t, "in netns "+n.Path(), n.Do(func(ns.NetNS) error { return f() }))
}

func buildTopology(t *testing.T) (pod, outside, guest ns.NetNS) {
	pod, outside, guest = newNS(t), newNS(t), newNS(t)
	doIn(t, outside, func() error {
		must(t, "veth out0/eth0", netlink.LinkAdd(&netlink.Veth{
			LinkAttrs: netlink.LinkAttrs{Name: "out0"}, PeerName: "eth0", PeerNamespace: netlink.NsFd(int(pod.Fd())),
		}))
		linkUp(t, "lo")
		l := linkUp(t, "out0")
		addAddr(t, l, outsideV4+"/24")
		addAddr(t, l, outsideV6+"/64")
		return nil
	})
	doIn(t, pod, func() error {
		linkUp(t, "lo")
		eth0 := linkUp(t, "eth0")
		addAddr(t, eth0, podV4+"/24")
		addAddr(t, eth0, podV6+"/64")
		must(t, "bridge", netlink.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "k6t-eth0"}}))
		br := linkUp(t, "k6t-eth0")
		addAddr(t, br, "10.0.2.1/24")
		addAddr(t, br, "fd10:0:2::1/120")
		must(t, "veth tap0/eth0", netlink.LinkAdd(&netlink.Veth{
			LinkAttrs: netlink.LinkAttrs{Name: "tap0"}, PeerName: "eth0", PeerNamespace: netlink.NsFd(int(guest.Fd())),
		}))
		tap, err := netlink.LinkByName("tap0")
		must(t, "tap0", err)
		must(t, "tap0 master", netlink.LinkSetMaster(tap, br))
		linkUp(t, "tap0")
		sysctl(t, "/proc/sys/net/ipv4/ip_forward", "1")
		sysctl(t, "/proc/sys/net/ipv6/conf/all/forwarding", "1")
		sysctl(t, "/proc/sys/net/ipv4/conf/k6t-eth0/route_localnet", "1")
		return nil
	})
	doIn(t, guest, func() error {
		linkUp(t, "lo")
		eth0 := linkUp(t, "eth0")
		addAddr(t, eth0, "10.0.2.2/24")
		addAddr(t, eth0, "fd10:0:2::2/120")
		must(t, "guest v4 default route", netlink.RouteAdd(&netlink.Route{Gw: net.ParseIP("10.0.2.1")}))
		must(t, "guest v6 default route", netlink.RouteAdd(&netlink.Route{Gw: net.ParseIP("fd10:0:2::1"), LinkIndex: eth0.Attrs().Index}))
		return nil
	})
	return pod, outside, guest
}

// serve listens on addr inside n (the socket belongs to n) and answers every
// connection with "<name> <remote address>".
func serve(t *testing.T, n ns.NetNS, name, addr string) {
	t.Helper()
	var l net.Listener
	doIn(t, n, func() (err error) {
		l, err = net.Listen("tcp", addr)
		return err
	})
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			fmt.Fprintf(c, "%s %s\n", name, c.RemoteAddr())
			c.Close()
		}
	}()
}

// dial connects from inside n and returns the server's greeting.
func dial(n ns.NetNS, addr string) (string, error) {
	var line string
	err := n.Do(func(ns.NetNS) error {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(time.Second))
		line, err = bufio.NewReader(c).ReadString('\n')
		return err
	})
	return strings.TrimSpace(line), err
}

// reaches asserts that dialing addr from n is answered by name, seeing the
// client's address as from.
func reaches(t *testing.T, n ns.NetNS, addr, name, from string) {
	t.Helper()
	got, err := dial(n, addr)
	if err != nil {
		t.Errorf("dial %s: %v, want answer from %s", addr, err, name)
		return
	}
	host, _, _ := net.SplitHostPort(strings.TrimPrefix(got, name+" "))
	if !strings.HasPrefix(got, name+" ") || host != from {
		t.Errorf("dial %s answered %q, want %q from %s", addr, got, name, from)
	}
}

// blocked asserts that dialing addr from n fails (refused, or times out
// within a second) instead of reaching the guest.
func blocked(t *testing.T, n ns.NetNS, addr string) {
	t.Helper()
	start := time.Now()
	got, err := dial(n, addr)
	if err == nil {
		t.Errorf("dial %s answered %q, want no connection", addr, got)
		return
	}
	if !errors.Is(err, syscall.ECONNREFUSED) && !os.IsTimeout(err) {
		t.Errorf("dial %s: %v, want refused or timeout", addr, err)
	}
	if d := time.Since(start); d > 1500*time.Millisecond {
		t.Errorf("dial %s took %v", addr, d)
	}
}

// settle dials addr from n until it answers (5s at most).
func settle(t *testing.T, n ns.NetNS, addr string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		_, err := dial(n, addr)
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("topology not ready: dial %s: %v", addr, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func hostport(host string, port int) string { return net.JoinHostPort(host, fmt.Sprint(port)) }

// TestNATBehaviour proves the ruleset really forwards, masquerades and
// excludes, with real namespaces and TCP connections.
func TestNATBehaviour(t *testing.T) {
	requireRoot(t, false)
	pod, outside, guest := buildTopology(t)
	for _, p := range []int{8080, 9090, 15001} {
		serve(t, guest, "guest", hostport("", p))
	}
	serve(t, outside, "outside", hostport("", 7000))
	// A pod-local sidecar listening on an excluded port.
	serve(t, pod, "sidecar", hostport("127.0.0.1", 15001))
	// Let neighbour discovery settle on both links before any NAT assertion:
	// the first IPv6 SYN otherwise waits ~1s for ND and the 1s dial timeout
	// used below would flake.
	for _, addr := range []string{"10.0.2.2", "fd10:0:2::2"} {
		settle(t, pod, hostport(addr, 8080))
	}
	for _, addr := range []string{outsideV4, outsideV6} {
		settle(t, pod, hostport(addr, 7000))
	}

	base := Masquerade{
		PodIf: "eth0", Bridge: "k6t-eth0",
		V4: &Family{Guest: net.ParseIP("10.0.2.2"), Gateway: net.ParseIP("10.0.2.1")},
		V6: &Family{Guest: net.ParseIP("fd10:0:2::2"), Gateway: net.ParseIP("fd10:0:2::1")},
	}

	t.Run("no ruleset", func(t *testing.T) {
		blocked(t, outside, hostport(podV4, 8080))
	})

	t.Run("port list", func(t *testing.T) {
		m := base
		m.Ports = []Port{{Protocol: "tcp", Port: 8080}}
		must(t, "Apply", Apply(pod.Path(), m))
		must(t, "Check", Check(pod.Path(), m))

		// Inbound DNAT keeps the client's address.
		reaches(t, outside, hostport(podV4, 8080), "guest", outsideV4)
		reaches(t, outside, hostport(podV6, 8080), "guest", outsideV6)
		blocked(t, outside, hostport(podV4, 9090))
		blocked(t, outside, hostport(podV6, 9090))
		// Guest outbound is masqueraded to the pod address.
		reaches(t, guest, hostport(outsideV4, 7000), "outside", podV4)
		reaches(t, guest, hostport(outsideV6, 7000), "outside", podV6)
		// The pod's localhost reaches the guest, SNATed to the gateway.
		reaches(t, pod, hostport("127.0.0.1", 8080), "guest", "10.0.2.1")
		blocked(t, pod, hostport("127.0.0.1", 9090))
	})

	t.Run("all ports with exclusions", func(t *testing.T) {
		m := base
		m.ExcludePorts = []Port{{Protocol: "tcp", Port: 15000, EndPort: 15090}}
		must(t, "Apply", Apply(pod.Path(), m)) // replaces the port-list ruleset
		must(t, "Check", Check(pod.Path(), m))

		reaches(t, outside, hostport(podV4, 8080), "guest", outsideV4)
		reaches(t, outside, hostport(podV4, 9090), "guest", outsideV4)
		reaches(t, outside, hostport(podV6, 9090), "guest", outsideV6)
		blocked(t, outside, hostport(podV4, 15001))
		blocked(t, outside, hostport(podV6, 15001))
		reaches(t, guest, hostport(outsideV4, 7000), "outside", podV4)
		reaches(t, pod, hostport("127.0.0.1", 9090), "guest", "10.0.2.1")
		// The excluded port on localhost stays with the pod's own listener.
		reaches(t, pod, hostport("127.0.0.1", 15001), "sidecar", "127.0.0.1")
	})

	t.Run("deleted", func(t *testing.T) {
		must(t, "Delete", Delete(pod.Path()))
		blocked(t, outside, hostport(podV4, 8080))
		blocked(t, outside, hostport(podV6, 8080))
	})
}
