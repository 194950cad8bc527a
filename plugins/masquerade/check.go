package masquerade

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/utils/sysctl"
	"github.com/vishvananda/netlink"

	"github.com/vmnic/vmnic/pkg/kubevirt"
	"github.com/vmnic/vmnic/pkg/nft"
)

// Check verifies every piece Add made and names each one that is missing or
// different.
func (p *Plugin) Check(_ context.Context, key string, s *Spec) error {
	h, closeNS, err := openHandle(s.Netns)
	if err != nil {
		return err
	}
	defer closeNS()

	var problems []string
	bad := func(format string, a ...any) { problems = append(problems, fmt.Sprintf(format, a...)) }

	if pod, err := h.LinkByName(s.PodIf); err != nil {
		bad("pod interface %q: missing", s.PodIf)
	} else if pod.Attrs().MTU != s.MTU {
		bad("pod interface %q: MTU %d, wired with %d", s.PodIf, pod.Attrs().MTU, s.MTU)
	}

	br := checkLink(h, s, s.Bridge, "bridge", bad)
	if br != nil {
		if !strings.EqualFold(br.Attrs().HardwareAddr.String(), BridgeMAC.String()) {
			bad("bridge %q: MAC %s, want %s", s.Bridge, br.Attrs().HardwareAddr, BridgeMAC)
		}
		checkAddrs(h, s, br, bad)
	}
	if tl := checkLink(h, s, s.Tap, "tuntap", bad); tl != nil {
		tap, _ := tl.(*netlink.Tuntap)
		switch {
		case tap == nil:
		case tap.Mode != netlink.TUNTAP_MODE_TAP:
			bad("tap %q: mode %s, want tap", s.Tap, tap.Mode)
		}
		if tap != nil {
			if tap.Owner != kubevirt.LauncherUID || tap.Group != kubevirt.LauncherGID {
				bad("tap %q: owner %d:%d, want %d:%d", s.Tap, tap.Owner, tap.Group, kubevirt.LauncherUID, kubevirt.LauncherGID)
			}
			mq := tap.Flags&netlink.TUNTAP_MULTI_QUEUE != 0
			if want := s.Queues > 1; mq != want {
				bad("tap %q: multiqueue %t, want %t", s.Tap, mq, want)
			}
		}
		if br != nil && tl.Attrs().MasterIndex != br.Attrs().Index {
			bad("tap %q: not attached to bridge %q", s.Tap, s.Bridge)
		}
	}

	if err := ns.WithNetNSPath(s.Netns, func(ns.NetNS) error {
		for _, kv := range s.sysctls() {
			v, err := sysctl.Sysctl(kv[0])
			if err != nil {
				bad("sysctl %s: %v", kv[0], err)
			} else if strings.TrimSpace(v) != kv[1] {
				bad("sysctl %s is %s, want %s", kv[0], strings.TrimSpace(v), kv[1])
			}
		}
		return nil
	}); err != nil {
		bad("sysctls: %v", err)
	}

	if err := nft.Check(s.Netns, s.nftSpec()); err != nil {
		bad("%v", err)
	}
	if !p.Servers.Running(key) {
		bad("DHCP servers on %q: not running", s.Bridge)
	}
	if len(problems) > 0 {
		return errors.New("vmnic masquerade CHECK failed: " + strings.Join(problems, "; "))
	}
	return nil
}

func checkLink(h netlinksafe.Handle, s *Spec, name, typ string, bad func(string, ...any)) netlink.Link {
	l, err := ownedLink(h, name, s.Owner)
	switch {
	case errors.Is(err, errLinkGone):
		bad("%s %q: missing", typ, name)
		return nil
	case errors.Is(err, errNotOwned):
		bad("%s %q: owner mark %q, want %q", typ, name, l.Attrs().Alias, s.Owner)
		return nil
	case err != nil:
		bad("%s %q: %v", typ, name, err)
		return nil
	}
	if l.Type() != typ {
		bad("link %q: type %s, want %s", name, l.Type(), typ)
	}
	if l.Attrs().MTU != s.MTU {
		bad("%s %q: MTU %d, want %d", typ, name, l.Attrs().MTU, s.MTU)
	}
	if l.Attrs().Flags&net.FlagUp == 0 {
		bad("%s %q: down", typ, name)
	}
	return l
}

func checkAddrs(h netlinksafe.Handle, s *Spec, br netlink.Link, bad func(string, ...any)) {
	have, err := h.AddrList(br, netlink.FAMILY_ALL)
	if err != nil {
		bad("bridge %q: list addresses: %v", s.Bridge, err)
		return
	}
	for _, want := range s.bridgeAddrs() {
		found := false
		for _, a := range have {
			if a.IPNet.String() == want.IPNet.String() {
				found = true
			}
		}
		if !found {
			bad("bridge %q: address %s missing", s.Bridge, want.IPNet)
		}
	}
}
