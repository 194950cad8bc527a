// Command udhcpc6 is a small stand-in for busybox's udhcpc6 applet, which the
// Debian busybox-static build does not include. test/guest compiles it
// statically and installs it as /bin/udhcpc6 in the guest initramfs.
//
// It speaks stateful DHCPv6 (Solicit/Advertise/Request/Reply, then Renew) and
// runs a lease script the way busybox udhcpc6 does: the script gets the event
// ("deconfig", "bound", "renew", "leasefail") as its first argument and the
// lease in the environment: interface, ipv6, lease, ipv6prefix,
// ipv6prefix_lease, dns and search (lists space separated).
//
// Supported flags (busybox syntax; flags without argument may be combined,
// as in -qfn):
//
//	-i IFACE  interface (default eth0)
//	-s PROG   lease script (default /usr/share/udhcpc/default6.script)
//	-q        exit after obtaining a lease
//	-n        exit with failure if no lease could be obtained
//	-t N      send up to N solicits per attempt (default 3)
//	-T SEC    wait SEC seconds for each answer (default 3)
//	-A SEC    wait SEC seconds after a failed attempt (default 5)
//	-d        also request a delegated prefix (IA_PD)
//	-f, -b, -R, -S, -v      accepted and ignored (it always runs in foreground)
//	-O OPT, -x OPT, -r IP   accepted and ignored
package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"time"

	"github.com/insomniacslk/dhcp/dhcpv6"
	"github.com/insomniacslk/dhcp/dhcpv6/nclient6"
	"github.com/insomniacslk/dhcp/iana"
)

type config struct {
	iface    string
	script   string
	quit     bool
	noLease  bool // -n
	tries    int
	timeout  time.Duration
	pause    time.Duration
	prefixPD bool
}

func main() {
	cfg, err := parseArgs(os.Args[1:])
	if err != nil {
		fmt.Fprintf(os.Stderr, "udhcpc6: %v\n", err)
		os.Exit(2)
	}
	if err := run(cfg); err != nil {
		fmt.Fprintf(os.Stderr, "udhcpc6: %v\n", err)
		os.Exit(1)
	}
}

func parseArgs(args []string) (*config, error) {
	cfg := &config{
		iface:   "eth0",
		script:  "/usr/share/udhcpc/default6.script",
		tries:   3,
		timeout: 3 * time.Second,
		pause:   5 * time.Second,
	}
	withArg := "isTtAOxrpHFVc"
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			break
		}
		if len(a) < 2 || a[0] != '-' || a[1] == '-' {
			return nil, fmt.Errorf("unsupported argument %q", a)
		}
		for j := 1; j < len(a); j++ {
			c := a[j]
			var val string
			if strings.IndexByte(withArg, c) >= 0 {
				switch {
				case j+1 < len(a):
					val = a[j+1:]
				case i+1 < len(args):
					i++
					val = args[i]
				default:
					return nil, fmt.Errorf("option -%c needs an argument", c)
				}
				j = len(a)
			}
			var err error
			switch c {
			case 'i':
				cfg.iface = val
			case 's':
				cfg.script = val
			case 'q':
				cfg.quit = true
			case 'n':
				cfg.noLease = true
			case 'd':
				cfg.prefixPD = true
			case 't':
				cfg.tries, err = strconv.Atoi(val)
			case 'T':
				cfg.timeout, err = seconds(val)
			case 'A':
				cfg.pause, err = seconds(val)
			case 'f', 'b', 'R', 'S', 'v', 'o', 'O', 'x', 'r', 'p', 'H', 'F', 'V', 'c':
			default:
				return nil, fmt.Errorf("unknown option -%c", c)
			}
			if err != nil {
				return nil, fmt.Errorf("option -%c: %w", c, err)
			}
		}
	}
	if cfg.tries < 1 {
		cfg.tries = 1
	}
	return cfg, nil
}

func seconds(s string) (time.Duration, error) {
	n, err := strconv.Atoi(s)
	if err != nil {
		return 0, err
	}
	return time.Duration(n) * time.Second, nil
}

// lease is what a Reply granted.
type lease struct {
	reply  *dhcpv6.Message
	server dhcpv6.DUID
	addr   *dhcpv6.OptIAAddress
	prefix *dhcpv6.OptIAPrefix
	t1     time.Duration
}

func run(cfg *config) error {
	if err := runScript(cfg, "deconfig", nil); err != nil {
		return err
	}
	ifi, err := net.InterfaceByName(cfg.iface)
	if err != nil {
		return fmt.Errorf("interface %s: %w", cfg.iface, err)
	}
	duid := &dhcpv6.DUIDLL{HWType: iana.HWTypeEthernet, LinkLayerAddr: ifi.HardwareAddr}
	iaid := [4]byte{}
	copy(iaid[:], ifi.HardwareAddr[len(ifi.HardwareAddr)-4:])

	client, err := newClient(cfg)
	if err != nil {
		return err
	}
	defer func() { _ = client.Close() }()

	for {
		l, err := acquire(cfg, client, duid, iaid)
		if err != nil {
			fmt.Fprintf(os.Stderr, "udhcpc6: no lease: %v\n", err)
			if serr := runScript(cfg, "leasefail", nil); serr != nil {
				return serr
			}
			if cfg.noLease {
				return errors.New("no lease, failing")
			}
			time.Sleep(cfg.pause)
			continue
		}
		if err := runScript(cfg, "bound", l); err != nil {
			return err
		}
		if cfg.quit {
			return nil
		}
		// Renew at T1 until the server stops answering, then start over.
		for {
			time.Sleep(l.t1)
			nl, err := renew(cfg, client, duid, l)
			if err != nil {
				fmt.Fprintf(os.Stderr, "udhcpc6: renew: %v\n", err)
				break
			}
			l = nl
			if err := runScript(cfg, "renew", l); err != nil {
				return err
			}
		}
	}
}

// newClient binds port 546 on the interface's link-local address, waiting
// for the address to exist and finish duplicate address detection.
func newClient(cfg *config) (*nclient6.Client, error) {
	deadline := time.Now().Add(15 * time.Second)
	for {
		c, err := nclient6.New(cfg.iface, nclient6.WithTimeout(cfg.timeout), nclient6.WithRetry(cfg.tries))
		if err == nil {
			return c, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("binding DHCPv6 client on %s: %w", cfg.iface, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func modifiers(cfg *config, duid dhcpv6.DUID, iaid [4]byte) []dhcpv6.Modifier {
	mods := []dhcpv6.Modifier{dhcpv6.WithClientID(duid), dhcpv6.WithIAID(iaid)}
	if cfg.prefixPD {
		mods = append(mods, dhcpv6.WithIAPD(iaid))
	}
	return mods
}

func acquire(cfg *config, c *nclient6.Client, duid dhcpv6.DUID, iaid [4]byte) (*lease, error) {
	ctx := context.Background()
	adv, err := c.Solicit(ctx, modifiers(cfg, duid, iaid)...)
	if err != nil {
		return nil, fmt.Errorf("solicit: %w", err)
	}
	var mods []dhcpv6.Modifier
	if cfg.prefixPD && adv.Options.OneIAPD() == nil {
		mods = append(mods, dhcpv6.WithIAPD(iaid))
	}
	reply, err := c.Request(ctx, adv, mods...)
	if err != nil {
		return nil, fmt.Errorf("request: %w", err)
	}
	return parseReply(reply)
}

func renew(cfg *config, c *nclient6.Client, duid dhcpv6.DUID, l *lease) (*lease, error) {
	msg, err := dhcpv6.NewMessage()
	if err != nil {
		return nil, err
	}
	msg.MessageType = dhcpv6.MessageTypeRenew
	msg.AddOption(dhcpv6.OptClientID(duid))
	msg.AddOption(dhcpv6.OptServerID(l.server))
	msg.AddOption(dhcpv6.OptElapsedTime(0))
	if ia := l.reply.Options.OneIANA(); ia != nil {
		msg.AddOption(ia)
	}
	if pd := l.reply.Options.OneIAPD(); pd != nil && cfg.prefixPD {
		msg.AddOption(pd)
	}
	msg.AddOption(dhcpv6.OptRequestedOption(dhcpv6.OptionDNSRecursiveNameServer, dhcpv6.OptionDomainSearchList))
	reply, err := c.SendAndRead(context.Background(), nclient6.AllDHCPRelayAgentsAndServers, msg,
		nclient6.IsMessageType(dhcpv6.MessageTypeReply))
	if err != nil {
		return nil, err
	}
	return parseReply(reply)
}

func parseReply(reply *dhcpv6.Message) (*lease, error) {
	if st := reply.Options.Status(); st != nil && st.StatusCode != iana.StatusSuccess {
		return nil, fmt.Errorf("server status %s", st)
	}
	l := &lease{reply: reply, server: reply.Options.ServerID()}
	if ia := reply.Options.OneIANA(); ia != nil {
		if st := ia.Options.Status(); st != nil && st.StatusCode != iana.StatusSuccess {
			return nil, fmt.Errorf("IA_NA status %s", st)
		}
		l.addr = ia.Options.OneAddress()
		l.t1 = ia.T1
	}
	if pd := reply.Options.OneIAPD(); pd != nil {
		if ps := pd.Options.Prefixes(); len(ps) > 0 {
			l.prefix = ps[0]
		}
		if l.t1 == 0 {
			l.t1 = pd.T1
		}
	}
	if l.addr == nil && l.prefix == nil {
		return nil, errors.New("reply holds neither an address nor a prefix")
	}
	if l.t1 <= 0 {
		valid := time.Hour
		if l.addr != nil {
			valid = l.addr.ValidLifetime
		}
		l.t1 = valid / 2
	}
	if l.t1 < 5*time.Second {
		l.t1 = 5 * time.Second
	}
	return l, nil
}

func runScript(cfg *config, event string, l *lease) error {
	env := append(os.Environ(), "interface="+cfg.iface)
	if l != nil {
		if l.addr != nil {
			env = append(env,
				"ipv6="+l.addr.IPv6Addr.String(),
				"lease="+strconv.Itoa(int(l.addr.ValidLifetime/time.Second)))
		}
		if l.prefix != nil && l.prefix.Prefix != nil {
			env = append(env,
				"ipv6prefix="+l.prefix.Prefix.String(),
				"ipv6prefix_lease="+strconv.Itoa(int(l.prefix.ValidLifetime/time.Second)))
		}
		var dns []string
		for _, ip := range l.reply.Options.DNS() {
			dns = append(dns, ip.String())
		}
		if len(dns) > 0 {
			env = append(env, "dns="+strings.Join(dns, " "))
		}
		if s := l.reply.Options.DomainSearchList(); s != nil && len(s.Labels) > 0 {
			env = append(env, "search="+strings.Join(s.Labels, " "))
		}
	}
	cmd := exec.Command(cfg.script, event)
	cmd.Env = env
	cmd.Stdout = os.Stdout
	cmd.Stderr = os.Stderr
	if err := cmd.Run(); err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			// busybox ignores the script's exit status.
			return nil
		}
		return fmt.Errorf("lease script %s: %w", cfg.script, err)
	}
	return nil
}
