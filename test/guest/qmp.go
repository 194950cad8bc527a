package guest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"time"
)

// QMP runs one QMP command (e.g. "query-status", or "migrate" with
// args map[string]any{"uri": "tcp:127.0.0.1:4444"}) on the guest's
// Options.MonitorSocket and returns the "return" value. Each call uses a new
// connection; asynchronous events are skipped. It retries connecting until
// ctx ends, since QEMU creates the socket shortly after starting.
func (g *Guest) QMP(ctx context.Context, command string, args any) (json.RawMessage, error) {
	if g.qmpPath == "" {
		return nil, errors.New("QMP: guest started without Options.MonitorSocket")
	}
	var conn net.Conn
	for {
		var d net.Dialer
		c, err := d.DialContext(ctx, "unix", g.qmpPath)
		if err == nil {
			conn = c
			break
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("QMP: connecting to %s: %w", g.qmpPath, err)
		case <-g.done:
			return nil, fmt.Errorf("QMP: guest exited: %w", err)
		case <-time.After(100 * time.Millisecond):
		}
	}
	defer func() { _ = conn.Close() }()
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()

	dec := json.NewDecoder(conn)
	enc := json.NewEncoder(conn)
	var greeting map[string]json.RawMessage
	if err := dec.Decode(&greeting); err != nil {
		return nil, fmt.Errorf("QMP: reading greeting: %w", err)
	}
	if _, err := qmpExec(dec, enc, "qmp_capabilities", nil); err != nil {
		return nil, err
	}
	return qmpExec(dec, enc, command, args)
}

func qmpExec(dec *json.Decoder, enc *json.Encoder, command string, args any) (json.RawMessage, error) {
	req := map[string]any{"execute": command}
	if args != nil {
		req["arguments"] = args
	}
	if err := enc.Encode(req); err != nil {
		return nil, fmt.Errorf("QMP %s: %w", command, err)
	}
	for {
		var resp struct {
			Return json.RawMessage `json:"return"`
			Error  *struct {
				Class string `json:"class"`
				Desc  string `json:"desc"`
			} `json:"error"`
			Event string `json:"event"`
		}
		if err := dec.Decode(&resp); err != nil {
			return nil, fmt.Errorf("QMP %s: reading reply: %w", command, err)
		}
		switch {
		case resp.Error != nil:
			return nil, fmt.Errorf("QMP %s: %s: %s", command, resp.Error.Class, resp.Error.Desc)
		case resp.Event != "":
			continue
		case resp.Return != nil:
			return resp.Return, nil
		}
	}
}
