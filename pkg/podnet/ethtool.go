package podnet

import (
	"fmt"
	"unsafe"

	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"
)

// The legacy ethtool ioctl commands for a link's transmit checksumming
// (the "tx-checksumming" feature set; include/uapi/linux/ethtool.h).
const (
	ethtoolGTxCsum = 0x16
	ethtoolSTxCsum = 0x17
)

// ethtoolValue is struct ethtool_value.
type ethtoolValue struct {
	cmd, data uint32
}

// ifreqData is struct ifreq with its ifr_data pointer.
type ifreqData struct {
	name [unix.IFNAMSIZ]byte
	data unsafe.Pointer
	_    [16]byte // the rest of the union
}

// ethtool runs one SIOCETHTOOL value command on ifName in the netns at
// netnsPath.
func ethtool(netnsPath, ifName string, cmd, data uint32) (uint32, error) {
	if len(ifName) >= unix.IFNAMSIZ {
		return 0, fmt.Errorf("interface name %q too long", ifName)
	}
	v := ethtoolValue{cmd: cmd, data: data}
	err := ns.WithNetNSPath(netnsPath, func(ns.NetNS) error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer func() { _ = unix.Close(fd) }()
		var req ifreqData
		copy(req.name[:], ifName)
		req.data = unsafe.Pointer(&v)
		if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.SIOCETHTOOL, uintptr(unsafe.Pointer(&req))); errno != 0 {
			return errno
		}
		return nil
	})
	return v.data, err
}

// SetTxChecksum turns transmit checksumming of ifName in the netns at
// netnsPath on or off. Off, the kernel fills in every checksum a packet
// leaves the link with; on (a veth's default), it may leave that to the
// receiver, which only the kernel's datapaths do: Open vSwitch's userspace
// datapath forwards such packets from a veth with the checksum unfilled.
func SetTxChecksum(netnsPath, ifName string, on bool) error {
	var data uint32
	if on {
		data = 1
	}
	if _, err := ethtool(netnsPath, ifName, ethtoolSTxCsum, data); err != nil {
		return fmt.Errorf("set tx-checksumming of %s: %w", ifName, err)
	}
	return nil
}

// TxChecksum reports whether transmit checksumming of ifName in the netns
// at netnsPath is on.
func TxChecksum(netnsPath, ifName string) (bool, error) {
	data, err := ethtool(netnsPath, ifName, ethtoolGTxCsum, 0)
	if err != nil {
		return false, fmt.Errorf("get tx-checksumming of %s: %w", ifName, err)
	}
	return data != 0, nil
}
