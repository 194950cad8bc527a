package spiderpool

import (
	"context"
	"encoding/base64"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/kubernetes"

	"github.com/vmnic/vmnic/test/cluster"
	"github.com/vmnic/vmnic/test/proc"
)

// ControllerOptions tune StartController.
type ControllerOptions struct {
	// Launcher starts the controller; one made with proc.NewLauncherIn
	// runs it in a node's network namespace, as the chart's
	// hostNetwork Deployment runs it there. nil: the controller's own,
	// in this namespace.
	Launcher *proc.Launcher
	// Address is where the API server reaches the controller's webhook
	// (the Service's endpoint; the cluster needs Aggregation, which routes
	// to endpoints): the node's IP. Required, and not a loopback address:
	// the API server refuses one in an EndpointSlice. The controller's
	// ports are free ones, not the chart's.
	Address string
	// CNIConfDir is the node's CNI config directory
	// (SPIDERPOOL_CNI_CONFIG_DIR).
	CNIConfDir string
	// Dial reaches the controller's health port at 127.0.0.1 where it
	// runs (proc.NetnsDialer of a node's namespace). nil: this
	// namespace.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// Values are extra --set values for Spiderpool's chart.
	Values []string
}

// Controller is a running spiderpool-controller.
type Controller struct {
	// Dir holds its config, certificates and log.
	Dir, Log string
	// WebhookPort and HealthPort are where it serves, on all addresses.
	WebhookPort, HealthPort int
	launcher                *proc.Launcher
	own                     bool // launcher is the controller's own
	proc                    *proc.Proc
}

// controllerValues render the chart as the tests' nodes need it: Multus,
// the CNI plugins and the coordinator are installed by the tests, not by
// the chart; IPv4 only.
var controllerValues = []string{
	"multus.multusCNI.install=false",
	"multus.multusCNI.uninstall=false",
	"plugins.installCNI=false",
	"coordinator.enabled=false",
	"ipam.enableIPv6=false",
}

// StartController runs spiderpool-controller as Spiderpool's chart deploys
// it: `helm template` of the release's chart (its auto method generates the
// webhook's CA and certificate) gives the controller's ConfigMap, its
// certificate Secret, its Service and the mutating and validating webhook
// configurations, and the Deployment's arguments and environment. The
// webhook configurations are applied, the Service with an EndpointSlice at
// opts.Address (no pod runs the controller: it is a process in the node's
// network namespace, as the hostNetwork pod would be), and the controller
// is started with the cluster's admin kubeconfig. It returns once the
// controller reports ready. The controller turns SpiderMultusConfigs into
// NetworkAttachmentDefinitions, and its webhooks default and validate
// Spiderpool's objects from then on. StartAgent's CRDs must be installed.
func StartController(ctx context.Context, c *cluster.Cluster, dir string, opts ControllerOptions) (*Controller, error) {
	if ip := net.ParseIP(opts.Address); ip == nil || ip.IsLoopback() {
		return nil, fmt.Errorf("ControllerOptions.Address %q: want the IP address the API server reaches the webhook at, not a loopback one", opts.Address)
	}
	if opts.Dial == nil {
		opts.Dial = (&net.Dialer{}).DialContext
	}
	paths, err := cluster.Binaries(ctx, "spiderpool-controller", "helm")
	if err != nil {
		return nil, err
	}
	bin, helm := paths[0], paths[1]
	mod, err := ModuleDir(ctx)
	if err != nil {
		return nil, err
	}
	if err = os.MkdirAll(filepath.Join(dir, "tls"), 0o755); err != nil {
		return nil, err
	}
	args := []string{"template", "spiderpool", filepath.Join(mod, "charts", "spiderpool"), "--namespace", "kube-system"}
	for _, v := range append(controllerValues, opts.Values...) {
		args = append(args, "--set", v)
	}
	cmd := exec.CommandContext(ctx, helm, args...)
	cmd.Env = append(os.Environ(), "HOME="+dir)
	out, err := cmd.Output()
	if err != nil {
		if ee, ok := err.(*exec.ExitError); ok {
			err = fmt.Errorf("%w: %s", err, ee.Stderr)
		}
		return nil, fmt.Errorf("helm template Spiderpool's chart: %w", err)
	}
	objs, err := cluster.Objects(out)
	if err != nil {
		return nil, err
	}
	var env []string
	var ctlArgs []string
	for _, o := range objs {
		switch {
		case o.GetKind() == "Secret" && o.GetName() == "spiderpool-controller-server-certs":
			for _, k := range []string{"tls.crt", "tls.key", "ca.crt"} {
				v, _, _ := unstructured.NestedString(o.Object, "data", k)
				b, derr := base64.StdEncoding.DecodeString(v)
				if derr != nil || len(b) == 0 {
					return nil, fmt.Errorf("the chart's controller Secret has no %s", k)
				}
				if err = os.WriteFile(filepath.Join(dir, "tls", k), b, 0o600); err != nil {
					return nil, err
				}
			}
		case o.GetKind() == "ConfigMap" && o.GetName() == "spiderpool-conf":
			conf, _, _ := unstructured.NestedString(o.Object, "data", "conf.yml")
			if err = os.WriteFile(filepath.Join(dir, "conf.yml"), []byte(conf), 0o644); err != nil {
				return nil, err
			}
		case o.GetKind() == "Deployment" && o.GetName() == "spiderpool-controller":
			env, ctlArgs = controllerEnv(o, opts)
		case o.GetKind() == "MutatingWebhookConfiguration" || o.GetKind() == "ValidatingWebhookConfiguration" ||
			(o.GetKind() == "Service" && o.GetName() == "spiderpool-controller"):
			if o.GetKind() == "Service" {
				// Endpoints by hand, below: no pod to select.
				unstructured.RemoveNestedField(o.Object, "spec", "selector")
			}
			j, jerr := o.MarshalJSON()
			if jerr != nil {
				return nil, jerr
			}
			if err = c.Apply(ctx, j); err != nil {
				return nil, fmt.Errorf("apply the chart's %s %s: %w", o.GetKind(), o.GetName(), err)
			}
		}
	}
	if ctlArgs == nil {
		return nil, fmt.Errorf("the chart rendered no spiderpool-controller Deployment")
	}
	ports, err := proc.FreePorts(4)
	if err != nil {
		return nil, err
	}
	ctl := &Controller{Dir: dir, Log: filepath.Join(dir, "spiderpool-controller.log"), WebhookPort: ports[0], HealthPort: ports[1], launcher: opts.Launcher}
	if ctl.launcher == nil {
		ctl.launcher, ctl.own = proc.NewLauncher(), true
	}
	env = append(env,
		"SPIDERPOOL_WEBHOOK_PORT="+strconv.Itoa(ports[0]),
		"SPIDERPOOL_HEALTH_PORT="+strconv.Itoa(ports[1]),
		"SPIDERPOOL_METRIC_HTTP_PORT="+strconv.Itoa(ports[2]),
		"SPIDERPOOL_GOPS_LISTEN_PORT="+strconv.Itoa(ports[3]))
	if err = controllerEndpoints(ctx, c, opts.Address, int32(ports[0]), int32(ports[1])); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(ctl.Log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	defer func() { _ = f.Close() }()
	// The Deployment's arguments, with the mounted files where they are
	// here.
	for i, a := range ctlArgs {
		switch {
		case strings.HasPrefix(a, "--config-path="):
			ctlArgs[i] = "--config-path=" + filepath.Join(dir, "conf.yml")
		case strings.HasPrefix(a, "--tls-server-cert="):
			ctlArgs[i] = "--tls-server-cert=" + filepath.Join(dir, "tls", "tls.crt")
		case strings.HasPrefix(a, "--tls-server-key="):
			ctlArgs[i] = "--tls-server-key=" + filepath.Join(dir, "tls", "tls.key")
		}
	}
	_, _ = fmt.Fprintf(f, "==== %s %s\n", bin, strings.Join(ctlArgs, " "))
	run := exec.Command(bin, ctlArgs...)
	run.Dir, run.Stdout, run.Stderr = dir, f, f
	run.Env = append(env, "KUBECONFIG="+c.Kubeconfig, "GOPS_CONFIG_DIR="+filepath.Join(dir, "gops"), "PATH=/usr/sbin:/usr/bin:/sbin:/bin")
	if ctl.proc, err = proc.StartCmd(ctl.launcher, run); err != nil {
		return nil, fmt.Errorf("start spiderpool-controller: %w", err)
	}
	if err := ctl.waitReady(ctx, 2*time.Minute, opts.Dial); err != nil {
		ctl.Stop()
		return nil, fmt.Errorf("%w\n--- %s (last 40 lines)\n%s", err, ctl.Log, proc.Tail(ctl.Log, 40))
	}
	return ctl, nil
}

// controllerEnv is the environment of the Deployment's container, its
// fieldRefs filled in, and its arguments.
func controllerEnv(d *unstructured.Unstructured, opts ControllerOptions) (env, args []string) {
	containers, _, _ := unstructured.NestedSlice(d.Object, "spec", "template", "spec", "containers")
	if len(containers) == 0 {
		return nil, nil
	}
	c, _ := containers[0].(map[string]any)
	as, _, _ := unstructured.NestedStringSlice(c, "args")
	envs, _, _ := unstructured.NestedSlice(c, "env")
	for _, e := range envs {
		m, _ := e.(map[string]any)
		name, _ := m["name"].(string)
		value, _ := m["value"].(string)
		switch name {
		case "SPIDERPOOL_POD_NAME":
			value = "spiderpool-controller-0"
		case "SPIDERPOOL_POD_NAMESPACE":
			value = "kube-system"
		case "SPIDERPOOL_CNI_CONFIG_DIR":
			if opts.CNIConfDir != "" {
				value = opts.CNIConfDir
			}
		}
		switch name {
		case "SPIDERPOOL_WEBHOOK_PORT", "SPIDERPOOL_HEALTH_PORT", "SPIDERPOOL_METRIC_HTTP_PORT", "SPIDERPOOL_GOPS_LISTEN_PORT":
			continue // free ones instead
		}
		env = append(env, name+"="+value)
	}
	return env, as
}

// controllerEndpoints points the chart's Service at the controller's
// ports on addr.
func controllerEndpoints(ctx context.Context, c *cluster.Cluster, addr string, webhookPort, healthPort int32) error {
	kube, err := kubernetes.NewForConfig(c.Config)
	if err != nil {
		return err
	}
	webhook, health := "webhook", "http"
	port := func(p int32) *int32 { return &p }
	tcp := corev1.ProtocolTCP
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{
			Name: "spiderpool-controller", Namespace: "kube-system",
			Labels: map[string]string{discoveryv1.LabelServiceName: "spiderpool-controller", discoveryv1.LabelManagedBy: "vmnic-tests"},
		},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{addr}}},
		Ports: []discoveryv1.EndpointPort{
			{Name: &webhook, Port: port(webhookPort), Protocol: &tcp},
			{Name: &health, Port: port(healthPort), Protocol: &tcp},
		},
	}
	_, err = kube.DiscoveryV1().EndpointSlices("kube-system").Create(ctx, slice, metav1.CreateOptions{})
	return err
}

// waitReady polls the readiness endpoint of the Deployment's probe.
func (ctl *Controller) waitReady(ctx context.Context, timeout time.Duration, dial func(ctx context.Context, network, addr string) (net.Conn, error)) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DialContext: dial}}
	defer client.CloseIdleConnections()
	url := fmt.Sprintf("http://127.0.0.1:%d/v1/runtime/readiness", ctl.HealthPort)
	var last string
	for {
		resp, err := client.Get(url)
		if err == nil {
			_ = resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			last = resp.Status
		} else {
			last = err.Error()
		}
		select {
		case <-ctl.proc.Exited():
			return fmt.Errorf("spiderpool-controller exited during startup (%v)", ctl.proc.Err())
		case <-ctx.Done():
			return fmt.Errorf("spiderpool-controller not ready after %v: %s", timeout, last)
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// Stop kills the controller.
func (ctl *Controller) Stop() {
	if ctl.proc != nil {
		ctl.proc.Kill()
	}
	if ctl.own {
		ctl.launcher.Close()
	}
}

// StartControllerT starts a controller in a t.TempDir() and stops it when
// the test ends, with its log's tail when the test failed.
func StartControllerT(t testing.TB, c *cluster.Cluster, opts ControllerOptions) *Controller {
	t.Helper()
	ctl, err := StartController(t.Context(), c, t.TempDir(), opts)
	if err != nil {
		t.Fatalf("start spiderpool-controller: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("spiderpool-controller log (%s):\n%s", ctl.Log, proc.Tail(ctl.Log, 40))
		}
		ctl.Stop()
	})
	return ctl
}

// NADResource is Multus' NetworkAttachmentDefinition.
var NADResource = schema.GroupVersionResource{Group: "k8s.cni.cncf.io", Version: "v1", Resource: "network-attachment-definitions"}

// WaitNAD waits up to a minute for the NetworkAttachmentDefinition
// namespace/name the controller makes of a SpiderMultusConfig.
func WaitNAD(ctx context.Context, t testing.TB, c *cluster.Cluster, namespace, name string) *unstructured.Unstructured {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	for {
		nad, err := c.Dynamic.Resource(NADResource).Namespace(namespace).Get(ctx, name, metav1.GetOptions{})
		if err == nil {
			return nad
		}
		if !apierrors.IsNotFound(err) {
			t.Fatal(err)
		}
		select {
		case <-ctx.Done():
			t.Fatalf("no NetworkAttachmentDefinition %s/%s from spiderpool-controller: %v", namespace, name, ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}
