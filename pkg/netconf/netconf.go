// Package netconf parses and validates vmnic's CNI network configuration and
// the CNI_ARGS that come with a request. Every rejection is a *types.Error
// carrying the CNI error code and naming the offending field, so that a
// user reading kubelet's event knows what to fix.
package netconf

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"
)

// Modes vmnic knows.
const (
	ModeMasquerade = "masquerade"
	ModePasst      = "passt"
	ModeBridge     = "bridge"
)

// Defaults for the shim's knobs.
const (
	DefaultSocket       = "/run/vmnic/vmnic.sock"
	DefaultSpoolDir     = "/var/lib/vmnic/spool"
	DefaultReadyTimeout = 10 * time.Second
	// MaxReadyTimeout keeps a misconfigured network from wedging a CRI call,
	// whose own deadline is 2-4 minutes.
	MaxReadyTimeout = 2 * time.Minute
	// MaxQueues is the kernel's limit of queues on one tap (MAX_TAP_QUEUES).
	MaxQueues = 256
	// MaxConfigSize bounds what a plugin accepts on stdin; real configs are
	// a few KiB, prevResult included.
	MaxConfigSize = 1 << 20
)

// Conf is vmnic's network configuration: an entry of a conflist, for example
// {"type":"vmnic","mode":"masquerade"} chained after the primary CNI.
type Conf struct {
	types.NetConf

	// Mode is masquerade, passt or bridge.
	Mode string `json:"mode"`
	// Socket is the daemon's unix socket.
	Socket string `json:"socket,omitempty"`
	// SpoolDir is where the shim leaves DELs the daemon could not take.
	SpoolDir string `json:"spoolDir,omitempty"`
	// ReadyTimeout bounds how long ADD, CHECK, STATUS and GC wait for the
	// daemon before failing with code 11 (try again later). JSON: "10s" or a
	// number of seconds.
	ReadyTimeout    time.Duration   `json:"-"`
	RawReadyTimeout json.RawMessage `json:"readyTimeout,omitempty"`

	// Args carries the VM facts when no Kubernetes API server is used
	// (standalone daemon): {"args":{"cni":{"vmnic":{...}}}}.
	Args *struct {
		CNI *struct {
			VM *VMArgs `json:"vmnic,omitempty"`
		} `json:"cni,omitempty"`
	} `json:"args,omitempty"`

	// RuntimeConfig is filled by the runtime for the capabilities the config
	// declares; "dns" carries the pod's DNS settings.
	RuntimeConfig struct {
		DNS *RuntimeDNS `json:"dns,omitempty"`
	} `json:"runtimeConfig,omitempty"`
}

// RuntimeDNS is the "dns" capability as containerd and CRI-O pass it: the
// pod's resolv.conf settings from kubelet.
type RuntimeDNS struct {
	Servers  []string `json:"servers,omitempty"`
	Searches []string `json:"searches,omitempty"`
	Options  []string `json:"options,omitempty"`
}

// VMArgs are the VM facts of a standalone setup.
type VMArgs struct {
	// Name of the VM; also handed to the guest as its DHCP host name.
	Name string `json:"name,omitempty"`
	// MAC of the guest NIC; when set, the DHCP servers answer only it.
	MAC string `json:"mac,omitempty"`
	// Ports forwarded from the pod interface to the guest; empty means all.
	Ports []Port `json:"ports,omitempty"`
	// Queues of the tap; more than one makes it multiqueue.
	Queues int `json:"queues,omitempty"`
}

// Port is a forwarded port, as in a VMI interface's ports list.
type Port struct {
	Name     string `json:"name,omitempty"`
	Protocol string `json:"protocol,omitempty"`
	Port     int    `json:"port"`
}

// parseDuration reads "10s" or a number of seconds.
func parseDuration(b json.RawMessage) (time.Duration, error) {
	if len(b) > 0 && b[0] == '"' {
		var s string
		if err := json.Unmarshal(b, &s); err != nil {
			return 0, err
		}
		return time.ParseDuration(s)
	}
	var secs float64
	if err := json.Unmarshal(b, &secs); err != nil {
		return 0, fmt.Errorf("want a duration like \"10s\" or a number of seconds, got %s", b)
	}
	return time.Duration(secs * float64(time.Second)), nil
}

// VM returns the standalone VM facts, or nil.
func (c *Conf) VM() *VMArgs {
	if c.Args == nil || c.Args.CNI == nil {
		return nil
	}
	return c.Args.CNI.VM
}

// Invalid returns a CNI "invalid network config" error naming field.
func Invalid(field, format string, a ...any) *types.Error {
	return types.NewError(types.ErrInvalidNetworkConfig, field+": "+fmt.Sprintf(format, a...), "")
}

// Parse decodes and validates stdin data. prevResult is parsed into
// Conf.PrevResult when present; whether it is required depends on the verb
// and is checked by RequirePrevResult.
func Parse(data []byte) (*Conf, *types.Error) {
	if len(data) > MaxConfigSize {
		return nil, types.NewError(types.ErrDecodingFailure, fmt.Sprintf("network config: %d bytes exceeds the limit of %d", len(data), MaxConfigSize), "")
	}
	c := &Conf{}
	dec := json.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(c); err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, "network config: "+describeJSONError(err), "")
	}
	c.setDefaults()
	if err := c.validate(); err != nil {
		return nil, err
	}
	if c.RawPrevResult != nil {
		if err := version.ParsePrevResult(&c.NetConf); err != nil {
			return nil, types.NewError(types.ErrDecodingFailure, "prevResult: "+err.Error(), "")
		}
	}
	return c, nil
}

// RequirePrevResult fails with code 7 when a chained mode has no prevResult.
func (c *Conf) RequirePrevResult() *types.Error {
	if c.PrevResult == nil {
		return Invalid("prevResult", "required: vmnic %s is a chained plugin and must follow the primary CNI in the conflist", c.Mode)
	}
	return nil
}

func (c *Conf) setDefaults() {
	if c.Socket == "" {
		c.Socket = DefaultSocket
	}
	if c.SpoolDir == "" {
		c.SpoolDir = DefaultSpoolDir
	}
	c.ReadyTimeout = DefaultReadyTimeout
}

func (c *Conf) validate() *types.Error {
	if c.Name == "" {
		return Invalid("name", "required")
	}
	switch c.Mode {
	case ModeMasquerade:
	case ModePasst, ModeBridge:
		return types.NewError(types.ErrInvalidNetworkConfig, fmt.Sprintf("mode: %q is not available in this vmnic version (supported: %s)", c.Mode, ModeMasquerade), "")
	case "":
		return Invalid("mode", "required (one of %s, %s, %s)", ModeMasquerade, ModePasst, ModeBridge)
	default:
		return Invalid("mode", "unknown value %q (want %s, %s or %s)", c.Mode, ModeMasquerade, ModePasst, ModeBridge)
	}
	if !strings.HasPrefix(c.Socket, "/") {
		return Invalid("socket", "%q is not an absolute path", c.Socket)
	}
	if !strings.HasPrefix(c.SpoolDir, "/") {
		return Invalid("spoolDir", "%q is not an absolute path", c.SpoolDir)
	}
	if len(c.RawReadyTimeout) > 0 {
		d, err := parseDuration(c.RawReadyTimeout)
		if err != nil {
			return Invalid("readyTimeout", "%v", err)
		}
		if d <= 0 || d > MaxReadyTimeout {
			return Invalid("readyTimeout", "%s is out of range (above 0, at most %s)", d, MaxReadyTimeout)
		}
		c.ReadyTimeout = d
	}
	if c.IPAM.Type != "" {
		return types.NewError(types.ErrUnsupportedField, fmt.Sprintf("ipam: mode %s takes its addresses from the primary CNI and accepts no ipam block", c.Mode), "")
	}
	if vm := c.VM(); vm != nil {
		if err := vm.validate("args.cni.vmnic"); err != nil {
			return err
		}
	}
	return nil
}

func (vm *VMArgs) validate(field string) *types.Error {
	if vm.MAC != "" {
		hw, err := net.ParseMAC(vm.MAC)
		if err != nil || len(hw) != 6 {
			return Invalid(field+".mac", "%q is not an Ethernet MAC address", vm.MAC)
		}
		if hw[0]&1 == 1 {
			return Invalid(field+".mac", "%q is a multicast address", vm.MAC)
		}
	}
	if vm.Queues < 0 || vm.Queues > MaxQueues {
		return Invalid(field+".queues", "%d is out of range (0 to %d)", vm.Queues, MaxQueues)
	}
	seen := map[string]bool{}
	for i, p := range vm.Ports {
		f := field + ".ports[" + strconv.Itoa(i) + "]"
		if p.Port < 1 || p.Port > 65535 {
			return Invalid(f+".port", "%d is out of range (1 to 65535)", p.Port)
		}
		proto := strings.ToLower(p.Protocol)
		if proto == "" {
			proto = "tcp"
		}
		switch proto {
		case "tcp", "udp", "sctp":
		default:
			return Invalid(f+".protocol", "%q is not TCP, UDP or SCTP", p.Protocol)
		}
		key := proto + "/" + strconv.Itoa(p.Port)
		if seen[key] {
			return Invalid(f, "duplicate port %s", key)
		}
		seen[key] = true
	}
	return nil
}

// ProtocolName returns the lower-case protocol of p, tcp when unset.
func (p Port) ProtocolName() string {
	if p.Protocol == "" {
		return "tcp"
	}
	return strings.ToLower(p.Protocol)
}

func describeJSONError(err error) string {
	var te *json.UnmarshalTypeError
	if errors.As(err, &te) {
		field := te.Field
		if field == "" {
			field = "(top level)"
		}
		return fmt.Sprintf("field %s: cannot use JSON %s as %s", field, te.Value, te.Type)
	}
	return err.Error()
}
