package passt

import (
	"encoding/binary"
	"net"
	"testing"

	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

func ether(src net.HardwareAddr, typ uint16, payload []byte) []byte {
	f := make([]byte, 14, 14+len(payload))
	copy(f[0:6], []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	copy(f[6:12], src)
	binary.BigEndian.PutUint16(f[12:14], typ)
	return append(f, payload...)
}

func arp(op uint16, sha net.HardwareAddr, spa, tpa net.IP) []byte {
	p := []byte{0, 1, 8, 0, 6, 4, 0, 0}
	binary.BigEndian.PutUint16(p[6:8], op)
	p = append(p, sha...)
	p = append(p, spa.To4()...)
	p = append(p, make([]byte, 6)...)
	return append(p, tpa.To4()...)
}

func icmp6(typ byte, target net.IP) []byte {
	ip := make([]byte, 40)
	ip[0] = 0x60
	ip[6] = unix.IPPROTO_ICMPV6
	ip[7] = 255
	msg := append([]byte{typ, 0, 0, 0, 0x20, 0, 0, 0}, target.To16()...)
	binary.BigEndian.PutUint16(ip[4:6], uint16(len(msg)))
	return append(ip, msg...)
}

// TestClaim: which frames claim an address for their sender (the target's
// underlay plugin announcing the address a migration source holds).
func TestClaim(t *testing.T) {
	mac := net.HardwareAddr{0x02, 0, 0, 0, 0, 9}
	v4, v6 := net.ParseIP("10.50.0.20"), net.ParseIP("fd00:50::20")
	cases := []struct {
		name   string
		frame  []byte
		want   net.IP
		wantV6 bool
	}{
		{"gratuitous ARP request", ether(mac, unix.ETH_P_ARP, arp(1, mac, v4, v4)), v4, false},
		{"ARP reply", ether(mac, unix.ETH_P_ARP, arp(2, mac, v4, net.ParseIP("10.50.0.1"))), v4, false},
		{"ARP request from another address", ether(mac, unix.ETH_P_ARP, arp(1, mac, net.ParseIP("10.50.0.1"), v4)), net.ParseIP("10.50.0.1"), false},
		{"neighbour advertisement", ether(mac, unix.ETH_P_IPV6, icmp6(136, v6)), v6, true},
		{"neighbour solicitation", ether(mac, unix.ETH_P_IPV6, icmp6(135, v6)), nil, false},
		{"truncated ARP", ether(mac, unix.ETH_P_ARP, arp(1, mac, v4, v4)[:20]), nil, false},
		{"truncated advertisement", ether(mac, unix.ETH_P_IPV6, icmp6(136, v6)[:50]), nil, false},
		{"IPv4", ether(mac, unix.ETH_P_IP, make([]byte, 40)), nil, false},
	}
	// The socket filter the watch attaches, run in x/net's BPF VM.
	raw := make([]bpf.Instruction, len(claimFilter))
	for i, f := range claimFilter {
		raw[i] = bpf.RawInstruction{Op: f.Code, Jt: f.Jt, Jf: f.Jf, K: f.K}.Disassemble()
	}
	vm, err := bpf.NewVM(raw)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range cases {
		got, v6got := claim(c.frame)
		if !got.Equal(c.want) || (c.want != nil && v6got != c.wantV6) {
			t.Errorf("%s: claim = %v (v6 %v), want %v (v6 %v)", c.name, got, v6got, c.want, c.wantV6)
		}
		n, err := vm.Run(c.frame)
		if err != nil {
			t.Fatal(err)
		}
		if passes := n > 0; c.want != nil && !passes {
			t.Errorf("%s: the socket filter drops a claim", c.name)
		}
	}
	// The guest's traffic never wakes the watch.
	for name, f := range map[string][]byte{
		"IPv4":                   ether(mac, unix.ETH_P_IP, make([]byte, 40)),
		"IPv6 TCP":               ether(mac, unix.ETH_P_IPV6, append([]byte{0x60, 0, 0, 0, 0, 20, unix.IPPROTO_TCP, 64}, make([]byte, 52)...)),
		"neighbour solicitation": ether(mac, unix.ETH_P_IPV6, icmp6(135, v6)),
		"echo request":           ether(mac, unix.ETH_P_IPV6, icmp6(128, v6)),
	} {
		if n, err := vm.Run(f); err != nil || n != 0 {
			t.Errorf("%s: the socket filter passes %d bytes (%v), want none", name, n, err)
		}
	}
}

// TestAnnounced: a source reasserts IPv6 only in answer to an IPv6 claim.
func TestAnnounced(t *testing.T) {
	s := &Spec{IPs: []string{"10.50.0.20", "fd00:50::20"}}
	if got := announced(s, false); len(got) != 1 || !got[0].Equal(net.ParseIP("10.50.0.20")) {
		t.Errorf("IPv4 reassertion announces %v", got)
	}
	if got := announced(s, true); len(got) != 2 {
		t.Errorf("release or IPv6 reassertion announces %v, want both", got)
	}
}
