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
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"
)

// Modes vmnic knows.
const (
	ModeMasquerade = "masquerade"
	ModePasst      = "passt"
	ModeBridge     = "bridge"
)

// modeKinds says of each mode whether it is chained after another plugin
// (true) or a network's main plugin: what the shim must know without the
// daemon. A new mode is one line here and one in the daemon's registry.
var modeKinds = map[string]bool{
	ModeMasquerade: true,
	ModePasst:      true,
	ModeBridge:     false,
}

// modeList is the known modes, for messages.
func modeList() string {
	names := make([]string, 0, len(modeKinds))
	for m := range modeKinds {
		names = append(names, m)
	}
	slices.Sort(names)
	return strings.Join(names, ", ")
}

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

	// Bridge mode (the main plugin of a network; masquerade and passt reject
	// these keys' effects: they are chained after the plugin that owns the
	// pod interface).
	BridgeConf

	// RuntimeConfig is filled by the runtime for the capabilities the config
	// declares; "dns" carries the pod's DNS settings.
	RuntimeConfig struct {
		DNS *RuntimeDNS `json:"dns,omitempty"`
	} `json:"runtimeConfig,omitempty"`
}

// BridgeConf are the keys of bridge mode: the OVS bridge and the port's
// VLAN settings.
type BridgeConf struct {
	// Bridge is the OVS bridge the pod's port goes to (required).
	Bridge string `json:"bridge,omitempty"`
	// VLAN makes the port an access port of that VLAN (0-4094).
	VLAN *int `json:"vlan,omitempty"`
	// Trunk lists the VLANs of a trunk port, as ids and ranges.
	Trunk []Trunk `json:"trunk,omitempty"`
	// MTU of the port and the pod interface; 0 keeps OVS's choice.
	MTU int `json:"mtu,omitempty"`
	// OVSDBSocket is the ovsdb-server endpoint ("unix:/path", "tcp:h:p");
	// empty means the daemon's (--ovsdb).
	OVSDBSocket string `json:"ovsdbSocket,omitempty"`
}

// Trunk is one entry of a trunk list: a single id, or a range minID-maxID.
type Trunk struct {
	ID    *int `json:"id,omitempty"`
	MinID *int `json:"minID,omitempty"`
	MaxID *int `json:"maxID,omitempty"`
}

// MaxVLAN is the highest usable VLAN id (4095 is reserved).
const MaxVLAN = 4094

// TrunkVLANs expands the trunk list into sorted VLAN ids.
func (b *BridgeConf) TrunkVLANs() []int {
	var out []int
	for _, t := range b.Trunk {
		lo, hi := t.bounds()
		for v := lo; v <= hi; v++ {
			out = append(out, v)
		}
	}
	slices.Sort(out)
	return out
}

func (t Trunk) bounds() (int, int) {
	if t.ID != nil {
		return *t.ID, *t.ID
	}
	return *t.MinID, *t.MaxID
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

// Chained reports whether the mode follows another plugin in the conflist
// (masquerade, passt) rather than being the network's main plugin (bridge).
func (c *Conf) Chained() bool { return modeKinds[c.Mode] }

// RequirePrevResult fails with code 7 when a chained mode has no prevResult.
func (c *Conf) RequirePrevResult() *types.Error {
	if !c.Chained() {
		return nil
	}
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
	if _, ok := modeKinds[c.Mode]; !ok {
		if c.Mode == "" {
			return Invalid("mode", "required (one of %s)", modeList())
		}
		return Invalid("mode", "unknown value %q (want one of %s)", c.Mode, modeList())
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
	if !c.Chained() {
		if err := c.validateBridge(); err != nil {
			return err
		}
	} else {
		if c.IPAM.Type != "" {
			return types.NewError(types.ErrUnsupportedField, fmt.Sprintf("ipam: mode %s takes its addresses from the primary CNI and accepts no ipam block", c.Mode), "")
		}
		if c.Bridge != "" || c.VLAN != nil || c.Trunk != nil || c.MTU != 0 || c.OVSDBSocket != "" {
			return types.NewError(types.ErrUnsupportedField, fmt.Sprintf("bridge, vlan, trunk, mtu, ovsdbSocket: only mode %s takes them, not %s", ModeBridge, c.Mode), "")
		}
	}
	if vm := c.VM(); vm != nil {
		if err := vm.validate("args.cni.vmnic"); err != nil {
			return err
		}
	}
	return nil
}

func (c *Conf) validateBridge() *types.Error {
	switch {
	case c.Bridge == "":
		return Invalid("bridge", "required in mode %s: the OVS bridge to add the port to", ModeBridge)
	case len(c.Bridge) > 15 || strings.ContainsAny(c.Bridge, "/ \t\n") || !utf8.ValidString(c.Bridge):
		return Invalid("bridge", "%q is not a valid bridge name (at most 15 bytes, no '/' or spaces)", c.Bridge)
	}
	if c.IPAM.Type == "" {
		return Invalid("ipam", "required in mode %s: an ipam block with a type (spiderpool, host-local, ...)", ModeBridge)
	}
	if strings.ContainsAny(c.IPAM.Type, "/\\") || c.IPAM.Type == "." || c.IPAM.Type == ".." {
		return Invalid("ipam.type", "%q is not a plugin name", c.IPAM.Type)
	}
	if c.VLAN != nil && (*c.VLAN < 0 || *c.VLAN > MaxVLAN) {
		return Invalid("vlan", "%d is out of range (0 to %d)", *c.VLAN, MaxVLAN)
	}
	if c.VLAN != nil && len(c.Trunk) > 0 {
		return Invalid("trunk", "an access port (vlan) takes no trunk list; set one of them")
	}
	seen := map[int]int{}
	for i, t := range c.Trunk {
		f := "trunk[" + strconv.Itoa(i) + "]"
		switch {
		case t.ID != nil && (t.MinID != nil || t.MaxID != nil):
			return Invalid(f, "set either id or minID/maxID, not both")
		case t.ID == nil && (t.MinID == nil || t.MaxID == nil):
			return Invalid(f, "needs id, or both minID and maxID")
		}
		lo, hi := t.bounds()
		if lo < 0 || lo > MaxVLAN || hi < 0 || hi > MaxVLAN {
			return Invalid(f, "VLAN %d-%d is out of range (0 to %d)", lo, hi, MaxVLAN)
		}
		if lo > hi {
			return Invalid(f, "minID %d is above maxID %d", lo, hi)
		}
		for v := lo; v <= hi; v++ {
			if j, dup := seen[v]; dup {
				return Invalid(f, "VLAN %d overlaps trunk[%d]", v, j)
			}
			seen[v] = i
		}
	}
	if c.MTU != 0 && (c.MTU < 68 || c.MTU > 65535) {
		return Invalid("mtu", "%d is out of range (68 to 65535)", c.MTU)
	}
	if c.OVSDBSocket != "" {
		rest, unix := strings.CutPrefix(c.OVSDBSocket, "unix:")
		_, tcp := strings.CutPrefix(c.OVSDBSocket, "tcp:")
		_, ssl := strings.CutPrefix(c.OVSDBSocket, "ssl:")
		switch {
		case unix && !strings.HasPrefix(rest, "/"):
			return Invalid("ovsdbSocket", "%q: a unix socket needs an absolute path", c.OVSDBSocket)
		case !unix && !tcp && !ssl:
			return Invalid("ovsdbSocket", "%q is not unix:/path, tcp:host:port or ssl:host:port", c.OVSDBSocket)
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
