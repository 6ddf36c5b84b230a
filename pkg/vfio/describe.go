package vfio

import (
	"fmt"
)

// Description is what can be told about a device without touching its
// state: the identity of the hardware and the driver behind it (from
// sysfs), and its migration flags and size estimate (from the open
// device). Compatible compares two. A field that could not be told is
// empty (zero).
type Description struct {
	Spec string
	Kind string // pci, mdev, vmm, sim
	// PCIVendor ... PCISubsystemDevice are the ids sysfs shows ("0x15b3"):
	// the function's, or the mdev parent's.
	PCIVendor, PCIDevice                   string
	PCISubsystemVendor, PCISubsystemDevice string
	// Driver is the bound driver (pci) or the mdev's vendor driver;
	// DriverVersion its module's version where the module has one.
	Driver, DriverVersion string
	// MdevType is the mdev type's name ("ferry_mig-p2p").
	MdevType string
	Flags    Flags
	// DataSize is the stop-copy size estimate; 0 when unknown.
	DataSize uint64
	// SimSize is a simulated device's state size.
	SimSize uint64
}

// Mismatch is why a source device's state cannot go into a destination
// device: the Description field that differs (as the API names it:
// "mdev_type", "migration_flags", ...) and a sentence for people.
type Mismatch struct {
	Field   string
	Message string
}

// Needs are what a migration asks of a destination device beyond
// identity: the flags it will use on the source device.
type Needs struct {
	// P2P: the source stops through RUNNING_P2P (every source device has
	// P2P); the destination device must have it too, as QEMU requires of
	// both ends.
	P2P bool
	// PreCopy: the migration is pre-copy and the source device has
	// PRE_COPY: its stream carries pre-copy records the destination
	// device must take.
	PreCopy bool
}

// Compatible says whether the state of the device src describes can be
// loaded into the device dst describes, for a migration that needs
// needs, or what differs. The rules: the kinds match (a vmm: device,
// known by its descriptor alone, is compared by what it tells); for PCI functions the
// vendor, device and subsystem ids and the driver; for mdevs the type
// and the driver; the driver versions where both sides tell one;
// STOP_COPY on both, and P2P and PRE_COPY where the migration uses
// them; a simulated device's size. Fields one side could not tell are
// not compared. It is pure.
func Compatible(src, dst Description, needs Needs) (Mismatch, bool) {
	known := func(k string) bool { return k == "pci" || k == "mdev" || k == "vmm" || k == "sim" }
	switch {
	case !known(src.Kind) || !known(dst.Kind):
		return Mismatch{"kind", fmt.Sprintf("unknown device kind %q or %q", src.Kind, dst.Kind)}, false
	case src.Kind == "vmm" || dst.Kind == "vmm":
		// What a VMM lent is known by its descriptor alone: whatever
		// it is, it is compared by what it tells.
	case src.Kind != dst.Kind:
		return Mismatch{"kind", fmt.Sprintf("a %s device's state cannot go into a %s device", src.Kind, dst.Kind)}, false
	}
	for _, f := range []struct{ field, a, b string }{
		{"pci_vendor", src.PCIVendor, dst.PCIVendor},
		{"pci_device", src.PCIDevice, dst.PCIDevice},
		{"pci_subsystem_vendor", src.PCISubsystemVendor, dst.PCISubsystemVendor},
		{"pci_subsystem_device", src.PCISubsystemDevice, dst.PCISubsystemDevice},
		{"mdev_type", src.MdevType, dst.MdevType},
		{"driver", src.Driver, dst.Driver},
		{"driver_version", src.DriverVersion, dst.DriverVersion},
	} {
		if f.a != "" && f.b != "" && f.a != f.b {
			return Mismatch{f.field, fmt.Sprintf("%s differs: the source's is %s, the destination's %s", f.field, f.a, f.b)}, false
		}
	}
	if src.Flags != 0 && dst.Flags != 0 {
		want := FlagStopCopy
		if needs.P2P {
			want |= FlagP2P
		}
		if needs.PreCopy {
			want |= FlagPreCopy
		}
		if missing := want &^ dst.Flags; missing != 0 {
			return Mismatch{"migration_flags", fmt.Sprintf("the destination device lacks %v (it has %v; the migration needs %v)", missing, dst.Flags, want)}, false
		}
	}
	if src.Kind == "sim" && dst.Kind == "sim" && src.SimSize != dst.SimSize {
		return Mismatch{"sim_size", fmt.Sprintf("the source's state is %d bytes, the destination device takes %d", src.SimSize, dst.SimSize)}, false
	}
	if src.Kind == "sim" && dst.Kind == "sim" && src.Flags != 0 && dst.Flags != 0 && src.Flags != dst.Flags {
		return Mismatch{"migration_flags", fmt.Sprintf("simulated devices of other flags (%v, %v) keep other state", src.Flags, dst.Flags)}, false
	}
	return Mismatch{}, true
}

// Describe tells what it can of the device dev (opened) is: its spec,
// flags and size estimate, and, for a kernel device named by spec, what
// sysfs shows of its hardware and driver. It issues no
// operation but DataSize, which only reads.
func Describe(dev Device) Description {
	d := describeSpec(dev.Spec())
	d.Flags = dev.Flags()
	if n, err := dev.DataSize(); err == nil {
		d.DataSize = n
	}
	return d
}

// describeSpec is what a spec alone tells, with sysfs for kernel devices.
func describeSpec(spec string) Description {
	d := Description{Spec: spec}
	s, err := ParseSpec(spec)
	if err != nil {
		return d
	}
	d.Kind = s.Kind.String()
	switch s.Kind {
	case SpecSim:
		d.SimSize = s.Sim.Size
	case SpecPCI, SpecMdev:
		describeKernel(s, &d)
	}
	return d
}

// DescribeInfo is Describe from a registry's listing: what the registry
// remembers of the device and what sysfs shows of it, with no operation
// on the device.
func DescribeInfo(info DeviceInfo) Description {
	d := describeSpec(info.Spec)
	d.Flags, d.DataSize = info.Flags, info.DataSize
	return d
}
