package nft

import (
	"os/exec"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
)

// TestHold: a held device sends nothing (a ping out of it fails), its
// release lets traffic pass again, and both are idempotent.
func TestHold(t *testing.T) {
	requireRoot(t, true)
	n := newNS(t)
	err := n.Do(func(ns.NetNS) error {
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "h0"}, PeerName: "h1"}); err != nil {
			return err
		}
		for _, name := range []string{"h0", "h1"} {
			l, err := netlink.LinkByName(name)
			if err != nil {
				return err
			}
			if err := netlink.LinkSetUp(l); err != nil {
				return err
			}
		}
		l, _ := netlink.LinkByName("h0")
		a, _ := netlink.ParseAddr("192.0.2.1/24")
		return netlink.AddrAdd(l, a)
	})
	if err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if err := ApplyHold(n.Path(), "h0"); err != nil {
			t.Fatal(err)
		}
	}
	if held, err := Held(n.Path(), "h0"); err != nil || !held {
		t.Fatalf("Held = %v, %v", held, err)
	}
	before := rxPackets(t, n, "h1")
	_ = exec.Command("nsenter", "--net="+n.Path(), "ping", "-c", "2", "-i", "0.2", "-W", "1", "-I", "h0", "192.0.2.2").Run()
	if got := rxPackets(t, n, "h1"); got != before {
		t.Errorf("held h0 sent %d frames", got-before)
	}
	for range 2 {
		if err := DeleteHold(n.Path(), "h0"); err != nil {
			t.Fatal(err)
		}
	}
	_ = exec.Command("nsenter", "--net="+n.Path(), "ping", "-c", "1", "-W", "1", "-I", "h0", "192.0.2.2").Run()
	if got := rxPackets(t, n, "h1"); got == before {
		t.Error("released h0 still sends nothing")
	}
	if held, _ := Held(n.Path(), "h0"); held {
		t.Error("still held after release")
	}
	if err := DeleteHold("/proc/self/no-such-ns", "h0"); err != nil {
		t.Errorf("release in a vanished netns: %v", err)
	}
}

func rxPackets(t *testing.T, n ns.NetNS, dev string) uint64 {
	t.Helper()
	var rx uint64
	_ = n.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName(dev)
		if err == nil && l.Attrs().Statistics != nil {
			rx = l.Attrs().Statistics.RxPackets
		}
		return err
	})
	return rx
}
