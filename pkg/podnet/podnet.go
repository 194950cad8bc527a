// Package podnet holds the link operations every vmnic mode shares: netlink
// handles inside a pod's network namespace that tolerate a vanished
// namespace, the owner mark written into each link vmnic creates, and the
// tap QEMU opens.
//
// The owner mark is the link's alias (IFLA_IFALIAS), "vmnic:<container>/<if>".
// Nothing whose alias is not the exact mark of the attachment is deleted.
package podnet

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/vmnic/vmnic/pkg/kubevirt"
	"github.com/vmnic/vmnic/pkg/state"
)

// AliasPrefix starts the owner mark vmnic writes into IFLA_IFALIAS of every
// link it creates.
const AliasPrefix = "vmnic:"

// Alias is the owner mark of an attachment's links.
func Alias(containerID, ifName string) string {
	a := AliasPrefix + state.Key(containerID, ifName)
	if len(a) > 255 {
		a = a[:255]
	}
	return a
}

var (
	// ErrNetnsGone: the namespace path is empty, missing or unmounted.
	ErrNetnsGone = errors.New("network namespace is gone")
	// ErrLinkGone: no link of that name.
	ErrLinkGone = errors.New("link not found")
	// ErrNotOwned: the link exists but carries another owner mark.
	ErrNotOwned = errors.New("link is not owned by this attachment")
)

// OpenHandle returns a netlink handle inside the namespace at path, and a
// function that closes it. A namespace that is gone is ErrNetnsGone.
func OpenHandle(path string) (netlinksafe.Handle, func(), error) {
	if path == "" {
		return netlinksafe.Handle{}, nil, ErrNetnsGone
	}
	nsh, err := netns.GetFromPath(path)
	if errors.Is(err, os.ErrNotExist) || errors.Is(err, unix.ENOENT) {
		return netlinksafe.Handle{}, nil, fmt.Errorf("%s: %w", path, ErrNetnsGone)
	}
	if err != nil {
		return netlinksafe.Handle{}, nil, fmt.Errorf("open netns %q: %w", path, err)
	}
	// A path whose namespace was unmounted still exists as a plain file.
	if ok, _ := IsNetns(path); !ok {
		_ = nsh.Close()
		return netlinksafe.Handle{}, nil, fmt.Errorf("%s: %w", path, ErrNetnsGone)
	}
	h, err := netlinksafe.NewHandleAt(nsh)
	if err != nil {
		_ = nsh.Close()
		return netlinksafe.Handle{}, nil, fmt.Errorf("netlink handle in %q: %w", path, err)
	}
	return h, func() { h.Close(); _ = nsh.Close() }, nil
}

// NetnsError is the CNI error for a pod netns that could not be opened. A
// namespace that no longer exists is the spec's "unknown container" (code
// 3): the sandbox is gone, and the runtime needs no cleanup for it. Any
// other failure names CNI_NETNS (code 4).
func NetnsError(err error) *types.Error {
	if errors.Is(err, ErrNetnsGone) {
		return types.NewError(types.ErrUnknownContainer, fmt.Sprintf("CNI_NETNS: the sandbox's network namespace no longer exists: %v", err), "")
	}
	return types.NewError(types.ErrInvalidEnvironmentVariables, fmt.Sprintf("CNI_NETNS: %v", err), "")
}

// RequireNetns returns NetnsError when path is not a mounted network
// namespace, and nil when it is.
func RequireNetns(path string) error {
	_, closeH, err := OpenHandle(path)
	if err != nil {
		return NetnsError(err)
	}
	closeH()
	return nil
}

// OpenHost returns a handle in the namespace at path, or in the caller's own
// namespace when path is empty (the daemon runs in the node's).
func OpenHost(path string) (netlinksafe.Handle, func(), error) {
	if path == "" {
		h, err := netlinksafe.NewHandle()
		if err != nil {
			return netlinksafe.Handle{}, nil, fmt.Errorf("netlink handle: %w", err)
		}
		return h, h.Close, nil
	}
	return OpenHandle(path)
}

// IsNetns reports whether path is a mounted network namespace (nsfs) or a
// /proc/<pid>/ns/net file.
func IsNetns(path string) (bool, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return false, err
	}
	return st.Type == unix.NSFS_MAGIC || st.Type == unix.PROC_SUPER_MAGIC, nil
}

// SetDown takes the link name down in the namespace at path; a namespace
// or link that is gone is success. For a pod interface that must not say a
// word more before the plugin that made it deletes it.
func SetDown(path, name string) error {
	h, closeH, err := OpenHandle(path)
	if errors.Is(err, ErrNetnsGone) {
		return nil
	}
	if err != nil {
		return err
	}
	defer closeH()
	l, err := h.LinkByName(name)
	if LinkGone(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("link %s in %s: %w", name, path, err)
	}
	if err := h.LinkSetDown(l); err != nil && !LinkGone(err) {
		return fmt.Errorf("set %s down in %s: %w", name, path, err)
	}
	return nil
}

// LinkGone reports whether err means the link does not exist.
func LinkGone(err error) bool {
	var nf netlink.LinkNotFoundError
	return errors.As(err, &nf) || errors.Is(err, unix.ENODEV)
}

// OwnedLink returns the link name if its alias is owner. A link with another
// alias is returned with ErrNotOwned; a missing one is ErrLinkGone.
func OwnedLink(h netlinksafe.Handle, name, owner string) (netlink.Link, error) {
	l, err := h.LinkByName(name)
	if err != nil {
		if LinkGone(err) {
			return nil, fmt.Errorf("%s: %w", name, ErrLinkGone)
		}
		return nil, fmt.Errorf("look up link %q: %w", name, err)
	}
	if l.Attrs().Alias != owner {
		return l, fmt.Errorf("%s (alias %q): %w", name, l.Attrs().Alias, ErrNotOwned)
	}
	return l, nil
}

// DeleteOwned deletes the named links that carry owner; missing links and
// links of other owners are skipped.
func DeleteOwned(h netlinksafe.Handle, owner string, names ...string) error {
	var errs []error
	for _, name := range names {
		l, err := OwnedLink(h, name, owner)
		if errors.Is(err, ErrLinkGone) || errors.Is(err, ErrNotOwned) {
			continue
		}
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if err := h.LinkDel(l); err != nil && !errors.Is(err, unix.ENODEV) {
			errs = append(errs, fmt.Errorf("delete link %q: %w", name, err))
		}
	}
	return errors.Join(errs...)
}

// TempName is the name a link of the attachment with this owner mark has
// between its creation and its rename to its final name: "vm", kind and
// ten hex digits of a hash of the mark. The kernel takes no alias when a
// link is created, so a link is created under this name, marked, and only
// then renamed; a daemon killed in between leaves a link whose name alone
// says whose it is.
func TempName(owner string, kind byte) string {
	sum := sha256.Sum256([]byte(owner))
	return "vm" + string(kind) + hex.EncodeToString(sum[:])[:10]
}

// Kinds of temporary link names.
const (
	TempBridge = 'b'
	TempTap    = 't'
	TempPeer   = 'p'
	// TempPlaceholder: the link that holds a pod interface's name and the
	// guest's MAC in bridge mode.
	TempPlaceholder = 'n'
)

// MarkAndRename marks the link created under the temporary name tmp with
// owner and renames it to name. The link must be down (a new link is).
func MarkAndRename(h netlinksafe.Handle, tmp, name, owner string) (netlink.Link, error) {
	l, err := h.LinkByName(tmp)
	if err != nil {
		return nil, fmt.Errorf("look up %q: %w", tmp, err)
	}
	if err := h.LinkSetAlias(l, owner); err != nil {
		return nil, fmt.Errorf("mark %q: %w", tmp, err)
	}
	if tmp != name {
		if err := h.LinkSetName(l, name); err != nil {
			if errors.Is(err, unix.EEXIST) {
				return nil, fmt.Errorf("rename %q to %q: %q already exists: %w", tmp, name, name, err)
			}
			return nil, fmt.Errorf("rename %q to %q: %w", tmp, name, err)
		}
	}
	return h.LinkByName(name)
}

// DeletePrivate deletes the named links if they carry owner or no mark at
// all: for names that only this attachment uses (temporary names, and
// names derived from the attachment), an unmarked link is one a killed
// daemon left between creating and marking it.
func DeletePrivate(h netlinksafe.Handle, owner string, names ...string) error {
	var errs []error
	for _, name := range names {
		l, err := h.LinkByName(name)
		if err != nil {
			if !LinkGone(err) {
				errs = append(errs, fmt.Errorf("look up link %q: %w", name, err))
			}
			continue
		}
		if a := l.Attrs().Alias; a != owner && a != "" {
			continue
		}
		if err := h.LinkDel(l); err != nil && !errors.Is(err, unix.ENODEV) {
			errs = append(errs, fmt.Errorf("delete link %q: %w", name, err))
		}
	}
	return errors.Join(errs...)
}

// TempNames are the temporary names of the attachment with owner mark.
func TempNames(owner string) []string {
	return []string{TempName(owner, TempBridge), TempName(owner, TempTap), TempName(owner, TempPeer), TempName(owner, TempPlaceholder)}
}

// Tap describes the tap QEMU opens in the pod.
type Tap struct {
	Netns  string
	Name   string
	Owner  string // the owner mark
	MTU    int
	Queues int // more than one makes it multiqueue
}

// AddTap creates the tap owned by the launcher's qemu user (under its
// temporary name, marked, then renamed), sets its MTU, attaches it to
// master and sets it up. On error the caller removes it.
func AddTap(h netlinksafe.Handle, t Tap, master netlink.Link) error {
	tmp := TempName(t.Owner, TempTap)
	tap := &netlink.Tuntap{
		LinkAttrs: netlink.LinkAttrs{Name: tmp},
		Mode:      netlink.TUNTAP_MODE_TAP,
		Flags:     netlink.TUNTAP_NO_PI | netlink.TUNTAP_VNET_HDR,
		Owner:     kubevirt.LauncherUID,
		Group:     kubevirt.LauncherGID,
	}
	if t.Queues > 1 {
		tap.Flags |= netlink.TUNTAP_MULTI_QUEUE
		tap.Queues = t.Queues
	}
	// The tap is created through /dev/net/tun, which acts in the calling
	// thread's netns: this one step has to run inside the pod netns.
	err := ns.WithNetNSPath(t.Netns, func(ns.NetNS) error {
		if err := netlink.LinkAdd(tap); err != nil {
			return err
		}
		for _, f := range tap.Fds {
			_ = f.Close()
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("create tap %q: %w", t.Name, err)
	}
	l, err := MarkAndRename(h, tmp, t.Name, t.Owner)
	if err != nil {
		_ = DeletePrivate(h, t.Owner, tmp)
		return fmt.Errorf("tap %q: %w", t.Name, err)
	}
	if t.MTU > 0 {
		if err := h.LinkSetMTU(l, t.MTU); err != nil {
			return fmt.Errorf("set MTU %d on %q: %w", t.MTU, t.Name, err)
		}
	}
	if err := h.LinkSetMaster(l, master); err != nil {
		return fmt.Errorf("attach %q to %q: %w", t.Name, master.Attrs().Name, err)
	}
	if err := h.LinkSetUp(l); err != nil {
		return fmt.Errorf("set %q up: %w", t.Name, err)
	}
	return nil
}

// AttachFilter attaches a classic BPF program to a socket: the kernel
// drops what it rejects before the reader wakes.
func AttachFilter(fd int, prog []unix.SockFilter) error {
	if err := unix.SetsockoptSockFprog(fd, unix.SOL_SOCKET, unix.SO_ATTACH_FILTER, &unix.SockFprog{Len: uint16(len(prog)), Filter: &prog[0]}); err != nil {
		return fmt.Errorf("attach a socket filter: %w", err)
	}
	return nil
}

// PacketSocket opens a packet socket for the ethertype proto bound to
// ifName in the netns at netnsPath, with a 200 ms receive timeout so that
// its reader notices its context ending. It sees frames before the bridge
// or nftables act on them.
func PacketSocket(netnsPath, ifName string, proto uint16) (int, error) {
	p := int(proto<<8 | proto>>8) // network byte order
	fd := -1
	err := ns.WithNetNSPath(netnsPath, func(ns.NetNS) error {
		ifi, err := net.InterfaceByName(ifName)
		if err != nil {
			return err
		}
		if fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, p); err != nil {
			return err
		}
		if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: uint16(p), Ifindex: ifi.Index}); err != nil {
			_ = unix.Close(fd)
			return err
		}
		return nil
	})
	if err != nil {
		return -1, fmt.Errorf("packet socket on %s in %s: %w", ifName, netnsPath, err)
	}
	tv := unix.Timeval{Usec: 200000}
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	return fd, nil
}
