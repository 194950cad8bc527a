package nft

import (
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// TestDADGuard: two namespaces on a veth, as a migration's source and
// target on one underlay. Without the guard the target's copy of the
// source's IPv6 address fails DAD (the source answers the probe); with the
// guard on the source it becomes valid, and the source still answers
// ordinary neighbour solicitations for it.
func TestDADGuard(t *testing.T) {
	requireRoot(t, true)
	src, dst := newNS(t), newNS(t)
	const shared, other = "fd00:50::10", "fd00:50::99"
	doIn(t, src, func() error {
		must(t, "veth", netlink.LinkAdd(&netlink.Veth{
			LinkAttrs: netlink.LinkAttrs{Name: "s0"}, PeerName: "d0", PeerNamespace: netlink.NsFd(int(dst.Fd())),
		}))
		addAddr(t, linkUp(t, "s0"), shared+"/64") // NODAD: the source has it
		return nil
	})
	doIn(t, dst, func() error {
		l := linkUp(t, "d0")
		addAddr(t, l, other+"/64")
		return nil
	})
	// addWithDAD adds shared to the target with DAD and waits for its
	// outcome: "dadfailed" or "valid".
	addWithDAD := func() string {
		t.Helper()
		var outcome string
		doIn(t, dst, func() error {
			l, err := netlink.LinkByName("d0")
			must(t, "d0", err)
			a, _ := netlink.ParseAddr(shared + "/64")
			must(t, "add "+shared, netlink.AddrAdd(l, a))
			deadline := time.Now().Add(10 * time.Second)
			for time.Now().Before(deadline) {
				addrs, err := netlink.AddrList(l, netlink.FAMILY_V6)
				must(t, "list", err)
				for _, a := range addrs {
					if a.IP.String() != shared {
						continue
					}
					switch {
					case a.Flags&unix.IFA_F_DADFAILED != 0:
						outcome = "dadfailed"
					case a.Flags&unix.IFA_F_TENTATIVE == 0:
						outcome = "valid"
					}
				}
				if outcome != "" {
					break
				}
				time.Sleep(50 * time.Millisecond)
			}
			_ = netlink.AddrDel(l, a)
			return nil
		})
		return outcome
	}
	if got := addWithDAD(); got != "dadfailed" {
		t.Fatalf("without the guard the target's copy is %q, want dadfailed (the test cannot see the guard work otherwise)", got)
	}
	for range 2 {
		must(t, "apply", ApplyDADGuard(src.Path(), "s0"))
	}
	if on, err := DADGuarded(src.Path(), "s0"); err != nil || !on {
		t.Fatalf("DADGuarded = %v, %v", on, err)
	}
	if got := addWithDAD(); got != "valid" {
		t.Errorf("with the source's guard the target's copy is %q, want valid", got)
	}
	// Ordinary address resolution still reaches the source.
	out, err := exec.Command("nsenter", "--net="+dst.Path(), "ping", "-6", "-c", "1", "-W", "2", "-I", other, shared).CombinedOutput()
	if err != nil {
		t.Errorf("the guarded source no longer answers for %s: %v\n%s", shared, err, out)
	}
	if r := RenderDADGuard("s0"); !strings.Contains(r, "ip6 saddr ::") || !strings.Contains(r, "drop") {
		t.Errorf("rendered guard:\n%s", r)
	}
	for range 2 {
		must(t, "delete", DeleteDADGuard(src.Path(), "s0"))
	}
	if on, _ := DADGuarded(src.Path(), "s0"); on {
		t.Error("guard still there after delete")
	}
	if err := DeleteDADGuard("/proc/self/no-such-ns", "s0"); err != nil {
		t.Errorf("delete in a vanished netns: %v", err)
	}
}
