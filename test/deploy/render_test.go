package deploy

import (
	"bytes"
	"errors"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	admissionv1 "k8s.io/api/admissionregistration/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"

	"github.com/vmnic/vmnic/test/cluster"
)

// TestManifestUpToDate checks that deploy/manifests/vmnic.yaml is the
// chart rendered with its defaults (-update rewrites it).
func TestManifestUpToDate(t *testing.T) {
	want := renderDefault(t)
	path := filepath.Join(repoRoot(t), manifestPath)
	if *update {
		if err := os.WriteFile(path, want, 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("wrote %s", manifestPath)
		return
	}
	have, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (generate it with -update)", err)
	}
	if !bytes.Equal(have, want) {
		t.Errorf("%s differs from a fresh render of %s at %s\nregenerate: go test ./test/deploy -run TestManifestUpToDate -update",
			manifestPath, chartDir, firstDiff(have, want))
	}
}

// TestChartCRDs checks that the chart's crds/ holds exactly the CRDs of
// deploy/crds, byte for byte, so that the two cannot drift (-update copies
// them over). Helm installs crds/ on install only, never on upgrade.
func TestChartCRDs(t *testing.T) {
	root := repoRoot(t)
	srcDir := filepath.Join(root, crdSourceDir)
	dstDir := filepath.Join(root, chartDir, "crds")
	src := yamlFiles(t, srcDir)
	if len(src) == 0 {
		t.Fatalf("no CRDs in %s", crdSourceDir)
	}
	if *update {
		for _, name := range yamlFiles(t, dstDir) {
			if !slices.Contains(src, name) {
				if err := os.Remove(filepath.Join(dstDir, name)); err != nil {
					t.Fatal(err)
				}
			}
		}
		for _, name := range src {
			b := readRepoFile(t, filepath.Join(crdSourceDir, name))
			if err := os.WriteFile(filepath.Join(dstDir, name), b, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		t.Logf("copied %v from %s to %s/crds", src, crdSourceDir, chartDir)
		return
	}
	if dst := yamlFiles(t, dstDir); !slices.Equal(src, dst) {
		t.Errorf("%s/crds holds %v, %s holds %v\nsync: go test ./test/deploy -run TestChartCRDs -update", chartDir, dst, crdSourceDir, src)
	}
	for _, name := range src {
		want := readRepoFile(t, filepath.Join(crdSourceDir, name))
		have, err := os.ReadFile(filepath.Join(dstDir, name))
		if err != nil {
			continue // reported above
		}
		if !bytes.Equal(have, want) {
			t.Errorf("%s/crds/%s differs from %s/%s at %s\nsync: go test ./test/deploy -run TestChartCRDs -update",
				chartDir, name, crdSourceDir, name, firstDiff(have, want))
		}
	}
}

func yamlFiles(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		if !e.IsDir() && (strings.HasSuffix(e.Name(), ".yaml") || strings.HasSuffix(e.Name(), ".yml")) {
			names = append(names, e.Name())
		}
	}
	return names // os.ReadDir sorts
}

// TestLint runs "helm lint --strict" with the default and with
// non-default values.
func TestLint(t *testing.T) {
	helm(t, "lint", "--strict", chartDir)
	helm(t, append([]string{"lint", "--strict", chartDir}, setArgs(nonDefault)...)...)
}

// nonDefault are values that take every other branch of the templates.
var nonDefault = []string{
	"fullnameOverride=edge",
	"securityContext.privileged=false",
	"updateStrategy.maxUnavailable=25%",
	"kubevirt.binding.name=vmnic-tap",
	"cni.binDir=/var/lib/rancher/k3s/data/current/bin",
	"cni.confDir=/var/lib/rancher/k3s/agent/etc/cni/net.d",
	"cni.chain=false",
	"daemon.nodeNetworkCapability=false",
	"daemon.extraArgs={--log-level=debug}",
	"image.repository=registry.example/vmnic",
	"image.tag=v9.9.9",
	"metrics.bind=hostIP",
	"metrics.port=9962",
	"metrics.prometheusAnnotations=true",
	"metrics.serviceMonitor.enabled=true",
	"metrics.serviceMonitor.labels.release=prometheus",
	"metrics.serviceMonitor.interval=30s",
	"metrics.serviceMonitor.scrapeTimeout=10s",
	"metrics.serviceMonitor.metricRelabelings[0].action=keep",
	"metrics.serviceMonitor.metricRelabelings[0].sourceLabels={__name__}",
	"metrics.serviceMonitor.metricRelabelings[0].regex=vmnic_.*",
	"probes.readiness.initialDelaySeconds=2",
	"podAnnotations.team=net",
}

func setArgs(set []string) []string {
	var args []string
	for _, s := range set {
		args = append(args, "--set", s)
	}
	return args
}

// rendered is one render decoded into typed objects.
type rendered struct {
	objs    []*unstructured.Unstructured
	ds      *appsv1.DaemonSet
	role    *rbacv1.ClusterRole
	binding *rbacv1.ClusterRoleBinding
	sa      *corev1.ServiceAccount
	policy  *admissionv1.ValidatingAdmissionPolicy
	vapb    *admissionv1.ValidatingAdmissionPolicyBinding
	// The metrics Service; its ServiceMonitor stays in objs (no Go type
	// here).
	svc *corev1.Service
}

func decode(t *testing.T, manifest []byte) *rendered {
	t.Helper()
	objs, err := cluster.Objects(manifest)
	if err != nil {
		t.Fatal(err)
	}
	r := &rendered{objs: objs}
	for _, o := range objs {
		var into any
		switch o.GetKind() {
		case "DaemonSet":
			r.ds = &appsv1.DaemonSet{}
			into = r.ds
		case "ClusterRole":
			r.role = &rbacv1.ClusterRole{}
			into = r.role
		case "ClusterRoleBinding":
			r.binding = &rbacv1.ClusterRoleBinding{}
			into = r.binding
		case "ServiceAccount":
			r.sa = &corev1.ServiceAccount{}
			into = r.sa
		case "ValidatingAdmissionPolicy":
			r.policy = &admissionv1.ValidatingAdmissionPolicy{}
			into = r.policy
		case "ValidatingAdmissionPolicyBinding":
			r.vapb = &admissionv1.ValidatingAdmissionPolicyBinding{}
			into = r.vapb
		case "Service":
			r.svc = &corev1.Service{}
			into = r.svc
		default:
			continue
		}
		if err := runtime.DefaultUnstructuredConverter.FromUnstructuredWithValidation(o.Object, into, true); err != nil {
			t.Fatalf("%s %s: %v", o.GetKind(), o.GetName(), err)
		}
	}
	if r.ds == nil || r.role == nil || r.binding == nil || r.sa == nil {
		t.Fatalf("render lacks a DaemonSet, ClusterRole, ClusterRoleBinding or ServiceAccount: %d objects", len(objs))
	}
	return r
}

func (r *rendered) kinds() []string {
	var ks []string
	for _, o := range r.objs {
		ks = append(ks, o.GetKind()+"/"+o.GetName())
	}
	return ks
}

// container returns the named (init) container.
func (r *rendered) container(t *testing.T, name string) corev1.Container {
	t.Helper()
	spec := r.ds.Spec.Template.Spec
	for _, c := range append(slices.Clone(spec.InitContainers), spec.Containers...) {
		if c.Name == name {
			return c
		}
	}
	t.Fatalf("no container %q in the DaemonSet", name)
	return corev1.Container{}
}

// TestRenderDefaults checks the default render against the deployment
// contract: host network, the init install step, the node name, the host
// paths vmnicd and the shim share, tolerations, priority, update strategy,
// identity and the admission policy.
func TestRenderDefaults(t *testing.T) {
	r := decode(t, render(t, defaultRelease, defaultNamespace))
	if want := []string{
		"CustomResourceDefinition/nodenetworkcapabilities.vmnic.io",
		"ServiceAccount/vmnic", "ClusterRole/vmnic", "ClusterRoleBinding/vmnic", "Role/vmnic", "RoleBinding/vmnic", "DaemonSet/vmnic",
		"ValidatingAdmissionPolicy/" + policyName, "ValidatingAdmissionPolicyBinding/" + policyName,
	}; !slices.Equal(r.kinds(), want) {
		t.Errorf("objects %v, want %v", r.kinds(), want)
	}
	spec := r.ds.Spec.Template.Spec
	if !spec.HostNetwork || spec.HostPID || spec.HostIPC {
		t.Errorf("hostNetwork %v hostPID %v hostIPC %v, want true false false", spec.HostNetwork, spec.HostPID, spec.HostIPC)
	}
	if spec.PriorityClassName != "system-node-critical" {
		t.Errorf("priorityClassName %q", spec.PriorityClassName)
	}
	if len(spec.Tolerations) != 1 || spec.Tolerations[0].Operator != corev1.TolerationOpExists || spec.Tolerations[0].Key != "" {
		t.Errorf("tolerations %+v, want one {operator: Exists}", spec.Tolerations)
	}
	if spec.ServiceAccountName != r.sa.Name || r.sa.Namespace != defaultNamespace {
		t.Errorf("serviceAccountName %q, ServiceAccount %s/%s", spec.ServiceAccountName, r.sa.Namespace, r.sa.Name)
	}
	if u := r.ds.Spec.UpdateStrategy; u.Type != appsv1.RollingUpdateDaemonSetStrategyType || u.RollingUpdate == nil ||
		u.RollingUpdate.MaxUnavailable == nil || u.RollingUpdate.MaxUnavailable.String() != "10%" ||
		u.RollingUpdate.MaxSurge == nil || u.RollingUpdate.MaxSurge.String() != "0" {
		t.Errorf("updateStrategy %+v, want RollingUpdate maxUnavailable 10%%, maxSurge 0", u)
	}
	if res := r.container(t, "vmnicd").Resources; res.Requests.Memory().String() != "64Mi" || res.Limits.Memory().String() != "256Mi" || !res.Limits.Cpu().IsZero() {
		t.Errorf("vmnicd resources %+v, want 64Mi requested, a 256Mi memory limit and no CPU limit", res)
	}

	initC := r.container(t, "install")
	if want := []string{
		"install", "--install-from=/usr/local/bin/vmnic",
		"--cni-bin-dir=/host/opt/cni/bin", "--cni-conf-dir=/host/etc/cni/net.d", "--chain=true",
	}; !slices.Equal(append(initC.Command, initC.Args...)[1:6], want) {
		t.Errorf("init container %v %v, want vmnicd %v ...", initC.Command, initC.Args, want)
	}
	vmnicd := r.container(t, "vmnicd")
	for _, want := range []string{
		"--node-name=$(NODE_NAME)", "--bindings=vmnic", "--install-from=/usr/local/bin/vmnic",
		"--cni-bin-dir=/host/opt/cni/bin", "--cni-conf-dir=/host/etc/cni/net.d", "--chain=true",
		"--socket=/run/vmnic/vmnic.sock", "--state-dir=/var/lib/vmnic", "--spool-dir=/var/lib/vmnic/spool",
	} {
		if !slices.Contains(vmnicd.Args, want) {
			t.Errorf("vmnicd args %v lack %s", vmnicd.Args, want)
		}
	}
	if len(vmnicd.Env) == 0 || vmnicd.Env[0].Name != "NODE_NAME" || vmnicd.Env[0].ValueFrom == nil ||
		vmnicd.Env[0].ValueFrom.FieldRef == nil || vmnicd.Env[0].ValueFrom.FieldRef.FieldPath != "spec.nodeName" {
		t.Errorf("vmnicd env %+v, want NODE_NAME from spec.nodeName first", vmnicd.Env)
	}
	for _, c := range []corev1.Container{initC, vmnicd} {
		if sc := c.SecurityContext; sc == nil || sc.Privileged == nil || !*sc.Privileged {
			t.Errorf("container %s securityContext %+v, want privileged", c.Name, sc)
		}
		if c.Image != "vmnic:dev" {
			t.Errorf("container %s image %q, want vmnic:dev", c.Name, c.Image)
		}
	}
	// Metrics on loopback: probed there by kubelet, not scrapeable, so no
	// port, no HOST_IP, no scrape annotations.
	checkMetricsEndpoint(t, vmnicd, "127.0.0.1:9961")
	if len(vmnicd.Ports) != 0 {
		t.Errorf("vmnicd ports %+v, want none (metrics on loopback)", vmnicd.Ports)
	}
	var env []string
	for _, e := range vmnicd.Env {
		if e.ValueFrom != nil && e.ValueFrom.FieldRef != nil {
			env = append(env, e.Name+"="+e.ValueFrom.FieldRef.FieldPath)
		}
	}
	if want := []string{"NODE_NAME=spec.nodeName", "POD_NAME=metadata.name", "POD_NAMESPACE=metadata.namespace"}; !slices.Equal(env, want) || len(vmnicd.Env) != len(want) {
		t.Errorf("vmnicd env %+v, want %v only", vmnicd.Env, want)
	}
	if a := r.ds.Spec.Template.Annotations; len(a) != 0 {
		t.Errorf("pod annotations %v, want none", a)
	}

	// Host path → (container path, propagation) for every mount of vmnicd.
	type mount struct {
		path        string
		propagation corev1.MountPropagationMode
	}
	want := map[string]mount{
		"/opt/cni/bin":         {"/host/opt/cni/bin", ""},
		"/etc/cni/net.d":       {"/host/etc/cni/net.d", ""},
		"/run/vmnic":           {"/run/vmnic", ""},
		"/var/lib/vmnic":       {"/var/lib/vmnic", ""},
		"/var/run/netns":       {"/var/run/netns", corev1.MountPropagationHostToContainer},
		"/run/netns":           {"/run/netns", corev1.MountPropagationHostToContainer},
		"/var/run/spidernet":   {"/var/run/spidernet", ""},
		"/var/run/openvswitch": {"/var/run/openvswitch", ""},
	}
	hostPaths := map[string]string{} // volume → host path
	for _, v := range spec.Volumes {
		if v.HostPath == nil {
			t.Errorf("volume %s is not a hostPath", v.Name)
			continue
		}
		if v.HostPath.Type == nil || *v.HostPath.Type != corev1.HostPathDirectoryOrCreate {
			t.Errorf("volume %s: hostPath type %v, want DirectoryOrCreate", v.Name, v.HostPath.Type)
		}
		hostPaths[v.Name] = v.HostPath.Path
	}
	have := map[string]mount{}
	readOnly := map[string]string{} // host path → where it is mounted read-only
	for _, m := range vmnicd.VolumeMounts {
		if m.ReadOnly {
			readOnly[hostPaths[m.Name]] = m.MountPath
			continue
		}
		p := corev1.MountPropagationMode("")
		if m.MountPropagation != nil {
			p = *m.MountPropagation
		}
		have[hostPaths[m.Name]] = mount{m.MountPath, p}
	}
	for host, w := range want {
		if have[host] != w {
			t.Errorf("host %s mounted as %+v, want %+v", host, have[host], w)
		}
	}
	if len(have) != len(want) {
		t.Errorf("vmnicd mounts %v, want exactly %v (no host /proc: netns paths are under /var/run/netns)", have, want)
	}
	// The bin dir at its host path too, read-only, for the IPAM plugins
	// vmnicd finds in the runtime's CNI_PATH; nothing else read-only.
	if want := map[string]string{"/opt/cni/bin": "/opt/cni/bin"}; !maps.Equal(readOnly, want) {
		t.Errorf("vmnicd read-only mounts %v, want %v", readOnly, want)
	}

	// The binding names the ServiceAccount; the policy matches its user.
	if s := r.binding.Subjects; len(s) != 1 || s[0].Kind != "ServiceAccount" || s[0].Name != r.sa.Name || s[0].Namespace != defaultNamespace {
		t.Errorf("ClusterRoleBinding subjects %+v", s)
	}
	if r.policy == nil || r.vapb == nil {
		t.Fatal("no ValidatingAdmissionPolicy and binding")
	}
	if mc := r.policy.Spec.MatchConditions; len(mc) != 1 ||
		mc[0].Expression != `request.userInfo.username == "system:serviceaccount:kube-system:vmnic"` {
		t.Errorf("policy matchConditions %+v", mc)
	}
	if r.vapb.Spec.PolicyName != r.policy.Name || !slices.Equal(r.vapb.Spec.ValidationActions, []admissionv1.ValidationAction{admissionv1.Deny}) {
		t.Errorf("policy binding %+v", r.vapb.Spec)
	}
	if !strings.Contains(r.policy.Spec.Variables[0].Expression, "'"+nodeNameKey+"'") {
		t.Errorf("policy does not read the %s claim: %s", nodeNameKey, r.policy.Spec.Variables[0].Expression)
	}
}

// TestRenderValues checks that values reach the objects.
func TestRenderValues(t *testing.T) {
	r := decode(t, render(t, "rel", "vmnic-system", nonDefault...))
	if r.ds.Name != "edge" || r.sa.Name != "edge" || r.ds.Namespace != "vmnic-system" {
		t.Errorf("names %s/%s sa %s, want vmnic-system/edge", r.ds.Namespace, r.ds.Name, r.sa.Name)
	}
	if got := r.ds.Spec.UpdateStrategy.RollingUpdate.MaxUnavailable.String(); got != "25%" {
		t.Errorf("maxUnavailable %s, want 25%%", got)
	}
	vmnicd := r.container(t, "vmnicd")
	for _, want := range []string{"--bindings=vmnic-tap", "--chain=false", "--capabilities=false", "--log-level=debug"} {
		if !slices.Contains(vmnicd.Args, want) {
			t.Errorf("vmnicd args %v lack %s", vmnicd.Args, want)
		}
	}
	for _, c := range []corev1.Container{r.container(t, "install"), vmnicd} {
		sc := c.SecurityContext
		if sc == nil || sc.Privileged == nil || *sc.Privileged || sc.Capabilities == nil ||
			!slices.Equal(sc.Capabilities.Add, []corev1.Capability{"NET_ADMIN", "SYS_ADMIN", "NET_RAW"}) ||
			!slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) {
			t.Errorf("container %s securityContext %+v, want unprivileged with NET_ADMIN SYS_ADMIN NET_RAW", c.Name, sc)
		}
		if c.Image != "registry.example/vmnic:v9.9.9" {
			t.Errorf("container %s image %q", c.Name, c.Image)
		}
	}
	paths := map[string]bool{}
	for _, v := range r.ds.Spec.Template.Spec.Volumes {
		paths[v.HostPath.Path] = true
	}
	if !paths["/var/lib/rancher/k3s/data/current/bin"] || !paths["/var/lib/rancher/k3s/agent/etc/cni/net.d"] {
		t.Errorf("host paths %v lack the k3s CNI dirs", paths)
	}
	// vmnicd runs the IPAM plugin it finds in the runtime's CNI_PATH, a
	// host path: the bin dir is mounted there too, read-only.
	atHost := false
	for _, m := range vmnicd.VolumeMounts {
		if m.Name == "cni-bin" && m.MountPath == "/var/lib/rancher/k3s/data/current/bin" && m.ReadOnly {
			atHost = true
		}
	}
	if !atHost {
		t.Errorf("vmnicd mounts %+v: want the CNI bin dir read-only at its host path", vmnicd.VolumeMounts)
	}
	if want := `request.userInfo.username == "system:serviceaccount:vmnic-system:edge"`; r.policy.Spec.MatchConditions[0].Expression != want {
		t.Errorf("policy matches %s, want %s", r.policy.Spec.MatchConditions[0].Expression, want)
	}

	// The node's own directories: the same path on the host and in the
	// container, and both containers name the same socket and spool (the
	// init step chains an entry that must match vmnicd's).
	dirs := decode(t, render(t, defaultRelease, defaultNamespace,
		"node.runDir=/srv/vmnic/run", "node.stateDir=/srv/vmnic/state", "cni.netnsDirs={/a/netns,/b/netns,/c/netns}"))
	for _, name := range []string{"install", "vmnicd"} {
		c := dirs.container(t, name)
		for _, want := range []string{"--socket=/srv/vmnic/run/vmnic.sock", "--spool-dir=/srv/vmnic/state/spool"} {
			if !slices.Contains(c.Args, want) {
				t.Errorf("%s args %v lack %s", name, c.Args, want)
			}
		}
	}
	mounts := map[string]corev1.VolumeMount{}
	for _, m := range dirs.container(t, "vmnicd").VolumeMounts {
		mounts[m.Name] = m
	}
	for _, v := range dirs.ds.Spec.Template.Spec.Volumes {
		m, ok := mounts[v.Name]
		if !ok {
			t.Errorf("volume %s is not mounted in vmnicd", v.Name)
			continue
		}
		if strings.HasPrefix(v.HostPath.Path, "/srv/") || strings.HasSuffix(v.HostPath.Path, "/netns") {
			if m.MountPath != v.HostPath.Path {
				t.Errorf("volume %s: host %s mounted at %s, want the same path", v.Name, v.HostPath.Path, m.MountPath)
			}
		}
		if strings.HasSuffix(v.HostPath.Path, "/netns") && (m.MountPropagation == nil || *m.MountPropagation != corev1.MountPropagationHostToContainer) {
			t.Errorf("netns volume %s without HostToContainer propagation", v.Name)
		}
		delete(mounts, v.Name)
	}
	got := []string{}
	for _, v := range dirs.ds.Spec.Template.Spec.Volumes {
		if strings.HasSuffix(v.HostPath.Path, "/netns") {
			got = append(got, v.Name+"="+v.HostPath.Path)
		}
	}
	if want := []string{"netns=/a/netns", "run-netns=/b/netns", "netns-2=/c/netns"}; !slices.Equal(got, want) {
		t.Errorf("netns volumes %v, want %v", got, want)
	}

	off := decode(t, render(t, defaultRelease, defaultNamespace, "admissionPolicy.enabled=false"))
	if off.policy != nil || off.vapb != nil {
		t.Error("admissionPolicy.enabled=false still renders the policy")
	}
}

// TestVmnicdAcceptsChartArgs runs the vmnicd of this tree with exactly the
// arguments the chart gives its two containers (plus -version, which exits
// after parsing), so a renamed or removed flag fails here, not on a node.
func TestVmnicdAcceptsChartArgs(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "vmnicd")
	build := exec.CommandContext(t.Context(), "go", "build", "-o", bin, "./cmd/vmnicd")
	build.Dir = repoRoot(t)
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build ./cmd/vmnicd: %v\n%s", err, out)
	}
	for _, set := range [][]string{nil, nonDefault} {
		r := decode(t, render(t, defaultRelease, defaultNamespace, set...))
		for _, name := range []string{"install", "vmnicd"} {
			c := r.container(t, name)
			if len(c.Command) != 1 || c.Command[0] != "/usr/local/bin/vmnicd" {
				t.Fatalf("container %s command %v, want /usr/local/bin/vmnicd (the Dockerfile's path)", name, c.Command)
			}
			args := make([]string, 0, len(c.Args)+1)
			for _, a := range c.Args {
				a = strings.ReplaceAll(a, "$(NODE_NAME)", "node-a")
				args = append(args, strings.ReplaceAll(a, hostIPRef, "192.0.2.1"))
			}
			args = append(args, "-version")
			out, err := exec.CommandContext(t.Context(), bin, args...).CombinedOutput()
			if err != nil {
				t.Errorf("container %s: vmnicd %s: %v\n%s", name, strings.Join(args, " "), err, out)
			}
		}
	}
}
