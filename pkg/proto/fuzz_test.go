package proto

import (
	"bytes"
	"encoding/json"
	"io"
	"reflect"
	"testing"
)

// countingReader counts what Decode pulls from the connection.
type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

// FuzzDecodeRequest feeds the daemon's request decoder arbitrary bytes, as a
// local client of the socket could. Seeds: testdata/fuzz/FuzzDecodeRequest.
func FuzzDecodeRequest(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte) {
		cr := &countingReader{r: bytes.NewReader(data)}
		var req Request
		err := Decode(cr, &req)
		if cr.n > MaxMessage {
			t.Fatalf("Decode read %d bytes, above MaxMessage %d", cr.n, MaxMessage)
		}
		if err != nil {
			return
		}
		// What decoded must survive the shim's encoding unchanged.
		var enc bytes.Buffer
		if merr := Encode(&enc, &req); merr != nil {
			// Config is kept raw; a value json accepted is re-encodable.
			t.Fatalf("re-encode decoded request: %v", merr)
		}
		var again Request
		if derr := Decode(bytes.NewReader(enc.Bytes()), &again); derr != nil {
			t.Fatalf("decode re-encoded request %s: %v", enc.Bytes(), derr)
		}
		req.Config, again.Config = compact(t, req.Config), compact(t, again.Config)
		if !reflect.DeepEqual(req, again) {
			t.Errorf("round trip changed the request:\n %#v\n %#v", req, again)
		}
	})
}

func compact(t *testing.T, raw json.RawMessage) json.RawMessage {
	t.Helper()
	if raw == nil {
		return json.RawMessage("null") // what the shim sends for no config
	}
	var b bytes.Buffer
	if err := json.Compact(&b, raw); err != nil {
		t.Fatalf("config %q is not JSON: %v", raw, err)
	}
	return b.Bytes()
}

// TestDecodeBoundedPrefix: a message cut by MaxMessage fails, whatever
// follows, and Decode does not read past the bound.
func TestDecodeBoundedPrefix(t *testing.T) {
	msg := append([]byte(`{"command":"DEL","config":{"name":"`), bytes.Repeat([]byte("n"), MaxMessage)...)
	msg = append(msg, `"}}`...)
	cr := &countingReader{r: bytes.NewReader(msg)}
	var req Request
	if err := Decode(cr, &req); err == nil {
		t.Fatal("message above MaxMessage decoded")
	}
	if cr.n > MaxMessage {
		t.Errorf("read %d bytes, above MaxMessage", cr.n)
	}
}
