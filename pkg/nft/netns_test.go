package nft

import (
	"errors"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"github.com/vmnic/vmnic/test/need"
)

// requireRoot skips tests that need CAP_NET_ADMIN (and, if needNft, the nft
// and nsenter binaries, which only the tests use to look and tamper).
func requireRoot(t *testing.T, needNft bool) {
	t.Helper()
	need.Root(t)
	if needNft {
		for _, bin := range []string{"nft", "nsenter"} {
			need.Binary(t, bin)
		}
	}
}

// newNS creates a bind-mounted network namespace removed at cleanup.
func newNS(t *testing.T) ns.NetNS {
	t.Helper()
	n, err := testutils.NewNS()
	if err != nil {
		t.Fatalf("new netns: %v", err)
	}
	t.Cleanup(func() {
		n.Close()
		_ = testutils.UnmountNS(n)
	})
	return n
}

// nft runs the nft binary inside the namespace and returns its output.
func nft(t *testing.T, n ns.NetNS, args ...string) string {
	t.Helper()
	out, err := nftErr(n, args...)
	if err != nil {
		t.Fatalf("nft %s: %v", strings.Join(args, " "), err)
	}
	return out
}

func nftErr(n ns.NetNS, args ...string) (string, error) {
	cmd := exec.Command("nsenter", append([]string{"--net=" + n.Path(), "nft"}, args...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), errors.New(strings.TrimSpace(string(out)) + ": " + err.Error())
	}
	return string(out), nil
}

// nftFile loads a ruleset text with nft -f.
func nftFile(t *testing.T, n ns.NetNS, text string) {
	t.Helper()
	cmd := exec.Command("nsenter", "--net="+n.Path(), "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(text)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nft -f: %v\n%s\ninput:\n%s", err, out, text)
	}
}

// listOwn returns `nft list table` of vmnic's tables, in Render's layout.
func listOwn(t *testing.T, n ns.NetNS) string {
	t.Helper()
	var parts []string
	for _, fam := range []string{"ip", "ip6"} {
		if out, err := nftErr(n, "list", "table", fam, TableName); err == nil {
			parts = append(parts, out)
		}
	}
	return strings.Join(parts, "\n")
}

var handleRE = regexp.MustCompile(`(?m)^\s*(.*?) # handle (\d+)$`)

// handleOf returns the handle of the rule whose text is exactly rule.
func handleOf(t *testing.T, n ns.NetNS, fam, chain, rule string) string {
	t.Helper()
	out := nft(t, n, "-a", "list", "chain", fam, TableName, chain)
	for _, m := range handleRE.FindAllStringSubmatch(out, -1) {
		if m[1] == rule {
			return m[2]
		}
	}
	t.Fatalf("no rule %q in chain %s %s:\n%s", rule, fam, chain, out)
	return ""
}

func mustCheck(t *testing.T, n ns.NetNS, m Masquerade) {
	t.Helper()
	if err := Check(n.Path(), m); err != nil {
		t.Fatalf("Check: %v", err)
	}
}

// TestApplyMatchesNft applies each golden configuration and asserts that the
// nft binary lists exactly the rendered ruleset, that Check agrees, and that
// re-applying replaces instead of appending.
func TestApplyMatchesNft(t *testing.T) {
	requireRoot(t, true)
	for _, tc := range goldenCases {
		t.Run(tc.name, func(t *testing.T) {
			n := newNS(t)
			for range 2 {
				if err := Apply(n.Path(), tc.m); err != nil {
					t.Fatalf("Apply: %v", err)
				}
				if got, want := listOwn(t, n), Render(tc.m); got != want {
					t.Fatalf("nft lists\n%s\nwant (Render)\n%s", got, want)
				}
				mustCheck(t, n, tc.m)
			}
		})
	}
}

// TestCheckAcceptsNftAuthored loads Render's text with the nft binary (which
// encodes some statements differently, e.g. ranges as cmp >=/<=) and expects
// Check to find it equal: the comparison is by meaning, not by encoding.
func TestCheckAcceptsNftAuthored(t *testing.T) {
	requireRoot(t, true)
	for _, tc := range goldenCases {
		t.Run(tc.name, func(t *testing.T) {
			n := newNS(t)
			nftFile(t, n, Render(tc.m))
			mustCheck(t, n, tc.m)
		})
	}
}

func TestCheckDetectsTampering(t *testing.T) {
	requireRoot(t, true)
	all := goldenCases[0].m   // v4, all ports
	ports := goldenCases[1].m // dual stack, port list
	excl := goldenCases[2].m  // dual stack, excluded ports
	for _, tc := range []struct {
		name   string
		m      Masquerade
		tamper func(t *testing.T, n ns.NetNS)
		want   []string
	}{
		{
			name: "rule deleted",
			m:    ports,
			tamper: func(t *testing.T, n ns.NetNS) {
				nft(t, n, "delete", "rule", "ip", TableName, "inbound", "handle",
					handleOf(t, n, "ip", "inbound", "tcp dport 8000-8010 dnat to 10.0.2.2"))
			},
			want: []string{`nft table ip vmnic: rule 2 of chain "inbound" missing: want "tcp dport 8000-8010 dnat to 10.0.2.2"`},
		},
		{
			name:   "chain deleted",
			m:      all,
			tamper: func(t *testing.T, n ns.NetNS) { nft(t, n, "delete", "chain", "ip", TableName, "output") },
			want:   []string{`nft table ip vmnic: chain "output" missing`},
		},
		{
			name: "rule added",
			m:    excl,
			tamper: func(t *testing.T, n ns.NetNS) {
				nft(t, n, "insert", "rule", "ip6", TableName, "inbound", "tcp", "dport", "22", "return")
				nft(t, n, "add", "rule", "ip", TableName, "postrouting", "counter")
			},
			want: []string{
				`nft table ip vmnic: unexpected rule 3 of chain "postrouting": "counter"`,
				`nft table ip6 vmnic: unexpected rule 1 of chain "inbound": "tcp dport 22 return"`,
			},
		},
		{
			name: "dnat address changed",
			m:    all,
			tamper: func(t *testing.T, n ns.NetNS) {
				nft(t, n, "replace", "rule", "ip", TableName, "inbound", "handle",
					handleOf(t, n, "ip", "inbound", "dnat to 10.0.2.2"), "dnat", "to", "10.0.2.3")
			},
			want: []string{`nft table ip vmnic: rule 1 of chain "inbound" differs: want "dnat to 10.0.2.2", got "dnat to 10.0.2.3"`},
		},
		{
			name: "interface changed",
			m:    all,
			tamper: func(t *testing.T, n ns.NetNS) {
				nft(t, n, "replace", "rule", "ip", TableName, "prerouting", "handle",
					handleOf(t, n, "ip", "prerouting", `iifname "eth0" jump inbound`), "iifname", "eth*", "jump", "inbound")
			},
			want: []string{`nft table ip vmnic: rule 1 of chain "prerouting" differs: want "iifname \"eth0\" jump inbound", got "iifname \"eth*\" jump inbound"`},
		},
		{
			name: "base chain priority changed",
			m:    all,
			tamper: func(t *testing.T, n ns.NetNS) {
				nft(t, n, "delete", "chain", "ip", TableName, "output")
				nft(t, n, "add", "chain", "ip", TableName, "output", "{ type nat hook output priority 0; }")
			},
			want: []string{
				`nft table ip vmnic: chain "output" differs: want "type nat hook output priority -100; policy accept;", got "type nat hook output priority 0; policy accept;"`,
				`nft table ip vmnic: rule 1 of chain "output" missing: want "ip daddr 127.0.0.1 dnat to 10.0.2.2"`,
			},
		},
		{
			name:   "unexpected chain",
			m:      all,
			tamper: func(t *testing.T, n ns.NetNS) { nft(t, n, "add", "chain", "ip", TableName, "extra") },
			want:   []string{`nft table ip vmnic: unexpected chain "extra"`},
		},
		{
			name:   "table dormant",
			m:      all,
			tamper: func(t *testing.T, n ns.NetNS) { nft(t, n, "add", "table", "ip", TableName, "{ flags dormant; }") },
			want:   []string{`nft table ip vmnic: unexpected table flags 0x1 (dormant)`},
		},
		{
			name:   "table deleted",
			m:      ports,
			tamper: func(t *testing.T, n ns.NetNS) { nft(t, n, "delete", "table", "ip6", TableName) },
			want:   []string{`nft table ip6 vmnic: missing`},
		},
		{
			name:   "stale table of a family the pod lacks",
			m:      all,
			tamper: func(t *testing.T, n ns.NetNS) { nft(t, n, "add", "table", "ip6", TableName) },
			want:   []string{`nft table ip6 vmnic: present, but the pod has no ip6 configuration`},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := newNS(t)
			if err := Apply(n.Path(), tc.m); err != nil {
				t.Fatalf("Apply: %v", err)
			}
			mustCheck(t, n, tc.m)
			tc.tamper(t, n)
			err := Check(n.Path(), tc.m)
			var drift *DriftError
			if !errors.As(err, &drift) {
				t.Fatalf("Check after tampering = %v, want a *DriftError", err)
			}
			if got, want := strings.Join(drift.Problems, "\n"), strings.Join(tc.want, "\n"); got != want {
				t.Errorf("Check problems:\n%s\nwant:\n%s", got, want)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not name %q", err, w)
				}
			}
			if err := Apply(n.Path(), tc.m); err != nil {
				t.Fatalf("re-Apply: %v", err)
			}
			mustCheck(t, n, tc.m)
			if got, want := listOwn(t, n), Render(tc.m); got != want {
				t.Errorf("after re-Apply nft lists\n%s\nwant\n%s", got, want)
			}
		})
	}
}

const foreign = `table ip nat {
	chain POSTROUTING {
		type nat hook postrouting priority srcnat; policy accept;
		ip saddr 10.244.0.0/16 masquerade
	}
}
table inet vmnic {
	chain c {
		tcp dport 1 return
	}
}
`

// TestForeignTablesUntouched: Apply, re-Apply and Delete leave the primary
// CNI's nat table (and a same-named table of another family) alone.
func TestForeignTablesUntouched(t *testing.T) {
	requireRoot(t, true)
	n := newNS(t)
	nftFile(t, n, foreign)
	before := nft(t, n, "list", "ruleset")
	m := goldenCases[1].m
	if err := Apply(n.Path(), m); err != nil {
		t.Fatal(err)
	}
	if err := Apply(n.Path(), goldenCases[0].m); err != nil { // v4 only: drops ip6 vmnic
		t.Fatal(err)
	}
	mustCheck(t, n, goldenCases[0].m)
	for _, tbl := range []string{"table ip nat", "table inet vmnic"} {
		if !strings.Contains(nft(t, n, "list", "ruleset"), tbl) {
			t.Errorf("%s gone after Apply", tbl)
		}
	}
	if out := nft(t, n, "list", "tables"); strings.Contains(out, "table ip6 vmnic") {
		t.Errorf("Apply of a v4-only config left table ip6 vmnic:\n%s", out)
	}
	for range 2 {
		if err := Delete(n.Path()); err != nil {
			t.Fatalf("Delete: %v", err)
		}
		if after := nft(t, n, "list", "ruleset"); after != before {
			t.Fatalf("ruleset after Delete\n%s\nwant (foreign tables only)\n%s", after, before)
		}
	}
	err := Check(n.Path(), m)
	var drift *DriftError
	if !errors.As(err, &drift) || len(drift.Problems) != 2 ||
		drift.Problems[0] != "nft table ip vmnic: missing" || drift.Problems[1] != "nft table ip6 vmnic: missing" {
		t.Errorf("Check after Delete = %v", err)
	}
}

// TestDeleteGoneNetns: DEL never fails on what is gone.
func TestDeleteGoneNetns(t *testing.T) {
	requireRoot(t, false)
	n, err := testutils.NewNS()
	if err != nil {
		t.Fatal(err)
	}
	path := n.Path()
	if err := Apply(path, goldenCases[0].m); err != nil {
		t.Fatal(err)
	}
	n.Close()
	if err := testutils.UnmountNS(n); err != nil {
		t.Fatal(err)
	}
	if err := Delete(path); err != nil {
		t.Errorf("Delete on removed netns path: %v", err)
	}
	// An unmounted bind mount point left behind is an ordinary file.
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	defer os.Remove(path)
	if err := Delete(path); err != nil {
		t.Errorf("Delete on a stale mount point file: %v", err)
	}
	if err := Check(path, goldenCases[0].m); err == nil {
		t.Error("Check on a non-netns path succeeded")
	}
	if err := Apply(path+"-missing", goldenCases[0].m); err == nil {
		t.Error("Apply on a missing path succeeded")
	}
	if err := Check(path+"-missing", goldenCases[0].m); err == nil {
		t.Error("Check on a missing path succeeded")
	}
}

// TestProcPath: /proc/<pid>/ns/net works as a namespace path.
func TestProcPath(t *testing.T) {
	requireRoot(t, true)
	n := newNS(t)
	cmd := exec.Command("nsenter", "--net="+n.Path(), "sleep", "30")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	path := "/proc/" + itoa(cmd.Process.Pid) + "/ns/net"
	// nsenter execs sleep in the same process after setns; wait until then.
	for i := 0; i < 100; i++ {
		if a, err := os.Readlink(path); err == nil {
			if b, _ := os.Readlink("/proc/self/ns/net"); a != b {
				break
			}
		}
		sleepMs(10)
	}
	m := goldenCases[0].m
	if err := Apply(path, m); err != nil {
		t.Fatal(err)
	}
	mustCheck(t, n, m)
	if err := Delete(path); err != nil {
		t.Fatal(err)
	}
	if out := nft(t, n, "list", "tables"); strings.TrimSpace(out) != "" {
		t.Errorf("tables left after Delete via /proc path:\n%s", out)
	}
	if out, _ := exec.Command("nft", "list", "tables").Output(); strings.Contains(string(out), "vmnic") {
		t.Errorf("vmnic table in the test's own netns:\n%s", out)
	}
}

func itoa(i int) string { return strconv.Itoa(i) }
func sleepMs(ms int)    { time.Sleep(time.Duration(ms) * time.Millisecond) }
