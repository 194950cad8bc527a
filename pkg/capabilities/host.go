package capabilities

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/vishvananda/netlink"

	"github.com/vmnic/vmnic/pkg/apis/v1alpha1"
)

// LinkLister lists the links of the host network namespace.
type LinkLister interface {
	LinkList() ([]netlink.Link, error)
}

// HostLinks is the real LinkLister: netlink in the caller's namespace.
type HostLinks struct{}

// LinkList implements LinkLister.
func (HostLinks) LinkList() ([]netlink.Link, error) { return netlinksafe.LinkList() }

// nicTypes are the link kinds reported as NICs.
var nicTypes = []string{"device", "bond", "vlan", "macvlan", "veth"}

// probeNICs lists the node's uplink-like links: physical devices (not the
// loopback), bonds, VLANs, macvlans, and veths whose peer is in the same
// namespace. A veth whose peer is in another namespace (IFLA_LINK_NETNSID
// set) is a pod's, and there can be hundreds of those coming and going.
func probeNICs(l LinkLister, log *slog.Logger) []v1alpha1.NIC {
	links, err := l.LinkList()
	if err != nil {
		log.Warn("list host links", "err", err)
		return nil
	}
	var out []v1alpha1.NIC
	for _, link := range links {
		a := link.Attrs()
		typ := link.Type()
		switch {
		case !slices.Contains(nicTypes, typ):
			continue
		case a.Flags&net.FlagLoopback != 0:
			continue
		case typ == "veth" && a.NetNsID >= 0:
			continue
		}
		out = append(out, v1alpha1.NIC{Name: a.Name, Type: typ, MTU: a.MTU, OperState: a.OperState.String()})
	}
	slices.SortFunc(out, func(a, b v1alpha1.NIC) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// cniConfExts are the file extensions container runtimes load.
var cniConfExts = []string{".conf", ".conflist", ".json"}

// probePrimaryCNI names the primary network's CNI: the first plugin type of
// the first config file (in the runtimes' name order) that is neither
// Multus' nor one starting with vmnic.
func probePrimaryCNI(dir string, log *slog.Logger) string {
	if dir == "" {
		return ""
	}
	t, err := primaryCNI(dir)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		// The primary CNI writes its config after its pods start.
		log.Debug("no CNI config dir yet", "dir", dir)
	case err != nil:
		log.Warn("find the primary CNI", "dir", dir, "err", err)
	}
	return t
}

func primaryCNI(dir string) (string, error) {
	entries, err := os.ReadDir(dir) // sorted by name, as the runtimes sort
	if err != nil {
		return "", fmt.Errorf("read CNI config dir %q: %w", dir, err)
	}
	for _, e := range entries {
		if e.IsDir() || !slices.Contains(cniConfExts, filepath.Ext(e.Name())) {
			continue
		}
		path := filepath.Join(dir, e.Name())
		data, err := os.ReadFile(path)
		if err != nil {
			return "", fmt.Errorf("read CNI config %q: %w", path, err)
		}
		var conf struct {
			Type    string `json:"type"`
			Plugins []struct {
				Type string `json:"type"`
			} `json:"plugins"`
		}
		if err := json.Unmarshal(data, &conf); err != nil {
			// The runtime would stop here as well.
			return "", fmt.Errorf("parse CNI config %q: %w", path, err)
		}
		first := conf.Type
		if len(conf.Plugins) > 0 {
			first = conf.Plugins[0].Type
		}
		if first == "" || first == "vmnic" || strings.HasPrefix(first, "multus") {
			continue
		}
		return first, nil
	}
	return "", nil
}
