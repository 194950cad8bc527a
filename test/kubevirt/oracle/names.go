package oracle

import (
	"fmt"

	v1 "kubevirt.io/api/core/v1"

	"kubevirt.io/kubevirt/pkg/network/link"
	"kubevirt.io/kubevirt/pkg/network/namescheme"
	"kubevirt.io/kubevirt/pkg/network/vmispec"
)

// NetworkNames are the names KubeVirt derives for one VMI network. Hashed
// and Ordinal are the pod interface names of its two naming schemes ("" for
// a network neither scheme names, such as a DRA network); the other names
// are derived from them ("" when the pod interface name is).
type NetworkNames struct {
	Network       string `json:"network"`
	Hashed        string `json:"hashed"`
	Ordinal       string `json:"ordinal"`
	TapHashed     string `json:"tapHashed"`
	TapOrdinal    string `json:"tapOrdinal"`
	BridgeHashed  string `json:"bridgeHashed"`
	NicHashed     string `json:"nicHashed"`
	BridgeOrdinal string `json:"bridgeOrdinal"`
	NicOrdinal    string `json:"nicOrdinal"`
	Secondary     bool   `json:"secondary"`
}

func namesCmd(args []string) (any, error) {
	fs := newFlagSet("names")
	vmiPath := fs.file("vmi", "VirtualMachineInstance JSON `file`", true)
	if err := fs.parse(args); err != nil {
		return nil, err
	}
	var vmi v1.VirtualMachineInstance
	if err := readJSON(*vmiPath, &vmi); err != nil {
		return nil, fmt.Errorf("VMI: %w", err)
	}
	return struct {
		Networks []NetworkNames `json:"networks"`
	}{networkNames(vmi.Spec.Networks)}, nil
}

func networkNames(networks []v1.Network) []NetworkNames {
	hashed := namescheme.CreateHashedNetworkNameScheme(networks)
	ordinal := namescheme.CreateOrdinalNetworkNameScheme(networks)
	out := make([]NetworkNames, 0, len(networks))
	for _, n := range networks {
		nn := NetworkNames{
			Network:   n.Name,
			Hashed:    hashed[n.Name],
			Ordinal:   ordinal[n.Name],
			Secondary: vmispec.IsSecondaryMultusNetwork(n),
		}
		if nn.Hashed != "" {
			nn.TapHashed = link.GenerateTapDeviceName(nn.Hashed, n)
			nn.BridgeHashed = link.GenerateBridgeName(nn.Hashed)
			nn.NicHashed = link.GenerateNewBridgedVmiInterfaceName(nn.Hashed)
		}
		if nn.Ordinal != "" {
			nn.TapOrdinal = link.GenerateTapDeviceName(nn.Ordinal, n)
			nn.BridgeOrdinal = link.GenerateBridgeName(nn.Ordinal)
			nn.NicOrdinal = link.GenerateNewBridgedVmiInterfaceName(nn.Ordinal)
		}
		out = append(out, nn)
	}
	return out
}
