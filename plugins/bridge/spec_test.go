package bridge

import (
	"net"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/vmnic/vmnic/pkg/kubevirt"
	"github.com/vmnic/vmnic/pkg/netconf"
)

func conf(t *testing.T, js string) *netconf.Conf {
	t.Helper()
	c, err := netconf.Parse([]byte(js))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestGuestMACRule(t *testing.T) {
	for ip, want := range map[string]string{
		"10.100.0.11":      "02:76:0a:64:00:0b",
		"192.168.255.1":    "02:76:c0:a8:ff:01",
		"fd00::aa:bb:cc:d": "02:76:00:cc:00:0d",
	} {
		got := GuestMACFor(net.ParseIP(ip))
		if got.String() != want {
			t.Errorf("GuestMACFor(%s) = %s, want %s", ip, got, want)
		}
		if got[0]&1 != 0 || got[0]&2 == 0 {
			t.Errorf("%s is not a locally administered unicast MAC", got)
		}
		if pm := portMAC(got); pm.String() == got.String() || pm[0]&1 != 0 {
			t.Errorf("port MAC %s for guest %s", pm, got)
		}
	}
}

func TestNewSpec(t *testing.T) {
	c := conf(t, `{"cniVersion":"1.0.0","name":"vlan100","mode":"bridge","bridge":"br1","vlan":100,"ipam":{"type":"host-local"}}`)
	in := Input{
		ContainerID: "c1", Netns: "/var/run/netns/p", IfName: "net1", Conf: c, OVSDB: "unix:/run/db.sock",
		Pod: netconf.PodArgs{Namespace: "ns", Name: "web"},
	}
	plain, err := NewSpec(in)
	if err != nil {
		t.Fatal(err)
	}
	if plain.VM || plain.Tap != "" || plain.HostIf != HostIfName("c1", "net1") || len(plain.HostIf) > 15 {
		t.Errorf("plain spec: %+v", plain)
	}
	if plain.OVSDB != "unix:/run/db.sock" || *plain.VLAN != 100 || plain.IPAM.Type != "host-local" || plain.IPAM.IfName != "net1" {
		t.Errorf("plain spec: %+v", plain)
	}
	if ids := plain.ExternalIDs(); ids[OwnerKey] != OwnerValue || ids[AttachmentKey] != "c1/net1" || ids[PodNameKey] != "web" {
		t.Errorf("external_ids %v", ids)
	}
	in.Facts = &kubevirt.Facts{Serve: true, VMName: "vm1", MAC: "02:00:00:00:00:42", Queues: 2}
	vm, err := NewSpec(in)
	if err != nil {
		t.Fatal(err)
	}
	if !vm.VM || vm.LinuxBridge != "k6t-net1" || vm.Tap != "tap1" || vm.NicIf != "net1-nic" || vm.Port() != "net1-nic" ||
		vm.GuestMAC != "02:00:00:00:00:42" || vm.Hostname != "vm1" {
		t.Errorf("VM spec: %+v", vm)
	}
	// The VMI's primary network gets tap0, whatever its interface's name.
	in.Facts.Primary, in.IfName = true, "ovn-udn1"
	if p, err := NewSpec(in); err != nil || p.Tap != "tap0" || p.NicIf != "ovn-udn1-nic" || p.LinuxBridge != "k6t-ovn-udn1" {
		t.Errorf("primary VM spec: %+v, %v", p, err)
	}
	in.Facts.Primary = false
	in.IfName = "averylongname1"
	if _, err := NewSpec(in); err == nil || err.(*types.Error).Code != types.ErrInvalidEnvironmentVariables {
		t.Errorf("ifname without room for -nic: %v", err)
	}
	in.IfName = "n1"
	if _, err := NewSpec(in); err == nil || err.(*types.Error).Code != types.ErrInvalidEnvironmentVariables {
		t.Errorf("short ifname: %v", err)
	}
}

func TestDHCPAndResult(t *testing.T) {
	_, dflt, _ := net.ParseCIDR("0.0.0.0/0")
	_, extra, _ := net.ParseCIDR("192.0.2.0/24")
	s := &Spec{
		PodIf: "net1", NicIf: "net1-nic", HostIf: "vmnx", Netns: "/n", VM: true, LinuxBridge: "k6t-net1", Tap: "tap1",
		GuestMAC: "02:76:0a:64:00:0b", Hostname: "vm1", MTU: 1400, DNS: []string{"10.9.9.9"},
		Addresses: &current.Result{
			IPs: []*current.IPConfig{
				{Address: net.IPNet{IP: net.ParseIP("10.100.0.11").To4(), Mask: net.CIDRMask(24, 32)}, Gateway: net.ParseIP("10.100.0.1")},
				{Address: net.IPNet{IP: net.ParseIP("fd00::11"), Mask: net.CIDRMask(64, 128)}},
			},
			Routes: []*types.Route{{Dst: *dflt}, {Dst: *extra, GW: net.ParseIP("10.100.0.254")}},
			DNS:    types.DNS{Nameservers: []string{"10.100.0.53", "fd00::53"}, Search: []string{"a.example"}},
		},
	}
	cfg := s.dhcpConfig(nil)
	if cfg.IfName != "k6t-net1" || cfg.ClientMAC.String() != s.GuestMAC {
		t.Errorf("dhcp on %s for %s", cfg.IfName, cfg.ClientMAC)
	}
	v4 := cfg.V4
	if v4 == nil || v4.Address.String() != "10.100.0.11/24" || !v4.Router.Equal(net.ParseIP("10.100.0.1")) || !v4.ServerID.Equal(ServerAddr) {
		t.Fatalf("v4 %+v", v4)
	}
	if len(v4.Routes) != 1 || v4.Routes[0].Dst.String() != "192.0.2.0/24" || v4.MTU != 1400 || v4.Hostname != "vm1" {
		t.Errorf("v4 routes/mtu/hostname: %+v", v4)
	}
	if len(v4.DNS) != 1 || v4.DNS[0].String() != "10.100.0.53" || strings.Join(v4.Search, ",") != "a.example" {
		t.Errorf("v4 DNS %v search %v: the IPAM result's DNS comes first", v4.DNS, v4.Search)
	}
	if cfg.V6 == nil || cfg.V6.Address.String() != "fd00::11" || len(cfg.V6.DNS) != 1 {
		t.Errorf("v6 %+v", cfg.V6)
	}
	if cfg.RA != nil {
		t.Error("bridge mode must not advertise itself as a router")
	}
	r := s.Result()
	var names []string
	for _, ifc := range r.Interfaces {
		names = append(names, ifc.Name)
		if ifc.Mac != "" {
			t.Errorf("%s has MAC %s before FillMACs read it from the kernel", ifc.Name, ifc.Mac)
		}
	}
	if strings.Join(names, ",") != "vmnx,net1,net1-nic,k6t-net1,tap1" || r.Interfaces[0].Sandbox != "" || r.Interfaces[1].Sandbox != "/n" {
		t.Errorf("result interfaces %+v", r.Interfaces)
	}
	for _, ipc := range r.IPs {
		if ipc.Interface == nil || *ipc.Interface != 1 {
			t.Errorf("IP %s not on the pod interface", ipc.Address.String())
		}
	}
}
