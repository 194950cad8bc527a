package install

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
)

// member is one key of a JSON object, in file order, with the byte range of
// its value in the source it was parsed from.
type member struct {
	Key        string
	Value      json.RawMessage
	start, end int
}

// object is a JSON object that keeps its keys in order (a map would not).
type object []member

// parseObject parses data, which must be exactly one JSON object.
func parseObject(data []byte) (object, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	if err := expectDelim(dec, '{'); err != nil {
		return nil, err
	}
	var o object
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, err
		}
		key, ok := tok.(string)
		if !ok {
			return nil, fmt.Errorf("object key: unexpected %v", tok)
		}
		if o.index(key) >= 0 {
			// libcni's map would keep the last silently; which one a
			// runtime sees is not worth guessing.
			return nil, fmt.Errorf("duplicate key %q", key)
		}
		s, raw, err := decodeSpan(dec, data, 0)
		if err != nil {
			return nil, fmt.Errorf("key %q: %w", key, err)
		}
		o = append(o, member{Key: key, Value: raw, start: s.start, end: s.end})
	}
	if err := expectDelim(dec, '}'); err != nil {
		return nil, err
	}
	if tok, err := dec.Token(); err != io.EOF {
		return nil, fmt.Errorf("data after the top-level object (%v, %v)", tok, err)
	}
	return o, nil
}

// span is a byte range [start, end).
type span struct{ start, end int }

// parseArray parses data[s.start:s.end], a JSON array, returning the byte
// range of every element within data.
func parseArray(data []byte, s span) ([]span, error) {
	dec := json.NewDecoder(bytes.NewReader(data[s.start:s.end]))
	if err := expectDelim(dec, '['); err != nil {
		return nil, err
	}
	var elems []span
	for dec.More() {
		e, _, err := decodeSpan(dec, data, s.start)
		if err != nil {
			return nil, fmt.Errorf("element %d: %w", len(elems), err)
		}
		elems = append(elems, e)
	}
	if err := expectDelim(dec, ']'); err != nil {
		return nil, err
	}
	return elems, nil
}

// decodeSpan decodes the next value of dec, which reads data[base:], and
// locates it in data: a RawMessage holds the value's exact bytes, and the
// decoder's offset is just past them.
func decodeSpan(dec *json.Decoder, data []byte, base int) (span, json.RawMessage, error) {
	var raw json.RawMessage
	if err := dec.Decode(&raw); err != nil {
		return span{}, nil, err
	}
	end := base + int(dec.InputOffset())
	start := end - len(raw)
	if start < 0 || end > len(data) || !bytes.Equal(data[start:end], raw) {
		return span{}, nil, errors.New("cannot locate value in source")
	}
	return span{start, end}, raw, nil
}

func expectDelim(dec *json.Decoder, want json.Delim) error {
	tok, err := dec.Token()
	if err != nil {
		return err
	}
	if d, ok := tok.(json.Delim); !ok || d != want {
		return fmt.Errorf("expected %q, found %v", want, tok)
	}
	return nil
}

// index is the position of key, or -1.
func (o object) index(key string) int {
	for i, m := range o {
		if m.Key == key {
			return i
		}
	}
	return -1
}

// get is the value of key, nil when absent.
func (o object) get(key string) json.RawMessage {
	if i := o.index(key); i >= 0 {
		return o[i].Value
	}
	return nil
}

// MarshalJSON writes the members compactly, in order.
func (o object) MarshalJSON() ([]byte, error) {
	var b bytes.Buffer
	b.WriteByte('{')
	for i, m := range o {
		if i > 0 {
			b.WriteByte(',')
		}
		k, err := json.Marshal(m.Key)
		if err != nil {
			return nil, err
		}
		b.Write(k)
		b.WriteByte(':')
		if err := json.Compact(&b, m.Value); err != nil {
			return nil, fmt.Errorf("key %q: %w", m.Key, err)
		}
	}
	b.WriteByte('}')
	return b.Bytes(), nil
}

// document is a parsed network config file: a conflist ("plugins") or a
// single-plugin config.
type document struct {
	data    []byte
	top     object
	plugins int      // index of "plugins" in top; -1 for a single-plugin config
	elems   []span   // the plugin entries in data (conflist only)
	types   []string // each plugin's type, in order
}

func parseDocument(data []byte) (*document, error) {
	top, err := parseObject(data)
	if err != nil {
		return nil, err
	}
	d := &document{data: data, top: top, plugins: top.index("plugins")}
	if d.plugins < 0 {
		t := pluginType(data)
		if t == "" {
			// A CNI 1.1 conflist may keep its plugins in files of a
			// subdirectory; there is no list here to chain into.
			return nil, errors.New(`neither a "plugins" list nor a plugin "type"`)
		}
		d.types = []string{t}
		return d, nil
	}
	m := top[d.plugins]
	d.elems, err = parseArray(data, span{m.start, m.end})
	if err != nil {
		return nil, fmt.Errorf("plugins: %w", err)
	}
	if len(d.elems) == 0 {
		return nil, errors.New("plugins: empty list")
	}
	for i := range d.elems {
		t := pluginType(d.raw(i))
		if t == "" {
			return nil, fmt.Errorf("plugins[%d]: no type", i)
		}
		d.types = append(d.types, t)
	}
	return d, nil
}

// pluginType is the "type" of a plugin object, "" when it has none.
func pluginType(raw []byte) string {
	var p struct {
		Type string `json:"type"`
	}
	if json.Unmarshal(raw, &p) != nil {
		return ""
	}
	return p.Type
}

func (d *document) isList() bool     { return d.plugins >= 0 }
func (d *document) raw(i int) []byte { return d.data[d.elems[i].start:d.elems[i].end] }

// isMultus: Multus' own config, which delegates to the primary rather than
// being it.
func (d *document) isMultus() bool {
	for _, t := range d.types {
		if t == "multus" || t == "multus-shim" {
			return true
		}
	}
	return false
}

// isVmnic: a config that starts with vmnic is not a primary network (vmnic
// needs a prevResult), whoever wrote it.
func (d *document) isVmnic() bool { return d.types[0] == BinaryName }

// versions are the spec versions a runtime may pick for this config.
func (d *document) versions() ([]string, error) {
	var vs []string
	var v string
	if raw := d.top.get("cniVersion"); raw != nil {
		if err := json.Unmarshal(raw, &v); err != nil {
			return nil, fmt.Errorf("cniVersion: %w", err)
		}
	}
	vs = append(vs, v) // "" when absent: the runtime's default, which the shim does not speak
	if raw := d.top.get("cniVersions"); raw != nil && d.isList() {
		var more []string
		if err := json.Unmarshal(raw, &more); err != nil {
			return nil, fmt.Errorf("cniVersions: %w", err)
		}
		vs = append(vs, more...)
	}
	return vs, nil
}

// chained is the conflist with exactly one vmnic entry, the desired one: an
// entry already there is updated where it stands, later duplicates dropped,
// a missing one appended. changed is false when the file already is so.
func (d *document) chained(entry []byte, isEntry func([]byte) bool) (out []byte, changed bool) {
	keep := make([]bool, len(d.elems))
	repl := map[int][]byte{}
	found := false
	for i, t := range d.types {
		keep[i] = true
		if t != BinaryName {
			continue
		}
		if found {
			keep[i] = false
			changed = true
			continue
		}
		found = true
		if !isEntry(d.raw(i)) {
			repl[i] = d.style().format(entry)
			changed = true
		}
	}
	if !found {
		return d.rebuild(keep, nil, d.style().format(entry)), true
	}
	if !changed {
		return d.data, false
	}
	return d.rebuild(keep, repl, nil), true
}

// unchained is the conflist without vmnic entries; changed is false when it
// had none.
func (d *document) unchained() (out []byte, changed bool) {
	keep := make([]bool, len(d.elems))
	for i, t := range d.types {
		keep[i] = t != BinaryName
		changed = changed || !keep[i]
	}
	if !changed {
		return d.data, false
	}
	return d.rebuild(keep, nil, nil), true
}

// rebuild writes the file again with the plugins kept, replaced and added;
// every byte outside the entries touched is the original's: the blank and
// comma before a kept entry are the ones it had, an added entry takes the
// separator of the last one, and removing it gives the original back.
func (d *document) rebuild(keep []bool, repl map[int][]byte, add []byte) []byte {
	el := d.elems
	var b bytes.Buffer
	b.Write(d.data[:el[0].start])
	first := true
	for i, e := range el {
		if !keep[i] {
			continue
		}
		if !first {
			b.Write(d.data[el[i-1].end:e.start])
		}
		if r, ok := repl[i]; ok {
			b.Write(r)
		} else {
			b.Write(d.data[e.start:e.end])
		}
		first = false
	}
	if add != nil {
		b.WriteByte(',')
		b.Write(d.blankBefore(len(el) - 1))
		b.Write(add)
	}
	b.Write(d.data[el[len(el)-1].end:])
	return b.Bytes()
}

// blankBefore is the whitespace between element i and the comma or bracket
// before it.
func (d *document) blankBefore(i int) []byte {
	from := d.top[d.plugins].start + 1 // after '['
	if i > 0 {
		from = d.elems[i-1].end
	}
	sep := d.data[from:d.elems[i].start]
	if c := bytes.LastIndexByte(sep, ','); c >= 0 {
		sep = sep[c+1:]
	}
	return sep
}

// style is how the file lays out a plugin entry, so vmnic's entry reads like
// its neighbours.
type style struct {
	lines        bool   // entries span lines
	prefix, unit string // json.Indent's prefix and indent for such an entry
	colonBlank   bool   // "key": value rather than "key":value
	commaBlank   bool   // one-line entries: a blank after commas
	braceBlank   bool   // one-line entries: { "key": value }
}

// style follows the last plugin that is not vmnic's.
func (d *document) style() style {
	i := len(d.elems) - 1
	for j := i; j >= 0; j-- {
		if d.types[j] != BinaryName {
			i = j
			break
		}
	}
	raw := d.raw(i)
	s := style{colonBlank: bytes.Contains(raw, []byte(": ")) || !bytes.Contains(raw, []byte(":"))}
	lines := strings.Split(string(raw), "\n")
	if len(lines) == 1 {
		s.commaBlank = bytes.Contains(raw, []byte(", "))
		s.braceBlank = bytes.HasPrefix(raw, []byte("{ "))
		return s
	}
	// The closing brace sits at the entry's own indentation; the first
	// member one unit deeper.
	s.lines = true
	s.prefix = leadingBlank(lines[len(lines)-1])
	s.unit = "  "
	if second := leadingBlank(lines[1]); strings.HasPrefix(second, s.prefix) && len(second) > len(s.prefix) {
		s.unit = second[len(s.prefix):]
	}
	return s
}

func leadingBlank(s string) string {
	return s[:len(s)-len(strings.TrimLeft(s, " \t"))]
}

// format lays out compact, valid JSON in style s.
func (s style) format(compact []byte) []byte {
	if !s.lines {
		return s.oneLine(compact)
	}
	var b bytes.Buffer
	if json.Indent(&b, compact, s.prefix, s.unit) != nil {
		return compact
	}
	if s.colonBlank {
		return b.Bytes()
	}
	// json.Indent puts a blank after every colon outside strings; take
	// them out again.
	out := make([]byte, 0, b.Len())
	walkJSON(b.Bytes(), func(i int, c byte, inString bool) {
		if !inString && c == ' ' && i > 0 && b.Bytes()[i-1] == ':' {
			return
		}
		out = append(out, c)
	})
	return out
}

// oneLine lays compact JSON out on one line.
func (s style) oneLine(compact []byte) []byte {
	out := make([]byte, 0, len(compact)*5/4)
	walkJSON(compact, func(i int, c byte, inString bool) {
		if inString {
			out = append(out, c)
			return
		}
		switch c {
		case ':':
			out = append(out, ':')
			if s.colonBlank {
				out = append(out, ' ')
			}
		case ',':
			out = append(out, ',')
			if s.commaBlank || s.braceBlank {
				out = append(out, ' ')
			}
		case '{':
			out = append(out, '{')
			if s.braceBlank && i+1 < len(compact) && compact[i+1] != '}' {
				out = append(out, ' ')
			}
		case '}':
			if s.braceBlank && i > 0 && compact[i-1] != '{' {
				out = append(out, ' ')
			}
			out = append(out, '}')
		default:
			out = append(out, c)
		}
	})
	return out
}

// walkJSON calls fn for every byte of data, telling whether it is inside a
// string (its quotes included).
func walkJSON(data []byte, fn func(i int, c byte, inString bool)) {
	inString, escaped := false, false
	for i, c := range data {
		switch {
		case inString:
			fn(i, c, true)
			switch {
			case escaped:
				escaped = false
			case c == '\\':
				escaped = true
			case c == '"':
				inString = false
			}
		case c == '"':
			inString = true
			fn(i, c, true)
		default:
			fn(i, c, false)
		}
	}
}

// converted is a single-plugin config turned into a conflist with vmnic's
// entry after the plugin, the way libcni's ConfListFromConf sees it: the
// list takes the plugin's name and cniVersion, the plugin keeps all its keys.
func (d *document) converted(entry []byte) ([]byte, error) {
	name := d.top.get("name")
	var n string
	if name == nil || json.Unmarshal(name, &n) != nil || n == "" {
		return nil, errors.New("no network name")
	}
	var plugins bytes.Buffer
	plugins.WriteByte('[')
	if err := json.Compact(&plugins, d.data); err != nil {
		return nil, err
	}
	plugins.WriteByte(',')
	plugins.Write(entry)
	plugins.WriteByte(']')
	var o object
	if v := d.top.get("cniVersion"); v != nil {
		o = append(o, member{Key: "cniVersion", Value: v})
	}
	o = append(o, member{Key: "name", Value: name}, member{Key: "plugins", Value: plugins.Bytes()})
	compact, err := o.MarshalJSON()
	if err != nil {
		return nil, err
	}
	var b bytes.Buffer
	if err := json.Indent(&b, compact, "", "  "); err != nil {
		return nil, err
	}
	b.WriteByte('\n')
	return b.Bytes(), nil
}
