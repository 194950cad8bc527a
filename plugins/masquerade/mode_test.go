package masquerade

import (
	"testing"

	"github.com/vmnic/vmnic/pkg/kubevirt"
	"github.com/vmnic/vmnic/pkg/mode"
	"github.com/vmnic/vmnic/pkg/netconf"
)

// TestModePlan: masquerade wires only the interfaces vmnic serves, with
// KubeVirt's names; DEL without a record looks for the attachment's names.
func TestModePlan(t *testing.T) {
	conf, cerr := netconf.Parse([]byte(`{"cniVersion":"1.0.0","name":"n","type":"vmnic","mode":"masquerade",
		"prevResult":{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/x"}],"ips":[{"address":"198.18.0.2/24","interface":0}]}}`))
	if cerr != nil {
		t.Fatal(cerr)
	}
	m := New(mode.Env{})
	req := func(ifName string, f *kubevirt.Facts) *mode.Request {
		return &mode.Request{ContainerID: "c1", Netns: "/x", IfName: ifName, Conf: conf, Facts: f}
	}
	if att, err := m.Plan(req("eth0", &kubevirt.Facts{VMName: "vm"})); att != nil || err != nil {
		t.Errorf("an interface vmnic does not serve: %v, %v; want pass-through", att, err)
	}
	att, err := m.Plan(req("eth0", &kubevirt.Facts{Serve: true, VMName: "vm", Primary: true}))
	if err != nil || att == nil {
		t.Fatalf("served interface: %v, %v", att, err)
	}
	if v := att.View(); v.Tap != "tap0" || v.Bridge != "k6t-eth0" || len(v.GuestIPs) != 1 || v.GuestIPs[0] != "10.0.2.2" {
		t.Errorf("view %+v", v)
	}
	if _, ok := att.(mode.Migrant); ok {
		t.Error("masquerade's NAT guest address does not migrate: it must not be a Migrant")
	}
	if _, err := m.Plan(req("e0", &kubevirt.Facts{Serve: true})); err == nil {
		t.Error("an interface name too short for the tap name was accepted")
	}
	if o := m.Orphan(&mode.Request{ContainerID: "c1", IfName: "net1"}); o != nil {
		t.Error("DEL without a netns has nothing to remove")
	}
	o := m.Orphan(&mode.Request{ContainerID: "c1", Netns: "/x", IfName: "net1"})
	if v := o.View(); v.Tap != "tap1" || v.Bridge != "k6t-net1" {
		t.Errorf("orphan's names %+v", v)
	}
}
