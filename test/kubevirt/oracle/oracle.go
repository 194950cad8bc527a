package oracle

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"

	"kubevirt.io/client-go/log"
)

// command is one subcommand: it parses its flags and returns the object to
// print.
type command func(args []string) (any, error)

var commands = map[string]command{
	"domain":       domainCmd,
	"names":        namesCmd,
	"launcher-pod": launcherPodCmd,
	"target-pod":   targetPodCmd,
	"images":       imagesCmd,
	"operator":     operatorCmd,
}

// Main runs the subcommand args[0] and returns the exit code. Its result
// goes to stdout as one JSON object; anything else (errors, KubeVirt's log)
// to stderr.
func Main(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || commands[args[0]] == nil {
		names := make([]string, 0, len(commands))
		for n := range commands {
			names = append(names, n)
		}
		slices.Sort(names)
		_, _ = fmt.Fprintf(stderr, "usage: kubevirt-oracle %s [flags]\n", strings.Join(names, "|"))
		return 2
	}
	out, err := run(commands[args[0]], args[1:])
	if errors.Is(err, flag.ErrHelp) {
		return 2
	}
	if err == nil {
		err = json.NewEncoder(stdout).Encode(out)
	}
	if err != nil {
		_, _ = fmt.Fprintf(stderr, "kubevirt-oracle %s: %v\n", args[0], err)
		return 1
	}
	return 0
}

// run calls cmd, turning a panic (KubeVirt's log.Critical panics, so does
// virt-launcher) into an error.
func run(cmd command, args []string) (out any, err error) {
	defer recoverInto(&err)
	return cmd(args)
}

func recoverInto(err *error) {
	if r := recover(); r != nil {
		*err = fmt.Errorf("KubeVirt panicked: %v", r)
	}
}

// flagSet is a subcommand's flags; required lists the flags it cannot do
// without.
type flagSet struct {
	*flag.FlagSet
	required  []string
	verbosity *int
}

func newFlagSet(name string) *flagSet {
	fs := flag.NewFlagSet("kubevirt-oracle "+name, flag.ContinueOnError)
	fs.SetOutput(os.Stderr)
	return &flagSet{FlagSet: fs, verbosity: fs.Int("v", 0, "verbosity of KubeVirt's log (on stderr)")}
}

// file declares a flag naming an input file.
func (fs *flagSet) file(name, usage string, required bool) *string {
	if required {
		fs.required = append(fs.required, name)
	}
	return fs.String(name, "", usage)
}

func (fs *flagSet) parse(args []string) error {
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	for _, name := range fs.required {
		if fs.Lookup(name).Value.String() == "" {
			return fmt.Errorf("flag -%s is required", name)
		}
	}
	if err := log.Log.SetVerbosityLevel(*fs.verbosity); err != nil {
		return fmt.Errorf("flag -v: %w", err)
	}
	return nil
}

// readJSON decodes the file at path into v; an empty path leaves v as is.
func readJSON(path string, v any) error {
	if path == "" {
		return nil
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("read input: %w", err)
	}
	if err := json.Unmarshal(data, v); err != nil {
		return fmt.Errorf("decode %s: %w", path, err)
	}
	return nil
}
