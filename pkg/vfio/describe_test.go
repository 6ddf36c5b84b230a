package vfio

import "testing"

func TestCompatible(t *testing.T) {
	nic := Description{Kind: "pci", PCIVendor: "0x15b3", PCIDevice: "0x101e", PCISubsystemVendor: "0x15b3", PCISubsystemDevice: "0x0047",
		Driver: "mlx5_vfio_pci", DriverVersion: "1.0", Flags: FlagStopCopy | FlagP2P | FlagPreCopy}
	with := func(f func(*Description)) Description { d := nic; f(&d); return d }
	mdev := Description{Kind: "mdev", MdevType: "ferry_mig-p2p", Driver: "ferry_mig", Flags: FlagStopCopy | FlagP2P}
	sim := Description{Kind: "sim", SimSize: 1 << 30, Flags: FlagStopCopy | FlagP2P}
	for _, tc := range []struct {
		name     string
		src, dst Description
		needs    Needs
		field    string // "" when compatible
	}{
		{"same function", nic, nic, Needs{P2P: true, PreCopy: true}, ""},
		{"other device id", nic, with(func(d *Description) { d.PCIDevice = "0x1021" }), Needs{}, "pci_device"},
		{"other vendor", nic, with(func(d *Description) { d.PCIVendor = "0x10de" }), Needs{}, "pci_vendor"},
		{"other subsystem", nic, with(func(d *Description) { d.PCISubsystemDevice = "0x0048" }), Needs{}, "pci_subsystem_device"},
		{"other driver", nic, with(func(d *Description) { d.Driver = "vfio-pci" }), Needs{}, "driver"},
		{"other driver version", nic, with(func(d *Description) { d.DriverVersion = "2.0" }), Needs{}, "driver_version"},
		{"version untold on one side", nic, with(func(d *Description) { d.DriverVersion = "" }), Needs{}, ""},
		{"no P2P where the source stops through it", nic, with(func(d *Description) { d.Flags = FlagStopCopy | FlagPreCopy }), Needs{P2P: true}, "migration_flags"},
		{"no P2P, none needed", nic, with(func(d *Description) { d.Flags = FlagStopCopy | FlagPreCopy }), Needs{}, ""},
		{"no PRE_COPY in a pre-copy migration", nic, with(func(d *Description) { d.Flags = FlagStopCopy | FlagP2P }), Needs{PreCopy: true}, "migration_flags"},
		{"flags untold", nic, with(func(d *Description) { d.Flags = 0 }), Needs{P2P: true}, ""},
		{"pci into mdev", nic, mdev, Needs{}, "kind"},
		{"other mdev type", mdev, Description{Kind: "mdev", MdevType: "ferry_mig-stopcopy", Driver: "ferry_mig", Flags: FlagStopCopy}, Needs{}, "mdev_type"},
		{"vmm device into mdev", Description{Kind: "vmm", Flags: FlagStopCopy | FlagP2P}, mdev, Needs{P2P: true}, ""},
		{"vmm device without P2P", Description{Kind: "vmm", Flags: FlagStopCopy | FlagP2P}, Description{Kind: "vmm", Flags: FlagStopCopy}, Needs{P2P: true}, "migration_flags"},
		{"sim", sim, sim, Needs{P2P: true}, ""},
		{"sim of another size", sim, Description{Kind: "sim", SimSize: 2 << 30, Flags: sim.Flags}, Needs{}, "sim_size"},
		{"sim of other flags", sim, Description{Kind: "sim", SimSize: sim.SimSize, Flags: FlagStopCopy | FlagP2P | FlagPreCopy}, Needs{}, "migration_flags"},
		{"sim into pci", sim, nic, Needs{}, "kind"},
		{"unknown kind", Description{Kind: "usb"}, nic, Needs{}, "kind"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, ok := Compatible(tc.src, tc.dst, tc.needs)
			if ok != (tc.field == "") || m.Field != tc.field {
				t.Fatalf("Compatible: %v %+v, want field %q", ok, m, tc.field)
			}
			if !ok && m.Message == "" {
				t.Fatal("a mismatch without a message")
			}
		})
	}
}
