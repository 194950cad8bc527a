package capabilities

import (
	"context"
	"fmt"
	"runtime"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/vmnic/vmnic/pkg/apis/v1alpha1"
)

// KernelProber finds out which kernel features work.
type KernelProber interface {
	ProbeKernel(ctx context.Context) v1alpha1.KernelFeatures
}

// NetNSKernelProber is the real KernelProber: it creates each kind of object
// in a network namespace of its own, made for the probe and gone after it,
// so the host's namespace sees nothing (not even a link event).
type NetNSKernelProber struct{}

// Names of the objects the probe creates; they live only in its namespace.
const (
	probeVeth    = "probe0"
	probePeer    = "probe1"
	probeBridge  = "probebr"
	probeMacvlan = "probemv"
	probeIpvlan  = "probeiv"
	probeTap     = "probetap"
	probeTable   = "vmnic-probe"
)

// ProbeKernel implements KernelProber. A feature whose object cannot be
// created (or whose probe could not run at all) is false, with the error in
// Errors.
func (NetNSKernelProber) ProbeKernel(ctx context.Context) v1alpha1.KernelFeatures {
	type linksDone struct {
		k   v1alpha1.KernelFeatures
		ns  netns.NsHandle
		err error
	}
	done := make(chan linksDone, 1)
	// The link checks run on an OS thread of their own that moves into a
	// new network namespace and never comes back: the goroutine ends
	// locked, so the runtime discards the thread instead of handing a
	// thread in the wrong namespace to other goroutines.
	go func() {
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			done <- linksDone{err: fmt.Errorf("create probe network namespace: %w", err)}
			return
		}
		h, err := netns.Get()
		if err != nil {
			done <- linksDone{err: fmt.Errorf("open probe network namespace: %w", err)}
			return
		}
		k := v1alpha1.KernelFeatures{Errors: map[string]string{}}
		probeLinks(&k)
		done <- linksDone{k: k, ns: h}
	}()
	var res linksDone
	select {
	case res = <-done:
	case <-ctx.Done():
		// The goroutine finishes on its own (link operations are
		// quick); its namespace goes when the handle is closed.
		go func() {
			if r := <-done; r.err == nil {
				_ = r.ns.Close()
			}
		}()
		res.err = fmt.Errorf("kernel probe: %w", ctx.Err())
	}
	if res.err != nil {
		k := v1alpha1.KernelFeatures{Errors: map[string]string{}}
		for _, f := range kernelFeatureNames {
			k.Errors[f] = res.err.Error()
		}
		return k
	}
	// The last reference to the namespace: closing it destroys the
	// namespace with whatever the probes left in it.
	defer func() { _ = res.ns.Close() }()

	k := res.k
	if err := probeNAT(int(res.ns)); err != nil {
		k.Errors["nftablesNAT"] = err.Error()
	} else {
		k.NftablesNAT = true
	}
	if len(k.Errors) == 0 {
		k.Errors = nil
	}
	return k
}

// probeLinks creates and deletes each link type in the calling thread's
// network namespace.
func probeLinks(k *v1alpha1.KernelFeatures) {
	fail := func(feature string, err error) { k.Errors[feature] = err.Error() }
	h, err := netlinksafe.NewHandle()
	if err != nil {
		err = fmt.Errorf("netlink handle: %w", err)
		for _, f := range kernelFeatureNames {
			if f != "nftablesNAT" {
				fail(f, err)
			}
		}
		return
	}
	defer h.Close()

	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: probeVeth}, PeerName: probePeer}
	if err := h.LinkAdd(veth); err != nil {
		fail("veth", err)
		// macvlan and ipvlan need a parent; without a veth there is
		// none to try them on.
		err = fmt.Errorf("no veth to put it on: %w", err)
		fail("macvlan", err)
		fail("ipvlan", err)
	} else {
		k.Veth = true
		parent, err := h.LinkByName(probeVeth)
		if err != nil {
			err = fmt.Errorf("look up veth %q: %w", probeVeth, err)
			fail("macvlan", err)
			fail("ipvlan", err)
		} else {
			k.Macvlan = try(h, &netlink.Macvlan{
				LinkAttrs: netlink.LinkAttrs{Name: probeMacvlan, ParentIndex: parent.Attrs().Index},
				Mode:      netlink.MACVLAN_MODE_BRIDGE,
			}, "macvlan", fail)
			k.Ipvlan = try(h, &netlink.IPVlan{
				LinkAttrs: netlink.LinkAttrs{Name: probeIpvlan, ParentIndex: parent.Attrs().Index},
				Mode:      netlink.IPVLAN_MODE_L2,
			}, "ipvlan", fail)
		}
		_ = h.LinkDel(veth)
	}
	k.Bridge = try(h, &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: probeBridge}}, "bridge", fail)
	// A tap is made through /dev/net/tun, in the calling thread's
	// namespace: this thread is in the probe's.
	k.Tun = try(h, &netlink.Tuntap{
		LinkAttrs: netlink.LinkAttrs{Name: probeTap},
		Mode:      netlink.TUNTAP_MODE_TAP,
		Flags:     netlink.TUNTAP_NO_PI,
	}, "tun", fail)
}

// try creates link and deletes it again.
func try(h netlinksafe.Handle, link netlink.Link, feature string, fail func(string, error)) bool {
	if err := h.LinkAdd(link); err != nil {
		fail(feature, err)
		return false
	}
	// Created is what counts; if the delete fails, the namespace's end
	// removes the link.
	_ = h.LinkDel(link)
	return true
}

// probeNAT programs an ip nat table with a masquerade rule in the namespace
// nsFd and deletes it again.
func probeNAT(nsFd int) error {
	c, err := nftables.New(nftables.WithNetNSFd(nsFd))
	if err != nil {
		return fmt.Errorf("nftables netlink connection: %w", err)
	}
	t := c.AddTable(&nftables.Table{Family: nftables.TableFamilyIPv4, Name: probeTable})
	ch := c.AddChain(&nftables.Chain{
		Name:     "postrouting",
		Table:    t,
		Type:     nftables.ChainTypeNAT,
		Hooknum:  nftables.ChainHookPostrouting,
		Priority: nftables.ChainPriorityNATSource,
	})
	c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: []expr.Any{&expr.Masq{}}})
	if err := c.Flush(); err != nil {
		return fmt.Errorf("add nat table %q with a masquerade rule: %w", probeTable, err)
	}
	// Created is what counts; if the delete fails, the namespace's end
	// removes the table.
	c.DelTable(t)
	_ = c.Flush()
	return nil
}
