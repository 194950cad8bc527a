package kubevirt

import (
	"context"
	"testing"
	"time"

	"github.com/vmnic/vmnic/pkg/netconf"
)

func TestNames(t *testing.T) {
	cases := []struct {
		podIf   string
		primary bool
		tap     string
		bridge  string
		nic     string
	}{
		{"eth0", true, "tap0", "k6t-eth0", "eth0-nic"},
		{"net1", false, "tap1", "k6t-net1", "net1-nic"},
		{"pod16477688c0e", false, "tap16477688c0e", "k6t-16477688c0e", "16477688c0e-nic"},
		// A primary network whose pod interface is not eth0 (an OVN
		// user-defined network) still gets tap0.
		{"ovn-udn1", true, "tap0", "k6t-ovn-udn1", "ovn-udn1-nic"},
	}
	for _, c := range cases {
		if got := TapName(c.podIf, c.primary); got != c.tap {
			t.Errorf("TapName(%q, %v) = %q, want %q", c.podIf, c.primary, got, c.tap)
		}
		if got := BridgeName(c.podIf); got != c.bridge || len(got) > 15 {
			t.Errorf("BridgeName(%q) = %q, want %q (<= 15 chars)", c.podIf, got, c.bridge)
		}
		if got, err := NicName(c.podIf); err != nil || got != c.nic {
			t.Errorf("NicName(%q) = %q, %v, want %q", c.podIf, got, err, c.nic)
		}
	}
	if n, err := NicName("averylongname1"); err == nil {
		t.Errorf("NicName of a 14-character name = %q, want an error", n)
	}
	if got := TapCandidates("net1"); len(got) != 2 || got[0] != "tap1" || got[1] != "tap0" {
		t.Errorf("TapCandidates(net1) = %v", got)
	}
	if got := TapCandidates("eth0"); len(got) != 1 || got[0] != "tap0" {
		t.Errorf("TapCandidates(eth0) = %v", got)
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

func TestLastFrameAnnotation(t *testing.T) {
	at := time.Date(2026, 12, 7, 10, 0, 0, 123456789, time.FixedZone("x", 3600))
	v := FormatLastFrame("uid-1", at)
	if v != "uid-1 2026-12-07T09:00:00.123456789Z" {
		t.Errorf("FormatLastFrame = %q", v)
	}
	if got, ok := ParseLastFrame(v, "uid-1"); !ok || !got.Equal(at) {
		t.Errorf("ParseLastFrame(%q) = %v, %v", v, got, ok)
	}
	// Another migration's report is not this one's.
	if _, ok := ParseLastFrame(v, "uid-2"); ok {
		t.Error("a report of migration uid-1 read for uid-2")
	}
	none := FormatLastFrame("uid-1", time.Time{})
	if got, ok := ParseLastFrame(none, "uid-1"); none != "uid-1 none" || !ok || !got.IsZero() {
		t.Errorf("no frame: %q reads %v, %v", none, got, ok)
	}
	for _, bad := range []string{"", "uid-1", "uid-1 yesterday", " none"} {
		if _, ok := ParseLastFrame(bad, "uid-1"); ok {
			t.Errorf("ParseLastFrame(%q) accepted", bad)
		}
	}
	if _, ok := ParseLastFrame(" none", ""); ok {
		t.Error("a report without a migration UID accepted")
	}
}
