package netconf

import (
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"
)

// The seed corpora live in testdata/fuzz/FuzzParse and
// testdata/fuzz/FuzzParseArgs: a valid config of every CNI version with its
// prevResult, each malformed example of TestParseErrors, and the CNI_ARGS of
// containerd and CRI-O. Run with: go test -run '^$' -fuzz '^FuzzParse$' .

// parseCodes are the only CNI codes Parse may return.
var parseCodes = map[uint]bool{
	types.ErrIncompatibleCNIVersion:      true, // 1
	types.ErrUnsupportedField:            true, // 2
	types.ErrInvalidEnvironmentVariables: true, // 4
	types.ErrDecodingFailure:             true, // 6
	types.ErrInvalidNetworkConfig:        true, // 7
}

func FuzzParse(f *testing.F) {
	// TestParseErrors' "oversized" case, too big for a corpus file.
	f.Add([]byte(`{"cniVersion":"1.0.0","name":"podnet","mode":"masquerade","x":"` + strings.Repeat("a", MaxConfigSize) + `"}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := Parse(data)
		if err != nil {
			if c != nil {
				t.Errorf("Parse returned both a Conf and error %v", err)
			}
			if !parseCodes[err.Code] {
				t.Errorf("error code %d not in {1,2,4,6,7}: %q", err.Code, err.Msg)
			}
			if err.Msg == "" {
				t.Errorf("error code %d has an empty message", err.Code)
			}
			return
		}
		if c == nil {
			t.Fatal("Parse returned neither a Conf nor an error")
		}
		if len(data) > MaxConfigSize {
			t.Errorf("accepted %d bytes, above MaxConfigSize", len(data))
		}
		checkConf(t, c)
	})
}

// checkBridge asserts the bridge-mode invariants, and that the other modes
// took none of its keys.
func checkBridge(t *testing.T, c *Conf) {
	t.Helper()
	if c.Mode != ModeBridge {
		if c.IPAM.Type != "" || c.Bridge != "" || c.VLAN != nil || len(c.Trunk) > 0 || c.MTU != 0 || c.OVSDBSocket != "" {
			t.Errorf("mode %s accepted bridge keys or ipam: %+v ipam %q", c.Mode, c.BridgeConf, c.IPAM.Type)
		}
		return
	}
	if c.Bridge == "" || len(c.Bridge) > 15 || c.IPAM.Type == "" || strings.Contains(c.IPAM.Type, "/") {
		t.Errorf("accepted bridge %q ipam %q", c.Bridge, c.IPAM.Type)
	}
	if c.VLAN != nil && (*c.VLAN < 0 || *c.VLAN > MaxVLAN || len(c.Trunk) > 0) {
		t.Errorf("accepted vlan %d with %d trunks", *c.VLAN, len(c.Trunk))
	}
	vlans := c.TrunkVLANs()
	for i, v := range vlans {
		if v < 0 || v > MaxVLAN || (i > 0 && vlans[i-1] == v) {
			t.Errorf("accepted trunk VLANs %v", vlans)
			break
		}
	}
	if c.MTU != 0 && (c.MTU < 68 || c.MTU > 65535) {
		t.Errorf("accepted mtu %d", c.MTU)
	}
}

// checkConf asserts the invariants of a Conf that Parse accepted.
func checkConf(t *testing.T, c *Conf) {
	t.Helper()
	if c.Name == "" {
		t.Error("accepted a config without name")
	}
	if c.Mode != ModeMasquerade && c.Mode != ModeBridge && c.Mode != ModePasst {
		t.Errorf("mode = %q, want %q, %q or %q", c.Mode, ModeMasquerade, ModeBridge, ModePasst)
	}
	if !strings.HasPrefix(c.Socket, "/") {
		t.Errorf("socket %q is not absolute", c.Socket)
	}
	if !strings.HasPrefix(c.SpoolDir, "/") {
		t.Errorf("spoolDir %q is not absolute", c.SpoolDir)
	}
	if c.ReadyTimeout <= 0 || c.ReadyTimeout > MaxReadyTimeout {
		t.Errorf("readyTimeout %s outside (0, %s]", c.ReadyTimeout, MaxReadyTimeout)
	}
	checkBridge(t, c)
	if c.RawPrevResult != nil && c.PrevResult == nil {
		t.Error("prevResult present but not parsed")
	}
	if perr := c.RequirePrevResult(); (perr == nil) != (c.PrevResult != nil || !c.Chained()) {
		t.Errorf("RequirePrevResult = %v with PrevResult %v", perr, c.PrevResult)
	} else if perr != nil && perr.Code != types.ErrInvalidNetworkConfig {
		t.Errorf("RequirePrevResult code = %d, want 7", perr.Code)
	}
	vm := c.VM()
	if vm == nil {
		return
	}
	if vm.Queues < 0 || vm.Queues > MaxQueues {
		t.Errorf("queues %d outside 0..%d", vm.Queues, MaxQueues)
	}
	if vm.MAC != "" {
		hw, err := net.ParseMAC(vm.MAC)
		if err != nil || len(hw) != 6 || hw[0]&1 == 1 {
			t.Errorf("accepted MAC %q", vm.MAC)
		}
	}
	seen := map[string]bool{}
	for i, p := range vm.Ports {
		if p.Port < 1 || p.Port > 65535 {
			t.Errorf("ports[%d] = %d outside 1..65535", i, p.Port)
		}
		proto := p.ProtocolName()
		if proto != "tcp" && proto != "udp" && proto != "sctp" {
			t.Errorf("ports[%d] protocol %q", i, p.Protocol)
		}
		key := proto + "/" + strconv.Itoa(p.Port)
		if seen[key] {
			t.Errorf("duplicate port %s accepted", key)
		}
		seen[key] = true
	}
}

func FuzzParseArgs(f *testing.F) {
	f.Fuzz(func(t *testing.T, s string) {
		p, err := ParseArgs(s)
		want, wantErr := refParseArgs(s)
		if err != nil {
			if !wantErr {
				t.Errorf("ParseArgs(%q) failed: %v", s, err)
			}
			if err.Code != types.ErrInvalidEnvironmentVariables {
				t.Errorf("error code %d, want 4: %q", err.Code, err.Msg)
			}
			if !strings.Contains(err.Msg, "CNI_ARGS") {
				t.Errorf("error %q does not name CNI_ARGS", err.Msg)
			}
			return
		}
		if wantErr {
			t.Errorf("ParseArgs(%q) accepted a pair without '='", s)
		}
		if p != want {
			t.Errorf("ParseArgs(%q) = %+v, want %+v", s, p, want)
		}
		if p.IsLauncherPod() != strings.HasPrefix(p.Name, LauncherPrefix) {
			t.Errorf("IsLauncherPod() = %t for name %q", p.IsLauncherPod(), p.Name)
		}
	})
}

// refParseArgs is an independent model of ParseArgs: the last value of each
// known key wins, empty pairs are skipped, a pair without '=' is an error.
func refParseArgs(s string) (PodArgs, bool) {
	var p PodArgs
	for len(s) > 0 {
		kv := s
		if i := strings.IndexByte(s, ';'); i >= 0 {
			kv, s = s[:i], s[i+1:]
		} else {
			s = ""
		}
		if kv == "" {
			continue
		}
		i := strings.IndexByte(kv, '=')
		if i < 0 {
			return PodArgs{}, true
		}
		k, v := kv[:i], kv[i+1:]
		switch k {
		case "K8S_POD_NAMESPACE":
			p.Namespace = v
		case "K8S_POD_NAME":
			p.Name = v
		case "K8S_POD_UID":
			p.UID = v
		case "K8S_POD_INFRA_CONTAINER_ID":
			p.InfraID = v
		case "IgnoreUnknown":
			p.IgnoreUnknown = strings.ToLower(v) == "true" || v == "1"
		}
	}
	return p, false
}

// TestFuzzParseSeeds keeps the seed corpus honest: the valid-* seeds parse,
// those of every CNI version with their prevResult, and the err-* seeds fail.
func TestFuzzParseSeeds(t *testing.T) {
	dir := filepath.Join("testdata", "fuzz", "FuzzParse")
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	versions := map[string]bool{}
	for _, e := range entries {
		raw, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		_, line, _ := strings.Cut(strings.TrimSpace(string(raw)), "\n")
		data, err := strconv.Unquote(strings.TrimSuffix(strings.TrimPrefix(line, "[]byte("), ")"))
		if err != nil {
			t.Fatalf("%s: %v", e.Name(), err)
		}
		c, perr := Parse([]byte(data))
		switch {
		case strings.HasPrefix(e.Name(), "valid-"):
			if perr != nil {
				t.Errorf("%s: %v", e.Name(), perr)
				continue
			}
			if c.PrevResult != nil {
				versions[c.CNIVersion] = true
			}
		case strings.HasPrefix(e.Name(), "err-") && perr == nil:
			t.Errorf("%s: accepted", e.Name())
		}
	}
	for _, v := range []string{"0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"} {
		if !versions[v] {
			t.Errorf("no valid seed of CNI version %s with prevResult", v)
		}
	}
}
