// Command demo is `make demo`: vmnic wiring a KubeVirt VM NIC on a sandbox
// node, no cluster needed. It starts vmnicd standalone in a node network
// namespace, wires a virt-launcher pod through libcni (ptp + host-local as
// the primary CNI, vmnic masquerade chained after it), boots a real guest on
// the tap that takes its addresses by DHCP and reaches out, connects to the
// guest through a forwarded port, then removes everything.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"time"

	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/vmnic/vmnic/test/guest"
	"github.com/vmnic/vmnic/test/harness"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "\ndemo failed: %v\n", err)
		os.Exit(1)
	}
}

func step(format string, a ...any) { fmt.Printf("\n==> "+format+"\n", a...) }

func show(ns, cmd string) {
	out, _ := exec.Command("nsenter", "--net="+ns, "sh", "-c", cmd).CombinedOutput()
	for _, l := range strings.Split(strings.TrimRight(string(out), "\n"), "\n") {
		fmt.Println("    " + l)
	}
}

func run() error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("run as root: the demo creates network namespaces and a tap")
	}
	if err := guest.Check(); err != nil {
		return fmt.Errorf("%w (run `make deps`)", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	dir, err := os.MkdirTemp("", "vmnic-demo-")
	if err != nil {
		return err
	}
	defer func() { _ = os.RemoveAll(dir) }()

	step("building the vmnic shim, vmnicd and the reference plugins (ptp, host-local)")
	built := time.Now()
	harness.ReferencePlugins = []string{
		"github.com/containernetworking/plugins/plugins/main/ptp",
		"github.com/containernetworking/plugins/plugins/ipam/host-local",
	}
	node, err := harness.NewNode(dir)
	if err != nil {
		return err
	}
	defer node.Close()
	fmt.Printf("    node netns %s\n", node.NS.Path())

	step("starting vmnicd standalone in the node netns")
	d, err := node.StartDaemonProcess()
	if err != nil {
		return err
	}
	fmt.Printf("    built and started in %s\n", time.Since(built).Round(time.Second))
	defer func() { _ = d.Stop() }()
	fmt.Printf("    socket %s (log %s)\n", node.Socket(), d.Log)

	const mac = "02:00:00:de:00:01"
	data, err := node.ConfList(harness.NetOptions{Vmnic: true, VM: harness.ScenarioVM("demo-vm", mac)})
	if err != nil {
		return err
	}
	var pretty map[string]any
	_ = json.Unmarshal(data, &pretty)
	conf, _ := json.MarshalIndent(pretty, "    ", "  ")
	step("the conflist the runtime reads (primary CNI + vmnic chained)")
	fmt.Println("    " + string(conf))
	list, err := harness.List(data)
	if err != nil {
		return err
	}

	pod, err := harness.NewPod("virt-launcher-demo-vm-x7k2p")
	if err != nil {
		return err
	}
	defer pod.Close()
	step("CNI ADD through libcni for pod %s/%s", pod.Namespace, pod.Name)
	start := time.Now()
	res, err := node.Add(ctx, list, pod)
	if err != nil {
		return fmt.Errorf("ADD: %w", err)
	}
	fmt.Printf("    ADD took %s\n", time.Since(start).Round(time.Millisecond))
	deleted := false
	defer func() {
		if !deleted {
			_ = node.Del(context.Background(), list, pod)
		}
	}()
	r, err := current.NewResultFromResult(res)
	if err != nil {
		return err
	}
	out, _ := json.MarshalIndent(r, "    ", "  ")
	fmt.Println("    result: " + string(out))

	step("inside the pod: links, addresses and vmnic's NAT table")
	show(pod.NS.Path(), "ip -br link; ip -br addr; nft list table ip vmnic")

	if cerr := node.Check(ctx, list, pod); cerr != nil {
		return fmt.Errorf("CHECK: %w", cerr)
	}
	step("CNI CHECK passed")

	step("booting a real guest (QEMU, TCG) on tap0; this takes ~20 s")
	img, err := guest.Build(dir)
	if err != nil {
		return err
	}
	// What KubeVirt's tap binding gives the domain here: tap0 (the pod
	// network's), the VMI's MAC and a queue per vCPU.
	nic := harness.GuestNIC{Tap: "tap0", MAC: mac, Queues: harness.ScenarioQueues}
	rep, err := harness.RunGuest(ctx, node, pod, img, nic, r, "198.18.0.1", "fd00:198:18::1",
		func(l string) { fmt.Println("    guest| " + l) })
	if err != nil {
		return fmt.Errorf("guest: %w", err)
	}

	step("what happened")
	ok := func(b bool) string {
		if b {
			return "yes"
		}
		return "NO"
	}
	fmt.Printf("    guest IPv4 by DHCP      %s (%s)\n", rep.Addr4, rep.Route4)
	fmt.Printf("    guest IPv6 by DHCPv6    %s\n", rep.Addr6)
	fmt.Printf("    IPv6 default route (RA) %s\n", ok(strings.Contains(rep.Route6, "via fe80::")))
	fmt.Printf("    guest pinged the node   v4 %s, v6 %s\n", ok(rep.Ping4), ok(rep.Ping6))
	fmt.Printf("    node saw guest TCP as   %s\n", strings.Join(rep.PeerSeen, "; "))
	fmt.Printf("    forwarded port 8080/v4  guest received %q\n", rep.Forwarded4)
	fmt.Printf("    forwarded port 8081/v6  guest received %q\n", rep.Forwarded6)
	fmt.Printf("    port 9090 (not fwd)     refused: %s, guest received %q\n", ok(rep.NotFwdDialErr == nil), rep.NotForwarded)

	step("CNI DEL (and again: DEL is idempotent)")
	for i := 0; i < 2; i++ {
		if err := node.Del(ctx, list, pod); err != nil {
			return fmt.Errorf("DEL: %w", err)
		}
	}
	deleted = true
	show(pod.NS.Path(), "ip -br link; nft list tables")

	good := rep.Addr4 == "10.0.2.2/24" && strings.HasPrefix(rep.Addr6, "fd10:0:2::2/") && rep.Ping4 && rep.Ping6 &&
		rep.Forwarded4 == "via-dnat-v4" && rep.Forwarded6 == "via-dnat-v6" && rep.NotForwarded == "" && rep.NotFwdDialErr == nil
	if !good {
		return fmt.Errorf("the guest did not get everything it should (see above)")
	}
	step("done: the VM NIC was wired, served, used and removed")
	return nil
}
