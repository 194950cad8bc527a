package node_test

import (
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vmnic/vmnic/pkg/nft"
	"github.com/vmnic/vmnic/test/need"
	"github.com/vmnic/vmnic/test/node"
)

// TestMultusOnNode puts Multus thick in front of Flannel and vmnic, as a
// node with secondary networks runs: multus-daemon in its DaemonSet,
// multus-shim in the bin dir, its generated 00-multus.conf first in the
// conf dir (the one containerd uses). vmnic, installed after it, chains
// into Flannel's conflist and never into Multus' own; a plain pod and a VM
// pod go through Multus to the cluster network, where vmnic wires the VM
// pod; Multus' network-status annotation carries Flannel's address.
func TestMultusOnNode(t *testing.T) {
	need.NoError(t, node.Check())
	ctx := t.Context()
	n := node.StartT(t, node.Options{})
	if err := n.Cluster.InstallKubeVirtCRDs(ctx); err != nil {
		t.Fatal(err)
	}
	if err := n.LabelSchedulable(ctx); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := n.InstallMultus(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("Multus thick ready after %v", time.Since(start).Round(time.Millisecond))
	img, err := node.BuildVmnicImage(ctx, t.TempDir(), "v1")
	if err != nil {
		t.Fatal(err)
	}
	if err := n.InstallVmnic(ctx, img); err != nil {
		t.Fatal(err)
	}
	if _, err := n.WaitDaemonSet(ctx, 2*time.Minute); err != nil {
		t.Fatal(err)
	}
	types, err := n.ConflistPlugins()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(types, []string{"flannel", "portmap", "vmnic"}) {
		t.Errorf("Flannel's conflist plugins %v, want flannel, portmap, vmnic", types)
	}
	mc, err := os.ReadFile(filepath.Join(n.CNIConfDir, node.MultusConf))
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%s: %s", node.MultusConf, mc)
	var multus struct {
		Type    string            `json:"type"`
		Plugins []json.RawMessage `json:"plugins"`
	}
	if err := json.Unmarshal(mc, &multus); err != nil {
		t.Fatal(err)
	}
	if multus.Type != "multus-shim" || multus.Plugins != nil || strings.Contains(string(mc), `"vmnic"`) {
		t.Errorf("vmnic touched Multus' config: %s", mc)
	}
	if _, err := os.Stat(filepath.Join(n.CNIConfDir, node.MultusConf+".vmnic-orig")); err == nil {
		t.Errorf("vmnic converted Multus' config")
	}

	plain := startPlainPod(ctx, t, n, "plain")
	if !strings.HasPrefix(plain.Status.PodIP, "10.244.") {
		t.Errorf("plain pod IP %s, want Flannel's", plain.Status.PodIP)
	}
	_, vm := createVMPod(ctx, t, n, "vm1")
	pod, err := n.WaitPodReady(ctx, vm.Namespace, vm.Name, 2*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	path, err := n.PodNetns(pod.Namespace, pod.Name)
	if err != nil {
		t.Fatal(err)
	}
	tables, err := node.InNetns(path, "nft", "list", "tables")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(tables, "ip "+nft.TableName) {
		t.Errorf("no vmnic NAT table in the VM pod behind Multus: %q", tables)
	}
	status := pod.Annotations["k8s.v1.cni.cncf.io/network-status"]
	if !strings.Contains(status, pod.Status.PodIP) || !strings.Contains(status, `"default": true`) && !strings.Contains(status, `"default":true`) {
		t.Errorf("Multus' network-status %s lacks the default network with the pod IP %s", status, pod.Status.PodIP)
	}
}
