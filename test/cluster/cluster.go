// Package cluster runs a real Kubernetes control plane for tests: etcd and
// kube-apiserver, built from Go modules by test/tools/build.sh, listening on
// free 127.0.0.1 ports with all their state in one directory. There is no
// kubelet, scheduler or controller manager: pods stay Pending, and what the
// controllers would create (a namespace's "default" ServiceAccount) this
// package creates itself.
//
// Authentication is a static admin token (user "admin", group
// system:masters) plus service-account tokens signed with a generated key;
// authorization is Node,RBAC, so impersonation and service-account tokens
// exercise real RBAC decisions.
//
//	c := cluster.StartT(t)
//	if err := c.InstallKubeVirtCRDs(ctx); err != nil { ... }
//	if err := c.Apply(ctx, manifest); err != nil { ... }
package cluster

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmnic/vmnic/test/proc"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/restmapper"
)

// AdminUser is the user name of Cluster.Token; its group is system:masters.
const AdminUser = "admin"

// ServiceAccountIssuer is the issuer of the service-account tokens.
const ServiceAccountIssuer = "https://kubernetes.default.svc.cluster.local"

// Options tune Start. The zero value is fine.
type Options struct {
	// BinDir holds kube-apiserver and etcd. Empty: Binaries builds them (when
	// missing or stale) into the repository's .tools/bin.
	BinDir string
	// APIServerArgs are extra kube-apiserver flags, after the defaults (a
	// later single-valued flag overrides an earlier one).
	APIServerArgs []string
	// ReadyTimeout bounds the wait for etcd and for /readyz (building the
	// binaries is bounded only by Start's context). Default 60s.
	ReadyTimeout time.Duration
	// Launcher starts etcd and kube-apiserver; one made with
	// proc.NewLauncherIn runs them in another network namespace (a node's).
	// The caller keeps it: Stop kills the processes but leaves it open.
	// nil: a launcher of the cluster's own, in this namespace.
	Launcher *proc.Launcher
	// Address is where kube-apiserver listens and what it advertises (the
	// kubernetes Service's endpoint); its serving certificate names it.
	// Default 127.0.0.1.
	Address string
	// Dial, if set, makes every connection of the cluster's clients (the
	// readiness probes, Config), for a cluster in another network
	// namespace: proc.NetnsDialer.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// Aggregation configures the API server for extension API servers and
	// webhooks behind Services (a front-proxy CA and client certificate,
	// routing to endpoints), as KubeVirt's virt-api needs.
	Aggregation bool
}

// Cluster is a running etcd + kube-apiserver. Everything is under Dir:
// etcd/ (data), pki/ (service-account keys, serving certificate),
// tokens.csv, kubeconfig, etcd.log and kube-apiserver.log.
type Cluster struct {
	// URL is the API server, https://127.0.0.1:<port>.
	URL string
	// Token is the admin bearer token (AdminUser, group system:masters).
	Token string
	// Kubeconfig is the path of a kubeconfig for the admin (CA verified).
	Kubeconfig string
	// Dir holds the cluster's state and logs.
	Dir string
	// EtcdURL is etcd's client URL, http://127.0.0.1:<port>.
	EtcdURL string
	// CAData is the PEM bundle that verifies the API server's certificate.
	CAData []byte
	// Config is the admin client configuration; copy it (rest.CopyConfig)
	// before changing it.
	Config *rest.Config
	// Dynamic is a dynamic client with Config.
	Dynamic dynamic.Interface
	// ReadyAfter is how long kube-apiserver took from start to /readyz.
	ReadyAfter time.Duration

	mapper    *restmapper.DeferredDiscoveryRESTMapper
	launcher  *proc.Launcher
	ownLaunch bool // launcher is the cluster's own: Stop closes it
	dial      func(ctx context.Context, network, addr string) (net.Conn, error)
	etcd      *proc.Proc
	apiserver *proc.Proc
	// apiserverArgs and apiserverBin start it again (RestartAPIServer).
	apiserverArgs []string
	apiserverBin  string
	readyTimeout  time.Duration
	stopOnce      sync.Once
}

// Start starts etcd and kube-apiserver with their state in dir (which must
// exist, or is created), waits for /readyz, writes the kubeconfig and
// creates the "default" ServiceAccount in namespace default. ctx bounds the
// startup only (including a build of the binaries); the processes live until
// Stop, or until the test process dies (they get SIGKILL then). On error
// nothing is left running and the error carries the tail of the logs.
func Start(ctx context.Context, dir string, opts Options) (*Cluster, error) {
	if opts.ReadyTimeout <= 0 {
		opts.ReadyTimeout = 60 * time.Second
	}
	dir, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("cluster dir: %w", err)
	}
	if err := os.MkdirAll(filepath.Join(dir, "pki"), 0o700); err != nil {
		return nil, fmt.Errorf("cluster dir: %w", err)
	}
	apiserverBin := filepath.Join(opts.BinDir, "kube-apiserver")
	etcdBin := filepath.Join(opts.BinDir, "etcd")
	if opts.BinDir == "" {
		paths, err := Binaries(ctx, "kube-apiserver", "etcd")
		if err != nil {
			return nil, err
		}
		apiserverBin, etcdBin = paths[0], paths[1]
	}

	if opts.Address == "" {
		opts.Address = "127.0.0.1"
	}
	c := &Cluster{Dir: dir, Kubeconfig: filepath.Join(dir, "kubeconfig"), launcher: opts.Launcher, dial: opts.Dial}
	if c.launcher == nil {
		c.launcher, c.ownLaunch = proc.NewLauncher(), true
	}
	if err := c.start(ctx, apiserverBin, etcdBin, opts); err != nil {
		c.Stop()
		return nil, fmt.Errorf("%w\n%s", err, c.LogTail(40))
	}
	return c, nil
}

// StartT starts a cluster in t.TempDir() and stops it when the test ends.
// It fails the test with the tail of the logs when startup fails, and logs
// that tail as well when the test failed.
func StartT(t testing.TB) *Cluster {
	t.Helper()
	return StartWithT(t, Options{})
}

// StartWithT is StartT with opts.
func StartWithT(t testing.TB, opts Options) *Cluster {
	t.Helper()
	c, err := Start(t.Context(), t.TempDir(), opts)
	if err != nil {
		t.Fatalf("start cluster: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("cluster logs (%s):\n%s", c.Dir, c.LogTail(30))
		}
		c.Stop()
	})
	return c
}

// Stop kills kube-apiserver and etcd (SIGKILL to their process groups) and
// waits until both are gone. It leaves Dir in place and is safe to call more
// than once.
func (c *Cluster) Stop() {
	c.stopOnce.Do(func() {
		c.apiserver.Kill()
		c.etcd.Kill()
		if c.ownLaunch {
			c.launcher.Close()
		}
	})
}

// RestartAPIServer kills kube-apiserver (SIGKILL, as a crashed control
// plane), keeps it down for down, and starts it again on the same address,
// port and certificates with etcd untouched; it returns once /readyz
// answers. The clients' connections break meanwhile, as in a real outage.
func (c *Cluster) RestartAPIServer(ctx context.Context, down time.Duration) error {
	c.apiserver.Kill()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(down):
	}
	p, err := proc.Start(c.launcher, "kube-apiserver", c.apiserverBin, filepath.Join(c.Dir, "kube-apiserver-restarted.log"), c.apiserverArgs)
	if err != nil {
		return err
	}
	c.apiserver = p
	insecure := &tls.Config{InsecureSkipVerify: true} //nolint:gosec // readiness probe only
	if err := waitHTTP(ctx, p, c.readyTimeout, c.URL+"/readyz", insecure, c.dial, nil); err != nil {
		return fmt.Errorf("kube-apiserver after a restart: %w", err)
	}
	return nil
}

// WatchCounts reads the API server's own count of the watches open on it
// now, by resource: apiserver_longrunning_requests{verb="WATCH"} summed
// over its other labels (a stable metric). With resources, only those
// (0 for one without a watch).
func (c *Cluster) WatchCounts(ctx context.Context, resources ...string) (map[string]int, error) {
	return c.SumByResource(ctx, "apiserver_longrunning_requests", "WATCH", resources...)
}

// WaitFewerWatches waits up to timeout until the API server counts fewer
// watches than with on each of resources (a client that held them has
// stopped) and returns the counts of resources then.
func (c *Cluster) WaitFewerWatches(ctx context.Context, with map[string]int, resources []string, timeout time.Duration) (map[string]int, error) {
	deadline := time.Now().Add(timeout)
	for {
		now, err := c.WatchCounts(ctx, resources...)
		if err != nil {
			return nil, err
		}
		fewer := true
		for _, r := range resources {
			fewer = fewer && now[r] < with[r]
		}
		if fewer {
			return now, nil
		}
		if time.Now().After(deadline) {
			return now, fmt.Errorf("after %s the API server still counts watches %v (%v before)", timeout, now, with)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// SumByResource sums the API server's metric name for verb by resource,
// over the metric's other labels: apiserver_request_total with "WATCH",
// say, counts the watch requests that have ended. With resources, only
// those (0 for one the metric does not have).
func (c *Cluster) SumByResource(ctx context.Context, name, verb string, resources ...string) (map[string]int, error) {
	body, err := c.Metrics(ctx)
	if err != nil {
		return nil, err
	}
	out := map[string]int{}
	for _, r := range resources {
		out[r] = 0
	}
	for line := range strings.Lines(body) {
		rest, ok := strings.CutPrefix(line, name+"{")
		if !ok {
			continue
		}
		labels, value, ok := strings.Cut(rest, "} ")
		if !ok {
			continue
		}
		l := map[string]string{}
		for _, m := range labelRE.FindAllStringSubmatch(labels, -1) {
			l[m[1]] = m[2]
		}
		if l["verb"] != verb {
			continue
		}
		v, err := strconv.ParseFloat(strings.TrimSpace(value), 64)
		if err != nil {
			return nil, fmt.Errorf("%s: %q: %w", name, line, err)
		}
		if _, wanted := out[l["resource"]]; wanted || len(resources) == 0 {
			out[l["resource"]] += int(v)
		}
	}
	return out, nil
}

var labelRE = regexp.MustCompile(`(\w+)="((?:[^"\\]|\\.)*)"`)

// Metrics returns the API server's /metrics, as the admin reads it.
func (c *Cluster) Metrics(ctx context.Context) (string, error) {
	dc, err := discovery.NewDiscoveryClientForConfig(c.Config)
	if err != nil {
		return "", err
	}
	b, err := dc.RESTClient().Get().AbsPath("/metrics").DoRaw(ctx)
	if err != nil {
		return "", fmt.Errorf("API server metrics: %w", err)
	}
	return string(b), nil
}

// Pids returns the process ids of etcd and kube-apiserver (0 when not
// started).
func (c *Cluster) Pids() (etcd, apiserver int) {
	if c.etcd != nil {
		etcd = c.etcd.Cmd.Process.Pid
	}
	if c.apiserver != nil {
		apiserver = c.apiserver.Cmd.Process.Pid
	}
	return etcd, apiserver
}

// LogTail returns the last n lines of etcd's and kube-apiserver's logs.
func (c *Cluster) LogTail(n int) string {
	var b strings.Builder
	for _, name := range []string{"etcd", "kube-apiserver"} {
		path := filepath.Join(c.Dir, name+".log")
		fmt.Fprintf(&b, "--- %s (last %d lines)\n%s\n", path, n, proc.Tail(path, n))
	}
	return b.String()
}

// ConfigAs returns a copy of the admin configuration that impersonates user
// (with groups): requests are then authorized by RBAC as that user.
func (c *Cluster) ConfigAs(user string, groups ...string) *rest.Config {
	cfg := rest.CopyConfig(c.Config)
	cfg.Impersonate = rest.ImpersonationConfig{UserName: user, Groups: groups}
	return cfg
}

// ConfigWithToken returns a configuration that authenticates with token
// only (for example a service-account token) and verifies the server.
func (c *Cluster) ConfigWithToken(token string) *rest.Config {
	return &rest.Config{
		Host:            c.URL,
		BearerToken:     token,
		TLSClientConfig: rest.TLSClientConfig{CAData: c.CAData},
		QPS:             -1,
		Dial:            c.dial,
	}
}

func (c *Cluster) start(ctx context.Context, apiserverBin, etcdBin string, opts Options) error {
	if err := c.startEtcd(ctx, etcdBin, opts.ReadyTimeout); err != nil {
		return err
	}
	if err := c.writeCredentials(); err != nil {
		return err
	}
	if err := c.startAPIServer(ctx, apiserverBin, opts); err != nil {
		return err
	}
	ca, err := os.ReadFile(filepath.Join(c.Dir, "pki", "apiserver.crt"))
	if err != nil {
		return fmt.Errorf("read the self-signed serving certificate: %w", err)
	}
	c.CAData = ca
	c.Config = c.ConfigWithToken(c.Token)
	if c.Dynamic, err = dynamic.NewForConfig(c.Config); err != nil {
		return fmt.Errorf("dynamic client: %w", err)
	}
	dc, err := discovery.NewDiscoveryClientForConfig(c.Config)
	if err != nil {
		return fmt.Errorf("discovery client: %w", err)
	}
	c.mapper = restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(dc))
	if err := c.writeKubeconfig(); err != nil {
		return err
	}
	// The system namespaces come from a post-start hook that /readyz does
	// not wait for: retry until namespace default exists.
	readyCtx, cancel := context.WithTimeout(ctx, opts.ReadyTimeout)
	defer cancel()
	if err := c.ensureDefaultServiceAccount(readyCtx, metav1.NamespaceDefault); err != nil {
		return err
	}
	return nil
}

// retryable reports whether a process that died during startup should be
// started again on other ports.
func retryable(p *proc.Proc) bool {
	return strings.Contains(proc.Tail(p.Log, 50), "address already in use")
}

func (c *Cluster) startEtcd(ctx context.Context, bin string, timeout time.Duration) error {
	dataDir := filepath.Join(c.Dir, "etcd")
	for attempt := 1; ; attempt++ {
		ports, err := proc.FreePorts(2)
		if err != nil {
			return err
		}
		client := "http://127.0.0.1:" + strconv.Itoa(ports[0])
		peer := "http://127.0.0.1:" + strconv.Itoa(ports[1])
		args := []string{
			"--name=default",
			"--data-dir=" + dataDir,
			"--listen-client-urls=" + client,
			"--advertise-client-urls=" + client,
			"--listen-peer-urls=" + peer,
			"--initial-advertise-peer-urls=" + peer,
			"--initial-cluster=default=" + peer,
			"--unsafe-no-fsync", // test data: speed over durability
			"--log-level=warn",
		}
		if err = os.RemoveAll(dataDir); err != nil {
			return fmt.Errorf("etcd data dir: %w", err)
		}
		p, err := proc.Start(c.launcher, "etcd", bin, filepath.Join(c.Dir, "etcd.log"), args)
		if err != nil {
			return err
		}
		c.etcd, c.EtcdURL = p, client
		err = waitHTTP(ctx, p, timeout, client+"/health", nil, c.dial, func(body string) bool {
			return strings.Contains(body, `"health":"true"`)
		})
		if err == nil {
			return nil
		}
		p.Kill()
		if attempt < 3 && p.HasExited() && retryable(p) {
			continue
		}
		return fmt.Errorf("etcd: %w", err)
	}
}

// writeCredentials generates the admin token file and the service-account
// key pair.
func (c *Cluster) writeCredentials() error {
	tok := make([]byte, 24)
	if _, err := rand.Read(tok); err != nil {
		return fmt.Errorf("admin token: %w", err)
	}
	c.Token = hex.EncodeToString(tok)
	line := fmt.Sprintf("%s,%s,%s-uid,\"system:masters\"\n", c.Token, AdminUser, AdminUser)
	if err := os.WriteFile(filepath.Join(c.Dir, "tokens.csv"), []byte(line), 0o600); err != nil {
		return fmt.Errorf("token file: %w", err)
	}

	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return fmt.Errorf("service-account key: %w", err)
	}
	pub, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		return fmt.Errorf("service-account key: %w", err)
	}
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)})
	pubPEM := pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pub})
	if err := os.WriteFile(filepath.Join(c.Dir, "pki", "sa.key"), keyPEM, 0o600); err != nil {
		return fmt.Errorf("service-account key: %w", err)
	}
	if err := os.WriteFile(filepath.Join(c.Dir, "pki", "sa.pub"), pubPEM, 0o644); err != nil {
		return fmt.Errorf("service-account key: %w", err)
	}
	return nil
}

func (c *Cluster) startAPIServer(ctx context.Context, bin string, opts Options) error {
	pki := filepath.Join(c.Dir, "pki")
	for attempt := 1; ; attempt++ {
		ports, err := proc.FreePorts(1)
		if err != nil {
			return err
		}
		args := []string{
			"--etcd-servers=" + c.EtcdURL,
			"--bind-address=" + opts.Address,
			"--advertise-address=" + opts.Address,
			"--secure-port=" + strconv.Itoa(ports[0]),
			// No --tls-cert-file: a self-signed CA and serving certificate
			// for 127.0.0.1 are generated into pki/apiserver.{crt,key}.
			"--cert-dir=" + pki,
			"--token-auth-file=" + filepath.Join(c.Dir, "tokens.csv"),
			"--authorization-mode=Node,RBAC",
			"--service-account-issuer=" + ServiceAccountIssuer,
			"--service-account-key-file=" + filepath.Join(pki, "sa.pub"),
			"--service-account-signing-key-file=" + filepath.Join(pki, "sa.key"),
			"--service-cluster-ip-range=10.96.0.0/16",
			"--allow-privileged=true", // the DaemonSet is privileged
			"--profiling=false",
		}
		if opts.Aggregation {
			agg, aerr := aggregationArgs(pki)
			if aerr != nil {
				return aerr
			}
			args = append(args, agg...)
		}
		args = append(args, opts.APIServerArgs...)
		started := time.Now()
		p, err := proc.Start(c.launcher, "kube-apiserver", bin, filepath.Join(c.Dir, "kube-apiserver.log"), args)
		if err != nil {
			return err
		}
		c.apiserver, c.apiserverArgs, c.apiserverBin, c.readyTimeout = p, args, bin, opts.ReadyTimeout
		c.URL = "https://" + net.JoinHostPort(opts.Address, strconv.Itoa(ports[0]))
		// The certificate is not known before the server writes it: the
		// readiness probe skips verification, later clients verify.
		insecure := &tls.Config{InsecureSkipVerify: true} //nolint:gosec // readiness probe only
		err = waitHTTP(ctx, p, opts.ReadyTimeout, c.URL+"/readyz", insecure, c.dial, nil)
		if err == nil {
			c.ReadyAfter = time.Since(started)
			return nil
		}
		p.Kill()
		if attempt < 3 && p.HasExited() && retryable(p) {
			continue
		}
		return fmt.Errorf("kube-apiserver: %w", err)
	}
}

// waitHTTP polls url until it answers 200 (and ok accepts the body), the
// process exits, or the timeout passes.
func waitHTTP(ctx context.Context, p *proc.Proc, timeout time.Duration, url string, tlsConfig *tls.Config,
	dial func(ctx context.Context, network, addr string) (net.Conn, error), ok func(body string) bool,
) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	client := &http.Client{
		Timeout:   2 * time.Second,
		Transport: &http.Transport{TLSClientConfig: tlsConfig, Proxy: nil, DialContext: dial},
	}
	defer client.CloseIdleConnections()
	var last string
	for {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return fmt.Errorf("probe %s: %w", url, err)
		}
		resp, err := client.Do(req)
		if err == nil {
			buf := make([]byte, 4096)
			n, _ := resp.Body.Read(buf)
			_ = resp.Body.Close()
			body := string(buf[:n])
			if resp.StatusCode == http.StatusOK && (ok == nil || ok(body)) {
				return nil
			}
			last = fmt.Sprintf("%s: %s", resp.Status, strings.TrimSpace(body))
		} else {
			last = err.Error()
		}
		select {
		case <-p.Exited():
			return fmt.Errorf("exited during startup (%v)", p.Err())
		case <-ctx.Done():
			return fmt.Errorf("not ready at %s after %v (last: %s): %w", url, timeout, last, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func (c *Cluster) writeKubeconfig() error {
	kc := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: vmnic-test
  cluster:
    server: %s
    certificate-authority-data: %s
users:
- name: %s
  user:
    token: %s
contexts:
- name: vmnic-test
  context:
    cluster: vmnic-test
    user: %s
    namespace: default
current-context: vmnic-test
`, c.URL, base64.StdEncoding.EncodeToString(c.CAData), AdminUser, c.Token, AdminUser)
	if err := os.WriteFile(c.Kubeconfig, []byte(kc), 0o600); err != nil {
		return fmt.Errorf("write kubeconfig: %w", err)
	}
	return nil
}

var serviceAccounts = schema.GroupVersionResource{Version: "v1", Resource: "serviceaccounts"}

// CreateNamespace creates namespace name (if missing) with its "default"
// ServiceAccount, which the ServiceAccount admission plugin needs before
// pods can be created there (no controller manager runs to add it).
func (c *Cluster) CreateNamespace(ctx context.Context, name string) error {
	ns := &unstructured.Unstructured{}
	ns.SetAPIVersion("v1")
	ns.SetKind("Namespace")
	ns.SetName(name)
	_, err := c.Dynamic.Resource(schema.GroupVersionResource{Version: "v1", Resource: "namespaces"}).
		Create(ctx, ns, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("create namespace %s: %w", name, err)
	}
	return c.ensureDefaultServiceAccount(ctx, name)
}

// ensureDefaultServiceAccount creates the "default" ServiceAccount in
// namespace ns, waiting (until ctx ends) for the namespace to exist.
func (c *Cluster) ensureDefaultServiceAccount(ctx context.Context, ns string) error {
	sa := &unstructured.Unstructured{}
	sa.SetAPIVersion("v1")
	sa.SetKind("ServiceAccount")
	sa.SetName("default")
	for {
		_, err := c.Dynamic.Resource(serviceAccounts).Namespace(ns).Create(ctx, sa, metav1.CreateOptions{})
		if err == nil || apierrors.IsAlreadyExists(err) {
			return nil
		}
		if !apierrors.IsNotFound(err) {
			return fmt.Errorf("create serviceaccount %s/default: %w", ns, err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("create serviceaccount %s/default: %w (last: %w)", ns, ctx.Err(), err)
		case <-time.After(100 * time.Millisecond):
		}
	}
}
