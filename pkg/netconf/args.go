package netconf

import (
	"strings"

	"github.com/containernetworking/cni/pkg/types"
)

// LauncherPrefix starts the name of every virt-launcher pod
// (generateName "virt-launcher-<vmi>-").
const LauncherPrefix = "virt-launcher-"

// PodArgs are the Kubernetes facts a runtime passes in CNI_ARGS.
type PodArgs struct {
	Namespace     string
	Name          string
	UID           string
	InfraID       string
	IgnoreUnknown bool
}

// IsLauncherPod reports whether the pod may be a KubeVirt VM pod. It is the
// shim's fast-path test: anything else passes through without the daemon.
func (p PodArgs) IsLauncherPod() bool { return strings.HasPrefix(p.Name, LauncherPrefix) }

// ParseArgs reads CNI_ARGS ("K=V;K2=V2"). Unknown keys are kept out of the
// way rather than refused: runtimes add keys over time and vmnic is chained
// behind plugins that accept them.
func ParseArgs(s string) (PodArgs, *types.Error) {
	var p PodArgs
	if s == "" {
		return p, nil
	}
	for _, kv := range strings.Split(s, ";") {
		if kv == "" {
			continue
		}
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			return p, types.NewError(types.ErrInvalidEnvironmentVariables, "CNI_ARGS: pair "+quote(kv)+" has no '='", "")
		}
		switch k {
		case "K8S_POD_NAMESPACE":
			p.Namespace = v
		case "K8S_POD_NAME":
			p.Name = v
		case "K8S_POD_UID":
			p.UID = v
		case "K8S_POD_INFRA_CONTAINER_ID":
			p.InfraID = v
		case "IgnoreUnknown":
			p.IgnoreUnknown = v == "1" || strings.EqualFold(v, "true")
		}
	}
	return p, nil
}

func quote(s string) string {
	if len(s) > 64 {
		s = s[:64] + "…"
	}
	return "\"" + s + "\""
}
