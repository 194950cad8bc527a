package daemon

import (
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"k8s.io/client-go/rest"
)

// TestAPICall names requests as the API server's own metrics do.
func TestAPICall(t *testing.T) {
	for _, c := range []struct{ method, url, verb, resource string }{
		{"GET", "/api/v1/pods?fieldSelector=spec.nodeName%3Dn&limit=500", "list", "pods"},
		{"GET", "/api/v1/pods?watch=true&allowWatchBookmarks=true", "watch", "pods"},
		{"GET", "/api/v1/namespaces/default/pods/virt-launcher-x", "get", "pods"},
		{"GET", "/apis/kubevirt.io/v1/virtualmachineinstances?watch=1", "watch", "virtualmachineinstances"},
		{"GET", "/apis/kubevirt.io/v1/namespaces/default/virtualmachineinstances/vm1", "get", "virtualmachineinstances"},
		{"POST", "/api/v1/namespaces/default/events", "create", "events"},
		{"PUT", "/apis/vmnic.io/v1alpha1/nodenetworkcapabilities/n/status", "update", "nodenetworkcapabilities/status"},
		{"PATCH", "/api/v1/nodes/n/status", "patch", "nodes/status"},
		{"DELETE", "/api/v1/namespaces/default/pods/p", "delete", "pods"},
		{"GET", "/api/v1/namespaces", "list", "namespaces"},
		{"GET", "/api/v1/namespaces/default", "get", "namespaces"},
		{"GET", "/apis", "get", "other"},
		{"GET", "/version", "get", "other"},
	} {
		verb, resource := apiCall(httptest.NewRequest(c.method, c.url, nil))
		if verb != c.verb || resource != c.resource {
			t.Errorf("%s %s = %s %s, want %s %s", c.method, c.url, verb, resource, c.verb, c.resource)
		}
	}
	for code, want := range map[int]string{200: "2xx", 201: "2xx", 404: "4xx", 503: "5xx", 0: "other"} {
		if got := httpClass(code); got != want {
			t.Errorf("httpClass(%d) = %s, want %s", code, got, want)
		}
	}
}

// TestCountAPICalls: a client built from the wrapped config counts its
// requests, and the bytes of the answers as they are read.
func TestCountAPICalls(t *testing.T) {
	body := strings.Repeat("x", 1234)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte(body))
	}))
	defer srv.Close()
	m := NewMetrics()
	cfg := &rest.Config{Host: srv.URL}
	countAPICalls(cfg, m)
	rt, err := rest.TransportFor(cfg)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := (&http.Client{Transport: rt}).Get(srv.URL + "/api/v1/namespaces/default/pods/p")
	if err != nil {
		t.Fatal(err)
	}
	got, _ := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	if len(got) != len(body) {
		t.Fatalf("read %d bytes, want %d", len(got), len(body))
	}
	if n := testutil.ToFloat64(m.apiCalls.WithLabelValues("get", "pods", "2xx")); n != 1 {
		t.Errorf("requests counted %v, want 1", n)
	}
	if n := testutil.ToFloat64(m.apiBytes.WithLabelValues("get", "pods")); n != float64(len(body)) {
		t.Errorf("bytes counted %v, want %d", n, len(body))
	}
}
