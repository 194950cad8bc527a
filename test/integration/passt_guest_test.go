package integration

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/insomniacslk/dhcp/dhcpv4"
)

// passtGuest is the guest's NIC behind passt, speaking passt's own socket
// protocol: QEMU's stream netdev, every Ethernet frame preceded by its
// length (32 bits, big-endian). It stands in for a booted guest where one
// costs too much: inside the node VM (test/nodevm) QEMU would run under
// QEMU's own emulation. What passt sees is the same: a guest that takes its
// address by DHCP and sends IPv4 from it.
type passtGuest struct {
	conn  net.Conn
	mac   net.HardwareAddr
	ip    net.IP           // from passt's DHCP
	gwMAC net.HardwareAddr // passt's side of the link
}

// passtDir is a directory for passt sockets that passt, which drops to
// nobody before it binds, may write.
func passtDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "passt")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o1777); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	return dir
}

func dialPasstGuest(t testing.TB, sock string, mac net.HardwareAddr) *passtGuest {
	t.Helper()
	// passt binds the socket, then listens on it: a connection in between
	// is refused (startPasst waits only for the file).
	var c net.Conn
	var err error
	for deadline := time.Now().Add(5 * time.Second); ; {
		c, err = net.Dial("unix", sock)
		if err == nil || !errors.Is(err, syscall.ECONNREFUSED) || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("connect to passt's socket %s: %v", sock, err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return &passtGuest{conn: c, mac: mac}
}

func (g *passtGuest) send(frame []byte) error {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(frame)))
	_, err := g.conn.Write(append(b, frame...))
	return err
}

// recv returns the next frame passt sends, by the deadline.
func (g *passtGuest) recv(deadline time.Time) ([]byte, error) {
	if err := g.conn.SetReadDeadline(deadline); err != nil {
		return nil, err
	}
	var n [4]byte
	if _, err := io.ReadFull(g.conn, n[:]); err != nil {
		return nil, err
	}
	frame := make([]byte, binary.BigEndian.Uint32(n[:]))
	_, err := io.ReadFull(g.conn, frame)
	return frame, err
}

// ipv4UDP is an Ethernet frame carrying one IPv4 UDP datagram (no UDP
// checksum, which IPv4 allows).
func ipv4UDP(dstMAC, srcMAC net.HardwareAddr, src, dst net.IP, sport, dport uint16, payload []byte) []byte {
	f := append(append(append([]byte{}, dstMAC...), srcMAC...), 0x08, 0x00)
	ip := make([]byte, 20)
	ip[0], ip[8], ip[9] = 0x45, 64, 17 // IPv4, 20-byte header; TTL; UDP
	binary.BigEndian.PutUint16(ip[2:], uint16(20+8+len(payload)))
	copy(ip[12:16], src.To4())
	copy(ip[16:20], dst.To4())
	var sum uint32
	for i := 0; i < 20; i += 2 {
		sum += uint32(binary.BigEndian.Uint16(ip[i:]))
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	binary.BigEndian.PutUint16(ip[10:], ^uint16(sum))
	udp := make([]byte, 8)
	binary.BigEndian.PutUint16(udp[0:], sport)
	binary.BigEndian.PutUint16(udp[2:], dport)
	binary.BigEndian.PutUint16(udp[4:], uint16(8+len(payload)))
	return append(append(append(f, ip...), udp...), payload...)
}

// dhcpReply returns the DHCPv4 message in frame, if it is one from a server.
func dhcpReply(frame []byte) (*dhcpv4.DHCPv4, net.HardwareAddr) {
	if len(frame) < 14+20+8 || frame[12] != 0x08 || frame[13] != 0x00 {
		return nil, nil
	}
	ip := frame[14:]
	ihl := int(ip[0]&0x0f) * 4
	if ip[9] != 17 || len(ip) < ihl+8 {
		return nil, nil
	}
	udp := ip[ihl:]
	if binary.BigEndian.Uint16(udp[0:]) != 67 || binary.BigEndian.Uint16(udp[2:]) != 68 {
		return nil, nil
	}
	m, err := dhcpv4.FromBytes(udp[8:])
	if err != nil {
		return nil, nil
	}
	return m, net.HardwareAddr(frame[6:12])
}

// exchange broadcasts m and waits for the server's answer of type want.
func (g *passtGuest) exchange(m *dhcpv4.DHCPv4, want dhcpv4.MessageType) (*dhcpv4.DHCPv4, error) {
	frame := ipv4UDP(net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, g.mac, net.IPv4zero, net.IPv4bcast, 68, 67, m.ToBytes())
	deadline := time.Now().Add(10 * time.Second)
	for attempt := 0; time.Now().Before(deadline); attempt++ {
		if err := g.send(frame); err != nil {
			return nil, err
		}
		wait := time.Now().Add(time.Second)
		for {
			f, err := g.recv(wait)
			if err != nil {
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() {
					break
				}
				return nil, err
			}
			if r, from := dhcpReply(f); r != nil && r.TransactionID == m.TransactionID && r.MessageType() == want {
				g.gwMAC = from
				return r, nil
			}
		}
	}
	return nil, fmt.Errorf("no DHCP %s from passt within 10 s", want)
}

// dhcp takes the guest's address from passt's DHCP server: DISCOVER,
// OFFER, REQUEST, ACK.
func (g *passtGuest) dhcp(t testing.TB) net.IP {
	t.Helper()
	disc, err := dhcpv4.NewDiscovery(g.mac)
	if err != nil {
		t.Fatal(err)
	}
	offer, err := g.exchange(disc, dhcpv4.MessageTypeOffer)
	if err != nil {
		t.Fatalf("DHCP DISCOVER: %v", err)
	}
	req, err := dhcpv4.NewRequestFromOffer(offer)
	if err != nil {
		t.Fatal(err)
	}
	ack, err := g.exchange(req, dhcpv4.MessageTypeAck)
	if err != nil {
		t.Fatalf("DHCP REQUEST: %v", err)
	}
	g.ip = ack.YourIPAddr
	return g.ip
}

// sendUDP sends payload from the guest's address to dst:port, through
// passt's side of the link (the guest's gateway, whatever its address).
func (g *passtGuest) sendUDP(dst net.IP, port uint16, payload []byte) error {
	return g.send(ipv4UDP(g.gwMAC, g.mac, g.ip, dst, 40000, port, payload))
}

// udpListener is a UDP socket on the underlay's host (its netns's
// address ip), reading what guests send it.
type udpListener struct{ c *net.UDPConn }

// expect waits for payload from a sender at from, sending again through
// g every half second (the first datagram can be lost while passt and the
// underlay resolve their neighbours).
func (l *udpListener) expect(t testing.TB, g *passtGuest, dst net.IP, port uint16, payload, from string) {
	t.Helper()
	buf := make([]byte, 2048)
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if err := g.sendUDP(dst, port, []byte(payload)); err != nil {
			t.Fatalf("send through passt: %v", err)
		}
		_ = l.c.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		for {
			n, addr, err := l.c.ReadFromUDP(buf)
			if err != nil {
				break
			}
			if string(buf[:n]) == payload {
				if addr.IP.String() != from {
					t.Fatalf("%q reached the underlay from %s, want %s", payload, addr.IP, from)
				}
				return
			}
		}
	}
	t.Fatalf("%q from the guest behind passt never reached %s:%d on the underlay", payload, dst, port)
}

// sockIn is passt's socket path for the pod's interface.
func sockIn(dir, pod, ifName string) string { return filepath.Join(dir, pod+"-"+ifName+".sock") }
