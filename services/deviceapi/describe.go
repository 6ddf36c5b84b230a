package deviceapi

import (
	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/vfio"
)

// DescriptionToProto converts a device description.
func DescriptionToProto(d vfio.Description) *ferryv1.DeviceDescription {
	return &ferryv1.DeviceDescription{
		Spec: d.Spec, Kind: d.Kind,
		PciVendor: d.PCIVendor, PciDevice: d.PCIDevice,
		PciSubsystemVendor: d.PCISubsystemVendor, PciSubsystemDevice: d.PCISubsystemDevice,
		Driver: d.Driver, DriverVersion: d.DriverVersion, MdevType: d.MdevType,
		MigrationFlags: uint64(d.Flags), EstimatedStateBytes: d.DataSize, SimSize: d.SimSize,
	}
}

// DescriptionFromProto converts a description a peer sent; strings
// longer than a sysfs attribute are cut, so a hostile peer cannot make
// the comparison's messages large.
func DescriptionFromProto(p *ferryv1.DeviceDescription) vfio.Description {
	cut := func(s string) string {
		if len(s) > 256 {
			return s[:256]
		}
		return s
	}
	return vfio.Description{
		Spec: cut(p.GetSpec()), Kind: cut(p.GetKind()),
		PCIVendor: cut(p.GetPciVendor()), PCIDevice: cut(p.GetPciDevice()),
		PCISubsystemVendor: cut(p.GetPciSubsystemVendor()), PCISubsystemDevice: cut(p.GetPciSubsystemDevice()),
		Driver: cut(p.GetDriver()), DriverVersion: cut(p.GetDriverVersion()), MdevType: cut(p.GetMdevType()),
		Flags: vfio.Flags(p.GetMigrationFlags()), DataSize: p.GetEstimatedStateBytes(), SimSize: p.GetSimSize(),
	}
}
