// Package shim is the CNI plugin binary's logic: small, exec'd by the runtime
// for every pod on the node. It forwards VM pods to the vmnicd daemon and
// hands every other pod its prevResult back without touching the daemon, so a
// daemon outage never stops an ordinary pod from starting.
package shim

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/vmnic/vmnic/pkg/netconf"
	"github.com/vmnic/vmnic/pkg/proto"
	"github.com/vmnic/vmnic/pkg/spool"
	release "github.com/vmnic/vmnic/pkg/version"
)

// Supported lists the CNI spec versions the shim speaks. Chaining (prevResult)
// starts at 0.3.0.
var Supported = version.PluginSupports("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")

// Main runs the plugin.
func Main() {
	skel.PluginMainFuncs(skel.CNIFuncs{
		Add:    cmdAdd,
		Del:    cmdDel,
		Check:  cmdCheck,
		Status: cmdStatus,
		GC:     cmdGC,
	}, Supported, "vmnic "+release.Version+": KubeVirt VM NICs (masquerade, passt, bridge)")
}

func request(cmd string, args *skel.CmdArgs) *proto.Request {
	return &proto.Request{
		Command:     cmd,
		ContainerID: args.ContainerID,
		Netns:       args.Netns,
		IfName:      args.IfName,
		Args:        args.Args,
		Path:        args.Path,
		Config:      args.StdinData,
	}
}

// forward sends a request that must be served, waiting for the daemon's
// readiness up to the configured bound, and prints the result.
func forward(cmd string, args *skel.CmdArgs, conf *netconf.Conf) error {
	resp, err := proto.CallReady(context.Background(), conf.Socket, request(cmd, args), conf.ReadyTimeout)
	if err != nil {
		return err
	}
	if resp.Error != nil {
		return resp.Error
	}
	if len(resp.Result) > 0 {
		if _, err := os.Stdout.Write(resp.Result); err != nil {
			return types.NewError(types.ErrIOFailure, "write result: "+err.Error(), "")
		}
	}
	return nil
}

func load(args *skel.CmdArgs) (*netconf.Conf, netconf.PodArgs, error) {
	conf, cerr := netconf.Parse(args.StdinData)
	if cerr != nil {
		return nil, netconf.PodArgs{}, cerr
	}
	pod, cerr := netconf.ParseArgs(args.Args)
	if cerr != nil {
		return nil, pod, cerr
	}
	return conf, pod, nil
}

func cmdAdd(args *skel.CmdArgs) error {
	conf, pod, err := load(args)
	if err != nil {
		return err
	}
	if cerr := conf.RequirePrevResult(); cerr != nil {
		return cerr
	}
	if !pod.IsLauncherPod() && conf.Chained() {
		// Fast path: the result is the previous plugin's, byte for byte in
		// meaning, and the daemon is not contacted. Bridge mode is the
		// network's main plugin: every pod on it needs its port.
		return types.PrintResult(conf.PrevResult, conf.CNIVersion)
	}
	return forward("ADD", args, conf)
}

func cmdCheck(args *skel.CmdArgs) error {
	conf, pod, err := load(args)
	if err != nil {
		return err
	}
	if cerr := conf.RequirePrevResult(); cerr != nil {
		return cerr
	}
	if !pod.IsLauncherPod() && conf.Chained() {
		return nil
	}
	return forward("CHECK", args, conf)
}

// cmdDel never fails because the daemon is away: the request goes to the
// spool and the daemon replays it when it is back.
func cmdDel(args *skel.CmdArgs) error {
	conf, pod, err := load(args)
	if err != nil {
		return err
	}
	if !pod.IsLauncherPod() && conf.Chained() {
		return nil
	}
	req := request("DEL", args)
	ctx, cancel := context.WithTimeout(context.Background(), conf.ReadyTimeout)
	defer cancel()
	resp, err := proto.Call(ctx, conf.Socket, req)
	switch {
	case err == nil && resp.Error == nil:
		return nil
	case err == nil && resp.Error.Code != types.ErrTryAgainLater:
		return resp.Error
	}
	if serr := spool.Write(conf.SpoolDir, conf.Name, req); serr != nil {
		// Without the spool the only safe answer is an error: the runtime
		// retries DEL until it succeeds.
		return types.NewError(types.ErrIOFailure, fmt.Sprintf("daemon unavailable (%v) and spooling DEL failed: %v", describe(err, resp), serr), "")
	}
	fmt.Fprintf(os.Stderr, "vmnic: daemon unavailable (%v); DEL of %s/%s spooled for replay\n", describe(err, resp), args.ContainerID, args.IfName)
	return nil
}

func describe(err error, resp *proto.Response) string {
	if err != nil {
		return err.Error()
	}
	return resp.Error.Error()
}

// StatusTimeout bounds a bridge-mode STATUS: the runtime calls STATUS on
// every CRI Status poll, so it never waits for the daemon to come up.
const StatusTimeout = 2 * time.Second

// cmdStatus answers whether the network can take ADDs, which decides the
// node's NetworkReady (and so its Ready condition) when vmnic is chained
// into the node's primary network.
//
//   - masquerade and passt (chained): ready at once, without the daemon.
//     Every ordinary pod passes through the shim without it; a VM pod's ADD
//     that needs it gets code 11 and kubelet retries. A daemon outage must
//     not make the node NotReady and evict every pod on it.
//   - bridge (a network's main plugin): the daemon serves every ADD, so
//     STATUS asks it once, without waiting: code 50 when it is away or not
//     ready, or when the OVS bridge or the IPAM plugin cannot serve.
func cmdStatus(args *skel.CmdArgs) error {
	conf, cerr := netconf.Parse(args.StdinData)
	if cerr != nil {
		return cerr
	}
	if conf.Chained() {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), min(StatusTimeout, conf.ReadyTimeout))
	defer cancel()
	resp, err := proto.Call(ctx, conf.Socket, request("STATUS", args))
	if err != nil {
		return types.NewError(types.ErrPluginNotAvailable, "vmnic daemon unavailable: "+err.Error(), "")
	}
	if resp.Error != nil {
		return resp.Error
	}
	return nil
}

func cmdGC(args *skel.CmdArgs) error {
	conf, cerr := netconf.Parse(args.StdinData)
	if cerr != nil {
		return cerr
	}
	return forward("GC", args, conf)
}
