//go:build linux

package vfio

import (
	"os"
	"path/filepath"
	"strings"
)

// describeKernel describes a kernel device of this host (describeHost).
func describeKernel(s Spec, d *Description) { describeHost(realHost, s, d) }

// describeHost fills in what sysfs under h shows of the kernel device s:
// for a PCI function its ids and bound driver, for an mdev its type, its
// vendor driver and its parent's ids. It opens nothing under /dev and
// reads only sysfs attributes.
func describeHost(h hostPaths, s Spec, d *Description) {
	var dir, idsDir string
	switch s.Kind {
	case SpecPCI:
		dir = filepath.Join(h.sys, "bus/pci/devices", s.PCI.String())
		idsDir = dir
	case SpecMdev:
		if !isUUID(s.MdevUUID) {
			return
		}
		dir = filepath.Join(h.sys, "bus/mdev/devices", s.MdevUUID)
		if t, err := os.Readlink(filepath.Join(dir, "mdev_type")); err == nil {
			d.MdevType = filepath.Base(t)
		}
		// The parent is the directory the mdev sits in.
		if real, err := filepath.EvalSymlinks(dir); err == nil {
			idsDir = filepath.Dir(real)
		}
	default:
		return
	}
	if idsDir != "" {
		d.PCIVendor = sysAttr(idsDir, "vendor")
		d.PCIDevice = sysAttr(idsDir, "device")
		d.PCISubsystemVendor = sysAttr(idsDir, "subsystem_vendor")
		d.PCISubsystemDevice = sysAttr(idsDir, "subsystem_device")
	}
	if drv, err := os.Readlink(filepath.Join(dir, "driver")); err == nil {
		d.Driver = filepath.Base(drv)
		// A driver's module, where it is one, may say its version.
		if mod, err := os.Readlink(filepath.Join(dir, "driver", "module")); err == nil {
			d.DriverVersion = sysAttr(filepath.Join(h.sys, "module", filepath.Base(mod)), "version")
		}
	}
}

// sysAttr reads one short sysfs attribute, trimmed; "" when absent.
func sysAttr(dir, name string) string {
	b, err := os.ReadFile(filepath.Join(dir, name))
	if err != nil || len(b) > 256 {
		return ""
	}
	return strings.TrimSpace(string(b))
}
