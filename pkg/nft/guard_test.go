package nft

import (
	"errors"
	"strings"
	"testing"
)

// TestGuardLifecycle: the guard table nft reads back is what RenderGuard
// says, CHECK sees a removed rule and a foreign chain, and delete is
// idempotent and leaves other tables alone.
func TestGuardLifecycle(t *testing.T) {
	requireRoot(t, true)
	n := newNS(t)
	g := Guard{PodIf: "net1", Tap: "tap1"}
	nft(t, n, "add", "table", "bridge", "other")
	if err := ApplyGuard(n.Path(), g); err != nil {
		t.Fatal(err)
	}
	// Applying twice replaces, never duplicates.
	if err := ApplyGuard(n.Path(), g); err != nil {
		t.Fatal(err)
	}
	got := nft(t, n, "list", "table", "bridge", "vmnic_net1")
	for _, w := range []string{`iifname "net1" drop`, `oifname "net1" drop`, `iifname "tap1" oifname "net1" udp dport 67 drop`, `iifname "net1" oifname "tap1" udp dport 546 drop`} {
		if !strings.Contains(got, w) {
			t.Errorf("live table lacks %q:\n%s", w, got)
		}
	}
	if strings.Count(got, "chain ") != 3 {
		t.Errorf("want 3 chains:\n%s", got)
	}
	if want := RenderGuard(g); strings.Count(want, "drop") != strings.Count(got, "drop") {
		t.Errorf("render and live differ:\n%s\n%s", want, got)
	}
	if err := CheckGuard(n.Path(), g); err != nil {
		t.Errorf("CHECK of a fresh guard: %v", err)
	}
	h := ""
	for _, m := range handleRE.FindAllStringSubmatch(nft(t, n, "-a", "list", "chain", "bridge", "vmnic_net1", "output"), -1) {
		if m[1] == `oifname "net1" drop` {
			h = m[2]
		}
	}
	if h == "" {
		t.Fatal("output rule not found")
	}
	nft(t, n, "delete", "rule", "bridge", "vmnic_net1", "output", "handle", h)
	nft(t, n, "add", "chain", "bridge", "vmnic_net1", "extra")
	err := CheckGuard(n.Path(), g)
	var de *DriftError
	if !errors.As(err, &de) || !strings.Contains(err.Error(), "output") || !strings.Contains(err.Error(), `unexpected chain "extra"`) {
		t.Errorf("CHECK after tampering: %v", err)
	}
	for range 2 {
		if err := DeleteGuard(n.Path(), "net1"); err != nil {
			t.Fatal(err)
		}
	}
	if err := CheckGuard(n.Path(), g); err == nil || !strings.Contains(err.Error(), "missing") {
		t.Errorf("CHECK after delete: %v", err)
	}
	if out := nft(t, n, "list", "tables"); !strings.Contains(out, "table bridge other") {
		t.Errorf("foreign table removed: %s", out)
	}
	if err := DeleteGuard("/proc/self/no-such-ns", "net1"); err != nil {
		t.Errorf("delete in a vanished netns: %v", err)
	}
}
