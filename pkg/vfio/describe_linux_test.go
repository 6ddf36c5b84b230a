//go:build linux

package vfio

import (
	"os"
	"path/filepath"
	"testing"
)

func TestDescribeHost(t *testing.T) {
	h := newFakeHost(t)
	write := func(dir, name, v string) {
		t.Helper()
		h.mkdir(dir)
		if err := os.WriteFile(filepath.Join(dir, name), []byte(v+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// A PCI function bound to a variant driver whose module has a version.
	h.device("pci", "0000:3b:00.2", "12", "mlx5_vfio_pci", "vfio0")
	fn := filepath.Join(h.sys, "bus/pci/devices/0000:3b:00.2")
	for k, v := range map[string]string{"vendor": "0x15b3", "device": "0x101e", "subsystem_vendor": "0x15b3", "subsystem_device": "0x0047"} {
		write(fn, k, v)
	}
	// The module link where the fake driver link leads.
	drv := filepath.Join(fn, "../../../bus/pci/drivers/mlx5_vfio_pci")
	h.symlink(filepath.Join(h.sys, "module/mlx5_vfio_pci"), filepath.Join(drv, "module"))
	write(filepath.Join(h.sys, "module/mlx5_vfio_pci"), "version", "2.1")

	var d Description
	describeHost(h.hostPaths, mustSpec(t, "pci:0000:3b:00.2"), &d)
	want := Description{PCIVendor: "0x15b3", PCIDevice: "0x101e", PCISubsystemVendor: "0x15b3", PCISubsystemDevice: "0x0047", Driver: "mlx5_vfio_pci", DriverVersion: "2.1"}
	if d != want {
		t.Fatalf("pci: %+v, want %+v", d, want)
	}

	// An mdev: a directory under its parent, linked from the mdev bus.
	parent := filepath.Join(h.sys, "devices/virtual/ferry_mig")
	write(parent, "vendor", "0x1af4")
	uuid := "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"
	h.mkdir(filepath.Join(parent, uuid))
	h.symlink(filepath.Join(parent, uuid), filepath.Join(h.sys, "bus/mdev/devices", uuid))
	h.symlink("../mdev_supported_types/ferry_mig-p2p", filepath.Join(parent, uuid, "mdev_type"))
	h.symlink("../../../bus/mdev/drivers/ferry_mig", filepath.Join(parent, uuid, "driver"))
	d = Description{}
	describeHost(h.hostPaths, mustSpec(t, "mdev:"+uuid), &d)
	want = Description{PCIVendor: "0x1af4", MdevType: "ferry_mig-p2p", Driver: "ferry_mig"}
	if d != want {
		t.Fatalf("mdev: %+v, want %+v", d, want)
	}
}
