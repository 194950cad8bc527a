package daemon

import (
	"io"
	"net/http"
	"strconv"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/client-go/rest"
)

// countAPICalls makes every client built from cfg count its requests to
// the API server in m (vmnic_kube_api_requests_total), and the bytes of
// the answers (vmnic_kube_api_response_bytes_total): the informers' lists
// and watches, the live reads, the events, the capability publisher and
// the reads of its DaemonSet. What a daemon costs the API server then
// shows per node, by verb and resource.
func countAPICalls(cfg *rest.Config, m *Metrics) {
	cfg.Wrap(func(rt http.RoundTripper) http.RoundTripper {
		return roundTripFunc(func(req *http.Request) (*http.Response, error) {
			verb, resource := apiCall(req)
			resp, err := rt.RoundTrip(req)
			code := "error"
			if err == nil {
				code = httpClass(resp.StatusCode)
				if c := m.apiRead(verb, resource); c != nil && resp.Body != nil {
					resp.Body = &countingBody{ReadCloser: resp.Body, n: c}
				}
			}
			m.apiCall(verb, resource, code)
			return resp, err
		})
	})
}

// countingBody counts what is read from an answer's body.
type countingBody struct {
	io.ReadCloser
	n prometheus.Counter
}

func (b *countingBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if n > 0 {
		b.n.Add(float64(n))
	}
	return n, err
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// apiCall names a request as the API server's own metrics do: the verb
// (get, list, watch, create, update, patch, delete) and the resource (its
// subresource after a slash), "other" for what is not a resource request
// (discovery, say).
func apiCall(req *http.Request) (verb, resource string) {
	// /api/v1/[namespaces/NS/]RES[/NAME[/SUB]] or /apis/G/V/...
	parts := strings.Split(strings.Trim(req.URL.Path, "/"), "/")
	switch {
	case len(parts) >= 3 && parts[0] == "api":
		parts = parts[2:]
	case len(parts) >= 4 && parts[0] == "apis":
		parts = parts[3:]
	default:
		return strings.ToLower(req.Method), "other"
	}
	if parts[0] == "namespaces" && len(parts) > 2 {
		parts = parts[2:]
	}
	resource = parts[0]
	named := len(parts) >= 2
	if len(parts) >= 3 {
		resource += "/" + parts[2]
	}
	switch req.Method {
	case http.MethodGet:
		switch {
		case isTrue(req.URL.Query().Get("watch")):
			verb = "watch"
		case named:
			verb = "get"
		default:
			verb = "list"
		}
	case http.MethodPost:
		verb = "create"
	case http.MethodPut:
		verb = "update"
	case http.MethodPatch:
		verb = "patch"
	case http.MethodDelete:
		verb = "delete"
	default:
		verb = strings.ToLower(req.Method)
	}
	return verb, resource
}

func isTrue(s string) bool {
	b, _ := strconv.ParseBool(s)
	return b
}

// httpClass is "2xx", "4xx", ... of an HTTP status.
func httpClass(code int) string {
	if code < 100 || code > 599 {
		return "other"
	}
	return string(rune('0'+code/100)) + "xx"
}
