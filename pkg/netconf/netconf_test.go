package netconf

import (
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"
)

const prev = `"prevResult":{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/var/run/netns/x"}],"ips":[{"address":"198.18.0.2/24","interface":0}]}`

func TestParseValid(t *testing.T) {
	c, err := Parse([]byte(`{"cniVersion":"1.0.0","name":"podnet","type":"vmnic","mode":"masquerade",` + prev + `,
		"readyTimeout":"3s","args":{"cni":{"vmnic":{"name":"vm1","mac":"02:00:00:aa:bb:cc","queues":4,
		"ports":[{"port":80},{"port":53,"protocol":"UDP"}]}}}}`))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	if c.Socket != DefaultSocket || c.SpoolDir != DefaultSpoolDir {
		t.Errorf("defaults not applied: socket %q spool %q", c.Socket, c.SpoolDir)
	}
	if c.ReadyTimeout != 3*time.Second {
		t.Errorf("readyTimeout = %s, want 3s", c.ReadyTimeout)
	}
	vm := c.VM()
	if vm == nil || vm.Name != "vm1" || vm.Queues != 4 || len(vm.Ports) != 2 || vm.Ports[1].ProtocolName() != "udp" {
		t.Errorf("VM args = %+v", vm)
	}
	if c.PrevResult == nil {
		t.Error("prevResult not parsed")
	}
	if err := c.RequirePrevResult(); err != nil {
		t.Errorf("RequirePrevResult: %v", err)
	}
}

func TestParseNumericTimeoutAndDefaults(t *testing.T) {
	c, err := Parse([]byte(`{"cniVersion":"1.1.0","name":"n","mode":"masquerade","readyTimeout":1.5}`))
	if err != nil {
		t.Fatal(err)
	}
	if c.ReadyTimeout != 1500*time.Millisecond {
		t.Errorf("readyTimeout = %s", c.ReadyTimeout)
	}
	if err := c.RequirePrevResult(); err == nil || err.Code != types.ErrInvalidNetworkConfig || !strings.Contains(err.Msg, "prevResult") {
		t.Errorf("RequirePrevResult without prevResult = %v, want code 7 naming prevResult", err)
	}
}

func TestParseErrors(t *testing.T) {
	base := func(extra string) string {
		return `{"cniVersion":"1.0.0","name":"podnet","mode":"masquerade"` + extra + `}`
	}
	brBase := func(extra string) string {
		return `{"cniVersion":"1.0.0","name":"vlan100","mode":"bridge","ipam":{"type":"host-local"}` + extra + `}`
	}
	cases := []struct {
		name  string
		in    string
		code  uint
		field string
	}{
		{"not json", `{"cniVersion":`, types.ErrDecodingFailure, "network config"},
		{"mode wrong type", `{"name":"n","mode":7}`, types.ErrDecodingFailure, "mode"},
		{"missing name", `{"cniVersion":"1.0.0","mode":"masquerade"}`, types.ErrInvalidNetworkConfig, "name"},
		{"missing mode", `{"cniVersion":"1.0.0","name":"n"}`, types.ErrInvalidNetworkConfig, "mode"},
		{"unknown mode", `{"name":"n","mode":"nat"}`, types.ErrInvalidNetworkConfig, "mode"},
		{"ipam on passt", `{"name":"n","mode":"passt","ipam":{"type":"host-local"}}`, types.ErrUnsupportedField, "ipam"},
		{"vlan on passt", `{"name":"n","mode":"passt","vlan":10}`, types.ErrUnsupportedField, "vlan"},
		{"bridge key on masquerade", base(`,"bridge":"br1"`), types.ErrUnsupportedField, "bridge"},
		{"vlan on masquerade", base(`,"vlan":100`), types.ErrUnsupportedField, "vlan"},
		{"bridge missing", brBase(``), types.ErrInvalidNetworkConfig, "bridge"},
		{"bridge name too long", brBase(`,"bridge":"a-very-long-bridge"`), types.ErrInvalidNetworkConfig, "bridge"},
		{"bridge name with slash", brBase(`,"bridge":"br/1"`), types.ErrInvalidNetworkConfig, "bridge"},
		{"bridge without ipam", `{"name":"n","mode":"bridge","bridge":"br1"}`, types.ErrInvalidNetworkConfig, "ipam"},
		{"ipam type is a path", `{"name":"n","mode":"bridge","bridge":"br1","ipam":{"type":"../x"}}`, types.ErrInvalidNetworkConfig, "ipam.type"},
		{"vlan 4096", brBase(`,"bridge":"br1","vlan":4096`), types.ErrInvalidNetworkConfig, "vlan"},
		{"vlan 4095 reserved", brBase(`,"bridge":"br1","vlan":4095`), types.ErrInvalidNetworkConfig, "vlan"},
		{"vlan negative", brBase(`,"bridge":"br1","vlan":-1`), types.ErrInvalidNetworkConfig, "vlan"},
		{"vlan wrong type", brBase(`,"bridge":"br1","vlan":"100"`), types.ErrDecodingFailure, "vlan"},
		{"vlan and trunk", brBase(`,"bridge":"br1","vlan":10,"trunk":[{"id":20}]`), types.ErrInvalidNetworkConfig, "trunk"},
		{"trunk overlap", brBase(`,"bridge":"br1","trunk":[{"minID":10,"maxID":20},{"id":15}]`), types.ErrInvalidNetworkConfig, "trunk[1]"},
		{"trunk range reversed", brBase(`,"bridge":"br1","trunk":[{"minID":20,"maxID":10}]`), types.ErrInvalidNetworkConfig, "trunk[0]"},
		{"trunk id and range", brBase(`,"bridge":"br1","trunk":[{"id":5,"minID":1,"maxID":9}]`), types.ErrInvalidNetworkConfig, "trunk[0]"},
		{"trunk half range", brBase(`,"bridge":"br1","trunk":[{"minID":5}]`), types.ErrInvalidNetworkConfig, "trunk[0]"},
		{"trunk out of range", brBase(`,"bridge":"br1","trunk":[{"minID":4000,"maxID":4096}]`), types.ErrInvalidNetworkConfig, "trunk[0]"},
		{"mtu too small", brBase(`,"bridge":"br1","mtu":60`), types.ErrInvalidNetworkConfig, "mtu"},
		{"ovsdb relative", brBase(`,"bridge":"br1","ovsdbSocket":"unix:db.sock"`), types.ErrInvalidNetworkConfig, "ovsdbSocket"},
		{"ovsdb scheme", brBase(`,"bridge":"br1","ovsdbSocket":"/run/db.sock"`), types.ErrInvalidNetworkConfig, "ovsdbSocket"},
		{"relative socket", base(`,"socket":"vmnic.sock"`), types.ErrInvalidNetworkConfig, "socket"},
		{"relative spool", base(`,"spoolDir":"spool"`), types.ErrInvalidNetworkConfig, "spoolDir"},
		{"bad timeout", base(`,"readyTimeout":"soon"`), types.ErrInvalidNetworkConfig, "readyTimeout"},
		{"negative timeout", base(`,"readyTimeout":"-1s"`), types.ErrInvalidNetworkConfig, "readyTimeout"},
		{"huge timeout", base(`,"readyTimeout":"1h"`), types.ErrInvalidNetworkConfig, "readyTimeout"},
		{"timeout wrong type", base(`,"readyTimeout":true`), types.ErrInvalidNetworkConfig, "readyTimeout"},
		{"ipam on masquerade", base(`,"ipam":{"type":"host-local"}`), types.ErrUnsupportedField, "ipam"},
		{"bad mac", base(`,"args":{"cni":{"vmnic":{"mac":"zz"}}}`), types.ErrInvalidNetworkConfig, "args.cni.vmnic.mac"},
		{"multicast mac", base(`,"args":{"cni":{"vmnic":{"mac":"01:00:5e:00:00:01"}}}`), types.ErrInvalidNetworkConfig, "args.cni.vmnic.mac"},
		{"long mac", base(`,"args":{"cni":{"vmnic":{"mac":"02:00:00:00:00:00:00:01"}}}`), types.ErrInvalidNetworkConfig, "args.cni.vmnic.mac"},
		{"queues negative", base(`,"args":{"cni":{"vmnic":{"queues":-1}}}`), types.ErrInvalidNetworkConfig, "args.cni.vmnic.queues"},
		{"queues too many", base(`,"args":{"cni":{"vmnic":{"queues":257}}}`), types.ErrInvalidNetworkConfig, "args.cni.vmnic.queues"},
		{"queues wrong type", base(`,"args":{"cni":{"vmnic":{"queues":"4"}}}`), types.ErrDecodingFailure, "queues"},
		{"port zero", base(`,"args":{"cni":{"vmnic":{"ports":[{"port":0}]}}}`), types.ErrInvalidNetworkConfig, "args.cni.vmnic.ports[0].port"},
		{"port too big", base(`,"args":{"cni":{"vmnic":{"ports":[{"port":80},{"port":65536}]}}}`), types.ErrInvalidNetworkConfig, "args.cni.vmnic.ports[1].port"},
		{"bad protocol", base(`,"args":{"cni":{"vmnic":{"ports":[{"port":80,"protocol":"icmp"}]}}}`), types.ErrInvalidNetworkConfig, "args.cni.vmnic.ports[0].protocol"},
		{"duplicate port", base(`,"args":{"cni":{"vmnic":{"ports":[{"port":80},{"port":80,"protocol":"TCP"}]}}}`), types.ErrInvalidNetworkConfig, "args.cni.vmnic.ports[1]"},
		{"bad prevResult", base(`,"prevResult":{"cniVersion":"1.0.0","ips":[{"address":"bogus"}]}`), types.ErrDecodingFailure, "prevResult"},
		{"oversized", base(`,"x":"` + strings.Repeat("a", MaxConfigSize) + `"`), types.ErrDecodingFailure, "network config"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse([]byte(tc.in))
			if err == nil {
				t.Fatalf("Parse accepted %s", tc.in)
			}
			if err.Code != tc.code {
				t.Errorf("code = %d, want %d (%s)", err.Code, tc.code, err.Msg)
			}
			if !strings.Contains(err.Msg, tc.field) {
				t.Errorf("message %q does not name %q", err.Msg, tc.field)
			}
		})
	}
}

func TestParseBridge(t *testing.T) {
	c, err := Parse([]byte(`{"cniVersion":"1.0.0","name":"trunks","type":"vmnic","mode":"bridge","bridge":"br1",
		"trunk":[{"id":7},{"minID":100,"maxID":102}],"mtu":9000,"ovsdbSocket":"unix:/run/openvswitch/db.sock",
		"ipam":{"type":"spiderpool"}}`))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	if got := c.TrunkVLANs(); !slices.Equal(got, []int{7, 100, 101, 102}) {
		t.Errorf("TrunkVLANs = %v", got)
	}
	if c.Chained() {
		t.Error("bridge mode taken for a chained plugin")
	}
	if err := c.RequirePrevResult(); err != nil {
		t.Errorf("bridge mode without prevResult: %v", err)
	}
	if c.IPAM.Type != "spiderpool" || c.MTU != 9000 || c.VLAN != nil {
		t.Errorf("conf = %+v", c.BridgeConf)
	}
	access, err := Parse([]byte(`{"cniVersion":"1.0.0","name":"v","mode":"bridge","bridge":"br1","vlan":0,"ipam":{"type":"host-local"}}`))
	if err != nil || access.VLAN == nil || *access.VLAN != 0 {
		t.Errorf("vlan 0: %v %+v", err, access)
	}
}

func TestParseArgs(t *testing.T) {
	p, err := ParseArgs("IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=virt-launcher-vm1-x7k2p;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u1;FOO=bar")
	if err != nil {
		t.Fatal(err)
	}
	if p.Namespace != "ns" || p.Name != "virt-launcher-vm1-x7k2p" || p.UID != "u1" || p.InfraID != "abc" || !p.IgnoreUnknown {
		t.Errorf("ParseArgs = %+v", p)
	}
	if !p.IsLauncherPod() {
		t.Error("virt-launcher pod not recognised")
	}
	for _, name := range []string{"", "nginx-1", "virt-handler-abc", "xvirt-launcher-a"} {
		if (PodArgs{Name: name}).IsLauncherPod() {
			t.Errorf("%q taken for a launcher pod", name)
		}
	}
	if _, err := ParseArgs("K8S_POD_NAME"); err == nil || err.Code != types.ErrInvalidEnvironmentVariables || !strings.Contains(err.Msg, "CNI_ARGS") {
		t.Errorf("malformed CNI_ARGS: %v, want code 4 naming CNI_ARGS", err)
	}
}

// TestParseArgsAnyOrder: containerd builds CNI_ARGS from a map, so the keys
// come in any order; every order of what it sends reads the same.
func TestParseArgsAnyOrder(t *testing.T) {
	pairs := []string{"IgnoreUnknown=1", "K8S_POD_NAMESPACE=ns", "K8S_POD_NAME=virt-launcher-vm1-x7k2p", "K8S_POD_INFRA_CONTAINER_ID=abc", "K8S_POD_UID=u1"}
	want := PodArgs{Namespace: "ns", Name: "virt-launcher-vm1-x7k2p", UID: "u1", InfraID: "abc", IgnoreUnknown: true}
	n := 0
	var permute func(k int)
	permute = func(k int) {
		if k == len(pairs) {
			n++
			got, err := ParseArgs(strings.Join(pairs, ";"))
			if err != nil || got != want {
				t.Errorf("ParseArgs(%q) = %+v, %v, want %+v", strings.Join(pairs, ";"), got, err, want)
			}
			return
		}
		for i := k; i < len(pairs); i++ {
			pairs[k], pairs[i] = pairs[i], pairs[k]
			permute(k + 1)
			pairs[k], pairs[i] = pairs[i], pairs[k]
		}
	}
	permute(0)
	if n != 120 {
		t.Fatalf("tried %d orders, want all 120", n)
	}
}

// TestParseContainerdRuntimeConfig: what containerd puts into runtimeConfig
// for the capabilities a config declares (dns, portMappings, the pod's
// annotations) and cgroupPath (v2) is accepted; only dns is read.
func TestParseContainerdRuntimeConfig(t *testing.T) {
	c, err := Parse([]byte(`{"cniVersion":"1.1.0","name":"podnet","type":"vmnic","mode":"masquerade",` + prev + `,
		"capabilities":{"dns":true,"portMappings":true,"io.kubernetes.cri.pod-annotations":true},
		"runtimeConfig":{"dns":{"servers":["10.96.0.10"],"searches":["default.svc.cluster.local"],"options":["ndots:5"]},
		"portMappings":[{"hostPort":8080,"containerPort":80,"protocol":"tcp"}],
		"io.kubernetes.cri.pod-annotations":{"kubevirt.io/domain":"vm1","kubevirt.io/migrationJobName":"mig-1","k8s.v1.cni.cncf.io/networks":"[]"},
		"cgroupPath":"/kubepods/besteffort/pod123"}}`))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	if d := c.RuntimeConfig.DNS; d == nil || len(d.Servers) != 1 || d.Servers[0] != "10.96.0.10" {
		t.Errorf("runtimeConfig.dns = %+v", d)
	}
}
