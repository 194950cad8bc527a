// Package deploy tests what vmnic ships to a cluster: the Helm chart
// (deploy/chart/vmnic) and its rendered form (deploy/manifests/vmnic.yaml).
// Rendering runs the real helm binary, built from test/tools/go.mod by
// test/tools/build.sh; the cluster tests run a real etcd + kube-apiserver
// (test/cluster) and use the daemon's identity exactly as a node would: a
// service-account token bound to a pod on that node.
//
// Regenerate the rendered manifest and the chart's CRD copy after changing
// the chart or deploy/crds:
//
//	go test ./test/deploy -run 'TestManifestUpToDate|TestChartCRDs' -update
package deploy

import (
	"bytes"
	"flag"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/vmnic/vmnic/test/cluster"
)

var update = flag.Bool("update", false, "rewrite deploy/manifests/vmnic.yaml and the chart's crds/ from their sources")

const (
	chartDir     = "deploy/chart/vmnic"
	manifestPath = "deploy/manifests/vmnic.yaml"
	crdSourceDir = "deploy/crds"
	// The release the committed manifest is rendered as.
	defaultRelease   = "vmnic"
	defaultNamespace = "kube-system"
	// The objects' names for release "vmnic" (fullname).
	fullname    = "vmnic"
	policyName  = fullname + "-own-node"
	nodeNameKey = "authentication.kubernetes.io/node-name" // k8s.io/apiserver serviceaccount.NodeNameKey
)

// manifestHeader heads deploy/manifests/vmnic.yaml; the rest is the output
// of the command it names.
const manifestHeader = `# Generated from deploy/chart/vmnic with its default values; do not edit.
#   helm template vmnic deploy/chart/vmnic --namespace kube-system --include-crds
# Regenerate after changing the chart or deploy/crds:
#   go test ./test/deploy -run 'TestManifestUpToDate|TestChartCRDs' -update
`

// repoRoot returns the repository root; chart and manifest paths are
// relative to it.
func repoRoot(t testing.TB) string {
	t.Helper()
	root, err := cluster.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	return root
}

// helmBinary returns the helm built by test/tools/build.sh (built on first
// use: a few minutes cold, under a second warm).
func helmBinary(t testing.TB) string {
	t.Helper()
	paths, err := cluster.Binaries(t.Context(), "helm")
	if err != nil {
		t.Fatalf("build helm: %v", err)
	}
	return paths[0]
}

// helm runs helm in the repository root with its config, cache and data in
// a temporary directory, and no kubeconfig unless args name one. It fails
// the test when helm fails.
func helm(t testing.TB, args ...string) []byte {
	t.Helper()
	out, err := helmErr(t, args...)
	if err != nil {
		t.Fatalf("helm %s: %v", strings.Join(args, " "), err)
	}
	return out
}

func helmErr(t testing.TB, args ...string) ([]byte, error) {
	t.Helper()
	home := t.TempDir()
	cmd := exec.CommandContext(t.Context(), helmBinary(t), args...)
	cmd.Dir = repoRoot(t)
	cmd.Env = append(os.Environ(),
		"HOME="+home,
		"HELM_CACHE_HOME="+filepath.Join(home, "cache"),
		"HELM_CONFIG_HOME="+filepath.Join(home, "config"),
		"HELM_DATA_HOME="+filepath.Join(home, "data"),
		"KUBECONFIG="+filepath.Join(home, "no-kubeconfig"),
	)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.Bytes(), &helmError{err: err, stderr: strings.TrimSpace(stderr.String())}
	}
	return stdout.Bytes(), nil
}

type helmError struct {
	err    error
	stderr string
}

func (e *helmError) Error() string { return e.err.Error() + ": " + e.stderr }
func (e *helmError) Unwrap() error { return e.err }

// render is "helm template" of the chart, CRDs included, with --set values.
func render(t testing.TB, release, namespace string, set ...string) []byte {
	t.Helper()
	args := []string{"template", release, chartDir, "--namespace", namespace, "--include-crds"}
	for _, s := range set {
		args = append(args, "--set", s)
	}
	return helm(t, args...)
}

// renderDefault is what deploy/manifests/vmnic.yaml must hold.
func renderDefault(t testing.TB) []byte {
	t.Helper()
	return append([]byte(manifestHeader), render(t, defaultRelease, defaultNamespace)...)
}

// readRepoFile reads a file by its path relative to the repository root.
func readRepoFile(t testing.TB, rel string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(repoRoot(t), rel))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// firstDiff describes where got and want part, for a failure message.
func firstDiff(got, want []byte) string {
	g, w := strings.Split(string(got), "\n"), strings.Split(string(want), "\n")
	for i := 0; i < len(g) || i < len(w); i++ {
		var gl, wl string
		if i < len(g) {
			gl = g[i]
		}
		if i < len(w) {
			wl = w[i]
		}
		if gl != wl || i >= len(g) || i >= len(w) {
			return "line " + strconv.Itoa(i+1) + ":\n  have: " + gl + "\n  want: " + wl
		}
	}
	return "identical"
}
