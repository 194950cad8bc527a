package dhcp

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vmnic/vmnic/test/need"
)

// The tests here run real DHCP clients in the guest netns when the machine
// has them: busybox's udhcpc (what small guest images run) and ISC
// dhclient (Debian's). Their hook scripts dump the environment they get.

// dumpScript writes the environment atomically: the test polls for the file.
const dumpScript = "#!/bin/sh\nd='%s'\nenv > \"$d/.env.$$\" && mv \"$d/.env.$$\" \"$d/${reason:-$1}.env\"\n"

// busyboxApplet returns the busybox binary; it must have applet. (Debian's
// busybox has no udhcpc6, so DHCPv6 is proven with nclient6, dhclient -6
// and the guest's own client instead.)
func busyboxApplet(t *testing.T, applet string) string {
	t.Helper()
	bb := need.Binary(t, "busybox")
	out, err := exec.Command(bb, "--list").Output()
	if err != nil || !slices.Contains(strings.Fields(string(out)), applet) {
		need.NoError(t, fmt.Errorf("busybox at %s has no %s applet", bb, applet))
	}
	return bb
}

// runClient runs a client in the guest netns until its hook script wrote
// dir/<reason>.env, and returns that environment.
func (tn *testNet) runClient(t *testing.T, dir, reason string, argv ...string) map[string]string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "nsenter", append([]string{"--net=" + tn.guest.Path(), "--"}, argv...)...)
	out := &strings.Builder{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", argv[0], err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		cmd.Process.Kill()
		<-exited
		t.Logf("%s output:\n%s", filepath.Base(argv[0]), out)
	}()
	file := filepath.Join(dir, reason+".env")
	exists := func() bool { _, err := os.Stat(file); return err == nil }
	for !exists() {
		select {
		case err := <-exited:
			exited <- err // for the deferred kill
			if !exists() {
				t.Fatalf("%s exited (%v) without reaching %s", argv[0], err, reason)
			}
		case <-ctx.Done():
			t.Fatalf("%s did not reach %s in time", argv[0], reason)
		case <-time.After(20 * time.Millisecond):
		}
	}
	f, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	env := map[string]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), "="); ok {
			env[k] = v
		}
	}
	return env
}

func writeScript(t *testing.T, dir string) string {
	t.Helper()
	script := filepath.Join(dir, "hook")
	if err := os.WriteFile(script, fmt.Appendf(nil, dumpScript, dir), 0o755); err != nil {
		t.Fatal(err)
	}
	return script
}

func checkEnv(t *testing.T, env, want map[string]string) {
	t.Helper()
	for k, v := range want {
		got := strings.TrimSpace(env[k])
		if ip := net.ParseIP(v); ip != nil && ip.Equal(net.ParseIP(got)) {
			continue // udhcpc6 writes addresses in full
		}
		if got != v {
			t.Errorf("%s = %q, want %q", k, got, v)
		}
	}
}

func routedV4() *V4 {
	v := v4Config()
	v.Routes = []Route{{Dst: net.IPNet{IP: net.ParseIP("10.1.0.0"), Mask: net.CIDRMask(16, 32)}, Gw: serverV4}}
	return v
}

func TestBusyboxUDHCPC(t *testing.T) {
	bb := busyboxApplet(t, "udhcpc")
	tn := newTestNet(t, netOpts{})
	tn.start(t, Config{ClientMAC: guestMAC, V4: routedV4()})
	dir := t.TempDir()
	env := tn.runClient(t, dir, "bound", bb, "udhcpc", "-f", "-q", "-n", "-i", guestIf, "-t", "3", "-T", "1",
		"-s", writeScript(t, dir), "-O", "mtu", "-O", "search", "-O", "staticroutes", "-O", "hostname")
	checkEnv(t, env, map[string]string{
		"ip":           "10.0.2.2",
		"subnet":       "255.255.255.0",
		"mask":         "24",
		"router":       "10.0.2.1",
		"dns":          "10.96.0.10",
		"domain":       "default.svc.cluster.local",
		"search":       "default.svc.cluster.local svc.cluster.local",
		"mtu":          "1400",
		"hostname":     "vm1",
		"lease":        "3600",
		"serverid":     "10.0.2.1",
		"staticroutes": "10.1.0.0/16 10.0.2.1 0.0.0.0/0 10.0.2.1",
	})
}

const dhclientConf = `option rfc3442-classless-static-routes code 121 = array of unsigned integer 8;
request subnet-mask, broadcast-address, routers, domain-name, domain-name-servers,
	domain-search, host-name, interface-mtu, rfc3442-classless-static-routes,
	dhcp6.name-servers, dhcp6.domain-search;
`

func TestISCDhclient(t *testing.T) {
	dhclient := need.Binary(t, "dhclient")
	tn := newTestNet(t, netOpts{})
	tn.start(t, Config{ClientMAC: guestMAC, V4: routedV4(), V6: v6Config()})

	for _, tc := range []struct {
		name, family, reason string
		want                 map[string]string
	}{
		{"v4", "-4", "BOUND", map[string]string{
			"new_ip_address":                      "10.0.2.2",
			"new_subnet_mask":                     "255.255.255.0",
			"new_routers":                         "10.0.2.1",
			"new_domain_name_servers":             "10.96.0.10",
			"new_domain_name":                     "default.svc.cluster.local",
			"new_domain_search":                   "default.svc.cluster.local. svc.cluster.local.",
			"new_interface_mtu":                   "1400",
			"new_host_name":                       "vm1",
			"new_dhcp_lease_time":                 "3600",
			"new_dhcp_server_identifier":          "10.0.2.1",
			"new_rfc3442_classless_static_routes": "16 10 1 10 0 2 1 0 10 0 2 1",
		}},
		{"v6", "-6", "BOUND6", map[string]string{
			"new_ip6_address":         "fd10:0:2::2",
			"new_ip6_prefixlen":       "128",
			"new_dhcp6_name_servers":  "fd00:10:96::a",
			"new_dhcp6_domain_search": "default.svc.cluster.local. cluster.local.",
			"new_max_life":            "4294967295",
			"new_preferred_life":      "4294967295",
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			conf := filepath.Join(dir, "dhclient.conf")
			if err := os.WriteFile(conf, []byte(dhclientConf), 0o644); err != nil {
				t.Fatal(err)
			}
			env := tn.runClient(t, dir, tc.reason, dhclient, tc.family, "-d", "-v", "-1", "-cf", conf,
				"-sf", writeScript(t, dir), "-lf", filepath.Join(dir, "leases"), "-pf", filepath.Join(dir, "pid"), guestIf)
			checkEnv(t, env, tc.want)
		})
	}
}
