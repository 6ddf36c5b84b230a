//go:build linux

package vfio

import "fmt"

// openKernel opens a VFIO device named by a pci: or mdev: spec.
func openKernel(s Spec) (Device, error) {
	return nil, fmt.Errorf("open %s: %w", s, ErrNotSupported)
}
