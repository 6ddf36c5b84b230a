//go:build !linux

package vfio

import "fmt"

// openKernel reports that VFIO devices exist only on Linux.
func openKernel(s Spec) (Device, error) {
	return nil, fmt.Errorf("open %s: VFIO needs Linux: %w", s, ErrNotSupported)
}

// ListKernelDevices lists the VFIO devices of this host. VFIO exists only
// on Linux: elsewhere there are none, and the error wraps ErrNotSupported.
func ListKernelDevices() ([]Spec, error) {
	return nil, fmt.Errorf("list VFIO devices: VFIO needs Linux: %w", ErrNotSupported)
}
