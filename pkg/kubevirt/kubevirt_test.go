package kubevirt

import (
	"context"
	"testing"

	"github.com/vmnic/vmnic/pkg/netconf"
)

func TestNames(t *testing.T) {
	cases := []struct{ podIf, tap, bridge string }{
		{"eth0", "tap0", "k6t-eth0"},
		{"net1", "tap1", "k6t-net1"},
		{"pod16477688c0e", "tap16477688c0e", "k6t-16477688c0e"},
	}
	for _, c := range cases {
		if got := TapName(c.podIf); got != c.tap {
			t.Errorf("TapName(%q) = %q, want %q", c.podIf, got, c.tap)
		}
		if got := BridgeName(c.podIf); got != c.bridge || len(got) > 15 {
			t.Errorf("BridgeName(%q) = %q, want %q (<= 15 chars)", c.podIf, got, c.bridge)
		}
	}
}

func TestStandalone(t *testing.T) {
	conf, err := netconf.Parse([]byte(`{"name":"n","mode":"masquerade","args":{"cni":{"vmnic":{"name":"vm1","mac":"02:00:00:00:00:07","queues":2,"ports":[{"port":22}]}}}}`))
	if err != nil {
		t.Fatal(err)
	}
	f, lerr := Standalone{}.Lookup(context.Background(), Query{Pod: netconf.PodArgs{Name: "virt-launcher-vm1-abcde"}, Conf: conf})
	if lerr != nil || !f.Serve || f.VMName != "vm1" || f.MAC != "02:00:00:00:00:07" || f.Queues != 2 || len(f.Ports) != 1 {
		t.Errorf("launcher pod facts = %+v, %v", f, lerr)
	}
	f, _ = Standalone{}.Lookup(context.Background(), Query{Pod: netconf.PodArgs{Name: "web-0"}, Conf: conf})
	if f.Serve {
		t.Error("non-launcher pod served")
	}
	bare, _ := netconf.Parse([]byte(`{"name":"n","mode":"masquerade"}`))
	f, _ = Standalone{}.Lookup(context.Background(), Query{Pod: netconf.PodArgs{Name: "virt-launcher-x-1"}, Conf: bare})
	if !f.Serve || f.VMName != "virt-launcher-x-1" {
		t.Errorf("launcher pod without VM args = %+v", f)
	}
}
