package integration

import (
	"fmt"
	"strings"
	"testing"

	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/vmnic/vmnic/pkg/kubevirt"
	"github.com/vmnic/vmnic/test/guest"
	"github.com/vmnic/vmnic/test/harness"
	"github.com/vmnic/vmnic/test/need"
)

// TestGuestMasquerade boots a real guest on each masquerade NIC vmnic makes,
// as KubeVirt's tap binding boots it: with the tap, MAC and queues that
// KubeVirt's own code derives from the pod netns vmnic wired, for the pod
// interface names eth0 (the pod network), net1 (a Multus network, ordinal
// name) and pod<hash> (the same network, hashed name), each with and
// without macAddress on the VMI. Each boot checks DHCPv4 and DHCPv6 from
// vmnic's servers, the IPv6 default route from its Router Advertisements,
// ICMP and TCP out through the NAT on both families (the node sees the
// pod's addresses), and inbound TCP to the forwarded ports reaching the
// guest while another port does not.
func TestGuestMasquerade(t *testing.T) {
	need.NoError(t, guest.Check())
	img, err := guest.Build(t.TempDir())
	if err != nil {
		t.Fatalf("guest image: %v", err)
	}
	node, _ := newNode(t, true)
	const mac = "02:00:00:12:34:56"
	for _, c := range []struct {
		podIf string
		nic   vmiNIC
	}{
		{"eth0", vmiNIC{network: "default"}},
		{"net1", vmiNIC{network: "blue", nad: "blue"}},
		{kubevirt.HashedIfName("blue"), vmiNIC{network: "blue", nad: "blue"}},
	} {
		for _, withMAC := range []bool{true, false} {
			name := c.podIf + "/macAddress"
			if !withMAC {
				name = c.podIf + "/no-macAddress"
			}
			t.Run(name, func(t *testing.T) {
				nic := c.nic
				if withMAC {
					nic.mac = mac
				}
				testGuestMasquerade(t, node, img, c.podIf, nic)
			})
		}
	}
}

func testGuestMasquerade(t *testing.T, node *harness.Node, img *guest.Image, podIf string, nic vmiNIC) {
	ctx := ctxT(t)
	l := list(t, node, harness.NetOptions{Vmnic: true, VM: harness.ScenarioVM("vm1", nic.mac)})
	pod := newPod(t, "virt-launcher-vm1-guest")
	pod.IfName = podIf
	res, err := node.Add(ctx, l, pod)
	if err != nil {
		t.Fatalf("ADD: %v", err)
	}
	t.Cleanup(func() { _ = node.Del(ctx, l, pod) })
	r, err := current.NewResultFromResult(res)
	if err != nil {
		t.Fatal(err)
	}
	assertResultMACs(t, pod, r)
	vmi := testVMI("vm1", harness.ScenarioQueues, nic)
	di := kubevirtNICs(ctx, t, pod, vmi)
	if len(di) != 1 || di[0].PodInterface != podIf || di[0].Target == podIf {
		t.Fatalf("KubeVirt's domain interfaces %+v: want one for pod interface %s on a tap", di, podIf)
	}
	wantMAC := nic.mac
	if wantMAC == "" {
		wantMAC = podLinks(t, pod)[podIf].Attrs().HardwareAddr.String()
	}
	if di[0].MAC != wantMAC {
		t.Errorf("KubeVirt gives the guest MAC %s, want %s", di[0].MAC, wantMAC)
	}
	boot, _ := bootNICs(di)
	var logf func(string)
	if testing.Verbose() {
		logf = func(s string) { t.Log("guest: " + s) }
	}
	rep, err := harness.RunGuest(ctx, node, pod, img, boot, r, "198.18.0.1", "fd00:198:18::1", logf)
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
