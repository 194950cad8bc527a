package podnet

import (
	"encoding/binary"
	"testing"
)

// frame builds an Ethernet frame around an IP packet of the given
// version and protocol, with a transport header of hdr bytes (TCP's data
// offset set to it) and payload bytes of data.
func frame(version int, proto byte, hdr, payload int) []byte {
	l4 := make([]byte, hdr+payload)
	if proto == protoTCP && hdr >= 13 {
		l4[12] = byte(hdr/4) << 4
	}
	var ip []byte
	var etherType uint16
	if version == 4 {
		ip = make([]byte, 20)
		ip[0] = 0x45
		binary.BigEndian.PutUint16(ip[2:4], uint16(20+len(l4)))
		ip[9] = proto
		etherType = etherTypeIPv4
	} else {
		ip = make([]byte, 40)
		ip[0] = 0x60
		binary.BigEndian.PutUint16(ip[4:6], uint16(len(l4)))
		ip[6] = proto
		etherType = etherTypeIPv6
	}
	eth := make([]byte, 14)
	binary.BigEndian.PutUint16(eth[12:14], etherType)
	out := append(eth, ip...)
	out = append(out, l4...)
	// Ethernet pads short frames; the IP length must decide.
	return append(out, make([]byte, 6)...)
}

func TestCarriesPayload(t *testing.T) {
	later := frame(4, protoUDP, 8, 10)
	binary.BigEndian.PutUint16(later[14+6:14+8], 0x0010) // fragment offset 16
	arp := make([]byte, 60)
	binary.BigEndian.PutUint16(arp[12:14], 0x0806)
	truncated := frame(4, protoTCP, 20, 100)[:14+20+10]
	for _, c := range []struct {
		name  string
		frame []byte
		want  bool
	}{
		{"IPv4 TCP with data", frame(4, protoTCP, 20, 1), true},
		{"IPv4 TCP with options and data", frame(4, protoTCP, 32, 5), true},
		{"IPv4 TCP ACK (padded)", frame(4, protoTCP, 20, 0), false},
		{"IPv4 TCP SYN with options", frame(4, protoTCP, 40, 0), false},
		{"IPv4 UDP", frame(4, protoUDP, 8, 0), true},
		{"IPv4 ICMP", frame(4, 1, 8, 56), false},
		{"IPv4 later fragment", later, false},
		{"IPv6 TCP with data", frame(6, protoTCP, 20, 3), true},
		{"IPv6 TCP ACK", frame(6, protoTCP, 20, 0), false},
		{"IPv6 UDP", frame(6, protoUDP, 8, 4), true},
		{"ICMPv6", frame(6, 58, 8, 24), false},
		{"ARP", arp, false},
		{"truncated IPv4", truncated, false},
		{"short", []byte{1, 2, 3}, false},
	} {
		if got := CarriesPayload(c.frame); got != c.want {
			t.Errorf("%s: CarriesPayload = %v, want %v", c.name, got, c.want)
		}
	}
}

func TestIsTraffic(t *testing.T) {
	eth := func(etherType uint16, body []byte) []byte {
		f := make([]byte, 14, 14+len(body))
		binary.BigEndian.PutUint16(f[12:14], etherType)
		return append(f, body...)
	}
	icmp6 := func(typ byte) []byte {
		b := make([]byte, 48)
		b[0], b[6], b[40] = 0x60, protoICMPv6, typ
		return eth(etherTypeIPv6, b)
	}
	hopByHop := make([]byte, 48)
	hopByHop[0] = 0x60 // next header 0: an MLD report's hop-by-hop header
	for _, c := range []struct {
		name  string
		frame []byte
		want  bool
	}{
		{"IPv4 TCP ACK", frame(4, protoTCP, 20, 0), true},
		{"IPv4 UDP", frame(4, protoUDP, 8, 4), true},
		{"IPv4 ICMP", frame(4, protoICMP, 8, 56), true},
		{"IPv4 IGMP", frame(4, 2, 8, 0), false},
		{"IPv6 TCP", frame(6, protoTCP, 20, 0), true},
		{"ICMPv6 echo reply", icmp6(129), true},
		{"ICMPv6 unreachable", icmp6(1), true},
		{"neighbour solicitation", icmp6(135), false},
		{"neighbour advertisement", icmp6(136), false},
		{"router solicitation", icmp6(133), false},
		{"MLD report (hop-by-hop)", eth(etherTypeIPv6, hopByHop), false},
		{"ARP", eth(etherTypeARP, make([]byte, 28)), false},
		{"RARP", eth(etherTypeRARP, make([]byte, 28)), false},
		{"short", []byte{1, 2}, false},
	} {
		if got := IsTraffic(c.frame); got != c.want {
			t.Errorf("%s: IsTraffic = %v, want %v", c.name, got, c.want)
		}
	}
	if got := Describe(frame(4, protoTCP, 20, 1)); got != "IPv4 TCP 0>0" {
		t.Errorf("Describe = %q", got)
	}
}

func TestIsEchoRequest(t *testing.T) {
	echo := frame(4, protoICMP, 8, 56)
	echo[14+20] = 8
	reply := frame(4, protoICMP, 8, 56) // type 0
	echo6 := frame(6, protoICMPv6, 8, 56)
	echo6[14+40] = 128
	if !IsEchoRequest(echo) || !IsEchoRequest(echo6) {
		t.Error("an echo request not recognised")
	}
	if IsEchoRequest(reply) || IsEchoRequest(frame(4, protoUDP, 8, 4)) {
		t.Error("an echo reply or UDP taken for an echo request")
	}
}
