// Package ctl is vmnicctl, the operator's command line for vmnic: the
// daemon's health and the VM NICs it wired on this node (over vmnicd's
// socket), what each node can wire (NodeNetworkCapability, or a local
// probe), and doctor, which checks every mode's prerequisites against the
// cluster and says how to fix what is missing. The same binary is a kubectl
// plugin when invoked as kubectl-vmnic.
package ctl

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/vmnic/vmnic/pkg/netconf"
	"github.com/vmnic/vmnic/pkg/version"
)

// Exit codes.
const (
	ExitOK = 0
	// ExitFailed: the command failed, the daemon is not reachable, or
	// doctor found a required prerequisite missing.
	ExitFailed = 1
	// ExitUsage: bad command line.
	ExitUsage = 2
	// ExitStarting: status found the daemon starting (or stopping): it
	// answers, but serves no request yet.
	ExitStarting = 3
	// ExitDegraded: status found the daemon serving, but a watch of its
	// on the API server down for longer than its threshold: it decides
	// on a cache that no longer follows the cluster.
	ExitDegraded = 4
)

// Version is vmnicctl's version: the release of this build.
func Version() string { return version.Version }

// pluginName is the binary's name as a kubectl plugin.
const pluginName = "kubectl-vmnic"

// env is one invocation's context.
type env struct {
	prog   string // "vmnicctl" or "kubectl vmnic"
	stdout io.Writer
	stderr io.Writer
	common *commonFlags
}

// commonFlags are accepted by every subcommand (each uses what it needs).
type commonFlags struct {
	output     string
	socket     string
	kubeconfig string
	context    string
	timeout    time.Duration
}

func (c *commonFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&c.output, "o", "", "output format: json (and wide for attachments)")
	fs.StringVar(&c.output, "output", "", "same as -o")
	fs.StringVar(&c.socket, "socket", netconf.DefaultSocket, "vmnicd's unix socket")
	fs.StringVar(&c.kubeconfig, "kubeconfig", "", "kubeconfig file (default: KUBECONFIG, ~/.kube/config, or in-cluster)")
	fs.StringVar(&c.context, "context", "", "kubeconfig context")
	fs.DurationVar(&c.timeout, "timeout", 20*time.Second, "bound for the whole command")
}

func (c *commonFlags) json() bool { return c.output == "json" }

// runner runs a subcommand with its positional arguments.
type runner func(ctx context.Context, e *env, args []string) int

type command struct {
	name, args, help string
	// setup registers the command's own flags and returns its runner.
	setup func(fs *flag.FlagSet) runner
}

func plain(r runner) func(*flag.FlagSet) runner { return func(*flag.FlagSet) runner { return r } }

var commands []command

func init() {
	commands = []command{
		{name: "status", help: "vmnicd's health on this node: version, readiness, attachments, DHCP servers", setup: plain(runStatus)},
		{name: "attachments", help: "the VM NICs vmnicd wired on this node (-o wide for more)", setup: plain(runAttachments)},
		{name: "capabilities", args: "[NODE]", help: "what NODE can wire (its NodeNetworkCapability); every node without NODE; this machine with --local or without a cluster", setup: capabilitiesFlags},
		{name: "doctor", help: "check every mode's prerequisites in the cluster; exit 1 when a required one is missing", setup: doctorFlags},
		{name: "version", help: "print vmnicctl's version", setup: plain(runVersion)},
	}
}

// Main runs vmnicctl with argv (argv[0] is the program name) and returns
// the exit code.
func Main(argv []string, stdout, stderr io.Writer) int {
	prog := "vmnicctl"
	if len(argv) > 0 && strings.HasPrefix(filepath.Base(argv[0]), pluginName) {
		prog = "kubectl vmnic"
	}
	e := &env{prog: prog, stdout: stdout, stderr: stderr, common: &commonFlags{}}
	args := argv
	if len(args) > 0 {
		args = args[1:]
	}
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		e.usage(stdout)
		if len(args) == 0 {
			return ExitUsage
		}
		return ExitOK
	}
	var cmd *command
	for i := range commands {
		if commands[i].name == args[0] {
			cmd = &commands[i]
		}
	}
	if cmd == nil {
		printf(stderr, "%s: unknown command %q\n\n", prog, args[0])
		e.usage(stderr)
		return ExitUsage
	}
	fs := flag.NewFlagSet(prog+" "+cmd.name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	e.common.register(fs)
	run := cmd.setup(fs)
	fs.Usage = func() {
		printf(stderr, "Usage: %s %s [flags] %s\n\n%s\n\nFlags:\n", prog, cmd.name, cmd.args, cmd.help)
		fs.PrintDefaults()
	}
	positional, err := parseInterleaved(fs, args[1:])
	if errors.Is(err, flag.ErrHelp) {
		return ExitOK
	}
	if err != nil {
		return ExitUsage
	}
	switch e.common.output {
	case "", "json", "wide":
	default:
		printf(stderr, "%s: -o %q: want json or wide\n", prog, e.common.output)
		return ExitUsage
	}
	ctx, cancel := context.WithTimeout(context.Background(), e.common.timeout)
	defer cancel()
	return run(ctx, e, positional)
}

// parseInterleaved parses flags that may come after positional arguments
// (`capabilities node-a -o json`), as kubectl users type them.
func parseInterleaved(fs *flag.FlagSet, args []string) ([]string, error) {
	var positional []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		args = fs.Args()
		if len(args) == 0 {
			return positional, nil
		}
		if args[0] == "--" {
			return append(positional, args[1:]...), nil
		}
		positional = append(positional, args[0])
		args = args[1:]
	}
}

func (e *env) usage(w io.Writer) {
	printf(w, "%s %s: inspect and check vmnic (KubeVirt VM NICs)\n\nUsage: %s COMMAND [flags]\n\nCommands:\n", e.prog, Version(), e.prog)
	for _, c := range commands {
		name := c.name
		if c.args != "" {
			name += " " + c.args
		}
		printf(w, "  %-20s %s\n", name, c.help)
	}
	printf(w, "\nCommon flags: -o json, --socket PATH (default %s), --kubeconfig FILE, --context NAME, --timeout 20s.\n", netconf.DefaultSocket)
	printf(w, "status and attachments talk to vmnicd on this node (as root); capabilities and doctor read the cluster.\n")
	printf(w, "As a kubectl plugin: copy or link this binary as %s onto PATH, then: kubectl vmnic doctor.\n", pluginName)
}

func (e *env) errorf(format string, args ...any) {
	printf(e.stderr, e.prog+": "+format+"\n", args...)
}

// printJSON writes v indented.
func (e *env) printJSON(v any) int {
	enc := json.NewEncoder(e.stdout)
	enc.SetIndent("", "  ")
	if err := enc.Encode(v); err != nil {
		e.errorf("write JSON: %v", err)
		return ExitFailed
	}
	return ExitOK
}

func runVersion(_ context.Context, e *env, _ []string) int {
	if e.common.json() {
		return e.printJSON(map[string]string{"vmnicctl": Version()})
	}
	printLine(e.stdout, "vmnicctl", Version())
	return ExitOK
}

// noArgs refuses positional arguments.
func (e *env) noArgs(cmd string, args []string) bool {
	if len(args) > 0 {
		e.errorf("%s takes no arguments (got %q)", cmd, args)
		return false
	}
	return true
}

// isRoot tells whether the socket can be reached at all: it is root's.
func isRoot() bool { return os.Geteuid() == 0 }

// printf and printLine write output; a write error (a closed pipe) is no
// reason to fail differently.
func printf(w io.Writer, format string, args ...any) { _, _ = fmt.Fprintf(w, format, args...) }

func printLine(w io.Writer, args ...any) { _, _ = fmt.Fprintln(w, args...) }
