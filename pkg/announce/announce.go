// Package announce makes a host's addresses known at a new place on a
// link: gratuitous ARP (RFC 5227 announcement: an ARP request whose sender
// and target are the address) and unsolicited IPv6 Neighbor Advertisements
// (RFC 4861 7.2.6, Override set), sent from inside a pod's network
// namespace on one interface through a packet socket, so they leave by that
// interface even when it is a bridge port and its own stack is filtered.
package announce

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"
)

// Announcement is what to announce, where.
type Announcement struct {
	Netns  string           // the namespace holding IfName
	IfName string           // the interface the frames leave by
	MAC    net.HardwareAddr // the owner of the addresses (the frames' source)
	IPs    []net.IP
	// Delays are when each round goes out after the first (default: 50ms,
	// 100ms, then 1.1s and 2.2s, past the 1 s locktime within which Linux
	// peers ignore a new link-layer address for a neighbour).
	Delays []time.Duration
}

var defaultDelays = []time.Duration{50 * time.Millisecond, 100 * time.Millisecond, 1100 * time.Millisecond, 2200 * time.Millisecond}

// Send sends the announcements; it returns after the first round and sends
// the others in the background.
func Send(a Announcement) error {
	if len(a.MAC) != 6 {
		return fmt.Errorf("announce: MAC %q is not an Ethernet address", a.MAC)
	}
	if a.Delays == nil {
		a.Delays = defaultDelays
	}
	var fd, ifindex int
	err := ns.WithNetNSPath(a.Netns, func(ns.NetNS) error {
		ifi, err := net.InterfaceByName(a.IfName)
		if err != nil {
			return err
		}
		ifindex = ifi.Index
		fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, 0)
		return err
	})
	if err != nil {
		return fmt.Errorf("announce on %s in %s: %w", a.IfName, a.Netns, err)
	}
	var frames [][]byte
	for _, ip := range a.IPs {
		if v4 := ip.To4(); v4 != nil {
			frames = append(frames, garp(a.MAC, v4))
		} else {
			frames = append(frames, unsolicitedNA(a.MAC, ip.To16()))
		}
	}
	send := func() error {
		var errs []error
		for _, f := range frames {
			to := &unix.SockaddrLinklayer{Ifindex: ifindex, Halen: 6, Protocol: htons(binary.BigEndian.Uint16(f[12:14]))}
			copy(to.Addr[:], f[0:6])
			if err := unix.Sendto(fd, f, 0, to); err != nil {
				errs = append(errs, err)
			}
		}
		return errors.Join(errs...)
	}
	if err := send(); err != nil {
		_ = unix.Close(fd)
		return fmt.Errorf("announce on %s: %w", a.IfName, err)
	}
	go func() {
		defer func() { _ = unix.Close(fd) }()
		start := time.Now()
		for _, d := range a.Delays {
			time.Sleep(time.Until(start.Add(d)))
			_ = send()
		}
	}()
	return nil
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

var broadcast = net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}

// garp is an Ethernet frame holding an ARP request announcing ip at mac.
func garp(mac net.HardwareAddr, ip net.IP) []byte {
	f := make([]byte, 0, 42)
	f = append(f, broadcast...)
	f = append(f, mac...)
	f = binary.BigEndian.AppendUint16(f, unix.ETH_P_ARP)
	f = binary.BigEndian.AppendUint16(f, 1)             // hardware: Ethernet
	f = binary.BigEndian.AppendUint16(f, unix.ETH_P_IP) // protocol: IPv4
	f = append(f, 6, 4)
	f = binary.BigEndian.AppendUint16(f, 1) // request
	f = append(f, mac...)
	f = append(f, ip...)
	f = append(f, 0, 0, 0, 0, 0, 0)
	return append(f, ip...)
}

// unsolicitedNA is an Ethernet frame holding a Neighbor Advertisement for ip
// at mac, to all nodes, with the Override flag and the target's link-layer
// address.
func unsolicitedNA(mac net.HardwareAddr, ip net.IP) []byte {
	allNodes := net.ParseIP("ff02::1")
	icmp := make([]byte, 0, 32)
	icmp = append(icmp, 136, 0, 0, 0)  // type NA, code, checksum
	icmp = append(icmp, 0x20, 0, 0, 0) // flags: Override
	icmp = append(icmp, ip...)
	icmp = append(icmp, 2, 1) // option: target link-layer address, 8 bytes
	icmp = append(icmp, mac...)
	binary.BigEndian.PutUint16(icmp[2:], checksum6(ip, allNodes, icmp))

	f := make([]byte, 0, 14+40+len(icmp))
	f = append(f, 0x33, 0x33, 0, 0, 0, 1) // ff02::1's multicast MAC
	f = append(f, mac...)
	f = binary.BigEndian.AppendUint16(f, unix.ETH_P_IPV6)
	f = append(f, 0x60, 0, 0, 0)
	f = binary.BigEndian.AppendUint16(f, uint16(len(icmp)))
	f = append(f, unix.IPPROTO_ICMPV6, 255) // next header, hop limit 255
	f = append(f, ip...)                    // source: the address itself
	f = append(f, allNodes...)
	return append(f, icmp...)
}

// checksum6 is the ICMPv6 checksum over the IPv6 pseudo-header and msg.
func checksum6(src, dst net.IP, msg []byte) uint16 {
	var sum uint32
	add := func(b []byte) {
		for i := 0; i+1 < len(b); i += 2 {
			sum += uint32(binary.BigEndian.Uint16(b[i:]))
		}
		if len(b)%2 == 1 {
			sum += uint32(b[len(b)-1]) << 8
		}
	}
	add(src.To16())
	add(dst.To16())
	var l [8]byte
	binary.BigEndian.PutUint32(l[0:], uint32(len(msg)))
	l[7] = unix.IPPROTO_ICMPV6
	add(l[:])
	add(msg)
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}
