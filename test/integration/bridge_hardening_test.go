package integration

import (
	"errors"
	"fmt"
	"os/exec"
	"strings"
	"sync"
	"testing"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"

	"github.com/vmnic/vmnic/pkg/ctl"
	"github.com/vmnic/vmnic/pkg/failpoint"
	"github.com/vmnic/vmnic/pkg/netconf"
	"github.com/vmnic/vmnic/plugins/bridge"
	"github.com/vmnic/vmnic/test/harness"
)

// assertNoTrace checks that nothing of an attachment is left: OVS port,
// node veth, pod links (but lo), guard table, addresses, record, DHCP
// server.
func (n *ovsNode) assertNoTrace(t testing.TB, network string, pods ...*harness.Pod) {
	t.Helper()
	if ports := n.vmnicPorts(t); len(ports) != 0 {
		t.Errorf("OVS ports left: %v", ports)
	}
	for _, p := range pods {
		if l := nodeLink(t, n, portOf(p)); l != nil {
			t.Errorf("node veth %s left", l.Attrs().Name)
		}
		if p.NS == nil {
			continue
		}
		if links := podLinks(t, p); len(links) > 1 {
			t.Errorf("links left in %s: %v", p.Name, keys(links))
		}
		if out, _ := exec.Command("nsenter", "--net="+p.NS.Path(), "nft", "list", "tables").CombinedOutput(); strings.Contains(string(out), "vmnic") {
			t.Errorf("nft tables left in %s: %s", p.Name, out)
		}
	}
	if ips := n.allocated(t, network); len(ips) != 0 {
		t.Errorf("addresses left allocated: %v", ips)
	}
	if recs, _, _ := stateList(t, n.Node); len(recs) != 0 {
		t.Errorf("%d records left", len(recs))
	}
	if c := n.dhcpServers(t); c != 0 {
		t.Errorf("%d DHCP servers left", c)
	}
}

// dhcpServers counts the daemon's running DHCP servers, in process or
// through its socket.
func (n *ovsNode) dhcpServers(t testing.TB) int {
	t.Helper()
	if n.d != nil {
		return n.d.Servers().Count()
	}
	st, err := ctl.Status(ctxT(t), n.Socket())
	if err != nil {
		t.Fatal(err)
	}
	return st.DHCPServers
}

// TestBridgeAddFailureLeavesNothing injects a failure after each step of a
// bridge-mode ADD (after IPAM, the veth, the OVS port, the pod side, the
// filter table, the DHCP server): the ADD fails with the injected error
// and leaves nothing, and the runtime's DEL and a new ADD then work.
func TestBridgeAddFailureLeavesNothing(t *testing.T) {
	n := newOVSNode(t)
	ctx := ctxT(t)
	l := n.bridgeList(t, "fail", map[string]any{"vlan": 100}, n.hostLocal("10.100.0.10", "10.100.0.50"))
	t.Cleanup(func() { failpoint.Set(nil) })
	for _, step := range append(bridge.Steps, failpoint.Record) {
		for _, name := range []string{"virt-launcher-vm1-fail", "plain-fail"} {
			if strings.HasPrefix(name, "plain") && (step == "pod" || step == "nft" || step == "dhcp") {
				continue // steps of the VM layout only
			}
			t.Run(step+"/"+name, func(t *testing.T) {
				failpoint.Set(func(mode, s string) error {
					if mode == netconf.ModeBridge && s == step {
						return errors.New("injected failure after " + s)
					}
					return nil
				})
				p := newPod(t, name)
				p.IfName = "net1"
				_, err := n.Add(ctx, l, p)
				failpoint.Set(nil)
				if err == nil || !strings.Contains(err.Error(), "injected failure after "+step) {
					t.Fatalf("ADD error = %v, want the injected one", err)
				}
				n.assertNoTrace(t, "fail", p)
				if err := n.Del(ctx, l, p); err != nil {
					t.Fatalf("DEL after the failed ADD: %v", err)
				}
				if _, err := n.Add(ctx, l, p); err != nil {
					t.Fatalf("ADD after the failure: %v", err)
				}
				if err := n.Del(ctx, l, p); err != nil {
					t.Fatal(err)
				}
				n.assertNoTrace(t, "fail", p)
			})
		}
	}
}

// TestConcurrentAddDel: 40 VM pods with two bridge networks each attached
// in parallel (as containerd does) and 40 plain pods, all at once through
// libcni, with CNI GC passes running meanwhile; then all DELs at once.
// Everything succeeds, GC never removes a live attachment, nothing leaks.
func TestConcurrentAddDel(t *testing.T) {
	n := newOVSNode(t)
	ctx := ctxT(t)
	blue := n.bridgeList(t, "blue", map[string]any{"vlan": 100}, n.hostLocalOn("10.100.0.0/24", "10.100.0.1", "10.100.0.10", "10.100.0.250"))
	green := n.bridgeList(t, "green", map[string]any{"vlan": 200}, n.hostLocalOn("10.200.0.0/24", "10.200.0.1", "10.200.0.10", "10.200.0.250"))
	type att struct {
		p *harness.Pod
		l *libcni.NetworkConfigList
	}
	var atts []att
	for i := range 40 {
		vm := newPod(t, fmt.Sprintf("virt-launcher-c%d-x", i))
		plain := newPod(t, fmt.Sprintf("plain-%d", i))
		// One pod, several networks: each attachment needs its own Pod
		// value for its interface name; they share the netns.
		vm2 := *vm
		vm.IfName, vm2.IfName, plain.IfName = "net1", "net2", "net1"
		atts = append(atts, att{vm, blue}, att{&vm2, green}, att{plain, blue})
	}
	run := func(verb string, f func(a att) error) {
		t.Helper()
		var wg sync.WaitGroup
		var mu sync.Mutex
		var errs []string
		stop := make(chan struct{})
		gcDone := make(chan struct{})
		go func() { // GC with every attachment valid, over and over
			defer close(gcDone)
			var valid []types.GCAttachment
			for _, a := range atts {
				valid = append(valid, types.GCAttachment{ContainerID: a.p.ContainerID, IfName: a.p.IfName})
			}
			for {
				select {
				case <-stop:
					return
				default:
				}
				_ = n.GC(ctx, blue, valid)
			}
		}()
		for _, a := range atts {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if err := f(a); err != nil {
					mu.Lock()
					errs = append(errs, fmt.Sprintf("%s %s/%s: %v", verb, a.p.Name, a.p.IfName, err))
					mu.Unlock()
				}
			}()
		}
		wg.Wait()
		close(stop)
		<-gcDone
		for _, e := range errs {
			t.Error(e)
		}
	}
	run("ADD", func(a att) error { _, err := n.Add(ctx, a.l, a.p); return err })
	if t.Failed() {
		t.FailNow()
	}
	if ports := n.vmnicPorts(t); len(ports) != len(atts) {
		t.Errorf("%d ports for %d attachments (GC removed live ones?)", len(ports), len(atts))
	}
	for _, a := range atts[:6] {
		if err := n.Check(ctx, a.l, a.p); err != nil {
			t.Errorf("CHECK %s/%s: %v", a.p.Name, a.p.IfName, err)
		}
	}
	run("DEL", func(a att) error { return n.Del(ctx, a.l, a.p) })
	var pods []*harness.Pod
	for _, a := range atts {
		pods = append(pods, a.p)
	}
	n.assertNoTrace(t, "blue", pods...)
	if ips := n.allocated(t, "green"); len(ips) != 0 {
		t.Errorf("green addresses left: %v", ips)
	}
}
