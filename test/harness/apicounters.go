package harness

import (
	"strconv"
	"strings"
)

// APICounters are what a vmnicd says, in its metrics, it received from
// the API server and asked of it.
type APICounters struct {
	// Objects its informers received (vmnic_informer_objects_received_total),
	// in all and by informer selector.
	Objects    float64
	BySelector map[string]float64
	// Requests it made (vmnic_kube_api_requests_total) and Bytes it read
	// (vmnic_kube_api_response_bytes_total).
	Requests, Bytes float64
}

// ParseAPICounters reads APICounters from a vmnicd's /metrics text.
func ParseAPICounters(metrics string) APICounters {
	c := APICounters{BySelector: map[string]float64{}}
	for l := range strings.Lines(metrics) {
		name, value, ok := strings.Cut(strings.TrimSpace(l), " ")
		if !ok || strings.HasPrefix(name, "#") {
			continue
		}
		v, err := strconv.ParseFloat(value, 64)
		if err != nil {
			continue
		}
		switch {
		case strings.HasPrefix(name, "vmnic_informer_objects_received_total{"):
			_, sel, _ := strings.Cut(name, `selector="`)
			sel, _, _ = strings.Cut(sel, `"`)
			c.Objects += v
			c.BySelector[sel] = v
		case strings.HasPrefix(name, "vmnic_kube_api_requests_total{"):
			c.Requests += v
		case strings.HasPrefix(name, "vmnic_kube_api_response_bytes_total{"):
			c.Bytes += v
		}
	}
	return c
}
