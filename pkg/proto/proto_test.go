package proto

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"
)

func serve(t *testing.T, path string, handle func(*Request) *Response) {
	t.Helper()
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			var req Request
			if err := Decode(c, &req); err == nil {
				_ = json.NewEncoder(c).Encode(handle(&req))
			}
			_ = c.Close()
		}
	}()
}

func TestCallRoundTrip(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "s.sock")
	serve(t, sock, func(r *Request) *Response {
		return &Response{Result: json.RawMessage(`{"cmd":"` + r.Command + `"}`)}
	})
	resp, err := Call(context.Background(), sock, &Request{Command: "ADD", Config: json.RawMessage(`{}`)})
	if err != nil || string(resp.Result) != `{"cmd":"ADD"}` {
		t.Fatalf("Call = %+v, %v", resp, err)
	}
}

func TestCallReadyTimesOutWithCode11(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "absent.sock")
	start := time.Now()
	_, err := CallReady(context.Background(), sock, &Request{Command: "ADD"}, 300*time.Millisecond)
	var te *types.Error
	if !errors.As(err, &te) || te.Code != types.ErrTryAgainLater || !strings.Contains(te.Msg, sock) {
		t.Fatalf("CallReady = %v, want code 11 naming the socket", err)
	}
	if time.Since(start) < 300*time.Millisecond {
		t.Error("CallReady gave up before its bound")
	}
}

func TestCallReadyRetriesTryAgain(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "s.sock")
	n := 0
	serve(t, sock, func(*Request) *Response {
		n++
		if n < 3 {
			return &Response{Error: types.NewError(types.ErrTryAgainLater, "starting", "")}
		}
		return &Response{Result: json.RawMessage(`{}`)}
	})
	resp, err := CallReady(context.Background(), sock, &Request{Command: "ADD"}, 5*time.Second)
	if err != nil || resp.Error != nil || n != 3 {
		t.Fatalf("CallReady = %+v, %v after %d tries", resp, err, n)
	}
}

func TestDecodeBounded(t *testing.T) {
	var r Request
	big := `{"command":"ADD","config":"` + strings.Repeat("a", MaxMessage) + `"}`
	if err := Decode(strings.NewReader(big), &r); err == nil {
		t.Error("oversized message decoded")
	}
}

// TestCallReadyTimeoutWhileConnected: a daemon that accepts and never
// answers (killed or wedged mid-request) ends in code 11 too, never in an
// I/O failure because the connection's deadline fired a moment before the
// context reported done.
func TestCallReadyTimeoutWhileConnected(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "s.sock")
	hang := make(chan struct{})
	serve(t, sock, func(*Request) *Response { <-hang; return &Response{} })
	t.Cleanup(func() { close(hang) })
	for range 30 {
		_, err := CallReady(context.Background(), sock, &Request{Command: "ADD"}, 20*time.Millisecond)
		var te *types.Error
		if !errors.As(err, &te) || te.Code != types.ErrTryAgainLater {
			t.Fatalf("CallReady = %v, want code 11", err)
		}
	}
}
