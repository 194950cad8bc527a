// Package dhcp hands one guest VM its network configuration from inside a
// pod's network namespace.
//
// A Server answers DHCPv4 (RFC 2131), DHCPv6 (RFC 8415, stateful IA_NA) and
// sends IPv6 Router Advertisements (RFC 4861) on one interface of that
// namespace, typically the KubeVirt bridge k6t-eth0 that the VM's tap is
// plugged into. Each protocol is optional: a nil V4, V6 or RA in Config means
// that server is not started.
//
// Sockets are created inside the namespace (the calling goroutine's OS thread
// enters it through containernetworking's ns package and leaves again); the
// packets are then served from ordinary goroutines, which never enter the
// namespace. Every socket is bound to the interface with SO_BINDTODEVICE, so
// nothing is answered on other interfaces of the pod.
//
// The DHCP sockets do not set SO_REUSEADDR: a second DHCP server on the same
// interface (another Server, or virt-launcher's own) makes Start fail with
// "address already in use" instead of racing it for the guest's requests.
//
// Router Advertisements must leave from the interface's link-local address,
// which is tentative while duplicate address detection runs and stays so
// while the interface has no carrier (a bridge whose only port is a tap the
// VM has not opened yet). Start does not wait for it: the advertiser polls
// for it, every 100ms for 10s and every second after that, and sends its first
// advertisement (and answers solicitations that came meanwhile) as soon as it
// is usable.
//
// The servers hold a reference on the namespace through their sockets: call
// Stop when the pod goes away, or the namespace and its devices stay alive.
// They are bound to the interface's index: if the interface is deleted and
// created again, Stop them and Start new ones.
package dhcp

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"sync"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/insomniacslk/dhcp/dhcpv6"
	"github.com/insomniacslk/dhcp/iana"
	"github.com/vishvananda/netlink"
	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
	"golang.org/x/sys/unix"
)

// Route is an IPv4 classless static route (DHCP option 121).
type Route struct {
	Dst net.IPNet
	// Gw is the next hop; nil (or 0.0.0.0) means the destination is on-link.
	Gw net.IP
}

// V4 is the DHCPv4 configuration handed to the guest.
type V4 struct {
	// Address is the guest's address and mask, e.g. 10.0.2.2/24.
	Address net.IPNet
	// ServerID is the address of the served interface, e.g. 10.0.2.1. It is
	// the server identifier (option 54) and the source of the replies (if it
	// is no address of the interface, replies leave from the address the
	// kernel picks, and a warning is logged).
	ServerID net.IP
	// Router is the default gateway (option 3); nil means none.
	Router net.IP
	// Routes are classless static routes (option 121). Clients that get
	// option 121 ignore option 3 (RFC 3442), so when Routes is not empty and
	// Router is set, a default route via Router is added to option 121.
	Routes []Route
	// DNS are the name servers (option 6).
	DNS []net.IP
	// Search is the domain search list (option 119); its first entry is also
	// sent as the domain name (option 15).
	Search []string
	// MTU is the interface MTU (option 26); 0 omits the option.
	MTU int
	// Hostname is the guest's host name (option 12); empty omits it.
	Hostname string
	// LeaseTime is the lease time (option 51); 0 means infinite.
	LeaseTime time.Duration
}

// V6 is the DHCPv6 configuration handed to the guest.
type V6 struct {
	// Address is offered as a /128 in every IA_NA the client asks for.
	Address net.IP
	// DNS are the recursive name servers (option 23).
	DNS []net.IP
	// Search is the domain search list (option 24).
	Search []string
	// LeaseTime is both the preferred and the valid lifetime of Address;
	// 0 means infinite. The server's DUID is a DUID-LL of the interface's MAC.
	LeaseTime time.Duration
}

// RA configures the IPv6 Router Advertisements.
type RA struct {
	// Prefix is announced in a Prefix Information option with the on-link
	// flag; the autonomous (SLAAC) flag is set only for a /64. A zero Prefix
	// omits the option.
	Prefix net.IPNet
	// MTU is announced in an MTU option; 0 omits it.
	MTU int
	// RouterLifetime is how long the guest may use this router as its default
	// router (at most 65535s); 0 announces a router that is not a default
	// router. With a positive lifetime the guest installs a default route via
	// the interface's link-local address.
	RouterLifetime time.Duration
	// Managed and Other are the M and O flags: address, respectively other
	// configuration, is available over DHCPv6.
	Managed, Other bool
	// Interval between unsolicited advertisements; 0 means 10s. Router
	// Solicitations are answered at once.
	Interval time.Duration
}

// Config says where to serve and what.
type Config struct {
	// NetnsPath is the pod's network namespace, e.g. /var/run/netns/x or
	// /proc/<pid>/ns/net.
	NetnsPath string
	// IfName is the interface inside that namespace, e.g. k6t-eth0.
	IfName string
	// ClientMAC, if set, is the only client answered; others are ignored.
	// DHCPv6 clients are identified by their EUI-64 link-local source
	// address; a client whose address does not embed its MAC is answered.
	ClientMAC net.HardwareAddr
	// V4, V6 and RA configure the three servers; nil means not started.
	V4 *V4
	V6 *V6
	RA *RA
	// Logger receives the servers' logs; nil means slog.Default().
	Logger *slog.Logger
}

// Lease is an address handed to the guest.
type Lease struct {
	IP net.IP
	// HWAddr is the client's MAC, nil if a DHCPv6 client did not reveal it.
	HWAddr net.HardwareAddr
	Time   time.Time
}

// Stats counts what a Server did.
type Stats struct {
	V4Offers, V4Acks, V4Naks, V4Releases uint64
	V6Advertises, V6Replies              uint64
	RAsSent, RSsReceived                 uint64
	// LastV4Lease and LastV6Lease are the last addresses acknowledged; their
	// IP is nil while none was.
	LastV4Lease, LastV6Lease Lease
}

// Server runs the servers asked for in a Config. Create it with Start.
type Server struct {
	cfg     Config
	log     *slog.Logger
	ifIndex int
	ifMAC   net.HardwareAddr
	duid    dhcpv6.DUID

	v4conn *net.UDPConn
	v4pc   *ipv4.PacketConn // v4conn, to choose the source address
	// v4SrcWarned is set once replies could not leave from ServerID.
	v4SrcWarned bool
	v6conn      *ipv6.PacketConn
	raConn      *ipv6.PacketConn
	nl          *netlink.Handle // inside the namespace, to find the link-local address
	v4opts      *v4Options
	rsCh        chan struct{}

	done     chan struct{}
	stopOnce sync.Once
	wg       sync.WaitGroup

	mu    sync.Mutex
	stats Stats
}

const defaultRAInterval = 10 * time.Second

// Start opens the sockets of the servers asked for in cfg inside cfg's
// namespace and serves them until Stop. It returns once all of them listen;
// on failure it closes whatever it had opened. ctx bounds only the start: the
// servers run until Stop, whatever becomes of ctx.
func Start(ctx context.Context, cfg Config) (*Server, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	cfg = cfg.clone()
	if cfg.RA != nil && cfg.RA.Interval == 0 {
		cfg.RA.Interval = defaultRAInterval
	}
	logger := cfg.Logger
	if logger == nil {
		logger = slog.Default()
	}
	s := &Server{
		cfg:  cfg,
		log:  logger.With("netns", cfg.NetnsPath, "interface", cfg.IfName),
		done: make(chan struct{}),
		rsCh: make(chan struct{}, 1),
	}
	if cfg.V4 != nil {
		s.v4opts = newV4Options(cfg.V4)
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("start dhcp servers on %s in %s: %w", cfg.IfName, cfg.NetnsPath, err)
	}

	netns, err := ns.GetNS(cfg.NetnsPath)
	if err != nil {
		return nil, fmt.Errorf("open netns %s: %w", cfg.NetnsPath, err)
	}
	defer func() { _ = netns.Close() }()
	err = netns.Do(func(ns.NetNS) error { return s.open(ctx) })
	if err == nil {
		err = ctx.Err()
	}
	if err != nil {
		s.closeAll()
		if s.nl != nil {
			s.nl.Close()
		}
		return nil, fmt.Errorf("start dhcp servers on %s in %s: %w", cfg.IfName, cfg.NetnsPath, err)
	}

	if s.v4conn != nil {
		s.wg.Add(1)
		go s.serveV4()
	}
	if s.v6conn != nil {
		s.wg.Add(1)
		go s.serveV6()
	}
	if s.raConn != nil {
		s.wg.Add(2)
		go s.receiveRS()
		go s.advertise()
	}
	s.log.Info("dhcp servers started", "v4", cfg.V4 != nil, "v6", cfg.V6 != nil, "ra", cfg.RA != nil)
	return s, nil
}

// open runs inside the namespace: it only creates and configures sockets.
func (s *Server) open(ctx context.Context) error {
	link, err := netlink.LinkByName(s.cfg.IfName)
	if err != nil {
		return fmt.Errorf("find interface %s: %w", s.cfg.IfName, err)
	}
	s.ifIndex = link.Attrs().Index
	s.ifMAC = slices.Clone(link.Attrs().HardwareAddr)
	if (s.cfg.V6 != nil || s.cfg.RA != nil) && len(s.ifMAC) != 6 {
		return fmt.Errorf("interface %s has no Ethernet MAC address", s.cfg.IfName)
	}
	s.duid = &dhcpv6.DUIDLL{HWType: iana.HWTypeEthernet, LinkLayerAddr: s.ifMAC}
	ifi := &net.Interface{Index: s.ifIndex, Name: s.cfg.IfName}

	if s.cfg.V4 != nil {
		if s.v4conn, err = listenV4(ctx, s.cfg.IfName); err != nil {
			return err
		}
		s.v4pc = ipv4.NewPacketConn(s.v4conn)
	}
	if s.cfg.V6 != nil {
		if s.v6conn, err = listenV6(ctx, ifi); err != nil {
			return err
		}
	}
	if s.cfg.RA != nil {
		if s.raConn, err = listenRA(ctx, ifi); err != nil {
			return err
		}
		if s.nl, err = netlink.NewHandle(unix.NETLINK_ROUTE); err != nil {
			return fmt.Errorf("open netlink socket for %s: %w", s.cfg.IfName, err)
		}
		if err := s.nl.SetSocketTimeout(2 * time.Second); err != nil {
			return fmt.Errorf("set netlink socket timeout for %s: %w", s.cfg.IfName, err)
		}
	}
	return nil
}

// Stop closes the sockets and waits for the serving goroutines to end. It
// may be called more than once, also after the namespace vanished.
func (s *Server) Stop() {
	s.stopOnce.Do(func() {
		close(s.done)
		s.closeAll()
		s.wg.Wait()
		if s.nl != nil {
			s.nl.Close()
		}
		s.log.Info("dhcp servers stopped")
	})
}

// closeAll closes the sockets, which ends the goroutines blocked reading them.
func (s *Server) closeAll() {
	if s.v4conn != nil {
		_ = s.v4conn.Close()
	}
	if s.v6conn != nil {
		_ = s.v6conn.Close()
	}
	if s.raConn != nil {
		_ = s.raConn.Close()
	}
}

func (s *Server) stopping() bool {
	select {
	case <-s.done:
		return true
	default:
		return false
	}
}

// Stats returns a copy of the counters.
func (s *Server) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.stats
	st.LastV4Lease = st.LastV4Lease.clone()
	st.LastV6Lease = st.LastV6Lease.clone()
	return st
}

func (s *Server) count(f func(*Stats)) {
	s.mu.Lock()
	f(&s.stats)
	s.mu.Unlock()
}

func (l Lease) clone() Lease {
	return Lease{IP: slices.Clone(l.IP), HWAddr: slices.Clone(l.HWAddr), Time: l.Time}
}

// readFailed handles an error reading a socket. It reports whether the
// reading goroutine must end: after Stop, or once the socket is closed.
// Other errors are logged and retried after a growing pause, never in a
// tight loop.
func (s *Server) readFailed(what string, err error, pause *time.Duration) bool {
	if s.stopping() || errors.Is(err, net.ErrClosed) {
		return true
	}
	s.log.Warn("read failed", "socket", what, "error", err)
	select {
	case <-s.done:
		return true
	case <-time.After(*pause):
	}
	*pause = min(2**pause, time.Second)
	return false
}

func (c Config) clone() Config {
	c.ClientMAC = slices.Clone(c.ClientMAC)
	if c.V4 != nil {
		v := *c.V4
		v.Address = net.IPNet{IP: slices.Clone(v.Address.IP), Mask: slices.Clone(v.Address.Mask)}
		v.ServerID = slices.Clone(v.ServerID)
		v.Router = slices.Clone(v.Router)
		v.Routes = slices.Clone(v.Routes)
		v.DNS = slices.Clone(v.DNS)
		v.Search = slices.Clone(v.Search)
		c.V4 = &v
	}
	if c.V6 != nil {
		v := *c.V6
		v.Address = slices.Clone(v.Address)
		v.DNS = slices.Clone(v.DNS)
		v.Search = slices.Clone(v.Search)
		c.V6 = &v
	}
	if c.RA != nil {
		v := *c.RA
		if v.Prefix.IP != nil {
			v.Prefix = net.IPNet{IP: v.Prefix.IP.Mask(v.Prefix.Mask), Mask: slices.Clone(v.Prefix.Mask)}
		}
		c.RA = &v
	}
	return c
}

func (c *Config) validate() error {
	if c.NetnsPath == "" {
		return errors.New("dhcp config: netns path is empty")
	}
	if c.IfName == "" {
		return fmt.Errorf("dhcp config for netns %s: interface name is empty", c.NetnsPath)
	}
	if c.V4 == nil && c.V6 == nil && c.RA == nil {
		return fmt.Errorf("dhcp config for %s in %s: no server asked for", c.IfName, c.NetnsPath)
	}
	if c.ClientMAC != nil && len(c.ClientMAC) != 6 {
		return fmt.Errorf("dhcp config for %s in %s: client MAC %s is not an Ethernet address", c.IfName, c.NetnsPath, c.ClientMAC)
	}
	if c.V4 != nil {
		if err := c.V4.validate(); err != nil {
			return fmt.Errorf("dhcp config for %s in %s: %w", c.IfName, c.NetnsPath, err)
		}
	}
	if c.V6 != nil {
		if err := c.V6.validate(); err != nil {
			return fmt.Errorf("dhcp config for %s in %s: %w", c.IfName, c.NetnsPath, err)
		}
	}
	if c.RA != nil {
		if err := c.RA.validate(); err != nil {
			return fmt.Errorf("dhcp config for %s in %s: %w", c.IfName, c.NetnsPath, err)
		}
	}
	return nil
}

func (v *V6) validate() error {
	if !isV6(v.Address) || v.Address.IsUnspecified() || v.Address.IsMulticast() {
		return fmt.Errorf("dhcpv6 address %q is not a unicast IPv6 address", v.Address)
	}
	for _, ip := range v.DNS {
		if !isV6(ip) {
			return fmt.Errorf("dhcpv6 dns server %q is not an IPv6 address", ip)
		}
	}
	if err := validateSearch(v.Search); err != nil {
		return fmt.Errorf("dhcpv6 %w", err)
	}
	if v.LeaseTime < 0 {
		return fmt.Errorf("dhcpv6 lease time %s is negative", v.LeaseTime)
	}
	return nil
}

func (r *RA) validate() error {
	if r.Prefix.IP != nil {
		if _, bits := r.Prefix.Mask.Size(); !isV6(r.Prefix.IP) || bits != 128 {
			return fmt.Errorf("ra prefix %s is not an IPv6 prefix", r.Prefix.String())
		}
	}
	if r.MTU < 0 || (r.MTU > 0 && r.MTU < 1280) {
		return fmt.Errorf("ra mtu %d is below the IPv6 minimum of 1280", r.MTU)
	}
	if r.RouterLifetime < 0 || r.RouterLifetime > 65535*time.Second {
		return fmt.Errorf("ra router lifetime %s is not within 0..65535s", r.RouterLifetime)
	}
	if r.Interval < 0 {
		return fmt.Errorf("ra interval %s is negative", r.Interval)
	}
	return nil
}

func isV6(ip net.IP) bool {
	return len(ip) == net.IPv6len && ip.To4() == nil
}

// validateSearch checks that every domain can be encoded as DNS labels.
func validateSearch(domains []string) error {
	for _, d := range domains {
		name := d
		if len(name) > 0 && name[len(name)-1] == '.' {
			name = name[:len(name)-1]
		}
		if name == "" || len(name) > 253 {
			return fmt.Errorf("search domain %q is not a valid domain name", d)
		}
		label := 0
		for i := 0; i <= len(name); i++ {
			if i == len(name) || name[i] == '.' {
				if label == 0 || label > 63 {
					return fmt.Errorf("search domain %q has an empty or too long label", d)
				}
				label = 0
				continue
			}
			label++
		}
	}
	return nil
}
