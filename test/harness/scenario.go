package harness

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"regexp"
	"strings"
	"sync"
	"time"

	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/vmnic/vmnic/test/guest"
)

// Scenario ports: the node listens on PeerPort; the guest listens on the
// forwarded ports and on NotForwardedPort.
const (
	PeerPort         = 7000
	Forwarded4Port   = 8080
	Forwarded6Port   = 8081
	NotForwardedPort = 9090
	// ScenarioQueues makes the tap multiqueue, so QEMU really opens it
	// with several queues.
	ScenarioQueues = 2
)

// ScenarioVM is the standalone VM object for the scenario's pod.
func ScenarioVM(name, mac string) map[string]any {
	return map[string]any{
		"name": name, "mac": mac, "queues": ScenarioQueues,
		"ports": []any{
			map[string]any{"port": Forwarded4Port, "protocol": "TCP"},
			map[string]any{"port": Forwarded6Port, "protocol": "TCP"},
		},
	}
}

// GuestReport is what a masquerade guest saw and what reached it.
type GuestReport struct {
	DHCP4, DHCP6  string // the lease lines printed by the guest's scripts
	Addr4, Addr6  string // eth0 addresses in the guest
	Route4        string // IPv4 default route in the guest
	Route6        string // IPv6 default route (from vmnic's Router Advertisements)
	Ping4, Ping6  bool   // guest pinged the node
	PeerSeen      []string
	Forwarded4    string // what the guest's listener on Forwarded4Port received
	Forwarded6    string
	NotForwarded  string // what reached the guest on NotForwardedPort (want nothing)
	NotFwdDialErr error  // the node's dial to NotForwardedPort (want refused)
	Console       string
}

// guestScript runs inside the guest: DHCPv4, DHCPv6, wait for the RA
// default route, reach the node over ICMP and TCP on both families, then
// listen for the node's connections through the NAT.
func guestScript(peer4, peer6 string) string {
	return fmt.Sprintf(`
udhcpc -i eth0 -q -f -n -t 10 -T 2 -O staticroutes -O mtu -O hostname || echo DHCP4-FAILED
udhcpc6 -i eth0 -q -n -t 10 -T 2 || echo DHCP6-FAILED
i=0; while [ $i -lt 40 ] && ! ip -6 route show default | grep -q via; do sleep 0.25; i=$((i+1)); done
echo "ADDR4 $(ip -4 -o addr show dev eth0 | awk '{print $4}' | head -1)"
echo "ADDR6 $(ip -6 -o addr show dev eth0 scope global | awk '{print $4}' | head -1)"
echo "ROUTE4 $(ip -4 route show default | head -1)"
echo "ROUTE6 $(ip -6 route show default | head -1)"
ping -c 2 -W 3 %[1]s >/dev/null 2>&1 && echo PING4-OK || echo PING4-FAILED
ping -c 2 -W 3 %[2]s >/dev/null 2>&1 && echo PING6-OK || echo PING6-FAILED
echo tcp4-from-guest | nc -w 3 %[1]s %[3]d || echo TCP4-FAILED
echo tcp6-from-guest | nc -w 3 %[2]s %[3]d || echo TCP6-FAILED
nc -l -p %[4]d > /tmp/in4 2>/dev/null &
nc -l -p %[5]d > /tmp/in6 2>/dev/null &
nc -l -p %[6]d > /tmp/inx 2>/dev/null &
sleep 0.5
echo LISTENING
i=0; while [ $i -lt 120 ] && ! { [ -s /tmp/in4 ] && [ -s /tmp/in6 ]; }; do sleep 0.25; i=$((i+1)); done
sleep 0.5
echo "GOT4=$(cat /tmp/in4)"
echo "GOT6=$(cat /tmp/in6)"
echo "GOTX=$(cat /tmp/inx)"
`, peer4, peer6, PeerPort, Forwarded4Port, Forwarded6Port, NotForwardedPort)
}

// GuestNIC is the NIC a scenario guest boots with: the tap and MAC
// KubeVirt's tap binding gives the domain, and its queues.
type GuestNIC struct {
	Tap, MAC string
	Queues   int
}

// RunGuest boots a guest on the pod's tap and drives the scenario. res is
// the pod's CNI result (for its addresses); peer4/peer6 are the node's
// addresses the guest reaches out to. log, if set, gets every console line.
func RunGuest(ctx context.Context, n *Node, p *Pod, img *guest.Image, nic GuestNIC, res *current.Result, peer4, peer6 string, log func(string)) (*GuestReport, error) {
	var pod4, pod6 net.IP
	for _, ipc := range res.IPs {
		if ipc.Address.IP.To4() != nil {
			pod4 = ipc.Address.IP
		} else {
			pod6 = ipc.Address.IP
		}
	}
	if pod4 == nil || pod6 == nil {
		return nil, fmt.Errorf("scenario needs a dual-stack pod, got %v", res.IPs)
	}
	rep := &GuestReport{}

	// The node's listeners, opened inside the node netns; one per family,
	// as Go's wildcard probe may not give a dual-stack socket in a netns.
	var lns []net.Listener
	defer func() {
		for _, ln := range lns {
			_ = ln.Close()
		}
	}()
	var mu sync.Mutex
	for _, nw := range []string{"tcp4", "tcp6"} {
		var ln net.Listener
		if err := n.In(func() error {
			var err error
			ln, err = net.Listen(nw, fmt.Sprintf(":%d", PeerPort))
			return err
		}); err != nil {
			return nil, fmt.Errorf("node listener: %w", err)
		}
		lns = append(lns, ln)
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				line, _ := bufio.NewReader(c).ReadString('\n')
				host, _, _ := net.SplitHostPort(c.RemoteAddr().String())
				mu.Lock()
				rep.PeerSeen = append(rep.PeerSeen, strings.TrimSpace(line)+" from "+host)
				mu.Unlock()
				_ = c.Close()
			}
		}()
	}

	g, err := guest.Start(ctx, img, guest.Options{
		NetnsPath: p.NS.Path(), Tap: nic.Tap, MAC: nic.MAC, Queues: nic.Queues,
		Script: guestScript(peer4, peer6), Timeout: 4 * time.Minute, Log: log,
	})
	if err != nil {
		return nil, fmt.Errorf("boot guest: %w", err)
	}
	defer g.Kill()
	defer func() { rep.Console = g.Output() }()

	wait := func(re string) ([]string, error) {
		return g.WaitFor(ctx, regexp.MustCompile(re))
	}
	lines := []struct {
		re  string
		set func(m []string)
	}{
		{`^(DHCP4 bound.*|DHCP4-FAILED)$`, func(m []string) { rep.DHCP4 = m[1] }},
		{`^(DHCP6 bound.*|DHCP6-FAILED)$`, func(m []string) { rep.DHCP6 = m[1] }},
		{`^ADDR4 (.*)$`, func(m []string) { rep.Addr4 = m[1] }},
		{`^ADDR6 (.*)$`, func(m []string) { rep.Addr6 = m[1] }},
		{`^ROUTE4 (.*)$`, func(m []string) { rep.Route4 = m[1] }},
		{`^ROUTE6 (.*)$`, func(m []string) { rep.Route6 = m[1] }},
		{`^PING4-(OK|FAILED)$`, func(m []string) { rep.Ping4 = m[1] == "OK" }},
		{`^PING6-(OK|FAILED)$`, func(m []string) { rep.Ping6 = m[1] == "OK" }},
		{`^LISTENING$`, func([]string) {}},
	}
	for _, l := range lines {
		m, err := wait(l.re)
		if err != nil {
			return rep, err
		}
		l.set(m)
	}

	// From the node to the pod's addresses: the forwarded ports reach the
	// guest through DNAT; the other port must not.
	send := func(ip net.IP, port int, msg string) error {
		return n.In(func() error {
			c, err := net.DialTimeout("tcp", net.JoinHostPort(ip.String(), fmt.Sprint(port)), 3*time.Second)
			if err != nil {
				return err
			}
			defer func() { _ = c.Close() }()
			_, err = c.Write([]byte(msg + "\n"))
			return err
		})
	}
	rep.NotFwdDialErr = send(pod4, NotForwardedPort, "must-not-arrive")
	if rep.NotFwdDialErr == nil {
		rep.NotFwdDialErr = fmt.Errorf("none: connection to %s:%d was accepted", pod4, NotForwardedPort)
	} else {
		rep.NotFwdDialErr = nilIfRefused(rep.NotFwdDialErr)
	}
	if err := send(pod4, Forwarded4Port, "via-dnat-v4"); err != nil {
		return rep, fmt.Errorf("dial forwarded %s:%d: %w", pod4, Forwarded4Port, err)
	}
	if err := send(pod6, Forwarded6Port, "via-dnat-v6"); err != nil {
		return rep, fmt.Errorf("dial forwarded [%s]:%d: %w", pod6, Forwarded6Port, err)
	}
	for _, l := range []struct {
		re  string
		dst *string
	}{{`^GOT4=(.*)$`, &rep.Forwarded4}, {`^GOT6=(.*)$`, &rep.Forwarded6}, {`^GOTX=(.*)$`, &rep.NotForwarded}} {
		m, err := wait(l.re)
		if err != nil {
			return rep, err
		}
		*l.dst = m[1]
	}
	if _, err := g.WaitFor(ctx, guest.ScriptExit); err != nil {
		return rep, err
	}
	mu.Lock()
	defer mu.Unlock()
	return rep, nil
}

// nilIfRefused turns the expected "connection refused" into nil, and keeps
// anything else (a timeout, say) as the error to report.
func nilIfRefused(err error) error {
	if err != nil && strings.Contains(err.Error(), "connection refused") {
		return nil
	}
	return err
}
