package bridge

import (
	"slices"
	"testing"

	"github.com/vmnic/vmnic/pkg/kubevirt"
	"github.com/vmnic/vmnic/pkg/mode"
	"github.com/vmnic/vmnic/pkg/netconf"
	"github.com/vmnic/vmnic/pkg/ovsdb"
)

// TestModePlan: every pod on a bridge network gets a port; a VM vmnic
// serves gets the VM layout and takes part in migration.
func TestModePlan(t *testing.T) {
	conf, cerr := netconf.Parse([]byte(`{"cniVersion":"1.0.0","name":"n","type":"vmnic","mode":"bridge","bridge":"br1","ipam":{"type":"host-local"}}`))
	if cerr != nil {
		t.Fatal(cerr)
	}
	m := New(mode.Env{})
	req := func(f *kubevirt.Facts) *mode.Request {
		return &mode.Request{ContainerID: "c1", Netns: "/x", IfName: "net1", Conf: conf, Facts: f}
	}
	plain, err := m.Plan(req(&kubevirt.Facts{VMName: "vm", Binding: "core:bridge"}))
	if err != nil || plain == nil {
		t.Fatalf("plain port: %v, %v", plain, err)
	}
	if _, ok := plain.(mode.Migrant); ok {
		t.Error("a plain port takes part in migration")
	}
	vm, err := m.Plan(req(&kubevirt.Facts{Serve: true, VMName: "vm", Migration: &kubevirt.Migration{Job: "j"}}))
	if err != nil {
		t.Fatal(err)
	}
	mig, ok := vm.(mode.TargetWatcher)
	if !ok || !mig.Held() {
		t.Fatalf("VM NIC of a migration target: %T held=%v", vm, ok && mig.Held())
	}
	o := m.Orphan(req(nil)).(*port)
	if !slices.Contains(o.s.ownedNames(), "net1-nic") || !slices.Contains(o.s.ownedNames(), "tap1") || !slices.Contains(o.s.ownedNames(), "tap0") {
		t.Errorf("DEL without a record looks for %v", o.s.ownedNames())
	}
}

// TestOrphans: a sweep removes vmnic's ports whose attachment has no
// record or whose pod netns is gone, and keeps the live ones.
func TestOrphans(t *testing.T) {
	p := func(att, netns string) ovsdb.PortInfo {
		return ovsdb.PortInfo{Name: "vmn" + att, ExternalIDs: map[string]string{AttachmentKey: att, NetnsKey: netns}}
	}
	ports := []ovsdb.PortInfo{p("a/net1", "/ns/a"), p("b/net1", "/ns/b"), p("c/net1", "/ns/gone"), p("d/net1", "")}
	live := func(key string) bool { return key == "a/net1" || key == "c/net1" }
	gone := func(path string) bool { return path == "/ns/gone" }
	var got []string
	for _, o := range orphans(ports, live, gone) {
		got = append(got, o.port.ExternalIDs[AttachmentKey])
	}
	if want := []string{"b/net1", "c/net1", "d/net1"}; !slices.Equal(got, want) {
		t.Errorf("orphans %v, want %v (b and d have no record, c's netns is gone)", got, want)
	}
}
