// Package ipam runs a CNI IPAM plugin for the daemon. The daemon is not
// executed by the runtime, so it cannot use the CNI_* environment of its own
// process as invoke.DelegateAdd does: each call carries the runtime's
// variables, forwarded by the shim, explicitly.
package ipam

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"

	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
)

// Call is one IPAM plugin invocation: the plugin named by the config's
// ipam.type, found in Path (CNI_PATH), fed Config on stdin.
type Call struct {
	Type        string          `json:"type"`
	Config      json.RawMessage `json:"config"`
	ContainerID string          `json:"containerID"`
	Netns       string          `json:"netns"`
	IfName      string          `json:"ifName"`
	Args        string          `json:"args,omitempty"`
	Path        string          `json:"path"`
}

func (c *Call) args(cmd string) *invoke.Args {
	return &invoke.Args{
		Command:       cmd,
		ContainerID:   c.ContainerID,
		NetNS:         c.Netns,
		IfName:        c.IfName,
		PluginArgsStr: c.Args,
		Path:          c.Path,
	}
}

func (c *Call) find() (string, error) {
	p, err := invoke.FindInPath(c.Type, filepath.SplitList(c.Path))
	if err != nil {
		return "", types.NewError(types.ErrInvalidNetworkConfig, fmt.Sprintf("ipam.type: plugin %q not found in CNI_PATH %q", c.Type, c.Path), "")
	}
	return p, nil
}

// Add allocates the attachment's addresses. The result has at least one IP.
func (c *Call) Add(ctx context.Context) (*current.Result, error) {
	p, err := c.find()
	if err != nil {
		return nil, err
	}
	r, err := invoke.ExecPluginWithResult(ctx, p, c.Config, c.args("ADD"), nil)
	if err != nil {
		return nil, wrap("ADD", c.Type, err)
	}
	res, err := current.NewResultFromResult(r)
	if err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, fmt.Sprintf("ipam %s: result: %v", c.Type, err), "")
	}
	if len(res.IPs) == 0 {
		return res, types.NewError(types.ErrInvalidNetworkConfig, fmt.Sprintf("ipam %s: returned no address", c.Type), "")
	}
	return res, nil
}

// Del releases the attachment's addresses. IPAM plugins succeed on what is
// already released.
func (c *Call) Del(ctx context.Context) error {
	p, err := c.find()
	if err != nil {
		return err
	}
	if err := invoke.ExecPluginWithoutResult(ctx, p, c.Config, c.args("DEL"), nil); err != nil {
		return wrap("DEL", c.Type, err)
	}
	return nil
}

// Status asks the IPAM plugin whether it can allocate (CNI 1.1 STATUS: a
// plugin that delegates to IPAM passes STATUS on). An IPAM plugin from
// before STATUS (it refuses the verb or the version) cannot tell and counts
// as ready; any other failure is code 50 (or the plugin's own 50/51).
func (c *Call) Status(ctx context.Context) error {
	p, err := c.find()
	if err != nil {
		return types.NewError(types.ErrPluginNotAvailable, err.Error(), "")
	}
	err = invoke.ExecPluginWithoutResult(ctx, p, c.Config, c.args("STATUS"), nil)
	var te *types.Error
	switch {
	case err == nil:
		return nil
	case errors.As(err, &te) && (te.Code == types.ErrPluginNotAvailable || te.Code == types.ErrLimitedConnectivity):
		return wrap("STATUS", c.Type, err)
	case errors.As(err, &te) && (te.Code == types.ErrIncompatibleCNIVersion || te.Code == types.ErrInvalidEnvironmentVariables || te.Code == types.ErrUnsupportedField):
		return nil
	}
	return types.NewError(types.ErrPluginNotAvailable, fmt.Sprintf("ipam %s STATUS: %v", c.Type, err), "")
}

// wrap keeps the plugin's CNI error code and names the plugin.
func wrap(cmd, typ string, err error) error {
	var te *types.Error
	if errors.As(err, &te) {
		return types.NewError(te.Code, fmt.Sprintf("ipam %s %s: %s", typ, cmd, te.Msg), te.Details)
	}
	return types.NewError(types.ErrInternal, fmt.Sprintf("ipam %s %s: %v", typ, cmd, err), "")
}
