package ovsdb

import (
	"github.com/ovn-org/libovsdb/model"
)

// Table names in the Open_vSwitch database.
const (
	DatabaseName     = "Open_vSwitch"
	OpenvSwitchTable = "Open_vSwitch"
	BridgeTable      = "Bridge"
	PortTable        = "Port"
	InterfaceTable   = "Interface"
)

// The models below are partial: they carry only the columns vmnic reads or
// writes (libovsdb allows that; the cache ignores the other columns, and the
// monitor asks for these columns only). Go types follow libovsdb's mapping of
// the vswitch schema (8.x): optional scalars (min 0, max 1) are pointers,
// sets are slices, maps are maps, UUID references are strings.

// OpenvSwitch is the root row of the database.
type OpenvSwitch struct {
	UUID          string            `ovsdb:"_uuid"`
	Bridges       []string          `ovsdb:"bridges"`
	NextCfg       int               `ovsdb:"next_cfg"`
	CurCfg        int               `ovsdb:"cur_cfg"`
	ExternalIDs   map[string]string `ovsdb:"external_ids"`
	DatapathTypes []string          `ovsdb:"datapath_types"`
	OVSVersion    *string           `ovsdb:"ovs_version"`
	IfaceTypes    []string          `ovsdb:"iface_types"`
}

// Bridge is a row of the Bridge table.
type Bridge struct {
	UUID         string            `ovsdb:"_uuid"`
	Name         string            `ovsdb:"name"`
	Ports        []string          `ovsdb:"ports"`
	DatapathType string            `ovsdb:"datapath_type"`
	ExternalIDs  map[string]string `ovsdb:"external_ids"`
}

// Port is a row of the Port table.
type Port struct {
	UUID        string            `ovsdb:"_uuid"`
	Name        string            `ovsdb:"name"`
	Interfaces  []string          `ovsdb:"interfaces"`
	Tag         *int              `ovsdb:"tag"`
	Trunks      []int             `ovsdb:"trunks"`
	VLANMode    *string           `ovsdb:"vlan_mode"`
	ExternalIDs map[string]string `ovsdb:"external_ids"`
}

// Interface is a row of the Interface table. MTU, AdminState and LinkState
// are ephemeral: ovs-vswitchd fills them in.
type Interface struct {
	UUID        string            `ovsdb:"_uuid"`
	Name        string            `ovsdb:"name"`
	Type        string            `ovsdb:"type"`
	MTURequest  *int              `ovsdb:"mtu_request"`
	MTU         *int              `ovsdb:"mtu"`
	Ofport      *int              `ovsdb:"ofport"`
	Error       *string           `ovsdb:"error"`
	ExternalIDs map[string]string `ovsdb:"external_ids"`
	AdminState  *string           `ovsdb:"admin_state"`
	LinkState   *string           `ovsdb:"link_state"`
}

// DatabaseModel is the client model of the tables above.
func DatabaseModel() (model.ClientDBModel, error) {
	return model.NewClientDBModel(DatabaseName, map[string]model.Model{
		OpenvSwitchTable: &OpenvSwitch{},
		BridgeTable:      &Bridge{},
		PortTable:        &Port{},
		InterfaceTable:   &Interface{},
	})
}
