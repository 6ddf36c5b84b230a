//go:build !linux

package vfio

import "fmt"

// openKernel reports that VFIO devices exist only on Linux.
func openKernel(s Spec) (Device, error) {
	return nil, fmt.Errorf("open %s: VFIO needs Linux: %w", s, ErrNotSupported)
}
