package ovsdb

import (
	"errors"
	"testing"
	"time"
)

func TestPortSpecValidate(t *testing.T) {
	ok := PortSpec{Bridge: "br1", Name: "veth0", ExternalIDs: owner}
	with := func(f func(*PortSpec)) PortSpec {
		s := ok
		f(&s)
		return s
	}
	for _, tc := range []struct {
		name string
		spec PortSpec
		want error
	}{
		{"minimal", ok, nil},
		{"access", with(func(s *PortSpec) { s.Tag = intp(0) }), nil},
		{"trunks and mtu", with(func(s *PortSpec) { s.Trunks, s.MTU = []int{1, 4095}, 9000 }), nil},
		{"no bridge", with(func(s *PortSpec) { s.Bridge = "" }), ErrInvalidSpec},
		{"no name", with(func(s *PortSpec) { s.Name = "" }), ErrInvalidSpec},
		{"name too long", with(func(s *PortSpec) { s.Name = "a234567890123456" }), ErrInvalidSpec},
		{"tag too big", with(func(s *PortSpec) { s.Tag = intp(4096) }), ErrInvalidSpec},
		{"negative tag", with(func(s *PortSpec) { s.Tag = intp(-1) }), ErrInvalidSpec},
		{"trunk too big", with(func(s *PortSpec) { s.Trunks = []int{5000} }), ErrInvalidSpec},
		{"duplicate trunk", with(func(s *PortSpec) { s.Trunks = []int{5, 5} }), ErrInvalidSpec},
		{"negative mtu", with(func(s *PortSpec) { s.MTU = -1 }), ErrInvalidSpec},
		{"no owner mark", with(func(s *PortSpec) { s.ExternalIDs = nil }), ErrNoOwner},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.spec.validate()
			if tc.want == nil && err != nil || tc.want != nil && !errors.Is(err, tc.want) {
				t.Errorf("validate() = %v, want %v", err, tc.want)
			}
		})
	}
}

func TestIncludes(t *testing.T) {
	have := map[string]string{"vmnic.io/owner": "vmnic", "vmnic.io/pod": "a"}
	for _, tc := range []struct {
		want map[string]string
		ok   bool
	}{
		{nil, true},
		{map[string]string{"vmnic.io/owner": "vmnic"}, true},
		{have, true},
		{map[string]string{"vmnic.io/owner": "other"}, false},
		{map[string]string{"vmnic.io/owner": "vmnic", "x": ""}, false},
	} {
		if got := includes(have, tc.want); got != tc.ok {
			t.Errorf("includes(%v, %v) = %v", have, tc.want, got)
		}
	}
}

func TestReconnectBackoff(t *testing.T) {
	b := newReconnectBackoff()
	var last time.Duration
	for range 20 {
		last = b.NextBackOff()
		if last <= 0 || last > backoffMax {
			t.Fatalf("backoff %v out of (0, %v]", last, backoffMax)
		}
	}
	if last < backoffMax/2 {
		t.Errorf("backoff did not grow: %v", last)
	}
	b.Reset()
	if d := b.NextBackOff(); d > backoffMin {
		t.Errorf("after Reset: %v, want <= %v", d, backoffMin)
	}
	b.close()
	if d := b.NextBackOff(); d != parked {
		t.Errorf("after close: %v, want parked", d)
	}
}
