package podnet

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"golang.org/x/sys/unix"
)

// Frame is one frame a packet socket saw: its bytes from the Ethernet
// header on, and whether the interface sent it (PACKET_OUTGOING) or
// received it. On a tap, received frames are those QEMU wrote: the guest's.
type Frame struct {
	Data     []byte
	Outgoing bool
}

// WatchFrames calls seen with each frame on ifName (in the netns at
// netnsPath) that keep accepts, and the time it arrived, until seen
// returns false (nil is returned), ctx ends, or the interface goes (an
// error). It sees the frames before a bridge or nftables drops them.
func WatchFrames(ctx context.Context, netnsPath, ifName string, keep func(Frame) bool, seen func(f Frame, at time.Time) bool) error {
	fd, err := PacketSocket(netnsPath, ifName, unix.ETH_P_ALL)
	if err != nil {
		return err
	}
	defer func() { _ = unix.Close(fd) }()
	buf := make([]byte, 2048)
	for ctx.Err() == nil {
		n, from, err := unix.Recvfrom(fd, buf, 0)
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return fmt.Errorf("watch %s: %w", ifName, err)
		}
		at := time.Now()
		ll, _ := from.(*unix.SockaddrLinklayer)
		f := Frame{Data: buf[:n], Outgoing: ll != nil && ll.Pkttype == unix.PACKET_OUTGOING}
		if keep(f) && !seen(f, at) {
			return nil
		}
	}
	return ctx.Err()
}

// IsTraffic reports whether an Ethernet frame carries traffic: an IPv4
// or IPv6 packet of TCP, UDP or ICMP (ICMPv6 errors and echo). What a
// host sends only to keep its network working is not traffic: ARP, RARP
// (QEMU's announcement of a VM that resumed after a migration), neighbour
// discovery and multicast listener reports (whose hop-by-hop header is
// not followed), IGMP.
func IsTraffic(frame []byte) bool {
	if len(frame) < 14 {
		return false
	}
	ip := frame[14:]
	switch binary.BigEndian.Uint16(frame[12:14]) {
	case etherTypeIPv4:
		if len(ip) < 20 {
			return false
		}
		switch ip[9] {
		case protoTCP, protoUDP, protoICMP:
			return true
		}
	case etherTypeIPv6:
		if len(ip) < 40 {
			return false
		}
		switch ip[6] {
		case protoTCP, protoUDP:
			return true
		case protoICMPv6:
			// Errors (1-4), echo request and reply (128, 129).
			return len(ip) > 40 && (ip[40] < 128 || ip[40] == 128 || ip[40] == 129)
		}
	}
	return false
}

// Describe names a frame for a log line: its ethertype and, for IP, the
// protocol and ports.
func Describe(frame []byte) string {
	if len(frame) < 14 {
		return "runt"
	}
	et := binary.BigEndian.Uint16(frame[12:14])
	ip := frame[14:]
	var proto byte
	var l4 []byte
	switch {
	case et == etherTypeIPv4 && len(ip) >= 20:
		ihl := int(ip[0]&0x0f) * 4
		if ihl < 20 || len(ip) < ihl {
			return "IPv4"
		}
		proto, l4 = ip[9], ip[ihl:]
	case et == etherTypeIPv6 && len(ip) >= 40:
		proto, l4 = ip[6], ip[40:]
	case et == etherTypeARP:
		return "ARP"
	case et == etherTypeRARP:
		return "RARP"
	default:
		return fmt.Sprintf("ethertype %#04x", et)
	}
	family := "IPv4"
	if et == etherTypeIPv6 {
		family = "IPv6"
	}
	switch {
	case (proto == protoTCP || proto == protoUDP) && len(l4) >= 4:
		name := map[byte]string{protoTCP: "TCP", protoUDP: "UDP"}[proto]
		return fmt.Sprintf("%s %s %d>%d", family, name, binary.BigEndian.Uint16(l4[0:2]), binary.BigEndian.Uint16(l4[2:4]))
	case (proto == protoICMP || proto == protoICMPv6) && len(l4) >= 1:
		return fmt.Sprintf("%s ICMP type %d", family, l4[0])
	}
	return fmt.Sprintf("%s protocol %d", family, proto)
}

// IsEchoRequest reports whether an Ethernet frame is an ICMP or ICMPv6
// echo request (a ping). A pod's kernel answers pings but does not send
// them: from a passt pod, one comes from the guest (passt's ping socket).
func IsEchoRequest(frame []byte) bool {
	if len(frame) < 14 {
		return false
	}
	ip := frame[14:]
	switch binary.BigEndian.Uint16(frame[12:14]) {
	case etherTypeIPv4:
		if len(ip) < 20 || ip[9] != protoICMP {
			return false
		}
		ihl := int(ip[0]&0x0f) * 4
		return ihl >= 20 && len(ip) > ihl && ip[ihl] == 8
	case etherTypeIPv6:
		return len(ip) > 40 && ip[6] == protoICMPv6 && ip[40] == 128
	}
	return false
}

// Ethernet and IP numbers CarriesPayload reads.
const (
	etherTypeRARP = 0x8035
	etherTypeARP  = 0x0806
	etherTypeIPv4 = 0x0800
	etherTypeIPv6 = 0x86dd
	protoICMP     = 1
	protoTCP      = 6
	protoUDP      = 17
	protoICMPv6   = 58
)

// CarriesPayload reports whether an Ethernet frame is an IPv4 or IPv6
// packet with transport payload: a TCP segment with data, or a UDP
// datagram. A socket proxy such as passt makes these only for what its
// guest sends; the kernel's own answers (handshakes, ACKs, resets, ICMP,
// ARP, neighbour discovery) carry none. IPv6 extension headers are not
// followed (such a packet is not counted).
func CarriesPayload(frame []byte) bool {
	if len(frame) < 14 {
		return false
	}
	ip := frame[14:]
	var proto byte
	var l4 []byte
	switch binary.BigEndian.Uint16(frame[12:14]) {
	case etherTypeIPv4:
		if len(ip) < 20 || ip[0]>>4 != 4 {
			return false
		}
		ihl := int(ip[0]&0x0f) * 4
		total := int(binary.BigEndian.Uint16(ip[2:4]))
		if ihl < 20 || total < ihl || total > len(ip) {
			return false
		}
		if binary.BigEndian.Uint16(ip[6:8])&0x1fff != 0 {
			return false // a later fragment: its first one counted
		}
		proto, l4 = ip[9], ip[ihl:total]
	case etherTypeIPv6:
		if len(ip) < 40 || ip[0]>>4 != 6 {
			return false
		}
		plen := int(binary.BigEndian.Uint16(ip[4:6]))
		if 40+plen > len(ip) {
			return false
		}
		proto, l4 = ip[6], ip[40:40+plen]
	default:
		return false
	}
	switch proto {
	case protoUDP:
		return len(l4) >= 8
	case protoTCP:
		if len(l4) < 20 {
			return false
		}
		off := int(l4[12]>>4) * 4
		return off >= 20 && len(l4) > off
	}
	return false
}
