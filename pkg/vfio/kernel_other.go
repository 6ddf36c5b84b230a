//go:build !linux

package vfio

import (
	"fmt"
	"os"
)

// openKernel reports that VFIO devices exist only on Linux.
func openKernel(s Spec) (Device, error) {
	return nil, fmt.Errorf("open %s: VFIO needs Linux: %w", s, ErrNotSupported)
}

// ListKernelDevices lists the VFIO devices of this host. VFIO exists only
// on Linux: elsewhere there are none, and the error wraps ErrNotSupported.
func ListKernelDevices() ([]Spec, error) {
	return nil, fmt.Errorf("list VFIO devices: VFIO needs Linux: %w", ErrNotSupported)
}

// AdoptDeviceFD reports that VFIO devices exist only on Linux.
func AdoptDeviceFD(fd int, name string) (Device, error) {
	return nil, fmt.Errorf("adopt vmm:%s: VFIO needs Linux: %w", name, ErrNotSupported)
}

// DeviceFD reports that VFIO devices exist only on Linux.
func DeviceFD(dev Device) (*os.File, error) {
	return nil, fmt.Errorf("%s: VFIO needs Linux: %w", dev.Spec(), ErrNotSupported)
}

// describeKernel has nothing to read off Linux.
func describeKernel(Spec, *Description) {}
