package ovsdb

import (
	"fmt"
	"testing"
	"time"
)

// BenchmarkAddDeletePort compares adding and deleting one access port with
// an MTU and owner marks through the Client against the same through
// ovs-vsctl (one process per call, as ovs-cni-like shell-outs do), on the same
// switch, interleaved (alternating which goes first) so both see the same
// state and load. Both wait for ovs-vswitchd to apply each change. It reports
// the medians per add+delete pair and their ratio; "bg" is the number of other
// ports already on the bridge.
//
//	go test -run '^$' -bench AddDeletePort -benchtime 50x ./pkg/ovsdb
func BenchmarkAddDeletePort(b *testing.B) {
	for _, bg := range []int{0, 100} {
		b.Run(fmt.Sprintf("bg=%d", bg), func(b *testing.B) { benchAddDelete(b, bg) })
	}
}

func benchAddDelete(b *testing.B, bg int) {
	e := newEnv(b)
	ctx := ctxT(b, time.Hour)
	for i := range bg {
		name := fmt.Sprintf("bg%d", i)
		e.veth(b, name, nil)
		if err := e.c.AddPort(ctx, PortSpec{Bridge: "br1", Name: name, Tag: intp(1), ExternalIDs: owner}); err != nil {
			b.Fatalf("background port %s: %v", name, err)
		}
	}
	e.veth(b, "bc0", nil)
	e.veth(b, "bv0", nil)

	viaClient := func() time.Duration {
		start := time.Now()
		if err := e.c.AddPort(ctx, PortSpec{Bridge: "br1", Name: "bc0", Tag: intp(100), MTU: 1400, ExternalIDs: owner}); err != nil {
			b.Fatalf("AddPort: %v", err)
		}
		if err := e.c.DeletePort(ctx, "br1", "bc0", owner); err != nil {
			b.Fatalf("DeletePort: %v", err)
		}
		return time.Since(start)
	}
	viaVsctl := func() time.Duration {
		start := time.Now()
		vsctl(b, e.ovs, "add-port", "br1", "bv0", "tag=100",
			"--", "set", "Interface", "bv0", "mtu_request=1400", "external_ids:vmnic.io/owner=vmnic",
			"--", "set", "Port", "bv0", "external_ids:vmnic.io/owner=vmnic")
		vsctl(b, e.ovs, "del-port", "br1", "bv0")
		return time.Since(start)
	}

	var lib, cli []time.Duration
	i := 0
	for b.Loop() {
		if i%2 == 0 {
			lib = append(lib, viaClient())
			cli = append(cli, viaVsctl())
		} else {
			cli = append(cli, viaVsctl())
			lib = append(lib, viaClient())
		}
		i++
	}
	ml, mc := median(lib), median(cli)
	b.ReportMetric(ms(ml), "libovsdb-ms/op")
	b.ReportMetric(ms(mc), "vsctl-ms/op")
	b.ReportMetric(float64(mc)/float64(ml), "vsctl/libovsdb")
	b.Logf("bg=%d n=%d: median add+delete libovsdb %v, ovs-vsctl %v, ratio %.2f", bg, len(lib), ml, mc, float64(mc)/float64(ml))
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
