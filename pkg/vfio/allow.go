package vfio

import (
	"fmt"
	"path"
	"strings"
)

// ValidateDevicePattern checks one pattern of RegistryOptions.Devices: a
// glob (path.Match syntax: *, ?, [...]) over canonical pci: or mdev:
// specs, such as "pci:0000:3b:*" or "mdev:*", or "*" for every host
// device.
func ValidateDevicePattern(p string) error {
	if p == "*" {
		return nil
	}
	lp := strings.ToLower(p)
	if !strings.HasPrefix(lp, "pci:") && !strings.HasPrefix(lp, "mdev:") {
		return fmt.Errorf("device pattern %q: a pattern names pci: or mdev: devices (simulated devices are governed by --allow-sim alone)", p)
	}
	if _, err := path.Match(lp, ""); err != nil {
		return fmt.Errorf("device pattern %q: %v", p, err)
	}
	return nil
}

// Allowed returns nil if the registry serves the device s names: a sim:
// spec when AllowSim is set, a pci: or mdev: spec when its canonical form
// matches one of the Devices patterns, and a vmm: spec always (only a
// lent device exists under one). Otherwise the error wraps
// ErrNotAllowed.
func (r *Registry) Allowed(s Spec) error {
	name := s.String()
	switch s.Kind {
	case SpecSim:
		if !r.opts.AllowSim {
			return fmt.Errorf("%s: simulated devices are not enabled: %w", name, ErrNotAllowed)
		}
		return nil
	case SpecPCI, SpecMdev:
		for _, p := range r.opts.Devices {
			if p == "*" {
				return nil
			}
			if ok, err := path.Match(strings.ToLower(p), name); err == nil && ok {
				return nil
			}
		}
		return fmt.Errorf("%s: not in the agent's device allowlist (--devices): %w", name, ErrNotAllowed)
	case SpecVMM:
		// Only a device a VMM lent exists under a vmm: spec; lending it
		// was the VMM's consent.
		return nil
	}
	return fmt.Errorf("%s: unknown spec kind: %w", name, ErrBadSpec)
}
