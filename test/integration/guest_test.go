package integration

import (
	"fmt"
	"strings"
	"testing"

	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/vmnic/vmnic/test/guest"
	"github.com/vmnic/vmnic/test/harness"
	"github.com/vmnic/vmnic/test/need"
)

// TestGuestMasquerade boots a real guest on the tap vmnic made and checks,
// in one boot: DHCPv4 and DHCPv6 from vmnic's servers, the IPv6 default
// route from its Router Advertisements, ICMP and TCP out through the NAT on
// both families (the node sees the pod's addresses), and inbound TCP to the
// forwarded ports reaching the guest while another port does not.
func TestGuestMasquerade(t *testing.T) {
	need.NoError(t, guest.Check())
	ctx := ctxT(t)
	img, err := guest.Build(t.TempDir())
	if err != nil {
		t.Fatalf("guest image: %v", err)
	}
	node, _ := newNode(t, true)
	const mac = "02:00:00:12:34:56"
	l := list(t, node, harness.NetOptions{Vmnic: true, VM: harness.ScenarioVM("vm1", mac)})
	pod := newPod(t, "virt-launcher-vm1-guest")
	res, err := node.Add(ctx, l, pod)
	if err != nil {
		t.Fatalf("ADD: %v", err)
	}
	t.Cleanup(func() { _ = node.Del(ctx, l, pod) })
	r, err := current.NewResultFromResult(res)
	if err != nil {
		t.Fatal(err)
	}
	var logf func(string)
	if testing.Verbose() {
		logf = func(s string) { t.Log("guest: " + s) }
	}
	rep, err := harness.RunGuest(ctx, node, pod, img, mac, r, "198.18.0.1", "fd00:198:18::1", logf)
	if err != nil {
		t.Fatalf("guest scenario: %v", err)
	}
	var pod4, pod6 string
	for _, ipc := range r.IPs {
		if ipc.Address.IP.To4() != nil {
			pod4 = ipc.Address.IP.String()
		} else {
			pod6 = ipc.Address.IP.String()
		}
	}
	t.Logf("guest report: %+v", *rep)

	for _, w := range []string{"ip=10.0.2.2", "mask=24", "router=10.0.2.1", "mtu=1480", "hostname=vm1", "dns=198.18.0.53", "search=default.svc.cluster.local,svc.cluster.local"} {
		if !strings.Contains(rep.DHCP4, w) {
			t.Errorf("DHCPv4 lease %q lacks %s", rep.DHCP4, w)
		}
	}
	if !strings.Contains(rep.DHCP6, "ipv6=fd10:0:2::2") {
		t.Errorf("DHCPv6 lease %q lacks fd10:0:2::2", rep.DHCP6)
	}
	if !strings.Contains(rep.Console, fmt.Sprintf("queues=%d", harness.ScenarioQueues)) {
		t.Errorf("guest NIC does not have %d queues on the multiqueue tap", harness.ScenarioQueues)
	}
	if rep.Addr4 != "10.0.2.2/24" {
		t.Errorf("guest IPv4 %q, want 10.0.2.2/24", rep.Addr4)
	}
	if !strings.HasPrefix(rep.Addr6, "fd10:0:2::2/") {
		t.Errorf("guest IPv6 %q, want fd10:0:2::2", rep.Addr6)
	}
	if !strings.Contains(rep.Route4, "via 10.0.2.1") {
		t.Errorf("guest IPv4 default route %q", rep.Route4)
	}
	if !strings.Contains(rep.Route6, "via fe80::") {
		t.Errorf("guest IPv6 default route %q: want one via the bridge's link-local address (from RA)", rep.Route6)
	}
	if !rep.Ping4 || !rep.Ping6 {
		t.Errorf("ping from the guest: v4 %t, v6 %t", rep.Ping4, rep.Ping6)
	}
	for _, w := range []string{"tcp4-from-guest from " + pod4, "tcp6-from-guest from " + pod6} {
		if !contains(rep.PeerSeen, w) {
			t.Errorf("node saw %v, want %q (guest traffic masqueraded to the pod address)", rep.PeerSeen, w)
		}
	}
	if rep.Forwarded4 != "via-dnat-v4" || rep.Forwarded6 != "via-dnat-v6" {
		t.Errorf("forwarded ports: v4 got %q, v6 got %q", rep.Forwarded4, rep.Forwarded6)
	}
	if rep.NotForwarded != "" {
		t.Errorf("a port that is not forwarded reached the guest: %q", rep.NotForwarded)
	}
	if rep.NotFwdDialErr != nil {
		t.Errorf("dial to the port that is not forwarded: want connection refused, got %v", rep.NotFwdDialErr)
	}
}
