package vfio

import (
	"errors"
	"strings"
	"testing"
)

var validSpecs = []struct {
	name  string
	in    string
	canon string
	want  Spec
}{
	{"pci", "pci:0000:3b:00.2", "pci:0000:3b:00.2",
		Spec{Kind: SpecPCI, PCI: PCIAddr{Domain: 0, Bus: 0x3b, Device: 0, Function: 2}}},
	{"pci-upper", "pci:ABCD:3B:1F.7", "pci:abcd:3b:1f.7",
		Spec{Kind: SpecPCI, PCI: PCIAddr{Domain: 0xabcd, Bus: 0x3b, Device: 0x1f, Function: 7}}},
	{"mdev", "mdev:83B8F4F2-509F-382F-3C1E-E6BFE0FA1001", "mdev:83b8f4f2-509f-382f-3c1e-e6bfe0fa1001",
		Spec{Kind: SpecMdev, MdevUUID: "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"}},
	{"vmm", "vmm:VM-1.nic_0", "vmm:VM-1.nic_0", Spec{Kind: SpecVMM, VMM: "VM-1.nic_0"}},
	{"sim-min", "sim:size=1GiB,seed=7", "sim:size=1GiB,seed=7",
		Spec{Kind: SpecSim, Sim: SimConfig{Size: 1 << 30, Seed: 7, Flags: FlagStopCopy | FlagP2P}}},
	{"sim-order", "sim:seed=7,size=1GiB", "sim:size=1GiB,seed=7",
		Spec{Kind: SpecSim, Sim: SimConfig{Size: 1 << 30, Seed: 7, Flags: FlagStopCopy | FlagP2P}}},
	{"sim-default-seed", "sim:size=1073741824", "sim:size=1GiB,seed=0",
		Spec{Kind: SpecSim, Sim: SimConfig{Size: 1 << 30, Flags: FlagStopCopy | FlagP2P}}},
	{"sim-odd-size", "sim:size=1000001,seed=1", "sim:size=1000001,seed=1",
		Spec{Kind: SpecSim, Sim: SimConfig{Size: 1000001, Seed: 1, Flags: FlagStopCopy | FlagP2P}}},
	{"sim-decimal-size", "sim:size=2000000000", "sim:size=2GB,seed=0",
		Spec{Kind: SpecSim, Sim: SimConfig{Size: 2e9, Flags: FlagStopCopy | FlagP2P}}},
	{"sim-fraction-size", "sim:size=1.5GiB", "sim:size=1536MiB,seed=0",
		Spec{Kind: SpecSim, Sim: SimConfig{Size: 1536 << 20, Flags: FlagStopCopy | FlagP2P}}},
	{"sim-1-byte", "sim:size=1", "sim:size=1,seed=0",
		Spec{Kind: SpecSim, Sim: SimConfig{Size: 1, Flags: FlagStopCopy | FlagP2P}}},
	{"sim-max", "sim:size=1TiB", "sim:size=1TiB,seed=0",
		Spec{Kind: SpecSim, Sim: SimConfig{Size: 1 << 40, Flags: FlagStopCopy | FlagP2P}}},
	{"sim-all",
		"sim:flags=p2p|stopcopy,fault=4096,zero=0.30,wrate=2000MB,rate=2GB/s,seed=007,size=1024MiB",
		"sim:size=1GiB,seed=7,rate=2GB/s,wrate=2GB/s,zero=0.3,fault=4KiB",
		Spec{Kind: SpecSim, Sim: SimConfig{Size: 1 << 30, Seed: 7, ReadRate: 2e9, WriteRate: 2e9,
			ZeroFraction: 0.3, HasFault: true, FaultOffset: 4096, Flags: FlagStopCopy | FlagP2P}}},
	{"sim-fault-0", "sim:size=1MiB,fault=0", "sim:size=1MiB,seed=0,fault=0",
		Spec{Kind: SpecSim, Sim: SimConfig{Size: 1 << 20, HasFault: true, Flags: FlagStopCopy | FlagP2P}}},
	{"sim-zero-0", "sim:size=1MiB,zero=0", "sim:size=1MiB,seed=0",
		Spec{Kind: SpecSim, Sim: SimConfig{Size: 1 << 20, Flags: FlagStopCopy | FlagP2P}}},
	{"sim-zero-1", "sim:size=1MiB,zero=1.0", "sim:size=1MiB,seed=0,zero=1",
		Spec{Kind: SpecSim, Sim: SimConfig{Size: 1 << 20, ZeroFraction: 1, Flags: FlagStopCopy | FlagP2P}}},
	{"sim-stopcopy-only", "sim:size=1MiB,flags=stopcopy", "sim:size=1MiB,seed=0,flags=stopcopy",
		Spec{Kind: SpecSim, Sim: SimConfig{Size: 1 << 20, Flags: FlagStopCopy}}},
	{"sim-precopy", "sim:size=1GiB,seed=3,flags=precopy|stopcopy|p2p,precopy=64MiB,dirty=1MB/s",
		"sim:size=1GiB,seed=3,flags=stopcopy|p2p|precopy,precopy=64MiB,dirty=1MB/s",
		Spec{Kind: SpecSim, Sim: SimConfig{Size: 1 << 30, Seed: 3, Flags: FlagStopCopy | FlagP2P | FlagPreCopy,
			PreCopy: 64 << 20, DirtyRate: 1e6}}},
	{"sim-reinit", "sim:size=1GiB,flags=stopcopy|precopy,reinit=0,precopy=1GiB",
		"sim:size=1GiB,seed=0,flags=stopcopy|precopy,precopy=1GiB,reinit=0",
		Spec{Kind: SpecSim, Sim: SimConfig{Size: 1 << 30, Flags: FlagStopCopy | FlagPreCopy,
			PreCopy: 1 << 30, HasReinit: true}}},
	{"sim-reinit-mid", "sim:size=8MiB,seed=2,flags=stopcopy|p2p|precopy,precopy=4MiB,dirty=2MiB/s,reinit=1MiB",
		"sim:size=8MiB,seed=2,flags=stopcopy|p2p|precopy,precopy=4MiB,dirty=2MiB/s,reinit=1MiB",
		Spec{Kind: SpecSim, Sim: SimConfig{Size: 8 << 20, Seed: 2, Flags: FlagStopCopy | FlagP2P | FlagPreCopy,
			PreCopy: 4 << 20, DirtyRate: 2 << 20, HasReinit: true, ReinitOffset: 1 << 20}}},
	{"sim-precopyinfo-v1", "sim:size=8MiB,precopyinfo=v1,flags=stopcopy|precopy,precopy=4MiB,reinit=0",
		"sim:size=8MiB,seed=0,flags=stopcopy|precopy,precopy=4MiB,reinit=0,precopyinfo=v1",
		Spec{Kind: SpecSim, Sim: SimConfig{Size: 8 << 20, Flags: FlagStopCopy | FlagPreCopy,
			PreCopy: 4 << 20, HasReinit: true, PrecopyInfoV1: true}}},
	{"sim-precopyinfo-v2", "sim:size=8MiB,flags=stopcopy|precopy,precopyinfo=v2",
		"sim:size=8MiB,seed=0,flags=stopcopy|precopy",
		Spec{Kind: SpecSim, Sim: SimConfig{Size: 8 << 20, Flags: FlagStopCopy | FlagPreCopy}}},
	{"sim-hang-read", "sim:size=1GiB,hang=read@64MiB", "sim:size=1GiB,seed=0,hang=read@64MiB",
		Spec{Kind: SpecSim, Sim: SimConfig{Size: 1 << 30, Flags: FlagStopCopy | FlagP2P,
			Hang: SimHang{Op: HangRead, Offset: 64 << 20}}}},
	{"sim-hang-write-0", "sim:size=1MiB,hang=write@0", "sim:size=1MiB,seed=0,hang=write@0",
		Spec{Kind: SpecSim, Sim: SimConfig{Size: 1 << 20, Flags: FlagStopCopy | FlagP2P, Hang: SimHang{Op: HangWrite}}}},
	{"sim-hang-state", "sim:size=1MiB,hang=state:stop_copy", "sim:size=1MiB,seed=0,hang=state:STOP_COPY",
		Spec{Kind: SpecSim, Sim: SimConfig{Size: 1 << 20, Flags: FlagStopCopy | FlagP2P,
			Hang: SimHang{Op: HangState, State: StateStopCopy}}}},
	{"sim-hang-reset", "sim:size=1MiB,hang=reset", "sim:size=1MiB,seed=0,hang=reset",
		Spec{Kind: SpecSim, Sim: SimConfig{Size: 1 << 20, Flags: FlagStopCopy | FlagP2P, Hang: SimHang{Op: HangReset}}}},
	{"sim-fail-both", "sim:size=1MiB,fail=reset|state:RUNNING", "sim:size=1MiB,seed=0,fail=state:RUNNING|reset",
		Spec{Kind: SpecSim, Sim: SimConfig{Size: 1 << 20, Flags: FlagStopCopy | FlagP2P,
			FailArc: true, FailState: StateRunning, FailReset: true}}},
	{"sim-fail-reset", "sim:size=1MiB,fail=reset", "sim:size=1MiB,seed=0,fail=reset",
		Spec{Kind: SpecSim, Sim: SimConfig{Size: 1 << 20, Flags: FlagStopCopy | FlagP2P, FailReset: true}}},
}

func TestParseSpec(t *testing.T) {
	for _, tt := range validSpecs {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseSpec(tt.in)
			if err != nil {
				t.Fatalf("ParseSpec(%q): %v", tt.in, err)
			}
			if got != tt.want {
				t.Errorf("ParseSpec(%q) = %+v, want %+v", tt.in, got, tt.want)
			}
			if s := got.String(); s != tt.canon {
				t.Errorf("String() = %q, want %q", s, tt.canon)
			}
			again, err := ParseSpec(tt.canon)
			if err != nil || again != got {
				t.Errorf("ParseSpec(canonical %q) = %+v, %v; want %+v", tt.canon, again, err, got)
			}
		})
	}
}

var invalidSpecs = []struct {
	name string
	in   string
	want string // a substring of the error
}{
	{"empty", "", "unknown kind"},
	{"no-kind", "0000:3b:00.2", "unknown kind"},
	{"bad-kind", "usb:1-2", "unknown kind"},
	{"upper-kind", "PCI:0000:3b:00.2", "unknown kind"},
	{"space", "sim: size=1GiB", "whitespace"},
	{"tab", "sim:size=1GiB,\tseed=1", "whitespace"},
	{"non-ascii", "sim:size=1GiB,seed=\u00b9", "non-printable"},
	{"too-long", "sim:size=1GiB,seed=" + strings.Repeat("1", 500), "longer than 512"},
	{"pci-short", "pci:0000:3b:00", "not DDDD:BB:DD.F"},
	{"pci-no-domain", "pci:3b:00.2", "not DDDD:BB:DD.F"},
	{"pci-long-domain", "pci:00000:3b:00.2", "not DDDD:BB:DD.F"},
	{"pci-not-hex", "pci:000g:3b:00.2", "not hex"},
	{"pci-sign", "pci:+000:3b:00.2", "not hex"},
	{"pci-device", "pci:0000:3b:20.0", "above 0x1f"},
	{"pci-function", "pci:0000:3b:00.8", "above 7"},
	{"mdev-no-dashes", "mdev:83b8f4f2509f382f3c1ee6bfe0fa1001", "not a UUID"},
	{"mdev-not-hex", "mdev:83b8f4f2-509f-382f-3c1e-e6bfe0fa100g", "not a UUID"},
	{"mdev-dash-moved", "mdev:83b8f4f25-09f-382f-3c1e-e6bfe0fa1001", "not a UUID"},
	{"vmm-empty", "vmm:", "want 1-64 characters"},
	{"vmm-slash", "vmm:a/b", "is not one of"},
	{"vmm-long", "vmm:" + strings.Repeat("a", 65), "want 1-64 characters"},
	{"sim-nothing", "sim:", "empty field"},
	{"sim-unknown-key", "sim:size=1GiB,sped=1", `sim spec: unknown key "sped"`},
	{"sim-duplicate", "sim:size=1GiB,size=2GiB", `duplicate key "size"`},
	{"sim-empty-value", "sim:size=", `empty value for "size"`},
	{"sim-empty-field", "sim:size=1GiB,,seed=1", "empty field"},
	{"sim-trailing-comma", "sim:size=1GiB,", "empty field"},
	{"sim-no-equals", "sim:size=1GiB,seed", `"seed" is not key=value`},
	{"sim-no-size", "sim:seed=1", "size is required"},
	{"sim-size-0", "sim:size=0", "not between 1 byte and 1TiB"},
	{"sim-size-big", "sim:size=2TiB", "larger than 1TiB"},
	{"sim-size-junk", "sim:size=big", "invalid size"},
	{"sim-seed-negative", "sim:size=1GiB,seed=-1", "seed=-1"},
	{"sim-seed-overflow", "sim:size=1GiB,seed=18446744073709551616", "seed="},
	{"sim-rate-0", "sim:size=1GiB,rate=0", "rate must be above zero"},
	{"sim-rate-junk", "sim:size=1GiB,rate=fast", "rate="},
	{"sim-wrate-0", "sim:size=1GiB,wrate=0/s", "rate must be above zero"},
	{"sim-zero-big", "sim:size=1GiB,zero=1.5", "between 0 and 1"},
	{"sim-zero-negative", "sim:size=1GiB,zero=-0.1", "between 0 and 1"},
	{"sim-zero-exponent", "sim:size=1GiB,zero=1e-3", "between 0 and 1"},
	{"sim-zero-nan", "sim:size=1GiB,zero=NaN", "between 0 and 1"},
	{"sim-zero-dot", "sim:size=1GiB,zero=.", "between 0 and 1"},
	{"sim-fault-past-end", "sim:size=1GiB,fault=1GiB", "not below the size"},
	{"sim-flags-no-stopcopy", "sim:size=1GiB,flags=p2p", "must include stopcopy"},
	{"sim-flags-duplicate", "sim:size=1GiB,flags=stopcopy|stopcopy", `duplicate flag "stopcopy"`},
	{"sim-flags-unknown", "sim:size=1GiB,flags=stopcopy|turbo", `unknown flag "turbo"`},
	{"sim-flags-empty-name", "sim:size=1GiB,flags=stopcopy|", `unknown flag ""`},
	{"sim-precopy-without-flag", "sim:size=1GiB,precopy=1MiB", "need flags to include precopy"},
	{"sim-dirty-without-flag", "sim:size=1GiB,dirty=1MB/s", "need flags to include precopy"},
	{"sim-reinit-without-flag", "sim:size=1GiB,reinit=0", "need flags to include precopy"},
	{"sim-precopy-above-size", "sim:size=1MiB,flags=stopcopy|precopy,precopy=2MiB", "above the size"},
	{"sim-reinit-past-precopy", "sim:size=1GiB,flags=stopcopy|precopy,precopy=1MiB,reinit=2MiB", "past the precopy"},
	{"sim-reinit-without-precopy", "sim:size=1GiB,flags=stopcopy|precopy,reinit=0", "needs precopy initial data"},
	{"sim-datasize-bad", "sim:size=1GiB,datasize=maybe", "want none or supported"},
	{"sim-precopyinfo-without-flag", "sim:size=1GiB,precopyinfo=v1", "need flags to include precopy"},
	{"sim-precopyinfo-v3", "sim:size=1GiB,flags=stopcopy|precopy,precopyinfo=v3", "want v1 or v2"},
	{"sim-reinit-empty", "sim:size=1GiB,flags=stopcopy|precopy,precopy=1MiB,reinit=", "empty value"},
	{"sim-hang-past-end", "sim:size=1MiB,hang=read@1MiB", "hang offset 1048576 is not below the size"},
	{"sim-hang-unknown", "sim:size=1MiB,hang=close", "want read@OFFSET"},
	{"sim-hang-bad-offset", "sim:size=1MiB,hang=read@soon", "invalid size"},
	{"sim-hang-error", "sim:size=1MiB,hang=state:ERROR", "ERROR cannot be entered"},
	{"sim-hang-unknown-state", "sim:size=1MiB,hang=state:FLYING", `unknown state "FLYING"`},
	{"sim-hang-unsupported", "sim:size=1MiB,hang=state:PRE_COPY", "not one the flags support"},
	{"sim-fail-unsupported", "sim:size=1MiB,flags=stopcopy,fail=state:RUNNING_P2P", "not one the flags support"},
	{"sim-fail-two-states", "sim:size=1MiB,fail=state:STOP|state:RUNNING", "more than one state"},
	{"sim-fail-reset-twice", "sim:size=1MiB,fail=reset|reset", "duplicate reset"},
	{"sim-fail-junk", "sim:size=1MiB,fail=sometimes", "want state:STATE or reset"},
}

func TestParseSpecErrors(t *testing.T) {
	for _, tt := range invalidSpecs {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseSpec(tt.in)
			if err == nil {
				t.Fatalf("ParseSpec(%q) = %+v, want an error", tt.in, got)
			}
			if !errors.Is(err, ErrBadSpec) {
				t.Errorf("ParseSpec(%q) error %v does not wrap ErrBadSpec", tt.in, err)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("ParseSpec(%q) error %q, want it to contain %q", tt.in, err, tt.want)
			}
		})
	}
}

// TestParseSpecMessage pins the wording of one error, as people read it.
func TestParseSpecMessage(t *testing.T) {
	_, err := ParseSpec("sim:size=1GiB,sped=2")
	want := `sim spec: unknown key "sped": bad device spec`
	if err == nil || err.Error() != want {
		t.Errorf("error %q, want %q", err, want)
	}
}

func TestFormatSize(t *testing.T) {
	tests := []struct {
		n    uint64
		want string
	}{
		{0, "0"},
		{1, "1"},
		{1000, "1kB"},
		{1024, "1KiB"},
		{4096, "4KiB"},
		{1 << 30, "1GiB"},
		{1536 << 20, "1536MiB"},
		{2e9, "2GB"},
		{1000001, "1000001"},
		{1 << 40, "1TiB"},
	}
	for _, tt := range tests {
		if got := formatSize(tt.n); got != tt.want {
			t.Errorf("formatSize(%d) = %q, want %q", tt.n, got, tt.want)
		}
	}
}

// FuzzParseSpec checks that ParseSpec never panics, that its errors wrap
// ErrBadSpec, and that every spec it accepts has a canonical form that
// parses back to the same Spec and prints identically.
func FuzzParseSpec(f *testing.F) {
	for _, tt := range validSpecs {
		f.Add(tt.in)
	}
	for _, tt := range invalidSpecs {
		f.Add(tt.in)
	}
	f.Fuzz(func(t *testing.T, in string) {
		s, err := ParseSpec(in)
		if err != nil {
			if !errors.Is(err, ErrBadSpec) {
				t.Fatalf("ParseSpec(%q) error %v does not wrap ErrBadSpec", in, err)
			}
			return
		}
		canon := s.String()
		again, err := ParseSpec(canon)
		if err != nil {
			t.Fatalf("ParseSpec(%q) ok, but its canonical form %q: %v", in, canon, err)
		}
		if again != s {
			t.Fatalf("ParseSpec(%q) = %+v, canonical %q parses to %+v", in, s, canon, again)
		}
		if again.String() != canon {
			t.Fatalf("canonical %q prints as %q", canon, again.String())
		}
	})
}
