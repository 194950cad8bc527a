// Package plugins is the registry of the modes vmnicd serves, one package
// each: a new mode is one package under plugins/ and one line in Modes.
package plugins

import (
	"github.com/vmnic/vmnic/pkg/mode"
	"github.com/vmnic/vmnic/plugins/bridge"
	"github.com/vmnic/vmnic/plugins/masquerade"
	"github.com/vmnic/vmnic/plugins/passt"
)

// Modes are the modes vmnicd serves, with the daemon's environment.
func Modes(env mode.Env) []mode.Mode {
	return []mode.Mode{
		masquerade.New(env),
		bridge.New(env),
		passt.New(env),
	}
}

// ChainEntry is the entry vmnicd's installer chains into the node's
// primary CNI network (masquerade for every VM pod on it).
func ChainEntry() map[string]any { return masquerade.ChainEntry() }
