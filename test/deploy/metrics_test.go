package deploy

import (
	"errors"
	"net"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/vmnic/vmnic/test/spiderpool"
)

// metricsArg is the vmnicd flag of its metrics, /healthz and /readyz
// endpoint (daemon/main.go).
const metricsArg = "--metrics-addr="

// hostIPRef is how the chart names the node's IP in --metrics-addr.
const hostIPRef = "$(HOST_IP)"

// metricsAddr returns vmnicd's --metrics-addr; it fails the test unless the
// flag is given exactly once (a second one, from extraArgs, would win
// behind the probes' back).
func metricsAddr(t *testing.T, c corev1.Container) string {
	t.Helper()
	var addrs []string
	for _, a := range c.Args {
		if v, ok := strings.CutPrefix(a, metricsArg); ok {
			addrs = append(addrs, v)
		}
	}
	if len(addrs) != 1 {
		t.Fatalf("vmnicd args %v: %s given %d times, want once", c.Args, metricsArg, len(addrs))
	}
	return addrs[0]
}

// checkMetricsEndpoint checks that vmnicd serves its endpoint on want and
// that the liveness and readiness probes reach exactly that endpoint, with
// thresholds that leave a slow daemon alone.
func checkMetricsEndpoint(t *testing.T, c corev1.Container, want string) {
	t.Helper()
	addr := metricsAddr(t, c)
	if addr != want {
		t.Errorf("vmnicd %s%s, want %s", metricsArg, addr, want)
	}
	host, portStr, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatalf("%s%s: %v", metricsArg, addr, err)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil {
		t.Fatalf("%s%s: port: %v", metricsArg, addr, err)
	}
	// kubelet probes from the host's network namespace: loopback needs
	// host 127.0.0.1; the node's IP is the pod IP on the host network,
	// which kubelet asks when host is empty.
	var wantHost string
	switch host {
	case "127.0.0.1":
		wantHost = host
	case hostIPRef:
		env := envVar(c, "HOST_IP")
		if env == nil || env.ValueFrom == nil || env.ValueFrom.FieldRef == nil || env.ValueFrom.FieldRef.FieldPath != "status.hostIP" {
			t.Errorf("vmnicd env %+v: HOST_IP not from status.hostIP", c.Env)
		}
	default:
		t.Fatalf("%s%s: host %q is neither 127.0.0.1 nor %s", metricsArg, addr, host, hostIPRef)
	}
	for _, p := range []struct {
		name, path string
		probe      *corev1.Probe
	}{{"liveness", "/healthz", c.LivenessProbe}, {"readiness", "/readyz", c.ReadinessProbe}} {
		if p.probe == nil || p.probe.HTTPGet == nil {
			t.Errorf("%s probe %+v, want httpGet %s", p.name, p.probe, p.path)
			continue
		}
		g := p.probe.HTTPGet
		if g.Path != p.path || g.Port != intstr.FromInt32(int32(port)) || g.Host != wantHost || g.Scheme != corev1.URISchemeHTTP {
			t.Errorf("%s probe httpGet %+v, want %s on host %q port %d over HTTP", p.name, g, p.path, wantHost, port)
		}
	}
	if l := c.LivenessProbe; l != nil {
		// A minute of failures before kubelet restarts the daemon VM pods
		// wait for; every try ends before the next.
		if l.PeriodSeconds*l.FailureThreshold < 60 || l.TimeoutSeconds >= l.PeriodSeconds {
			t.Errorf("liveness probe period %ds × %d failures, timeout %ds: want ≥ 60 s of failures and timeout < period",
				l.PeriodSeconds, l.FailureThreshold, l.TimeoutSeconds)
		}
	}
	if r := c.ReadinessProbe; r != nil && (r.PeriodSeconds > 10 || r.TimeoutSeconds >= r.PeriodSeconds) {
		t.Errorf("readiness probe period %ds timeout %ds: want ready within 10 s of /readyz, timeout < period", r.PeriodSeconds, r.TimeoutSeconds)
	}
	// /readyz may take minutes (informer sync), /healthz answers at once: a
	// startup probe would only restart a daemon that is syncing.
	if c.StartupProbe != nil {
		t.Errorf("startup probe %+v, want none", c.StartupProbe)
	}
}

func envVar(c corev1.Container, name string) *corev1.EnvVar {
	for i := range c.Env {
		if c.Env[i].Name == name {
			return &c.Env[i]
		}
	}
	return nil
}

// serviceMonitor returns the render's ServiceMonitor, nil without one.
func (r *rendered) serviceMonitor() *unstructured.Unstructured {
	for _, o := range r.objs {
		if o.GroupVersionKind().Group == "monitoring.coreos.com" && o.GetKind() == "ServiceMonitor" {
			return o
		}
	}
	return nil
}

// TestRenderMetrics checks the metrics values: a scrapeable endpoint on the
// node's IP with its named port, scrape annotations, Service and
// ServiceMonitor (nonDefault), and metrics turned off (no flag value, no
// probes, nothing to scrape).
func TestRenderMetrics(t *testing.T) {
	t.Run("hostIP", func(t *testing.T) {
		r := decode(t, render(t, "rel", "vmnic-system", nonDefault...))
		vmnicd := r.container(t, "vmnicd")
		checkMetricsEndpoint(t, vmnicd, "["+hostIPRef+"]:9962")
		if vmnicd.ReadinessProbe != nil && vmnicd.ReadinessProbe.InitialDelaySeconds != 2 {
			t.Errorf("readiness probe %+v: probes.readiness.initialDelaySeconds=2 lost", vmnicd.ReadinessProbe)
		}
		want := []corev1.ContainerPort{{Name: "metrics", ContainerPort: 9962, HostPort: 9962, Protocol: corev1.ProtocolTCP}}
		if !slices.Equal(vmnicd.Ports, want) {
			t.Errorf("vmnicd ports %+v, want %+v (host network: hostPort = containerPort)", vmnicd.Ports, want)
		}
		if a := r.ds.Spec.Template.Annotations; a["prometheus.io/scrape"] != "true" || a["prometheus.io/port"] != "9962" ||
			a["prometheus.io/path"] != "/metrics" || a["team"] != "net" {
			t.Errorf("pod annotations %v, want prometheus.io scrape/port/path and podAnnotations", a)
		}

		svc := r.svc
		if svc == nil {
			t.Fatalf("no metrics Service in %v", r.kinds())
		}
		if svc.Name != "edge-metrics" || svc.Namespace != "vmnic-system" || svc.Spec.ClusterIP != corev1.ClusterIPNone ||
			!svc.Spec.PublishNotReadyAddresses {
			t.Errorf("Service %s/%s clusterIP %q publishNotReadyAddresses %v, want vmnic-system/edge-metrics, headless, not-ready addresses published",
				svc.Namespace, svc.Name, svc.Spec.ClusterIP, svc.Spec.PublishNotReadyAddresses)
		}
		podLabels := r.ds.Spec.Template.Labels
		for k, v := range svc.Spec.Selector {
			if podLabels[k] != v {
				t.Errorf("Service selector %v does not select the DaemonSet's pods %v", svc.Spec.Selector, podLabels)
				break
			}
		}
		if p := svc.Spec.Ports; len(p) != 1 || p[0].Name != "metrics" || p[0].Port != 9962 || p[0].TargetPort != intstr.FromString("metrics") {
			t.Errorf("Service ports %+v, want metrics 9962 → metrics", p)
		}

		sm := r.serviceMonitor()
		if sm == nil {
			t.Fatalf("no ServiceMonitor in %v", r.kinds())
		}
		if sm.GetAPIVersion() != "monitoring.coreos.com/v1" || sm.GetName() != "edge-metrics" || sm.GetNamespace() != "vmnic-system" ||
			sm.GetLabels()["release"] != "prometheus" {
			t.Errorf("ServiceMonitor %s %s/%s labels %v", sm.GetAPIVersion(), sm.GetNamespace(), sm.GetName(), sm.GetLabels())
		}
		sel, _, _ := unstructured.NestedStringMap(sm.Object, "spec", "selector", "matchLabels")
		for k, v := range sel {
			if svc.Labels[k] != v {
				t.Errorf("ServiceMonitor selector %v does not select the Service's labels %v", sel, svc.Labels)
				break
			}
		}
		if ns, _, _ := unstructured.NestedStringSlice(sm.Object, "spec", "namespaceSelector", "matchNames"); !slices.Equal(ns, []string{"vmnic-system"}) {
			t.Errorf("ServiceMonitor namespaceSelector %v, want [vmnic-system]", ns)
		}
		eps, _, _ := unstructured.NestedSlice(sm.Object, "spec", "endpoints")
		if len(eps) != 1 {
			t.Fatalf("ServiceMonitor endpoints %v, want one", eps)
		}
		ep, _ := eps[0].(map[string]any)
		if ep["port"] != "metrics" || ep["path"] != "/metrics" || ep["interval"] != "30s" || ep["scrapeTimeout"] != "10s" {
			t.Errorf("ServiceMonitor endpoint %v, want port metrics, /metrics, 30s, 10s", ep)
		}
		rl, _, _ := unstructured.NestedSlice(ep, "relabelings")
		if len(rl) == 0 || rl[0].(map[string]any)["targetLabel"] != "node" {
			t.Errorf("ServiceMonitor relabelings %v, want the node label first", rl)
		}
		if mrl, _, _ := unstructured.NestedSlice(ep, "metricRelabelings"); len(mrl) != 1 {
			t.Errorf("ServiceMonitor metricRelabelings %v, want the one given", mrl)
		}
	})

	t.Run("off", func(t *testing.T) {
		r := decode(t, render(t, defaultRelease, defaultNamespace, "metrics.enabled=false"))
		vmnicd := r.container(t, "vmnicd")
		// Given empty, not left out: vmnicd's own default would serve.
		if addr := metricsAddr(t, vmnicd); addr != "" {
			t.Errorf("vmnicd %s%s, want empty (no endpoint)", metricsArg, addr)
		}
		if vmnicd.LivenessProbe != nil || vmnicd.ReadinessProbe != nil || vmnicd.StartupProbe != nil {
			t.Errorf("vmnicd probes %+v %+v %+v with metrics off, want none", vmnicd.LivenessProbe, vmnicd.ReadinessProbe, vmnicd.StartupProbe)
		}
		if len(vmnicd.Ports) != 0 || envVar(vmnicd, "HOST_IP") != nil || r.svc != nil || r.serviceMonitor() != nil {
			t.Errorf("metrics off: ports %+v, env %+v, objects %v, want no port, no HOST_IP, no Service or ServiceMonitor",
				vmnicd.Ports, vmnicd.Env, r.kinds())
		}
	})

	t.Run("probes off one by one", func(t *testing.T) {
		r := decode(t, render(t, defaultRelease, defaultNamespace, "probes.liveness.enabled=false"))
		if c := r.container(t, "vmnicd"); c.LivenessProbe != nil || c.ReadinessProbe == nil {
			t.Errorf("probes.liveness.enabled=false: liveness %+v readiness %+v", c.LivenessProbe, c.ReadinessProbe)
		}
		r = decode(t, render(t, defaultRelease, defaultNamespace, "probes.readiness.enabled=false"))
		if c := r.container(t, "vmnicd"); c.LivenessProbe == nil || c.ReadinessProbe != nil {
			t.Errorf("probes.readiness.enabled=false: liveness %+v readiness %+v", c.LivenessProbe, c.ReadinessProbe)
		}
	})

	t.Run("hostIP without scraping", func(t *testing.T) {
		r := decode(t, render(t, defaultRelease, defaultNamespace, "metrics.bind=hostIP"))
		vmnicd := r.container(t, "vmnicd")
		checkMetricsEndpoint(t, vmnicd, "["+hostIPRef+"]:9961")
		if len(vmnicd.Ports) != 1 || vmnicd.Ports[0].Name != "metrics" {
			t.Errorf("vmnicd ports %+v, want the metrics port", vmnicd.Ports)
		}
		if a := r.ds.Spec.Template.Annotations; len(a) != 0 || r.svc != nil || r.serviceMonitor() != nil {
			t.Errorf("annotations %v, objects %v: want neither scrape annotations nor a ServiceMonitor unless asked", a, r.kinds())
		}
	})
}

// TestRenderRefuses checks that the chart refuses metrics values that
// cannot work, saying why, rather than rendering a DaemonSet whose probes or
// scrape targets miss the endpoint.
func TestRenderRefuses(t *testing.T) {
	for _, tc := range []struct {
		set  []string
		want string
	}{
		{[]string{"metrics.bind=0.0.0.0"}, `metrics.bind: "0.0.0.0" is neither loopback nor hostIP`},
		{[]string{"metrics.port=0"}, `metrics.port: "0" is not a port number`},
		{[]string{"metrics.port=65536"}, `metrics.port: "65536" is not a port number`},
		{[]string{"metrics.port=http"}, `metrics.port: "http" is not a port number`},
		{[]string{"metrics.serviceMonitor.enabled=true"}, "metrics.serviceMonitor.enabled needs metrics.bind=hostIP"},
		{[]string{"metrics.prometheusAnnotations=true"}, "metrics.prometheusAnnotations needs metrics.bind=hostIP"},
		{[]string{"metrics.enabled=false", "metrics.bind=hostIP", "metrics.serviceMonitor.enabled=true"}, "metrics.serviceMonitor.enabled needs metrics.enabled=true"},
		{[]string{"daemon.extraArgs={--metrics-addr=:9999}"}, `daemon.extraArgs: "--metrics-addr=:9999": set metrics.enabled`},
		{[]string{"daemon.extraArgs={-metrics-addr,:9999}"}, `daemon.extraArgs: "-metrics-addr": set metrics.enabled`},
	} {
		args := append([]string{"template", defaultRelease, chartDir, "--namespace", defaultNamespace}, setArgs(tc.set)...)
		_, err := helmErr(t, args...)
		var he *helmError
		if !errors.As(err, &he) || !strings.Contains(he.stderr, tc.want) {
			t.Errorf("--set %v: %v, want a failure saying %q", tc.set, err, tc.want)
		}
	}
}

// TestMetricsAddrListens checks that the address the chart gives vmnicd in
// hostIP mode is one vmnicd can listen on (net.Listen, as daemon/main.go
// does) whatever family the node's IP is: kubelet puts status.hostIP in
// bare, and an IPv6 address needs the brackets around it.
func TestMetricsAddrListens(t *testing.T) {
	r := decode(t, render(t, defaultRelease, defaultNamespace, "metrics.bind=hostIP"))
	addr := metricsAddr(t, r.container(t, "vmnicd"))
	if !strings.Contains(addr, hostIPRef) {
		t.Fatalf("%s%s does not use %s", metricsArg, addr, hostIPRef)
	}
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatal(err)
	}
	for _, ip := range []string{"127.0.0.1", "::1"} {
		// The chart's form with the IP kubelet would put in, on a free
		// port: 9961 may be taken on this machine.
		a := strings.TrimSuffix(strings.ReplaceAll(addr, hostIPRef, ip), port) + "0"
		ln, err := net.Listen("tcp", a)
		if err != nil {
			if ip == "::1" && errors.Is(err, syscall.EADDRNOTAVAIL) {
				t.Logf("no IPv6 loopback here: %v", err)
				continue
			}
			t.Errorf("listen %s (%s with HOST_IP=%s): %v", a, addr, ip, err)
			continue
		}
		_ = ln.Close()
	}
}

// serviceMonitorCRD is Prometheus Operator's ServiceMonitor CRD as
// Spiderpool's module ships it for its own tests: a real schema to check
// the chart's ServiceMonitor against.
func serviceMonitorCRD(t *testing.T) string {
	t.Helper()
	dir, err := spiderpool.ModuleDir(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Join(dir, "test", "yamls", "monitoring.coreos.com_servicemonitors.yaml")
}
