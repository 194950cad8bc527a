package passt

import (
	"testing"

	"github.com/vmnic/vmnic/pkg/kubevirt"
	"github.com/vmnic/vmnic/pkg/mode"
	"github.com/vmnic/vmnic/pkg/netconf"
)

// TestPlan: which interfaces passt mode takes part in, and when vmnic owns
// passt's sysctls.
func TestPlan(t *testing.T) {
	conf, cerr := netconf.Parse([]byte(`{"cniVersion":"1.0.0","name":"n","type":"vmnic","mode":"passt",
		"prevResult":{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/x"}],"ips":[{"address":"10.50.0.20/24","interface":0}]}}`))
	if cerr != nil {
		t.Fatal(cerr)
	}
	cases := []struct {
		name        string
		facts       *kubevirt.Facts
		serve, sets bool
	}{
		{"no VM", &kubevirt.Facts{}, false, false},
		{"core passtBinding", &kubevirt.Facts{VMName: "vm", Binding: kubevirt.CorePasst}, true, false},
		{"passt binding plugin", &kubevirt.Facts{VMName: "vm", Binding: "passt"}, true, false},
		{"standalone VM pod (no binding known)", &kubevirt.Facts{VMName: "vm", Serve: true}, true, true},
		{"a binding vmnic serves", &kubevirt.Facts{VMName: "vm", Binding: "vmnic", Serve: true}, true, false},
		{"another binding", &kubevirt.Facts{VMName: "vm", Binding: "core:masquerade"}, false, false},
	}
	for _, c := range cases {
		att, err := New(mode.Env{}).Plan(&mode.Request{ContainerID: "c1", Netns: "/x", IfName: "eth0", Conf: conf, Facts: c.facts})
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if (att != nil) != c.serve {
			t.Errorf("%s: serves %v, want %v", c.name, att != nil, c.serve)
			continue
		}
		if att == nil {
			continue
		}
		a := att.(*attachment)
		if a.s.SetSysctls != c.sets {
			t.Errorf("%s: vmnic sets the sysctls %v, want %v", c.name, a.s.SetSysctls, c.sets)
		}
		if _, ok := att.(mode.SourceGuard); !ok {
			t.Errorf("%s: a passt interface must take part in migration as a source", c.name)
		}
	}
	target := &kubevirt.Facts{VMName: "vm", Binding: kubevirt.CorePasst, Migration: &kubevirt.Migration{Job: "mig"}}
	att, _ := New(mode.Env{}).Plan(&mode.Request{ContainerID: "c1", Netns: "/x", IfName: "eth0", Conf: conf, Facts: target})
	if att == nil || !att.(mode.Migrant).Held() {
		t.Error("a migration target is not wired held")
	}
}
