package capabilities

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strings"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/vmnic/vmnic/pkg/apis/v1alpha1"
)

// Spiderpool's API as vmnic checks it.
const (
	SpiderpoolGroupVersion = "spiderpool.spidernet.io/v2beta1"
	SpiderpoolIPPools      = "spiderippools"
	// SpiderpoolHealthPath is the agent's health endpoint (go-swagger
	// base path /v1).
	SpiderpoolHealthPath = "/v1/ipam/healthy"
)

// Discovery is the part of client-go's discovery client the probe uses.
type Discovery interface {
	ServerResourcesForGroupVersion(groupVersion string) (*metav1.APIResourceList, error)
}

func probeSpiderpool(ctx context.Context, d Discovery, socket string, timeout time.Duration) v1alpha1.SpiderpoolStatus {
	s := v1alpha1.SpiderpoolStatus{SocketPath: socket}
	if err := spiderpoolCRDs(d); err != nil {
		s.CRDsError = err.Error()
	} else {
		s.CRDs = true
	}
	s.AgentSocket, s.Healthy, s.AgentError = probeAgent(ctx, socket, timeout)
	return s
}

// spiderpoolCRDs checks that the API server serves SpiderIPPools.
func spiderpoolCRDs(d Discovery) error {
	if d == nil {
		return errors.New("no API server configured")
	}
	list, err := d.ServerResourcesForGroupVersion(SpiderpoolGroupVersion)
	if apierrors.IsNotFound(err) {
		return fmt.Errorf("API server does not serve %s", SpiderpoolGroupVersion)
	}
	if err != nil {
		return fmt.Errorf("discover %s: %w", SpiderpoolGroupVersion, err)
	}
	if !slices.ContainsFunc(list.APIResources, func(r metav1.APIResource) bool { return r.Name == SpiderpoolIPPools }) {
		return fmt.Errorf("API server serves no %s in %s", SpiderpoolIPPools, SpiderpoolGroupVersion)
	}
	return nil
}

// probeAgent checks that the agent's socket exists and that the agent
// answers its health endpoint with 200 on it.
func probeAgent(ctx context.Context, socket string, timeout time.Duration) (present, healthy bool, msg string) {
	fi, err := os.Stat(socket)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return false, false, fmt.Sprintf("agent socket %s does not exist", socket)
	case err != nil:
		return false, false, fmt.Sprintf("agent socket: %v", err)
	case fi.Mode().Type() != fs.ModeSocket:
		return false, false, fmt.Sprintf("agent socket %s is not a socket (%s)", socket, fi.Mode().Type())
	}
	if err := agentHealthy(ctx, socket, timeout); err != nil {
		return true, false, err.Error()
	}
	return true, true, ""
}

func agentHealthy(ctx context.Context, socket string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
		DisableKeepAlives: true,
		Proxy:             nil,
	}
	defer tr.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://spiderpool-agent"+SpiderpoolHealthPath, nil)
	if err != nil {
		return fmt.Errorf("agent health request: %w", err)
	}
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		if ue := (*url.Error)(nil); errors.As(err, &ue) {
			err = ue.Err // its text repeats the method and URL
		}
		return fmt.Errorf("GET %s on %s: %w", SpiderpoolHealthPath, socket, err)
	}
	defer func() { _ = resp.Body.Close() }()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s on %s: %s %s", SpiderpoolHealthPath, socket, resp.Status, strings.TrimSpace(string(body)))
	}
	return nil
}
