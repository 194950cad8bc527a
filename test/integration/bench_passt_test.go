package integration

import (
	"encoding/json"
	"path/filepath"
	"testing"

	"github.com/vmnic/vmnic/test/harness"
)

// BenchmarkPasstAddDel: ADD+DEL of a passt VM interface through libcni
// (macvlan on a veth uplink + host-local + vmnic, standalone daemon, which
// sets passt's sysctls), IPv4 only as the masquerade benchmark is,
// interleaved with the underlay alone (macvlan + host-local, no vmnic).
func BenchmarkPasstAddDel(b *testing.B) {
	node, _ := newNode(b, true)
	underlay(b, node)
	ipam := map[string]any{
		"type": "host-local", "dataDir": filepath.Join(node.Dir, "ipam"),
		"ranges": []any{[]any{map[string]any{"subnet": "10.50.0.0/24", "rangeStart": "10.50.0.10", "rangeEnd": "10.50.0.250"}}},
	}
	vmnic := passtList(b, node, "1.1.0", ipam, nil)
	raw, err := json.Marshal(map[string]any{"cniVersion": "1.1.0", "name": "macvlan-alone", "plugins": []any{underlayPlugin("macvlan", ipam)}})
	if err != nil {
		b.Fatal(err)
	}
	alone, err := harness.List(raw)
	if err != nil {
		b.Fatal(err)
	}
	pod := newPod(b, "virt-launcher-vm1-passt")
	b.ResetTimer()
	adds, dels := addDelArms(b, b.N, []benchArm{listArm(node, vmnic), listArm(node, alone)}, []*harness.Pod{pod, pod})
	b.ReportMetric(ms(median(adds[0])), "add-ms-median")
	b.ReportMetric(ms(median(dels[0])), "del-ms-median")
	b.ReportMetric(ms(median(adds[1])), "underlay-add-ms-median")
	b.ReportMetric(ms(median(dels[1])), "underlay-del-ms-median")
}
