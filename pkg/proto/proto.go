// Package proto is the wire between the vmnic shim and the vmnicd daemon: one
// JSON request and one JSON response per connection on a root-only unix
// socket. The request is the CNI invocation as the runtime gave it
// (environment and stdin); the response is the result bytes to print or a CNI
// error.
package proto

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"syscall"
	"time"

	"github.com/containernetworking/cni/pkg/types"
)

// MaxMessage bounds a request or response on the wire.
const MaxMessage = 4 << 20

// Request is one CNI invocation forwarded by the shim.
type Request struct {
	Command     string          `json:"command"`
	ContainerID string          `json:"containerID,omitempty"`
	Netns       string          `json:"netns,omitempty"`
	IfName      string          `json:"ifName,omitempty"`
	Args        string          `json:"args,omitempty"`
	Path        string          `json:"path,omitempty"`
	Config      json.RawMessage `json:"config"`
	// Spooled is set when the request comes from the DEL spool.
	Spooled bool `json:"spooled,omitempty"`
}

// Response is the daemon's answer: Result to print on stdout, or Error.
type Response struct {
	Result json.RawMessage `json:"result,omitempty"`
	Error  *types.Error    `json:"error,omitempty"`
}

// Encode writes v as one JSON message. It does not HTML-escape, so a
// network configuration reaches the daemon byte for byte as the runtime
// gave it to the shim.
func Encode(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetEscapeHTML(false)
	return enc.Encode(v)
}

// Decode reads one bounded JSON message into v.
func Decode(r io.Reader, v any) error {
	dec := json.NewDecoder(io.LimitReader(r, MaxMessage))
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("decode message: %w", err)
	}
	return nil
}

// ErrSocketNotTrusted is returned when the socket is not owned by root.
var ErrSocketNotTrusted = errors.New("socket is not owned by root")

// Unavailable reports errors that mean "the daemon is not there (yet)":
// the socket is missing or nobody listens on it.
func Unavailable(err error) bool {
	return errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ENOENT) ||
		errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ECONNRESET) ||
		errors.Is(err, syscall.EPIPE) || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF)
}

// timedOut: the dialer's or the connection's deadline passed.
func timedOut(err error) bool {
	var ne net.Error
	return errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, context.DeadlineExceeded) ||
		(errors.As(err, &ne) && ne.Timeout())
}

// Call sends req once and returns the daemon's response. It refuses a socket
// that is not owned by root: the shim runs as root and hands the daemon pod
// netns paths, so only root may be on the other end.
func Call(ctx context.Context, socket string, req *Request) (*Response, error) {
	st, err := os.Stat(socket)
	if err != nil {
		return nil, fmt.Errorf("stat socket %q: %w", socket, err)
	}
	if sys, ok := st.Sys().(*syscall.Stat_t); ok && sys.Uid != 0 {
		return nil, fmt.Errorf("socket %q owned by uid %d: %w", socket, sys.Uid, ErrSocketNotTrusted)
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", socket)
	if err != nil {
		return nil, fmt.Errorf("connect to %q: %w", socket, err)
	}
	defer func() { _ = conn.Close() }()
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Now()) })
	defer stop()
	if err := Encode(conn, req); err != nil {
		return nil, fmt.Errorf("send %s request to %q: %w", req.Command, socket, err)
	}
	if uc, ok := conn.(*net.UnixConn); ok {
		_ = uc.CloseWrite()
	}
	resp := &Response{}
	if err := Decode(conn, resp); err != nil {
		return nil, fmt.Errorf("read %s response from %q: %w", req.Command, socket, err)
	}
	return resp, nil
}

// CallReady is Call retried while the daemon is unavailable or answers
// "try again later", until timeout. Then it fails with CNI code 11.
func CallReady(ctx context.Context, socket string, req *Request, timeout time.Duration) (*Response, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	backoff := 20 * time.Millisecond
	var last error
	for {
		resp, err := Call(ctx, socket, req)
		switch {
		case err == nil && (resp.Error == nil || resp.Error.Code != types.ErrTryAgainLater):
			return resp, nil
		case err == nil:
			last = resp.Error
		case errors.Is(err, ErrSocketNotTrusted):
			return nil, types.NewError(types.ErrIOFailure, err.Error(), "")
		case Unavailable(err) || ctx.Err() != nil || timedOut(err):
			// A deadline error can come from the dialer or the connection
			// a moment before ctx itself reports done: it is still the
			// timeout, code 11, not an I/O failure.
			last = err
		default:
			return nil, types.NewError(types.ErrIOFailure, err.Error(), "")
		}
		select {
		case <-ctx.Done():
			return nil, types.NewError(types.ErrTryAgainLater,
				fmt.Sprintf("vmnic daemon not ready on %s after %s", socket, timeout), fmt.Sprint(last))
		case <-time.After(backoff):
		}
		if backoff < 250*time.Millisecond {
			backoff *= 2
		}
	}
}
