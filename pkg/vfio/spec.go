package vfio

import (
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/vfio-ferry/ferry/pkg/size"
)

// ErrBadSpec is wrapped by every error ParseSpec returns.
var ErrBadSpec = errors.New("bad device spec")

// MaxSpecLen is the longest spec string ParseSpec accepts, in bytes.
const MaxSpecLen = 512

// MaxSimSize is the largest state a simulated device may have: 1 TiB.
const MaxSimSize = 1 << 40

// SpecKind says which kind of device a Spec names.
type SpecKind int

// The kinds of device spec. The zero SpecKind is not a valid kind.
const (
	SpecPCI  SpecKind = iota + 1 // pci:DDDD:BB:DD.F, a VFIO-bound PCI function
	SpecMdev                     // mdev:UUID, a mediated device
	SpecSim                      // sim:size=...,seed=..., the simulated device
	SpecVMM                      // vmm:NAME, a device a VMM lent over the VMM socket
)

// MaxVMMName is the longest name a VMM may lend a device under.
const MaxVMMName = 64

// String returns the spec prefix of the kind without its colon: "pci",
// "mdev" or "sim".
func (k SpecKind) String() string {
	switch k {
	case SpecPCI:
		return "pci"
	case SpecMdev:
		return "mdev"
	case SpecSim:
		return "sim"
	case SpecVMM:
		return "vmm"
	}
	return "SpecKind(" + strconv.Itoa(int(k)) + ")"
}

// Spec is a parsed device spec. Exactly the field that matches Kind is
// set; the others are zero. Specs are comparable: two specs that name the
// same device are ==, and so are their String forms.
type Spec struct {
	Kind SpecKind
	// PCI is the function's address, for SpecPCI.
	PCI PCIAddr
	// MdevUUID is the mediated device's UUID in canonical lowercase
	// 8-4-4-4-12 form, for SpecMdev.
	MdevUUID string
	// Sim is the simulated device's configuration, for SpecSim.
	Sim SimConfig
	// VMM is the name a VMM lent the device under, for SpecVMM.
	VMM string
}

// PCIAddr is a PCI function address: domain:bus:device.function.
type PCIAddr struct {
	Domain   uint16
	Bus      uint8
	Device   uint8 // 0..0x1f
	Function uint8 // 0..7
}

// String returns the address as sysfs names it: "0000:3b:00.2".
func (a PCIAddr) String() string {
	return fmt.Sprintf("%04x:%02x:%02x.%x", a.Domain, a.Bus, a.Device, a.Function)
}

// SimConfig configures a simulated device (see NewSim). The zero value of
// every optional field means "absent".
type SimConfig struct {
	// Size is the length of the device's stop-copy state in bytes,
	// 1..MaxSimSize. Key "size", required.
	Size uint64
	// Seed selects the device's content; two devices have the same state
	// exactly when their seeds and zero fractions are equal. Key "seed",
	// default 0.
	Seed uint64
	// ReadRate caps reads of the saving stream, in bytes per second; 0 is
	// unlimited. Key "rate", for example "2GB/s".
	ReadRate uint64
	// WriteRate caps writes to the resuming stream, in bytes per second; 0
	// is unlimited. Key "wrate".
	WriteRate uint64
	// ZeroFraction is the fraction, 0..1, of the state's 4 KiB pages that
	// are all zero. Key "zero".
	ZeroFraction float64
	// HasFault says a read fault is injected at FaultOffset: reads deliver
	// the bytes before it, then fail with ErrInjectedFault. Key "fault",
	// an offset below Size.
	HasFault    bool
	FaultOffset uint64
	// Flags are the migration flags the device reports; they always
	// include FlagStopCopy. Key "flags", "|"-separated names from
	// stopcopy, p2p and precopy; default "stopcopy|p2p".
	Flags Flags
	// PreCopy is the pre-copy initial data: the first PreCopy bytes of
	// the state (rounded up to whole 4 KiB pages), read in PRE_COPY; at
	// most Size. DirtyRate is the rate in bytes per second at which the
	// device rewrites 4 KiB pages of its state while in PRE_COPY(_P2P).
	// Keys "precopy" and "dirty"; both need flags to include precopy (see
	// the package documentation for the model and its stream).
	PreCopy   uint64
	DirtyRate uint64
	// HasReinit says new initial data appears once the initial data was
	// read up to ReinitOffset (rounded up to a page; at most PreCopy): the
	// whole state is rewritten, the initial data is read again from 0 and
	// PrecopyInfo reports Reinit. At PreCopy itself the reinit comes with
	// the first read after the initial data was read whole, so PrecopyInfo
	// reports that first (a device whose initial data changes after the
	// destination loaded it). Key "reinit", an offset; needs precopy.
	HasReinit    bool
	ReinitOffset uint64
	// PrecopyInfoV1 makes the device answer PrecopyInfo as kernels without
	// VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2 do: Reinit is never reported
	// (a reinit shows only as InitialBytes growing again). Key
	// "precopyinfo", v1 or v2 (the default); needs precopy.
	PrecopyInfoV1 bool
	// NoDataSize makes DataSize fail, as on a kernel or driver without
	// VFIO_DEVICE_FEATURE_MIG_DATA_SIZE. Key "datasize", none or
	// supported (the default).
	NoDataSize bool
	// Hang makes one operation of the device block until the device is
	// closed, as a driver that never answers would: a read or a write that
	// reaches a byte offset of its stream, the arc into a state, or a
	// reset. Key "hang": read@OFFSET, write@OFFSET (offsets below Size),
	// state:STATE or reset.
	Hang SimHang
	// FailArc makes the arc into FailState fail: the device enters ERROR
	// (its stream ends) and SetState fails with ErrInjectedFault.
	// FailReset makes Reset fail with ErrInjectedFault, leaving the state
	// alone. Key "fail": "|"-separated state:STATE and reset.
	FailArc   bool
	FailState State
	FailReset bool
}

// SimHangOp is the operation SimConfig.Hang blocks.
type SimHangOp uint8

// The operations a simulated device can hang in. The zero SimHangOp is
// no hang.
const (
	HangNone  SimHangOp = iota
	HangRead            // a read of the saving stream at Offset
	HangWrite           // a write of the resuming stream at Offset
	HangState           // the arc into State
	HangReset           // a reset
)

// SimHang is an operation that blocks until the device is closed (see
// SimConfig.Hang). A read or write at Offset first delivers (or accepts)
// the bytes before it; the call that starts at Offset blocks.
type SimHang struct {
	Op     SimHangOp
	Offset uint64 // HangRead, HangWrite
	State  State  // HangState
}

// defaultSimFlags are the flags of a simulated device without "flags=".
const defaultSimFlags = FlagStopCopy | FlagP2P

// simFlagNames are the names "flags=" accepts, lowest bit first.
var simFlagNames = [...]struct {
	flag Flags
	name string
}{
	{FlagStopCopy, "stopcopy"},
	{FlagP2P, "p2p"},
	{FlagPreCopy, "precopy"},
}

// ParseSpec parses a device spec:
//
//	pci:DDDD:BB:DD.F     a PCI function (hex; domain 4 digits, bus 2,
//	                     device 2 below 0x20, function 1 below 8)
//	mdev:UUID            a mediated device (8-4-4-4-12 hex)
//	sim:size=SIZE,seed=N[,rate=RATE][,wrate=RATE][,zero=FRACTION]
//	    [,fault=OFFSET][,flags=stopcopy|p2p|precopy][,precopy=SIZE][,dirty=RATE]
//	    [,reinit=OFFSET][,precopyinfo=v1|v2]
//	    [,hang=read@OFFSET|write@OFFSET|state:STATE|reset][,fail=state:STATE|reset]
//	                     the simulated device (see SimConfig)
//
// Hex digits may be in either case; prefixes and keys are lowercase. Sim
// keys may come in any order. Sizes and rates are read by package size
// ("1GiB", "2GB/s"). Unknown or repeated keys, empty values, whitespace
// and specs longer than MaxSpecLen are errors, which wrap ErrBadSpec.
func ParseSpec(s string) (Spec, error) {
	if len(s) > MaxSpecLen {
		return Spec{}, fmt.Errorf("spec is %d bytes, longer than %d: %w", len(s), MaxSpecLen, ErrBadSpec)
	}
	for i := range len(s) {
		if c := s[i]; c <= ' ' || c >= 0x7f {
			return Spec{}, fmt.Errorf("spec %q: whitespace or non-printable byte at %d: %w", s, i, ErrBadSpec)
		}
	}
	spec, err := parseKind(s)
	if err != nil {
		return Spec{}, err
	}
	// Canonical sizes can be a few bytes longer than their input ("1.5G"
	// is "1536MiB"): refuse what would not read back.
	if c := spec.String(); len(c) > MaxSpecLen {
		return Spec{}, fmt.Errorf("spec %q: canonical form is %d bytes, longer than %d: %w",
			s, len(c), MaxSpecLen, ErrBadSpec)
	}
	return spec, nil
}

// parseKind dispatches on the spec's prefix.
func parseKind(s string) (Spec, error) {
	kind, rest, _ := strings.Cut(s, ":")
	switch kind {
	case "pci":
		return parsePCI(rest)
	case "mdev":
		return parseMdev(rest)
	case "sim":
		return parseSim(rest)
	case "vmm":
		return parseVMM(rest)
	}
	return Spec{}, fmt.Errorf("spec %q: unknown kind (want pci:, mdev:, vmm: or sim:): %w", s, ErrBadSpec)
}

// String returns the canonical form of the spec, which ParseSpec reads
// back to the same Spec: lowercase hex, sim keys in the order of
// ParseSpec's grammar, sizes and rates printed exactly with the shortest
// suffix, defaults left out (but size and seed always shown). The zero
// Spec prints as "".
func (s Spec) String() string {
	switch s.Kind {
	case SpecPCI:
		return "pci:" + s.PCI.String()
	case SpecMdev:
		return "mdev:" + s.MdevUUID
	case SpecSim:
		return "sim:" + s.Sim.String()
	case SpecVMM:
		return "vmm:" + s.VMM
	}
	return ""
}

// specErr formats a parse error of a spec of the given kind.
func specErr(kind SpecKind, format string, args ...any) error {
	return fmt.Errorf("%v spec: %s: %w", kind, fmt.Sprintf(format, args...), ErrBadSpec)
}

// parsePCI parses the part of a pci: spec after the prefix.
func parsePCI(s string) (Spec, error) {
	// DDDD:BB:DD.F
	if len(s) != 12 || s[4] != ':' || s[7] != ':' || s[10] != '.' {
		return Spec{}, specErr(SpecPCI, "%q is not DDDD:BB:DD.F", s)
	}
	dom, e1 := parseHex(s[0:4])
	bus, e2 := parseHex(s[5:7])
	dev, e3 := parseHex(s[8:10])
	fn, e4 := parseHex(s[11:12])
	if err := errors.Join(e1, e2, e3, e4); err != nil {
		return Spec{}, specErr(SpecPCI, "%q: %v", s, err)
	}
	if dev >= 0x20 {
		return Spec{}, specErr(SpecPCI, "%q: device %#x is above 0x1f", s, dev)
	}
	if fn >= 8 {
		return Spec{}, specErr(SpecPCI, "%q: function %d is above 7", s, fn)
	}
	addr := PCIAddr{Domain: uint16(dom), Bus: uint8(bus), Device: uint8(dev), Function: uint8(fn)}
	return Spec{Kind: SpecPCI, PCI: addr}, nil
}

// parseHex reads a string made only of hex digits.
func parseHex(s string) (uint64, error) {
	for i := range len(s) {
		if !isHex(s[i]) {
			return 0, fmt.Errorf("%q is not hex", s)
		}
	}
	return strconv.ParseUint(s, 16, 64)
}

func isHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

// parseMdev parses the part of an mdev: spec after the prefix.
func parseMdev(s string) (Spec, error) {
	if len(s) != 36 {
		return Spec{}, specErr(SpecMdev, "%q is not a UUID (8-4-4-4-12 hex digits)", s)
	}
	for i := range len(s) {
		dash := i == 8 || i == 13 || i == 18 || i == 23
		if dash && s[i] != '-' || !dash && !isHex(s[i]) {
			return Spec{}, specErr(SpecMdev, "%q is not a UUID (8-4-4-4-12 hex digits)", s)
		}
	}
	return Spec{Kind: SpecMdev, MdevUUID: strings.ToLower(s)}, nil
}

// parseVMM parses the part of a vmm: spec after the prefix: the name a
// VMM chose, 1-MaxVMMName characters of [A-Za-z0-9._-], compared exactly.
func parseVMM(s string) (Spec, error) {
	if err := ValidateVMMName(s); err != nil {
		return Spec{}, err
	}
	return Spec{Kind: SpecVMM, VMM: s}, nil
}

// ValidateVMMName checks a name a VMM lends a device under (see parseVMM).
// Errors wrap ErrBadSpec.
func ValidateVMMName(s string) error {
	if s == "" || len(s) > MaxVMMName {
		return specErr(SpecVMM, "name %q: want 1-%d characters", s, MaxVMMName)
	}
	for i := range len(s) {
		c := s[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '.' || c == '_' || c == '-') {
			return specErr(SpecVMM, "name %q: byte %d is not one of [A-Za-z0-9._-]", s, i)
		}
	}
	return nil
}

// simKeys are the keys of a sim spec in canonical order, each with the
// function that stores its value.
var simKeys = [...]struct {
	key   string
	parse func(c *SimConfig, v string) error
}{
	{"size", func(c *SimConfig, v string) (err error) { c.Size, err = parseSize(v); return }},
	{"seed", func(c *SimConfig, v string) (err error) { c.Seed, err = strconv.ParseUint(v, 10, 64); return }},
	{"rate", func(c *SimConfig, v string) (err error) { c.ReadRate, err = parseRate(v); return }},
	{"wrate", func(c *SimConfig, v string) (err error) { c.WriteRate, err = parseRate(v); return }},
	{"zero", func(c *SimConfig, v string) (err error) { c.ZeroFraction, err = parseFraction(v); return }},
	{"fault", func(c *SimConfig, v string) (err error) {
		c.HasFault = true
		c.FaultOffset, err = size.Parse(v)
		return
	}},
	{"flags", func(c *SimConfig, v string) (err error) { c.Flags, err = parseSimFlags(v); return }},
	{"precopy", func(c *SimConfig, v string) (err error) { c.PreCopy, err = parseSize(v); return }},
	{"dirty", func(c *SimConfig, v string) (err error) { c.DirtyRate, err = parseRate(v); return }},
	{"reinit", func(c *SimConfig, v string) (err error) {
		c.HasReinit = true
		c.ReinitOffset, err = size.Parse(v)
		return
	}},
	{"precopyinfo", func(c *SimConfig, v string) error {
		switch v {
		case "v1":
			c.PrecopyInfoV1 = true
		case "v2":
			c.PrecopyInfoV1 = false
		default:
			return errors.New("want v1 or v2")
		}
		return nil
	}},
	{"datasize", func(c *SimConfig, v string) error {
		switch v {
		case "none":
			c.NoDataSize = true
		case "supported":
			c.NoDataSize = false
		default:
			return errors.New("want none or supported")
		}
		return nil
	}},
	{"hang", func(c *SimConfig, v string) (err error) { c.Hang, err = parseHang(v); return }},
	{"fail", parseFail},
}

// parseSim parses the part of a sim: spec after the prefix.
func parseSim(s string) (Spec, error) {
	c := SimConfig{Flags: defaultSimFlags}
	var seen [len(simKeys)]bool
	for field := range strings.SplitSeq(s, ",") {
		key, val, ok := strings.Cut(field, "=")
		switch {
		case field == "":
			return Spec{}, specErr(SpecSim, "empty field in %q", s)
		case !ok:
			return Spec{}, specErr(SpecSim, "%q is not key=value", field)
		case val == "":
			return Spec{}, specErr(SpecSim, "empty value for %q", key)
		}
		i := simKeyIndex(key)
		if i < 0 {
			return Spec{}, specErr(SpecSim, "unknown key %q", key)
		}
		if seen[i] {
			return Spec{}, specErr(SpecSim, "duplicate key %q", key)
		}
		seen[i] = true
		if err := simKeys[i].parse(&c, val); err != nil {
			return Spec{}, specErr(SpecSim, "%s=%s: %v", key, val, err)
		}
	}
	if !seen[0] {
		return Spec{}, specErr(SpecSim, "size is required")
	}
	if err := c.validate(); err != nil {
		return Spec{}, specErr(SpecSim, "%v", err)
	}
	return Spec{Kind: SpecSim, Sim: c}, nil
}

// simKeyIndex returns the index of key in simKeys, or -1.
func simKeyIndex(key string) int {
	for i, k := range simKeys {
		if k.key == key {
			return i
		}
	}
	return -1
}

// validate checks the rules that tie the fields together.
func (c SimConfig) validate() error {
	switch {
	case c.Size == 0 || c.Size > MaxSimSize:
		return fmt.Errorf("size %d is not between 1 byte and 1TiB", c.Size)
	case !(c.ZeroFraction >= 0 && c.ZeroFraction <= 1):
		return fmt.Errorf("zero fraction %v is not between 0 and 1", c.ZeroFraction)
	case c.Flags&FlagStopCopy == 0 || c.Flags&^(FlagStopCopy|FlagP2P|FlagPreCopy) != 0:
		return fmt.Errorf("flags %v: want stopcopy with optional p2p and precopy", c.Flags)
	case c.HasFault && c.FaultOffset >= c.Size:
		return fmt.Errorf("fault offset %d is not below the size %d", c.FaultOffset, c.Size)
	case c.Flags&FlagPreCopy == 0 && (c.PreCopy != 0 || c.DirtyRate != 0 || c.HasReinit || c.PrecopyInfoV1):
		return errors.New("precopy, dirty, reinit and precopyinfo need flags to include precopy")
	case c.PreCopy > c.Size:
		return fmt.Errorf("precopy %d is above the size %d", c.PreCopy, c.Size)
	case c.HasReinit && c.PreCopy == 0:
		return errors.New("reinit needs precopy initial data")
	case c.HasReinit && c.ReinitOffset > c.PreCopy:
		return fmt.Errorf("reinit offset %d is past the precopy size %d", c.ReinitOffset, c.PreCopy)
	case !c.HasReinit && c.ReinitOffset != 0:
		return errors.New("reinit offset set without reinit")
	case c.Hang.Op > HangReset:
		return fmt.Errorf("hang op %d is not known", c.Hang.Op)
	case (c.Hang.Op == HangRead || c.Hang.Op == HangWrite) && c.Hang.Offset >= c.Size:
		return fmt.Errorf("hang offset %d is not below the size %d", c.Hang.Offset, c.Size)
	case c.Hang.Op != HangRead && c.Hang.Op != HangWrite && c.Hang.Offset != 0,
		c.Hang.Op != HangState && c.Hang.State != 0:
		return errors.New("hang has fields its op does not use")
	case c.Hang.Op == HangState && !c.Flags.Supports(c.Hang.State):
		return fmt.Errorf("hang state %v is not one the flags support", c.Hang.State)
	case c.FailArc && !c.Flags.Supports(c.FailState):
		return fmt.Errorf("fail state %v is not one the flags support", c.FailState)
	case !c.FailArc && c.FailState != 0:
		return errors.New("fail state set without the arc failure")
	}
	return nil
}

// parseHang reads "read@OFFSET", "write@OFFSET", "state:STATE" or
// "reset".
func parseHang(v string) (SimHang, error) {
	if v == "reset" {
		return SimHang{Op: HangReset}, nil
	}
	if op, off, ok := strings.Cut(v, "@"); ok && (op == "read" || op == "write") {
		n, err := size.Parse(off)
		if err != nil {
			return SimHang{}, err
		}
		h := SimHang{Op: HangRead, Offset: n}
		if op == "write" {
			h.Op = HangWrite
		}
		return h, nil
	}
	if name, ok := strings.CutPrefix(v, "state:"); ok {
		st, err := parseStateName(name)
		return SimHang{Op: HangState, State: st}, err
	}
	return SimHang{}, errors.New("want read@OFFSET, write@OFFSET, state:STATE or reset")
}

// parseFail reads "|"-separated "state:STATE" and "reset", each at most
// once.
func parseFail(c *SimConfig, v string) error {
	for part := range strings.SplitSeq(v, "|") {
		if part == "reset" {
			if c.FailReset {
				return errors.New("duplicate reset")
			}
			c.FailReset = true
			continue
		}
		name, ok := strings.CutPrefix(part, "state:")
		if !ok {
			return fmt.Errorf("%q: want state:STATE or reset", part)
		}
		if c.FailArc {
			return errors.New("more than one state")
		}
		st, err := parseStateName(name)
		if err != nil {
			return err
		}
		c.FailArc, c.FailState = true, st
	}
	return nil
}

// parseStateName reads a state by its kernel name ("STOP_COPY", in
// either case). ERROR is refused: no arc leads into it on request.
func parseStateName(name string) (State, error) {
	for s, n := range stateNames {
		if strings.EqualFold(name, n) {
			if State(s) == StateError {
				return 0, errors.New("ERROR cannot be entered on request")
			}
			return State(s), nil
		}
	}
	return 0, fmt.Errorf("unknown state %q", name)
}

// parseSize reads a size of at most MaxSimSize.
func parseSize(v string) (uint64, error) {
	n, err := size.Parse(v)
	if err != nil {
		return 0, err
	}
	if n > MaxSimSize {
		return 0, errors.New("larger than 1TiB")
	}
	return n, nil
}

// parseRate reads a rate that is not zero (leave the key out for
// "unlimited").
func parseRate(v string) (uint64, error) {
	n, err := size.ParseRate(v)
	if err != nil {
		return 0, err
	}
	if n == 0 {
		return 0, errors.New("rate must be above zero")
	}
	return n, nil
}

// parseFraction reads a plain decimal fraction between 0 and 1.
func parseFraction(v string) (float64, error) {
	for i := range len(v) {
		if c := v[i]; (c < '0' || c > '9') && c != '.' {
			return 0, errors.New("not a decimal fraction between 0 and 1")
		}
	}
	f, err := strconv.ParseFloat(v, 64)
	if err != nil || f < 0 || f > 1 {
		return 0, errors.New("not a decimal fraction between 0 and 1")
	}
	return f, nil
}

// parseSimFlags reads "stopcopy|p2p|precopy" in any order; stopcopy is
// required.
func parseSimFlags(v string) (Flags, error) {
	var f Flags
	for name := range strings.SplitSeq(v, "|") {
		flag := simFlag(name)
		switch {
		case flag == 0:
			return 0, fmt.Errorf("unknown flag %q (want stopcopy, p2p or precopy)", name)
		case f&flag != 0:
			return 0, fmt.Errorf("duplicate flag %q", name)
		}
		f |= flag
	}
	if f&FlagStopCopy == 0 {
		return 0, errors.New("flags must include stopcopy")
	}
	return f, nil
}

// simFlag returns the flag named name, or 0.
func simFlag(name string) Flags {
	for _, fn := range simFlagNames {
		if fn.name == name {
			return fn.flag
		}
	}
	return 0
}

// String returns the canonical sim spec without its "sim:" prefix.
func (c SimConfig) String() string {
	var b strings.Builder
	b.WriteString("size=" + formatSize(c.Size))
	b.WriteString(",seed=" + strconv.FormatUint(c.Seed, 10))
	if c.ReadRate != 0 {
		b.WriteString(",rate=" + formatSize(c.ReadRate) + "/s")
	}
	if c.WriteRate != 0 {
		b.WriteString(",wrate=" + formatSize(c.WriteRate) + "/s")
	}
	if c.ZeroFraction != 0 {
		b.WriteString(",zero=" + strconv.FormatFloat(c.ZeroFraction, 'f', -1, 64))
	}
	if c.HasFault {
		b.WriteString(",fault=" + formatSize(c.FaultOffset))
	}
	if c.Flags != defaultSimFlags {
		b.WriteString(",flags=" + formatSimFlags(c.Flags))
	}
	if c.PreCopy != 0 {
		b.WriteString(",precopy=" + formatSize(c.PreCopy))
	}
	if c.DirtyRate != 0 {
		b.WriteString(",dirty=" + formatSize(c.DirtyRate) + "/s")
	}
	if c.HasReinit {
		b.WriteString(",reinit=" + formatSize(c.ReinitOffset))
	}
	if c.PrecopyInfoV1 {
		b.WriteString(",precopyinfo=v1")
	}
	if c.NoDataSize {
		b.WriteString(",datasize=none")
	}
	switch c.Hang.Op {
	case HangRead:
		b.WriteString(",hang=read@" + formatSize(c.Hang.Offset))
	case HangWrite:
		b.WriteString(",hang=write@" + formatSize(c.Hang.Offset))
	case HangState:
		b.WriteString(",hang=state:" + c.Hang.State.String())
	case HangReset:
		b.WriteString(",hang=reset")
	}
	switch {
	case c.FailArc && c.FailReset:
		b.WriteString(",fail=state:" + c.FailState.String() + "|reset")
	case c.FailArc:
		b.WriteString(",fail=state:" + c.FailState.String())
	case c.FailReset:
		b.WriteString(",fail=reset")
	}
	return b.String()
}

// formatSimFlags prints flags the way "flags=" reads them.
func formatSimFlags(f Flags) string {
	var names []string
	for _, fn := range simFlagNames {
		if f&fn.flag != 0 {
			names = append(names, fn.name)
		}
	}
	return strings.Join(names, "|")
}

// sizeUnits are the suffixes formatSize may use, in order of preference
// when two spellings are equally short.
var sizeUnits = [...]struct {
	name string
	mult uint64
}{
	{"TiB", 1 << 40}, {"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10},
	{"TB", 1e12}, {"GB", 1e9}, {"MB", 1e6}, {"kB", 1e3},
}

// formatSize prints n exactly, in the shortest of its spellings as a whole
// number of one unit: 1073741824 is "1GiB", 2000000000 is "2GB", 1000001
// is "1000001". Unlike size.Format it never rounds, so size.Parse reads
// the result back to n.
func formatSize(n uint64) string {
	best := strconv.FormatUint(n, 10)
	if n == 0 {
		return best
	}
	plain := true
	for _, u := range sizeUnits {
		if n%u.mult != 0 {
			continue
		}
		s := strconv.FormatUint(n/u.mult, 10) + u.name
		if len(s) < len(best) || len(s) == len(best) && plain {
			best, plain = s, false
		}
	}
	return best
}
