package announce

import (
	"bytes"
	"encoding/binary"
	"net"
	"testing"
)

func TestGARPFrame(t *testing.T) {
	mac := net.HardwareAddr{0x02, 0x76, 10, 100, 0, 11}
	ip := net.ParseIP("10.100.0.11").To4()
	f := garp(mac, ip)
	if len(f) != 42 {
		t.Fatalf("length %d", len(f))
	}
	checks := []struct {
		name      string
		got, want []byte
	}{
		{"destination", f[0:6], broadcast},
		{"source", f[6:12], mac},
		{"ethertype", f[12:14], []byte{0x08, 0x06}},
		{"opcode request", f[20:22], []byte{0, 1}},
		{"sender MAC", f[22:28], mac},
		{"sender IP", f[28:32], ip},
		{"target MAC", f[32:38], make([]byte, 6)},
		{"target IP", f[38:42], ip},
	}
	for _, c := range checks {
		if !bytes.Equal(c.got, c.want) {
			t.Errorf("%s = % x, want % x", c.name, c.got, c.want)
		}
	}
}

func TestUnsolicitedNAFrame(t *testing.T) {
	mac := net.HardwareAddr{0x02, 0x76, 0, 0, 0, 0x11}
	ip := net.ParseIP("fd00::11")
	f := unsolicitedNA(mac, ip)
	if !bytes.Equal(f[0:6], []byte{0x33, 0x33, 0, 0, 0, 1}) || binary.BigEndian.Uint16(f[12:14]) != 0x86dd {
		t.Fatalf("ethernet header % x", f[:14])
	}
	ip6, icmp := f[14:54], f[54:]
	if ip6[6] != 58 || ip6[7] != 255 || int(binary.BigEndian.Uint16(ip6[4:6])) != len(icmp) {
		t.Errorf("IPv6 header % x", ip6)
	}
	if icmp[0] != 136 || icmp[4]&0x20 == 0 || icmp[4]&0x40 != 0 {
		t.Errorf("NA type %d flags %#x: want 136 with Override, not Solicited", icmp[0], icmp[4])
	}
	if !net.IP(icmp[8:24]).Equal(ip) || icmp[24] != 2 || icmp[25] != 1 || !bytes.Equal(icmp[26:32], mac) {
		t.Errorf("target or link-layer option: % x", icmp[8:])
	}
	// The checksum is right when summing the message with it gives zero.
	if c := checksum6(net.IP(ip6[8:24]), net.IP(ip6[24:40]), icmp); c != 0 {
		t.Errorf("checksum does not verify: %#x", c)
	}
}
