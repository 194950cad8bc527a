package daemon

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/vmnic/vmnic/pkg/proto"
)

// ObserveOptions configure what the daemon reports about itself.
type ObserveOptions struct{}

// observe is called after every CNI request with its outcome.
func (d *Daemon) observe(_ *proto.Request, _ error, _ time.Duration) {}

// introspectPrefix starts the commands vmnicctl sends on the socket.
const introspectPrefix = "VMNIC_"

func isIntrospect(cmd string) bool { return strings.HasPrefix(cmd, introspectPrefix) }

// introspect answers vmnicctl's requests.
func (d *Daemon) introspect(_ context.Context, req *proto.Request) (json.RawMessage, error) {
	return nil, types.NewError(types.ErrInvalidEnvironmentVariables, fmt.Sprintf("CNI_COMMAND: unknown command %q", req.Command), "")
}
