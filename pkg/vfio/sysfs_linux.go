//go:build linux

package vfio

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// hostPaths are the roots under which the backend finds devices: "/sys"
// and "/dev" on a host, a fake tree in tests.
type hostPaths struct {
	sys string
	dev string
}

// realHost is where a running kernel shows its devices.
var realHost = hostPaths{sys: "/sys", dev: "/dev"}

// resolved is where a spec leads on this host. Every path in it was built
// from the host's own sysfs and the spec's validated fields, never from a
// path a caller supplied.
type resolved struct {
	// name is the device's name for VFIO_GROUP_GET_DEVICE_FD: the PCI
	// address ("0000:3b:00.2") or the mdev UUID.
	name string
	// sysDir is the device's directory in sysfs.
	sysDir string
	// groupNode is the group's character device, /dev/vfio/N, or
	// /dev/vfio/noiommu-N for a group without an IOMMU; "" when the
	// device has no group node (cdev-only kernels).
	groupNode string
	// noIOMMU is set for a /dev/vfio/noiommu-N group.
	noIOMMU bool
	// cdevNode is the device's own VFIO character device,
	// /dev/vfio/devices/vfioX (Linux 6.6+), or "" when there is none.
	cdevNode string
}

// resolveSpec finds a pci: or mdev: device in sysfs and checks that it is
// a VFIO device whose group (or cdev) node exists. Errors wrap
// ErrNotSupported when the device exists but VFIO does not drive it, and
// fs.ErrNotExist when there is no such device.
func resolveSpec(h hostPaths, s Spec) (resolved, error) {
	var r resolved
	switch s.Kind {
	case SpecPCI:
		r.name = s.PCI.String()
		r.sysDir = filepath.Join(h.sys, "bus/pci/devices", r.name)
	case SpecMdev:
		if !isUUID(s.MdevUUID) {
			return r, fmt.Errorf("%q is not a UUID: %w", s.MdevUUID, ErrBadSpec)
		}
		r.name = s.MdevUUID
		r.sysDir = filepath.Join(h.sys, "bus/mdev/devices", r.name)
	default:
		return r, fmt.Errorf("%v is not a kernel device: %w", s.Kind, ErrNotSupported)
	}
	if _, err := os.Stat(r.sysDir); err != nil {
		return r, fmt.Errorf("no device %s in sysfs: %w", r.name, err)
	}
	if !isVFIODevice(r.sysDir) {
		return r, fmt.Errorf("device %s is not bound to a VFIO driver: %w", r.name, ErrNotSupported)
	}

	if cdev := vfioCdevName(r.sysDir); cdev != "" {
		node := filepath.Join(h.dev, "vfio/devices", cdev)
		if isCharDevice(node) {
			r.cdevNode = node
		}
	}
	group, err := iommuGroup(r.sysDir)
	if err == nil {
		if node := filepath.Join(h.dev, "vfio", group); isCharDevice(node) {
			r.groupNode = node
		} else if node := filepath.Join(h.dev, "vfio", "noiommu-"+group); isCharDevice(node) {
			r.groupNode, r.noIOMMU = node, true
		}
	}
	if r.groupNode == "" && r.cdevNode == "" {
		if err == nil {
			err = fmt.Errorf("no node for IOMMU group %s under %s", group, filepath.Join(h.dev, "vfio"))
		}
		return r, fmt.Errorf("device %s: %w: %w", r.name, err, ErrNotSupported)
	}
	return r, nil
}

// isVFIODevice reports whether the device in sysDir is driven by VFIO:
// since Linux 6.1 every registered VFIO device has a vfio-dev/vfioX child
// (class vfio-dev); before that, its driver's name says so (vfio-pci,
// mlx5_vfio_pci, vfio_mdev, ...).
func isVFIODevice(sysDir string) bool {
	if vfioCdevName(sysDir) != "" {
		return true
	}
	drv, err := os.Readlink(filepath.Join(sysDir, "driver"))
	return err == nil && strings.Contains(filepath.Base(drv), "vfio")
}

// vfioCdevName returns the name of the device's vfio-dev child ("vfio3"),
// or "".
func vfioCdevName(sysDir string) string {
	entries, err := os.ReadDir(filepath.Join(sysDir, "vfio-dev"))
	if err != nil {
		return ""
	}
	for _, e := range entries {
		if n := e.Name(); strings.HasPrefix(n, "vfio") && isDigits(n[len("vfio"):]) {
			return n
		}
	}
	return ""
}

// iommuGroup returns the number of the device's IOMMU group, the base
// name of its iommu_group link.
func iommuGroup(sysDir string) (string, error) {
	link, err := os.Readlink(filepath.Join(sysDir, "iommu_group"))
	if err != nil {
		return "", fmt.Errorf("no IOMMU group: %w", err)
	}
	group := filepath.Base(link)
	if !isDigits(group) {
		return "", fmt.Errorf("IOMMU group link %q does not end in a number", link)
	}
	return group, nil
}

// isCharDevice reports whether path exists and is a character device.
func isCharDevice(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.Mode()&fs.ModeCharDevice != 0
}

func isDigits(s string) bool {
	if s == "" {
		return false
	}
	for i := range len(s) {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

// isUUID reports whether s is a lowercase 8-4-4-4-12 UUID, the form the
// kernel names mdevs by.
func isUUID(s string) bool {
	if len(s) != 36 {
		return false
	}
	for i := range len(s) {
		c := s[i]
		switch i {
		case 8, 13, 18, 23:
			if c != '-' {
				return false
			}
		default:
			if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
				return false
			}
		}
	}
	return true
}

// ListKernelDevices lists the VFIO devices of this host that Ferry can
// open: PCI functions bound to a VFIO driver (vfio-pci or a vendor
// variant) and mediated devices, each with a group node under /dev/vfio
// or its own VFIO cdev. Sysfs does not tell whether a device supports
// migration: opening it does (Open fails with ErrNotSupported when
// it does not, and Device.Flags tells which states it has). The list is
// sorted, PCI functions first. A host without VFIO has none.
func ListKernelDevices() ([]Spec, error) {
	return listKernelDevices(realHost)
}

func listKernelDevices(h hostPaths) ([]Spec, error) {
	var specs []Spec
	var errs []error
	for _, bus := range [...]struct {
		dir    string
		prefix string
	}{
		{"bus/pci/devices", "pci:"},
		{"bus/mdev/devices", "mdev:"},
	} {
		entries, err := os.ReadDir(filepath.Join(h.sys, bus.dir))
		if errors.Is(err, fs.ErrNotExist) {
			continue // no PCI bus, or mdev not loaded
		}
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for _, e := range entries {
			s, err := ParseSpec(bus.prefix + e.Name())
			if err != nil {
				continue // not a name this backend can open
			}
			if _, err := resolveSpec(h, s); err == nil {
				specs = append(specs, s)
			}
		}
	}
	slices.SortFunc(specs, func(a, b Spec) int {
		if a.Kind != b.Kind {
			return int(a.Kind) - int(b.Kind)
		}
		return strings.Compare(a.String(), b.String())
	})
	return specs, errors.Join(errs...)
}
