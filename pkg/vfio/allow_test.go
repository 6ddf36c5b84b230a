package vfio

import (
	"errors"
	"testing"
)

func TestDeviceAllowlist(t *testing.T) {
	r := NewRegistry(RegistryOptions{AllowSim: true, Devices: []string{"pci:0000:3B:*", "pci:0000:5e:00.[0-3]", "mdev:c0ffee00-*"}})
	for spec, want := range map[string]bool{
		"pci:0000:3b:00.2":                          true,
		"pci:0000:3B:01.7":                          true, // canonical form: lower case
		"pci:0000:3c:00.2":                          false,
		"pci:0000:5e:00.3":                          true,
		"pci:0000:5e:00.4":                          false,
		"pci:0001:3b:00.0":                          false,
		"mdev:c0ffee00-0000-4000-8000-000000000001": true,
		"mdev:C0FFEE00-0000-4000-8000-000000000001": true, // canonical form: lower case
		"mdev:deadbeef-0000-4000-8000-000000000001": false,
		"sim:size=1MiB,seed=3":                      true, // --allow-sim
	} {
		s, err := ParseSpec(spec)
		if err != nil {
			t.Fatal(err)
		}
		err = r.Allowed(s)
		if got := err == nil; got != want {
			t.Errorf("Allowed(%s) = %v, want allowed %v", spec, err, want)
		}
		if err != nil && !errors.Is(err, ErrNotAllowed) {
			t.Errorf("Allowed(%s) = %v, want ErrNotAllowed", spec, err)
		}
	}
	all := NewRegistry(RegistryOptions{Devices: []string{"*"}})
	for _, spec := range []string{"pci:0000:00:01.0", "mdev:00000000-0000-0000-0000-000000000000"} {
		s, _ := ParseSpec(spec)
		if err := all.Allowed(s); err != nil {
			t.Errorf("* refuses %s: %v", spec, err)
		}
	}
	s, _ := ParseSpec("sim:size=1MiB")
	if err := all.Allowed(s); !errors.Is(err, ErrNotAllowed) {
		t.Errorf("* admits a sim device without AllowSim: %v", err)
	}
}

func TestValidateDevicePattern(t *testing.T) {
	for _, p := range []string{"*", "pci:*", "mdev:*", "pci:0000:3b:*", "PCI:0000:3B:00.[0-3]", "mdev:c0ffee00-*"} {
		if err := ValidateDevicePattern(p); err != nil {
			t.Errorf("%q: %v", p, err)
		}
	}
	for _, p := range []string{"", "sim:*", "0000:3b:00.2", "pci:[", "vfio:*", "**"} {
		if err := ValidateDevicePattern(p); err == nil {
			t.Errorf("%q accepted", p)
		}
	}
}
