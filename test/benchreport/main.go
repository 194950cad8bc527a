// Command benchreport turns the output of make bench into
// docs/benchmarks.md: each figure next to its goal and the peers' figure,
// with the machine it ran on. Its inputs are the steps' outputs, in any
// order: Go benchmark results, the go test -v log of the live-migration
// tests, test/fuzz.sh's output. A missing file is reported as not run.
//
//	go run ./test/benchreport -o docs/benchmarks.md integration.txt ovsdb.txt migration.txt fuzz.txt ...
package main

import (
	"bufio"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/vmnic/vmnic/test/fleet"
)

// row is one line of the report: the metric a benchmark reported, next to
// the peers measured in the same run (vs) and, in peers, what no peer here
// can run (a published figure and its source).
type row struct {
	bench, unit string // benchmark name (without -N) and ReportMetric unit
	what        string
	goal        string
	vs          []peer
	peers       string
	invert      bool // report 1/value (vsctl/libovsdb → libovsdb/vsctl)
	format      string
}

// peer is a figure of the same run that a row is compared with. With ratio
// the row's value divided by the peer's follows it ("vmnic 0.75x").
type peer struct {
	label, bench, unit, format string
	ratio                      bool
}

// realNodeRows are the rows of BenchmarkSandboxStart's sub-benchmark for
// one primary CNI (label names it, plugin its own plugin).
func realNodeRows(primary, label, plugin string) []row {
	b := "BenchmarkSandboxStart/" + primary
	return []row{
		{
			bench: b, unit: "vm-chained-ms-median", what: "real node (containerd, kubelet, " + label + "): VM pod (KubeVirt's launcher pod) creation to Ready, vmnic chained",
			vs: []peer{{label: "the same VM pod on " + primary + " alone (vmnic not installed)", bench: b, unit: "vm-unchained-ms-median", format: "%.0f ms", ratio: true}}, format: "%.0f ms",
		},
		{
			bench: b, unit: "plain-chained-ms-median", what: "… plain pod creation to Ready, vmnic chained (the shim passes it through)",
			vs: []peer{{label: "the same pod on " + primary + " alone", bench: b, unit: "plain-unchained-ms-median", format: "%.0f ms", ratio: true}}, format: "%.0f ms",
		},
		{
			bench: b, unit: "vmnic-add-vm-chained-ms-median", what: "… the VM pod's CNI ADD of vmnic's shim (masquerade), exec to exit",
			vs: []peer{{label: "the primary's own plugin, " + plugin + ", in the same chain", bench: b, unit: "primary-add-vm-chained-ms-median", format: "%.0f ms", ratio: true}}, format: "%.0f ms",
		},
		{
			bench: b, unit: "vmnic-del-vm-chained-ms-median", what: "… the VM pod's CNI DEL of vmnic's shim",
			vs: []peer{{label: "the primary's DEL in the same chain", bench: b, unit: "primary-del-vm-chained-ms-median", format: "%.0f ms", ratio: true}}, format: "%.0f ms",
		},
		{
			bench: b, unit: "vmnic-add-plain-chained-ms-median", what: "… a plain pod's CNI ADD of vmnic's shim (pass-through)",
			vs: []peer{{label: "the primary's ADD of a VM pod without vmnic", bench: b, unit: "primary-add-vm-unchained-ms-median", format: "%.0f ms"}}, format: "%.0f ms",
		},
		{
			bench: b, unit: "helm-install-ms-median", what: "… helm install of the chart to the DaemonSet Ready (shim installed, conflist chained, vmnicd serving)",
			peers: "no peer installed here", format: "%.0f ms",
		},
	}
}

// Peers measured beside vmnic.
const (
	peerPrimary  = "the primary alone (ptp + host-local)"
	peerOVSCNI   = "ovs-cni (no IPAM: returns after its OVSDB commit)"
	peerOVSCNIHL = "ovs-cni + host-local (polls link_state every 600 ms until up)"
	noPeerHere   = "no peer runs here: KubeVirt's own bindings wire inside virt-launcher, with no CNI step to time"
)

// nodeVMNote follows peerNote.
const nodeVMNote = "The node VM rows come from `go run ./test/nodevm/bench`: QEMU boots Debian's own kernel (linux-image-amd64, which has the openvswitch module this machine's kernel lacks) on a root filesystem made from Debian's packages, and runs BenchmarkScaleBridge and BenchmarkAddDeletePort inside it, on the kernel datapath (`system`) and then on the userspace one (`netdev`), with the same ovs-vswitchd, one after the other in one boot. Without KVM the VM's CPUs are emulated (TCG), so its milliseconds are not this machine's: compare the two datapaths with each other, and the ratios with the rows above."

// peerNote follows the table: how the peers were run.
const peerNote = "The peers column holds figures of the same run, the ratio in brackets being vmnic's figure over the peer's. ovs-cni is v0.39.0, built from its Go module (`test/tools/ovscni`), run through libcni beside vmnic on the same ovsdb-server and ovs-vswitchd (userspace datapath) in the same node netns, arms interleaved. The two wait for different things: vmnic's ADD returns once ovs-vswitchd has applied the port (its Interface row has an ofport), so the guest's first frame is switched; ovs-cni without IPAM returns after its OVSDB commit, and with IPAM polls the port's link_state every 600 ms until it is up. On the userspace datapath ovs-vswitchd's apply of one port grows with every port it has (the apply-wait rows), so at 250 ports per bridge vmnic pays that growth and ovs-cni does not; the rows without the apply wait compare the plugins' own work. ovs-cni opens one OVSDB connection per plugin process; vmnicd keeps one. Where no peer can run here, the row names a published figure and its source, or says why none exists."

func ovsCNIPeers(bench, unit, format string) []peer {
	return []peer{
		{label: peerOVSCNI, bench: bench, unit: "ovscni-" + unit, format: format, ratio: true},
		{label: peerOVSCNIHL, bench: bench, unit: "ovscni-hostlocal-" + unit, format: format, ratio: true},
	}
}

const peerBridge = "BenchmarkPeerBridgeAddDel"

// The node VM's benchmarks (test/nodevm/bench), renamed by datapath.
const (
	nodeVMSystem = "BenchmarkNodeVMSystem"
	nodeVMNetdev = "BenchmarkNodeVMNetdev"
)

var rows = slices.Concat(localRows,
	realNodeRows("flannel", "Flannel", "flannel (its bridge and host-local delegates)"),
	realNodeRows("calico", "Calico v3.31 (Felix nftables, kube-proxy)", "calico (with calico-ipam)"),
	realNodeRows("cilium", "Cilium v1.20 (BPF, kube-proxy)", "cilium-cni"),
	kubeVirtRows)

// localRows are the rows of the benchmarks on this machine's namespaces,
// OVS and a cluster without nodes.
var localRows = []row{
	{
		bench: "BenchmarkPassThroughOverhead", unit: "overhead-ms", what: "pass-through overhead of a non-VM pod (ADD+DEL, vmnic chained vs not)", goal: "< 2 ms",
		vs: []peer{{label: peerPrimary + ", ADD+DEL", bench: "BenchmarkPassThroughOverhead", unit: "without-ms-median", format: "%.1f ms"}}, format: "%.1f ms",
	},
	{
		bench: "BenchmarkShimExec", unit: "shim-passthrough-ms-median", what: "one exec of the shim (pass-through ADD, built as released)", goal: "≤ 1.1x a minimal Go binary",
		vs: []peer{
			{label: "a minimal static Go binary printing {}", bench: "BenchmarkShimExec", unit: "go-minimal-ms-median", format: "%.2f ms", ratio: true},
			{label: "a Go binary decoding its stdin with encoding/json", bench: "BenchmarkShimExec", unit: "go-json-ms-median", format: "%.2f ms", ratio: true},
			{label: "the loopback reference plugin (VERSION)", bench: "BenchmarkShimExec", unit: "loopback-version-ms-median", format: "%.2f ms"},
			{label: "/bin/true", bench: "BenchmarkShimExec", unit: "bin-true-ms-median", format: "%.2f ms"},
		}, format: "%.2f ms",
	},
	{
		bench: "BenchmarkShimExec", unit: "shim/go-minimal", what: "… the shim / the minimal Go binary", goal: "≤ 1.10",
		vs: []peer{
			{label: "the minimal binary with the shim's packages linked in, not called / the minimal one", bench: "BenchmarkShimExec", unit: "go-linked/go-minimal", format: "%.2f"},
			{label: "the encoding/json binary / the minimal one", bench: "BenchmarkShimExec", unit: "go-json/go-minimal", format: "%.2f"},
		},
		peers: "missed when above 1.10: the shim's imports (the CNI types and skel, their init and the binary's size) cost the first ratio before any work, and decoding a config by reflection costs the second; meeting 1.1x takes a pass-through binary that links neither and hands VM pods to the full shim, which is not built", format: "%.2f",
	},
	{
		bench: "BenchmarkStatus", unit: "chained-vmnicd-away-ms-median", what: "CNI STATUS of the node's primary conflist with vmnic chained and vmnicd stopped (the node's NetworkReady)", goal: "at once, never readyTimeout (10 s)",
		vs: []peer{{label: peerPrimary, bench: "BenchmarkStatus", unit: "primary-ms-median", format: "%.1f ms", ratio: true}}, format: "%.1f ms",
	},
	{bench: "BenchmarkStatus", unit: "bridge-ms-median", what: "… a bridge-mode network (asks vmnicd: OVSDB, bridge, IPAM STATUS)", peers: "ovs-cni has no STATUS (CNI 1.1)", format: "%.1f ms"},
	{
		bench: "BenchmarkMasqueradeAddDel", unit: "add-ms-median", what: "masquerade VM NIC: ADD (ptp + host-local + vmnic)", goal: "pod start p99 ≤ 5 s",
		vs: []peer{{label: peerPrimary, bench: "BenchmarkMasqueradeAddDel", unit: "primary-add-ms-median", format: "%.0f ms"}}, peers: noPeerHere, format: "%.0f ms",
	},
	{
		bench: "BenchmarkMasqueradeAddDel", unit: "del-ms-median", what: "masquerade VM NIC: DEL",
		vs: []peer{{label: peerPrimary, bench: "BenchmarkMasqueradeAddDel", unit: "primary-del-ms-median", format: "%.0f ms"}}, format: "%.0f ms",
	},
	{
		bench: "BenchmarkPasstAddDel", unit: "add-ms-median", what: "passt VM interface: ADD (macvlan + host-local + vmnic)",
		vs: []peer{{label: "the underlay alone (macvlan + host-local)", bench: "BenchmarkPasstAddDel", unit: "underlay-add-ms-median", format: "%.0f ms"}}, peers: noPeerHere, format: "%.0f ms",
	},
	{
		bench: "BenchmarkPasstAddDel", unit: "del-ms-median", what: "passt VM interface: DEL",
		vs: []peer{{label: "the underlay alone", bench: "BenchmarkPasstAddDel", unit: "underlay-del-ms-median", format: "%.0f ms"}}, format: "%.0f ms",
	},
	{bench: peerBridge, unit: "vmnic-plain-add-ms-median", what: "bridge mode, an ordinary pod's port on an empty bridge: ADD (host-local IPAM)", goal: "≤ 1.0x ovs-cni", vs: ovsCNIPeers(peerBridge, "add-ms-median", "%.1f ms"), format: "%.1f ms"},
	{bench: peerBridge, unit: "vmnic-plain-del-ms-median", what: "… DEL", vs: ovsCNIPeers(peerBridge, "del-ms-median", "%.1f ms"), format: "%.1f ms"},
	{bench: peerBridge, unit: "vmnic-vm-add-ms-median", what: "bridge mode, a VM NIC (port, placeholder, k6t- bridge, tap, DHCP server): ADD", vs: ovsCNIPeers(peerBridge, "add-ms-median", "%.1f ms"), format: "%.1f ms"},
	{bench: peerBridge, unit: "vmnic-vm-del-ms-median", what: "… DEL", vs: ovsCNIPeers(peerBridge, "del-ms-median", "%.1f ms"), format: "%.1f ms"},
	{
		bench: "BenchmarkAddDeletePort/bg=0", unit: "vsctl/libovsdb", invert: true, what: "OVS port add+delete: vmnic's libovsdb path / ovs-vsctl (empty bridge)", goal: "< 0.2",
		vs:    []peer{{label: "ovs-vsctl", bench: "BenchmarkAddDeletePort/bg=0", unit: "vsctl-ms/op", format: "%.1f ms/op"}, {label: "libovsdb", bench: "BenchmarkAddDeletePort/bg=0", unit: "libovsdb-ms/op", format: "%.2f ms/op"}},
		peers: "~30x (1/30) direct OVSDB vs ovs-vsctl in one published comparison", format: "%.2f",
	},
	{
		bench: "BenchmarkAddDeletePort/bg=100", unit: "vsctl/libovsdb", invert: true, what: "the same with 100 ports on the bridge", goal: "< 0.2",
		vs: []peer{{label: "ovs-vsctl", bench: "BenchmarkAddDeletePort/bg=100", unit: "vsctl-ms/op", format: "%.1f ms/op"}, {label: "libovsdb", bench: "BenchmarkAddDeletePort/bg=100", unit: "libovsdb-ms/op", format: "%.2f ms/op"}}, format: "%.2f",
	},
	{
		bench: nodeVMSystem + "AddDeletePort/bg=0", unit: "vsctl/libovsdb", invert: true, what: "node VM, kernel datapath: OVS port add+delete, libovsdb / ovs-vsctl (empty bridge)", goal: "< 0.2",
		vs: []peer{{label: "ovs-vsctl", bench: nodeVMSystem + "AddDeletePort/bg=0", unit: "vsctl-ms/op", format: "%.1f ms/op"}, {label: "libovsdb", bench: nodeVMSystem + "AddDeletePort/bg=0", unit: "libovsdb-ms/op", format: "%.2f ms/op"}}, format: "%.2f",
	},
	{
		bench: nodeVMSystem + "AddDeletePort/bg=100", unit: "vsctl/libovsdb", invert: true, what: "node VM, kernel datapath: OVS port add+delete, libovsdb / ovs-vsctl (100 ports on the bridge)", goal: "< 0.2",
		vs: []peer{{label: "ovs-vsctl", bench: nodeVMSystem + "AddDeletePort/bg=100", unit: "vsctl-ms/op", format: "%.1f ms/op"}, {label: "libovsdb", bench: nodeVMSystem + "AddDeletePort/bg=100", unit: "libovsdb-ms/op", format: "%.2f ms/op"}}, format: "%.2f",
	},
	{
		bench: nodeVMNetdev + "AddDeletePort/bg=0", unit: "vsctl/libovsdb", invert: true, what: "node VM, userspace datapath: OVS port add+delete, libovsdb / ovs-vsctl (empty bridge)", goal: "< 0.2",
		vs: []peer{{label: "ovs-vsctl", bench: nodeVMNetdev + "AddDeletePort/bg=0", unit: "vsctl-ms/op", format: "%.1f ms/op"}, {label: "libovsdb", bench: nodeVMNetdev + "AddDeletePort/bg=0", unit: "libovsdb-ms/op", format: "%.2f ms/op"}}, format: "%.2f",
	},
	{
		bench: nodeVMNetdev + "AddDeletePort/bg=100", unit: "vsctl/libovsdb", invert: true, what: "node VM, userspace datapath: OVS port add+delete, libovsdb / ovs-vsctl (100 ports on the bridge)", goal: "< 0.2",
		vs: []peer{{label: "ovs-vsctl", bench: nodeVMNetdev + "AddDeletePort/bg=100", unit: "vsctl-ms/op", format: "%.1f ms/op"}, {label: "libovsdb", bench: nodeVMNetdev + "AddDeletePort/bg=100", unit: "libovsdb-ms/op", format: "%.2f ms/op"}}, format: "%.2f",
	},
	{bench: "BenchmarkScaleMasquerade", unit: "add-first50-p50-ms", what: "250 masquerade VM NICs on one node: ADD p50 of the first 50", goal: "pod start p99 ≤ 5 s", peers: noPeerHere, format: "%.0f ms"},
	{bench: "BenchmarkScaleMasquerade", unit: "add-first50-p99-ms", what: "… ADD p99 of the first 50", format: "%.0f ms"},
	{bench: "BenchmarkScaleMasquerade", unit: "add-last50-p50-ms", what: "… ADD p50 of the last 50", format: "%.0f ms"},
	{bench: "BenchmarkScaleMasquerade", unit: "add-last50-p99-ms", what: "… ADD p99 of the last 50", format: "%.0f ms"},
	{bench: "BenchmarkScaleMasquerade", unit: "last/first-p50", what: "… last 50 / first 50 (p50)", goal: "flat", format: "%.2f"},
	{bench: "BenchmarkScaleMasquerade", unit: "vmnicd-rss-MiB-at-250", what: "… vmnicd RSS with the 250 attachments", format: "%.0f MiB"},
	{bench: "BenchmarkScaleMasquerade", unit: "gc-pass-ms", what: "… one CNI GC pass over the 250", format: "%.0f ms"},
	{bench: "BenchmarkScaleMasquerade", unit: "del-ms-median", what: "… DEL median", format: "%.0f ms"},
	{
		bench: "BenchmarkPeerScaleBridge", unit: "vmnic-last/first", what: "250 ports one after the other, vmnic's and ovs-cni's (ordinary pods: a port and its veth) interleaved, each plugin on its own bridge of one ovs-vswitchd: ADD median of the last 25 / the first 25", goal: "flatter than ovs-cni",
		vs: []peer{{label: peerOVSCNI, bench: "BenchmarkPeerScaleBridge", unit: "ovscni-last/first", format: "%.2f"}}, format: "%.2f",
	},
	{
		bench: "BenchmarkPeerScaleBridge", unit: "vmnic-last/first-without-ovs-apply", what: "… vmnic's last/first without its wait for ovs-vswitchd to apply the port",
		vs: []peer{{label: "ovs-cni (never waits)", bench: "BenchmarkPeerScaleBridge", unit: "ovscni-last/first", format: "%.2f"}}, format: "%.2f",
	},
	{
		bench: "BenchmarkPeerScaleBridge", unit: "vmnic-ovs-apply-last25-ms-median", what: "… vmnic's wait for ovs-vswitchd's apply, the last 25",
		vs: []peer{{label: "the first 25", bench: "BenchmarkPeerScaleBridge", unit: "vmnic-ovs-apply-first25-ms-median", format: "%.1f ms"}}, format: "%.1f ms",
	},
	{
		bench: "BenchmarkPeerScaleBridge", unit: "vmnic-add-first25-ms-median", what: "… ADD median of the first 25",
		vs: []peer{{label: "ovs-cni", bench: "BenchmarkPeerScaleBridge", unit: "ovscni-add-first25-ms-median", format: "%.1f ms", ratio: true}}, format: "%.1f ms",
	},
	{
		bench: "BenchmarkPeerScaleBridge", unit: "vmnic-add-last25-ms-median", what: "… of the last 25",
		vs: []peer{{label: "ovs-cni", bench: "BenchmarkPeerScaleBridge", unit: "ovscni-add-last25-ms-median", format: "%.1f ms", ratio: true}}, format: "%.1f ms",
	},
	{
		bench: "BenchmarkPeerScaleBridge", unit: "vmnic-add250-ms-median", what: "… ADD of the 250th port on a bridge with 249 (15 rounds)",
		vs: []peer{{label: "ovs-cni", bench: "BenchmarkPeerScaleBridge", unit: "ovscni-add250-ms-median", format: "%.1f ms", ratio: true}}, format: "%.1f ms",
	},
	{
		bench: "BenchmarkPeerScaleBridge", unit: "vmnic-del250-ms-median", what: "… DEL of the 250th port",
		vs: []peer{{label: "ovs-cni", bench: "BenchmarkPeerScaleBridge", unit: "ovscni-del250-ms-median", format: "%.1f ms", ratio: true}}, format: "%.1f ms",
	},
	{bench: "BenchmarkScaleBridge", unit: "add-first50-p50-ms", what: "250 VM NICs on one OVS bridge (vmnic alone): ADD p50 of the first 50", peers: "ovs-cni in the rows above", format: "%.0f ms"},
	{bench: "BenchmarkScaleBridge", unit: "add-first50-p99-ms", what: "… ADD p99 of the first 50", format: "%.0f ms"},
	{bench: "BenchmarkScaleBridge", unit: "add-last50-p50-ms", what: "… ADD p50 of the last 50", format: "%.0f ms"},
	{bench: "BenchmarkScaleBridge", unit: "add-last50-p99-ms", what: "… ADD p99 of the last 50", format: "%.0f ms"},
	{bench: "BenchmarkScaleBridge", unit: "add-first25-ms-median", what: "… ADD median of the first 25", format: "%.0f ms"},
	{bench: "BenchmarkScaleBridge", unit: "add-last25-ms-median", what: "… of the last 25", format: "%.0f ms"},
	{bench: "BenchmarkScaleBridge", unit: "last/first", what: "… last 25 / first 25", goal: "flat, < 1.5", format: "%.2f"},
	{
		bench: "BenchmarkScaleBridge", unit: "ovs-apply-last25-ms-median", what: "… of which ovs-vswitchd's apply wait (last 25)",
		vs: []peer{{label: "the first 25", bench: "BenchmarkScaleBridge", unit: "ovs-apply-first25-ms-median", format: "%.1f ms"}}, format: "%.1f ms",
	},
	{bench: "BenchmarkScaleBridge", unit: "last/first-without-ovs-apply", what: "… last/first without the apply wait", format: "%.2f"},
	{bench: "BenchmarkScaleBridge", unit: "gc-pass-ms", what: "… one CNI GC pass over the 250", peers: "ovs-cni has no GC", format: "%.0f ms"},
	{bench: "BenchmarkScaleBridge", unit: "del-ms-median", what: "… DEL median", format: "%.0f ms"},
	{
		bench: nodeVMSystem + "ScaleBridge", unit: "last/first", what: "node VM (Debian's kernel, below): 250 VM NICs on one OVS bridge on the kernel datapath: ADD median of the last 25 / the first 25", goal: "flat, < 1.5",
		vs: []peer{
			{label: "the userspace datapath, same VM and ovs-vswitchd", bench: nodeVMNetdev + "ScaleBridge", unit: "last/first", format: "%.2f"},
			{label: "the userspace datapath on this machine (the row above)", bench: "BenchmarkScaleBridge", unit: "last/first", format: "%.2f"},
		}, format: "%.2f",
	},
	{
		bench: nodeVMSystem + "ScaleBridge", unit: "last/first-without-ovs-apply", what: "… last/first without the wait for ovs-vswitchd's apply",
		vs: []peer{{label: "userspace, same VM", bench: nodeVMNetdev + "ScaleBridge", unit: "last/first-without-ovs-apply", format: "%.2f"}}, format: "%.2f",
	},
	{
		bench: nodeVMSystem + "ScaleBridge", unit: "ovs-apply-last25-ms-median", what: "… ovs-vswitchd's apply wait, the last 25",
		vs: []peer{
			{label: "the first 25", bench: nodeVMSystem + "ScaleBridge", unit: "ovs-apply-first25-ms-median", format: "%.1f ms"},
			{label: "userspace, same VM, the last 25", bench: nodeVMNetdev + "ScaleBridge", unit: "ovs-apply-last25-ms-median", format: "%.1f ms", ratio: true},
		}, format: "%.1f ms",
	},
	{
		bench: nodeVMSystem + "ScaleBridge", unit: "add-first25-ms-median", what: "… ADD median of the first 25 (emulated CPU: compare within the VM)",
		vs: []peer{{label: "userspace, same VM", bench: nodeVMNetdev + "ScaleBridge", unit: "add-first25-ms-median", format: "%.0f ms", ratio: true}}, format: "%.0f ms",
	},
	{
		bench: nodeVMSystem + "ScaleBridge", unit: "add-last25-ms-median", what: "… of the last 25",
		vs: []peer{{label: "userspace, same VM", bench: nodeVMNetdev + "ScaleBridge", unit: "add-last25-ms-median", format: "%.0f ms", ratio: true}}, format: "%.0f ms",
	},
	{
		bench: "BenchmarkPeerConcurrentAdd", unit: "vmnic-plain-ADD/s", what: "100 concurrent ADDs of ordinary pods' ports on one bridge, failed ones retried at once until all are up: throughput", goal: "a burst of max-pods (110-250) per node",
		vs:    []peer{{label: peerOVSCNI, bench: "BenchmarkPeerConcurrentAdd", unit: "ovscni-ADD/s", format: "%.1f/s", ratio: true}},
		peers: "Cilium's default endpoint-creation limit, 0.5/s (burst 4), stalled 135 pods for 20-40 min", format: "%.1f/s",
	},
	{
		bench: "BenchmarkPeerConcurrentAdd", unit: "vmnic-vm-ADD/s", what: "… of VM NICs",
		vs: []peer{{label: "ovs-cni", bench: "BenchmarkPeerConcurrentAdd", unit: "ovscni-ADD/s", format: "%.1f/s", ratio: true}}, format: "%.1f/s",
	},
	{
		bench: "BenchmarkPeerConcurrentAdd", unit: "vmnic-plain-add-failed-first-try", what: "… ADDs that failed at their first try (ordinary pods, all iterations)", goal: "0",
		vs:    []peer{{label: "ovs-cni", bench: "BenchmarkPeerConcurrentAdd", unit: "ovscni-add-failed-first-try", format: "%.0f"}, {label: "ADDs per plugin", bench: "BenchmarkPeerConcurrentAdd", unit: "adds-per-arm", format: "%.0f"}},
		peers: "ovs-cni's fail with EAGAIN on connect: each of its processes opens its own OVSDB connection at once and overflows ovsdb-server's listen backlog", format: "%.0f",
	},
	{
		bench: "BenchmarkPeerConcurrentAdd", unit: "vmnic-plain-del-failed-first-try", what: "… DELs that failed at their first try", goal: "0",
		vs: []peer{{label: "ovs-cni", bench: "BenchmarkPeerConcurrentAdd", unit: "ovscni-del-failed-first-try", format: "%.0f"}}, format: "%.0f",
	},
	{bench: "BenchmarkConcurrentAddDel", unit: "ADD/s", what: "100 concurrent CNI ADDs, bridge mode (33 VM pods with 2 networks attached in parallel, 34 plain pods): throughput", peers: "ovs-cni in the rows above", format: "%.1f/s"},
	{bench: "BenchmarkConcurrentAddDel", unit: "add-burst-ms", what: "… wall time of the 100-ADD burst", format: "%.0f ms"},
	{bench: "BenchmarkConcurrentAddDel", unit: "add-p50-ms", what: "… one ADD in the burst: p50", format: "%.0f ms"},
	{bench: "BenchmarkConcurrentAddDel", unit: "add-p99-ms", what: "… one ADD in the burst: p99", goal: "pod start p99 ≤ 5 s", peers: "OVN-Kubernetes CNI p99 1.6-6.4 s at scale", format: "%.0f ms"},
	{bench: "BenchmarkConcurrentAddDel", unit: "DEL/s", what: "… then their 100 DELs at once: throughput", format: "%.1f/s"},
	{bench: "BenchmarkConcurrentAddDel", unit: "del-burst-ms", what: "… wall time of the 100-DEL burst", format: "%.0f ms"},
	{bench: "BenchmarkConcurrentAddDel", unit: "del-p50-ms", what: "… one DEL in the burst: p50", format: "%.0f ms"},
	{bench: "BenchmarkConcurrentAddDel", unit: "del-p99-ms", what: "… one DEL in the burst: p99", format: "%.0f ms"},
	{
		bench: "BenchmarkPeerKillMidAdd", unit: "vmnic-shim-killed-adds", what: "SIGKILL in the middle of an ADD (12 trials per case, delays spread over the plugin's own ADD time): ADDs the kill cut short (the rest had finished when it came), the plugin process killed",
		vs: []peer{{label: "ovs-cni", bench: "BenchmarkPeerKillMidAdd", unit: "ovscni-killed-adds", format: "%.0f"}}, format: "%.0f",
	},
	{
		bench: "BenchmarkPeerKillMidAdd", unit: "vmnic-shim-killed-after-del-ports", what: "… OVS ports left after the runtime's DEL", goal: "0",
		vs: []peer{{label: "ovs-cni", bench: "BenchmarkPeerKillMidAdd", unit: "ovscni-killed-after-del-ports", format: "%.0f"}}, format: "%.0f",
	},
	{
		bench: "BenchmarkPeerKillMidAdd", unit: "vmnic-shim-killed-after-del-veths", what: "… node-side veths left after the DEL", goal: "0",
		vs: []peer{{label: "ovs-cni", bench: "BenchmarkPeerKillMidAdd", unit: "ovscni-killed-after-del-veths", format: "%.0f"}}, format: "%.0f",
	},
	{
		bench: "BenchmarkPeerKillMidAdd", unit: "vmnic-shim-killed-after-gc-ports", what: "… OVS ports left after a GC (ovs-cni: after the sandbox is gone and its next ADD's clean-up of failed ports)", goal: "0",
		vs: []peer{{label: "ovs-cni", bench: "BenchmarkPeerKillMidAdd", unit: "ovscni-killed-after-next-add-ports", format: "%.0f"}}, format: "%.0f",
	},
	{bench: "BenchmarkPeerKillMidAdd", unit: "vmnic-shim-killed-after-gc-ips", what: "… addresses left allocated after the GC", goal: "0", peers: "ovs-cni ran without IPAM", format: "%.0f"},
	{bench: "BenchmarkPeerKillMidAdd", unit: "vmnic-daemon-killed-adds-failed", what: "vmnicd killed in the middle of an ADD and restarted: ADDs that failed (the others the shim's retry took to the new vmnicd)", peers: "ovs-cni has no daemon", format: "%.0f"},
	{bench: "BenchmarkPeerKillMidAdd", unit: "vmnic-daemon-killed-after-del-ports", what: "… OVS ports left after the runtime's DEL", goal: "0", format: "%.0f"},
	{bench: "BenchmarkPeerKillMidAdd", unit: "vmnic-daemon-killed-after-gc-ports", what: "… after a GC", goal: "0", format: "%.0f"},
	{bench: "BenchmarkPeerKillMidAdd", unit: "vmnic-daemon-killed-after-gc-veths", what: "… node-side veths left after the GC", goal: "0", format: "%.0f"},
	{bench: "BenchmarkPeerKillMidAdd", unit: "vmnic-daemon-killed-after-gc-ips", what: "… addresses left allocated after the GC", goal: "0", format: "%.0f"},
	{bench: "BenchmarkInformerMemory", unit: "standalone-rss-MiB", what: "vmnicd RSS, standalone", peers: "no peer daemon runs here (Multus thick and Spiderpool's agent run against a cluster)", format: "%.0f MiB"},
	{bench: "BenchmarkInformerMemory", unit: "cluster-250vm-rss-MiB", what: "vmnicd RSS with informers over 250 VM pods", format: "%.0f MiB"},
}

// kubeVirtRows are the rows of the real KubeVirt on two nodes.
var kubeVirtRows = []row{
	{
		bench: realKubeVirt, unit: "masq-vmnic-ms-median", what: "real KubeVirt v1.8.2 on two node containers: VMI creation to Running, vmnic's masquerade binding",
		vs: []peer{{label: "KubeVirt's masquerade binding, vmnic not installed", bench: realKubeVirt, unit: "masq-core-ms-median", format: "%.0f ms", ratio: true}}, format: "%.0f ms",
	},
	{
		bench: realKubeVirt, unit: "bridge-vmnic-ms-median", what: "… a VMI whose one NIC is in vmnic's bridge mode (OVS, Spiderpool)",
		peers: "KubeVirt's own bridge binding cannot run here: it makes a dummy link (kubevirt v1.8.2 pkg/network/setup/netpod), which this kernel lacks", format: "%.0f ms",
	},
	{
		bench: realKubeVirt, unit: "passt-vmnic-ms-median", what: "… KubeVirt's passt binding on macvlan with vmnic chained (passt mode)",
		vs: []peer{{label: "the same on macvlan alone", bench: realKubeVirt, unit: "passt-core-ms-median", format: "%.0f ms", ratio: true}}, format: "%.0f ms",
	},
	{
		bench: realKubeVirt, unit: "gap-masquerade-vmnicd-ms-median", what: "… live migration's network gap, masquerade, as vmnicd measured it (event and metric)",
		vs: []peer{
			{label: "the guest's 50 ms pings' longest gap, heard by a peer", bench: realKubeVirt, unit: "gap-masquerade-probe-ms-median", format: "%.0f ms"},
		}, format: "%.0f ms",
	},
	{
		bench: realKubeVirt, unit: "gap-bridge-vmnicd-ms-median", what: "… bridge (OVS, userspace datapath)",
		vs: []peer{{label: "a 50 ms ping's longest time without a reply", bench: realKubeVirt, unit: "gap-bridge-probe-ms-median", format: "%.0f ms"}}, format: "%.0f ms",
	},
	{
		bench: realKubeVirt, unit: "gap-passt-vmnicd-ms-median", what: "… passt on macvlan",
		vs: []peer{
			{label: "the guest's 50 ms pings' longest gap, heard by a peer", bench: realKubeVirt, unit: "gap-passt-probe-ms-median", format: "%.0f ms"},
			{label: "a 50 ms HTTP probe's longest time without an answer", bench: realKubeVirt, unit: "gap-passt-http-ms-median", format: "%.0f ms"},
		}, format: "%.0f ms",
	},
	{bench: realKubeVirt, unit: "vmnicd-cpu-s-per-node", what: "… vmnicd's CPU time per node through the runs and migrations above", peers: "no peer daemon here", format: "%.1f s"},
	{bench: realKubeVirt, unit: "vmnicd-peak-rss-MiB", what: "… vmnicd's peak RSS", format: "%.0f MiB"},
}

// realKubeVirt is test/virt's benchmark.
const realKubeVirt = "BenchmarkRealKubeVirt"

// line is one rendered row of the table.
type line struct{ what, val, goal, peers string }

func main() {
	out := flag.String("o", "docs/benchmarks.md", "report file")
	fleetOnly := flag.Bool("fleet-only", false, "replace only the report's Fleet section, from test/fleet's report (make bench-fleet)")
	keep := flag.Bool("keep", false, "rows whose benchmark did not run in these inputs keep the report's previous figures (make bench-node)")
	flag.Parse()
	in := newInput()
	for _, f := range flag.Args() {
		err := in.read(f)
		if errors.Is(err, fs.ErrNotExist) {
			// A step of make bench that did not run: its rows say so.
			fmt.Fprintf(os.Stderr, "benchreport: %s is missing: its figures are reported as not run\n", f)
			continue
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "benchreport:", err)
			os.Exit(1)
		}
	}
	if *fleetOnly {
		writeFleetOnly(in, *out)
		return
	}
	lines := append(in.benchLines(), in.migrationLines()...)
	lines = append(lines, in.fuzzLines()...)
	lines = append(lines, in.demoLines()...)
	var b strings.Builder
	fmt.Fprintf(&b, "# vmnic benchmarks\n\nGenerated by `make bench` on %s. Medians, arms interleaved in one run; the machines are noisy, so compare figures of one run with each other.\n\n", time.Now().UTC().Format("2006-01-02"))
	if *keep {
		old, err := os.ReadFile(*out)
		if err != nil {
			fmt.Fprintln(os.Stderr, "benchreport:", err)
			os.Exit(1)
		}
		fresh := 0
		for _, l := range lines {
			if measured(l.val) {
				fresh++
			}
		}
		lines = keepOld(lines, string(old))
		b.Reset()
		fmt.Fprintf(&b, "# vmnic benchmarks\n\nGenerated by `make bench`; %d rows updated on %s by a run of part of it, the others from earlier runs (the oldest on %s). Medians, arms interleaved in one run; the machines are noisy, so compare figures of one run with each other.\n\n", fresh, time.Now().UTC().Format("2006-01-02"), generatedOn(string(old)))
	}
	machine := fmt.Sprintf("%s, %d CPUs, %s RAM, kernel %s, %s.", cpuModel(), runtime.NumCPU(), memTotal(), strings.TrimSpace(readFile("/proc/sys/kernel/osrelease")), runtime.Version())
	if *keep {
		old, _ := os.ReadFile(*out)
		fmt.Fprintf(&b, "Machine of the rows updated now: %s The other rows: %s\n\n", machine, oldMachine(string(old)))
	} else {
		fmt.Fprintf(&b, "Machine: %s OVS runs its userspace datapath here (no kernel module), and both datapaths in the node VM rows; QEMU runs under TCG.\n\n", machine)
	}
	b.WriteString("| figure | value | goal | peers |\n|---|---|---|---|\n")
	missing := 0
	for _, l := range lines {
		if !measured(l.val) {
			missing++
		}
		fmt.Fprintf(&b, "| %s | %s | %s | %s |\n", l.what, l.val, dash(l.goal), dash(l.peers))
	}
	b.WriteString("\n" + peerNote + "\n\n" + nodeVMNote + in.nodeVMBoot + "\n\n" + migrationNote + "\n\n" + fuzzNote + "\n")
	section, err := in.fleetSection(filepath.Join(filepath.Dir(*out), "fleet.svg"))
	if err != nil {
		fmt.Fprintln(os.Stderr, "benchreport:", err)
		os.Exit(1)
	}
	b.WriteString("\n" + section)
	if err := os.WriteFile(*out, []byte(b.String()), 0o644); err != nil {
		fmt.Fprintln(os.Stderr, "benchreport:", err)
		os.Exit(1)
	}
	fmt.Printf("benchreport: wrote %s (%d figures, %d rows without one)\n", *out, len(lines)-missing, missing)
}

// keepOld merges the previous report, old, into this run's lines: a line
// without a figure now takes the value and peers of the same line of old,
// and a line of old that this run has none of (a step that did not run and
// writes no line then, such as fuzzing) stays where it was, after the line
// it followed. Lines are matched by their text, and a line continuing the
// one above ("… ") by both.
func keepOld(lines []line, old string) []line {
	type oldLine struct {
		key string
		l   line
	}
	var olds []oldLine
	head := ""
	for _, l := range strings.Split(old, "\n") {
		cells := strings.Split(strings.TrimSuffix(strings.TrimPrefix(l, "| "), " |"), " | ")
		if !strings.HasPrefix(l, "| ") || len(cells) != 4 || cells[0] == "figure" {
			continue
		}
		olds = append(olds, oldLine{lineKey(&head, cells[0]), line{cells[0], cells[1], cells[2], cells[3]}})
	}
	now := map[string]int{}
	head = ""
	for i, l := range lines {
		now[lineKey(&head, l.what)] = i
	}
	// after[i] are the old-only lines that follow line i (-1: first).
	after := map[int][]line{}
	at := -1
	for _, o := range olds {
		if i, ok := now[o.key]; ok {
			at = i
			if !measured(lines[i].val) && measured(o.l.val) {
				lines[i].val, lines[i].peers = o.l.val, o.l.peers
			}
			continue
		}
		after[at] = append(after[at], o.l)
	}
	merged := append([]line(nil), after[-1]...)
	for i, l := range lines {
		merged = append(merged, l)
		merged = append(merged, after[i]...)
	}
	return merged
}

// lineKey is a line's text, after the text of the line it continues.
func lineKey(head *string, what string) string {
	if strings.HasPrefix(what, "…") {
		return *head + " " + what
	}
	*head = what
	return what
}

// oldMachine is what the report old says of the machine of its rows not
// updated by a later partial run.
func oldMachine(old string) string {
	for _, l := range strings.Split(old, "\n") {
		if _, rest, ok := strings.Cut(l, " The other rows: "); ok && strings.HasPrefix(l, "Machine") {
			return rest
		}
		if rest, ok := strings.CutPrefix(l, "Machine: "); ok {
			return rest
		}
	}
	return "not recorded."
}

// generatedOn is the oldest date the first paragraph of the report old
// gives (when it was made, or its oldest rows, after partial runs).
func generatedOn(old string) string {
	first, _, _ := strings.Cut(strings.TrimPrefix(old, "# vmnic benchmarks\n\n"), "\n\n")
	oldest := ""
	for _, f := range strings.Fields(first) {
		f = strings.Trim(f, "().;,")
		if _, err := time.Parse("2006-01-02", f); err == nil && (oldest == "" || f < oldest) {
			oldest = f
		}
	}
	if oldest == "" {
		return "an earlier date"
	}
	return oldest
}

// writeFleetOnly replaces the Fleet section of the report out.
func writeFleetOnly(in *input, out string) {
	report, err := os.ReadFile(out)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		fmt.Fprintln(os.Stderr, "benchreport:", err)
		os.Exit(1)
	}
	section, err := in.fleetSection(filepath.Join(filepath.Dir(out), "fleet.svg"))
	if err == nil {
		err = os.WriteFile(out, []byte(replaceFleetSection(string(report), section)), 0o644)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "benchreport:", err)
		os.Exit(1)
	}
	fmt.Printf("benchreport: wrote the Fleet section of %s\n", out)
}

// Values of rows without a figure.
const (
	notRun      = "not run"      // no input had the benchmark, test or target
	notMeasured = "not measured" // it ran but did not report this figure
	failed      = "failed"       // it ran and failed before reporting
	skipped     = "skipped"      // it ran and skipped (the machine lacks something)
)

func measured(val string) bool {
	return val != notRun && val != notMeasured && val != failed && val != skipped
}

// input is what the result files hold, whichever step of make bench wrote
// them: go test -bench lines, the go test -v log of the live-migration
// tests, test/fuzz.sh's output.
type input struct {
	bench  map[string]float64 // "BenchmarkName unit" → value
	ran    map[string]bool    // benchmarks with a result or a --- line
	failed map[string]bool    // benchmarks with a --- FAIL line
	mig    map[string]*migRuns
	// migSwitch is a run's switchover line, until its probe line comes.
	migSwitch map[string]time.Duration
	fuzz      map[string]*fuzzRun
	fuzzes    []string // fuzz targets in the order seen
	demo      *demoRun
	// nodeVMBoot is what test/nodevm/bench said of the boot.
	nodeVMBoot string
	// pending is a benchmark whose name line came without its figures.
	pending string
	// fleet is test/fleet's report.
	fleet *fleet.Report
}

func newInput() *input {
	return &input{
		bench: map[string]float64{}, ran: map[string]bool{}, failed: map[string]bool{},
		mig: map[string]*migRuns{}, migSwitch: map[string]time.Duration{}, fuzz: map[string]*fuzzRun{},
	}
}

// read parses one result file line by line; each parser keeps its state
// within the file (the running test, the fuzz target).
func (in *input) read(path string) error {
	if filepath.Base(path) == "fleet.json" {
		return in.readFleet(path)
	}
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer func() { _ = f.Close() }()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 0, 64<<10), 16<<20) // -v logs carry long daemon debug lines
	var test string
	var target *fuzzRun
	for sc.Scan() {
		l := sc.Text()
		in.benchLine(l)
		test = in.migrationLine(l, test)
		target = in.fuzzLine(l, target)
		in.demoLine(l)
		if m := nodeVMBootRE.FindStringSubmatch(l); m != nil {
			in.nodeVMBoot = fmt.Sprintf(" In this run the VM ran under %s, booted in %s s, and took %s s for the four runs.", strings.ToUpper(m[1]), m[2], m[3])
		}
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return nil
}

// nodeVMBootRE is test/nodevm/bench's line on the boot.
var nodeVMBootRE = regexp.MustCompile(`^nodevm: accel=(\S+) boot=([0-9.]+)s wall=([0-9.]+)s`)

// outcome is go test's verdict line of a test, benchmark or fuzz target.
var outcome = regexp.MustCompile(`^\s*--- (PASS|FAIL|SKIP): (\S+)`)

// benchName drops the -GOMAXPROCS suffix of a benchmark's name.
func benchName(name string) string {
	if i := strings.LastIndex(name, "-"); i > 0 {
		if _, err := strconv.Atoi(name[i+1:]); err == nil {
			return name[:i]
		}
	}
	return name
}

// benchLine parses a benchmark result line (name-N  iterations  value unit
// ...) or a benchmark's verdict line.
func (in *input) benchLine(l string) {
	if m := outcome.FindStringSubmatch(l); m != nil && strings.HasPrefix(m[2], "Benchmark") {
		name := benchName(m[2])
		in.ran[name] = true
		if m[1] == "FAIL" {
			in.failed[name] = true
		}
		return
	}
	fields := strings.Fields(l)
	// A benchmark that writes to stdout or stderr while it runs splits its
	// result line: go test prints the name, then that output, then the
	// figures on a line of their own ("  3  1396 ns/op  300.0 unit ...").
	if len(fields) >= 3 && fields[2] == "ns/op" && in.pending != "" {
		if _, err := strconv.Atoi(fields[0]); err == nil {
			fields = append([]string{in.pending}, fields...)
		}
	}
	if len(fields) >= 1 && strings.HasPrefix(fields[0], "Benchmark") {
		in.pending = fields[0]
	}
	if len(fields) < 4 || !strings.HasPrefix(fields[0], "Benchmark") {
		return
	}
	if _, err := strconv.Atoi(fields[1]); err != nil {
		return
	}
	in.pending = ""
	name := benchName(fields[0])
	in.ran[name] = true
	for i := 2; i+1 < len(fields); i += 2 {
		v, err := strconv.ParseFloat(fields[i], 64)
		if err != nil {
			continue
		}
		in.bench[name+" "+fields[i+1]] = v
	}
}

// benchLines renders the benchmarks' rows.
func (in *input) benchLines() []line {
	var out []line
	for _, r := range rows {
		val := notRun
		parent, _, _ := strings.Cut(r.bench, "/")
		if v, ok := in.bench[r.bench+" "+r.unit]; ok {
			if r.invert && v != 0 {
				v = 1 / v
			}
			val = fmt.Sprintf(r.format, v)
		} else if in.failed[r.bench] || in.failed[parent] {
			val = failed
		} else if in.ran[r.bench] {
			val = notMeasured
		}
		out = append(out, line{r.what, val, r.goal, in.peerText(r)})
	}
	return out
}

// peerText renders a row's peers: each measured peer's figure (and the
// row's ratio to it), then the text for what no peer here can run.
func (in *input) peerText(r row) string {
	var parts []string
	mine, haveMine := in.bench[r.bench+" "+r.unit]
	for _, p := range r.vs {
		v, ok := in.bench[p.bench+" "+p.unit]
		if !ok {
			parts = append(parts, p.label+": "+notRun)
			continue
		}
		t := p.label + ": " + fmt.Sprintf(p.format, v)
		if p.ratio && haveMine && v != 0 {
			t += fmt.Sprintf(" (vmnic %.2fx)", mine/v)
		}
		parts = append(parts, t)
	}
	if r.peers != "" {
		parts = append(parts, r.peers)
	}
	return strings.Join(parts, "; ")
}

func dash(s string) string {
	if s == "" {
		return "—"
	}
	return s
}

func readFile(p string) string {
	b, _ := os.ReadFile(p)
	return string(b)
}

func cpuModel() string {
	for _, l := range strings.Split(readFile("/proc/cpuinfo"), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "unknown CPU"
}

func memTotal() string {
	for _, l := range strings.Split(readFile("/proc/meminfo"), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok && k == "MemTotal" {
			kb, _ := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			return fmt.Sprintf("%.0f GiB", float64(kb)/(1<<20))
		}
	}
	return "unknown"
}
