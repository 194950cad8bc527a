package node

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// PluginTimer times the CNI plugins it wraps, for benchmarks: each wrapped
// plugin in the CNI bin dir is moved to <name>.timed and replaced by a
// shell script that runs it and appends one line per call to a log under
// Dir (the same path inside a node container and out). The time is the
// plugin's exec to its exit, as the runtime waits for it.
type PluginTimer struct {
	n       *Node
	log     string
	wrapped []string
}

// timingWrapper runs the real plugin, under its own name, and records the
// call.
const timingWrapper = `#!/bin/bash
s=$(date +%%s%%N)
# Under its own name: Calico's binary chooses calico or calico-ipam by it.
(exec -a "$0" "$0.timed" "$@")
rc=$?
e=$(date +%%s%%N)
echo "${0##*/} $CNI_COMMAND $((e-s)) $rc $CNI_ARGS" >>%s
exit $rc
`

// TimePlugins wraps the named plugins of the CNI bin dir.
func (n *Node) TimePlugins(names ...string) (*PluginTimer, error) {
	pt := &PluginTimer{n: n, log: filepath.Join(n.Dir, "cni-times.log")}
	for _, name := range names {
		if err := pt.Wrap(name); err != nil {
			_ = pt.Unwrap()
			return nil, err
		}
	}
	return pt, nil
}

// Wrap wraps one more plugin (one installed after TimePlugins, as the
// vmnic shim by helm install).
func (pt *PluginTimer) Wrap(name string) error {
	bin := filepath.Join(pt.n.CNIBinDir, name)
	if err := os.Rename(bin, bin+".timed"); err != nil {
		return err
	}
	pt.wrapped = append(pt.wrapped, name)
	return writeAtomicMode(bin, []byte(fmt.Sprintf(timingWrapper, pt.log)), 0o755)
}

// Unwrap puts the wrapped plugins back.
func (pt *PluginTimer) Unwrap() error {
	var first error
	for _, name := range pt.wrapped {
		bin := filepath.Join(pt.n.CNIBinDir, name)
		if err := os.Rename(bin+".timed", bin); err != nil && first == nil {
			first = err
		}
	}
	pt.wrapped = nil
	return first
}

// PluginCall is one recorded call.
type PluginCall struct {
	Plugin, Command, Pod string
	Took                 time.Duration
	Failed               bool
}

// Calls returns the calls recorded so far.
func (pt *PluginTimer) Calls() ([]PluginCall, error) {
	f, err := os.Open(pt.log)
	if os.IsNotExist(err) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	defer func() { _ = f.Close() }()
	var calls []PluginCall
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 4 {
			continue
		}
		ns, err := strconv.ParseInt(fields[2], 10, 64)
		if err != nil {
			continue
		}
		c := PluginCall{Plugin: fields[0], Command: fields[1], Took: time.Duration(ns), Failed: fields[3] != "0"}
		if len(fields) > 4 {
			for _, kv := range strings.Split(fields[4], ";") {
				if v, ok := strings.CutPrefix(kv, "K8S_POD_NAME="); ok {
					c.Pod = v
				}
			}
		}
		calls = append(calls, c)
	}
	return calls, sc.Err()
}
