package ovsdb

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/vmnic/vmnic/test/need"
	"github.com/vmnic/vmnic/test/ovs"
)

// owner is the mark the tests put on their ports.
var owner = map[string]string{"vmnic.io/owner": "vmnic"}

// env is a private switch with a netdev bridge br1, its ovs-vswitchd running
// in a network namespace of its own (so the userspace datapath sees only the
// test's veths), and a Client connected to it.
type env struct {
	ovs *ovs.OVS
	ns  ns.NetNS // ovs-vswitchd's namespace; switch-side veth ends live here
	c   *Client
}

func newEnv(t testing.TB) *env {
	t.Helper()
	need.Root(t)
	stopLog := testLogger(t) // registered first: its cleanup runs last
	n := newNS(t)
	o := ovs.StartT(t, ovs.WithNetNS(n))
	if err := o.AddBridge("br1"); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Dial(ctx, o.DB(), stopLog)
	if err != nil {
		t.Fatalf("dial %s: %v", o.DB(), err)
	}
	t.Cleanup(c.Close)
	return &env{ovs: o, ns: n, c: c}
}

// newNS creates a bind-mounted network namespace removed at cleanup.
func newNS(t testing.TB) ns.NetNS {
	t.Helper()
	n, err := testutils.NewNS()
	if err != nil {
		t.Fatalf("new netns: %v", err)
	}
	t.Cleanup(func() {
		_ = n.Close()
		_ = testutils.UnmountNS(n)
	})
	return n
}

// testLogger logs to t until the test's last cleanup; libovsdb goroutines
// may log after that, and t.Log would then panic.
func testLogger(t testing.TB) *slog.Logger {
	w := &testWriter{t: t}
	t.Cleanup(w.stop)
	// -3 shows libovsdb's connection messages (logr V(3)) but not the
	// per-transaction dumps (V(4)).
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.Level(-3)}))
}

type testWriter struct {
	mu   sync.Mutex
	t    testing.TB
	done bool
}

func (w *testWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Log(strings.TrimRight(string(p), "\n"))
	}
	return len(p), nil
}

func (w *testWriter) stop() {
	w.mu.Lock()
	w.done = true
	w.mu.Unlock()
}

var _ io.Writer = (*testWriter)(nil)

func vsctl(t testing.TB, o *ovs.OVS, args ...string) string {
	t.Helper()
	out, err := o.Vsctl(args...)
	if err != nil {
		t.Fatalf("%v", err)
	}
	return out
}

func ctxT(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// veth creates a veth pair in the switch's namespace: name stays there, its
// peer goes to peerNS as "eth0" (or stays as name+"p" when peerNS is nil).
// Both ends are up. The links go away with the namespaces.
func (e *env) veth(t testing.TB, name string, peerNS ns.NetNS) {
	t.Helper()
	h := nsHandle(t, e.ns)
	defer h.Close()
	peer := name + "p"
	attrs := netlink.NewLinkAttrs()
	attrs.Name = name
	v := &netlink.Veth{LinkAttrs: attrs, PeerName: peer}
	if peerNS != nil {
		peer = "eth0"
		v.PeerName = peer
		v.PeerNamespace = netlink.NsFd(int(peerNS.Fd()))
	}
	if err := h.LinkAdd(v); err != nil {
		t.Fatalf("add veth %q: %v", name, err)
	}
	setUp(t, h, name)
	if peerNS == nil {
		setUp(t, h, peer)
		return
	}
	ph := nsHandle(t, peerNS)
	defer ph.Close()
	setUp(t, ph, peer)
}

func nsHandle(t testing.TB, n ns.NetNS) netlinksafe.Handle {
	t.Helper()
	h, err := netlinksafe.NewHandleAt(netns.NsHandle(n.Fd()))
	if err != nil {
		t.Fatalf("netlink handle in %s: %v", n.Path(), err)
	}
	return h
}

func setUp(t testing.TB, h netlinksafe.Handle, name string) {
	t.Helper()
	l, err := h.LinkByName(name)
	if err != nil {
		t.Fatalf("link %q: %v", name, err)
	}
	if err := h.LinkSetUp(l); err != nil {
		t.Fatalf("set %q up: %v", name, err)
	}
}

func linkMTU(t testing.TB, n ns.NetNS, name string) int {
	t.Helper()
	h := nsHandle(t, n)
	defer h.Close()
	l, err := h.LinkByName(name)
	if err != nil {
		t.Fatalf("link %q: %v", name, err)
	}
	return l.Attrs().MTU
}

// inNS runs a command in n's network namespace.
func inNS(n ns.NetNS, name string, args ...string) (string, error) {
	cmd := exec.Command("nsenter", append([]string{"--net=" + n.Path(), name}, args...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

// port returns the cached port named name, failing the test if absent.
func (e *env) port(t testing.TB, name string) PortInfo {
	t.Helper()
	ports, err := e.c.Ports(ctxT(t, 5*time.Second), nil)
	if err != nil {
		t.Fatalf("ports: %v", err)
	}
	for _, p := range ports {
		if p.Name == name {
			return p
		}
	}
	t.Fatalf("port %q not in cache; have %v", name, ports)
	return PortInfo{}
}

// eventually polls cond until it holds or d passes.
func eventually(t testing.TB, d time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		ok, state := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not after %s (%s)", what, d, state)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func intp(v int) *int { return &v }

func ownerPlus(kv ...string) map[string]string {
	m := map[string]string{}
	for k, v := range owner {
		m[k] = v
	}
	for i := 0; i+1 < len(kv); i += 2 {
		m[kv[i]] = kv[i+1]
	}
	return m
}
