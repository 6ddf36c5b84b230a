package vfio

import (
	"errors"
	"fmt"
	"io/fs"
	"slices"
	"strings"
	"sync"
	"time"
)

// Errors of the Registry. Compare with errors.Is.
var (
	// ErrNotAllowed: the registry does not open this device (a sim: spec
	// without RegistryOptions.AllowSim, a host device no pattern of
	// RegistryOptions.Devices matches).
	ErrNotAllowed = errors.New("not allowed")
	// ErrBusy: another owner holds the device.
	ErrBusy = errors.New("device busy")
)

// Open opens the device a spec names: a SimDevice for sim: specs, the
// kernel's device (through its VFIO cdev or group) for pci: and mdev:
// specs. Agents should go through a Registry, which also enforces
// RegistryOptions.AllowSim and exclusive ownership.
func Open(s Spec) (Device, error) {
	switch s.Kind {
	case SpecSim:
		d, err := NewSim(s)
		if err != nil {
			return nil, err
		}
		return d, nil
	case SpecPCI, SpecMdev:
		return openKernel(s)
	case SpecVMM:
		return nil, fmt.Errorf("open %s: a vmm: device is lent by its VMM (Registry.Lend), never opened: %w", s, ErrNotAllowed)
	}
	return nil, fmt.Errorf("open %v: unknown spec kind: %w", s.Kind, ErrBadSpec)
}

// RegistryOptions configure a Registry.
type RegistryOptions struct {
	// AllowSim lets the registry open sim: specs. Agents set it only when
	// run with --allow-sim, so a production host never serves simulated
	// state by mistake.
	AllowSim bool
	// Devices are the host devices the registry opens: glob patterns
	// over canonical pci: and mdev: specs ("pci:0000:3b:*", "mdev:*", or
	// "*" for all; see ValidateDevicePattern). None: no host device.
	Devices []string
	// OpTimeout is the device timeout: how long any operation of a
	// device may take before the device is reported stuck (see
	// GuardedDevice). 0 means DefaultOpTimeout, 10s: far above what a
	// state change takes (milliseconds) and below what a control plane
	// waits for an answer.
	OpTimeout time.Duration
	// Open opens a device the registry admitted; nil means Open. Tests
	// inject their own to count opens or to hand out fake devices.
	Open func(Spec) (Device, error)
	// ListHost lists the host's VFIO devices for ListAll; nil means
	// ListKernelDevices, which reads sysfs and opens nothing.
	ListHost func() ([]Spec, error)
	// Evict is called when the VMM that lent a device withdraws it while
	// owner holds it: the agent cancels owner's migration, which rolls
	// the device back and releases it (Withdraw waits for that). It must
	// not block. nil: Withdraw only waits.
	Evict func(owner, spec string, why error)
}

// OwnerStuck is the owner a Registry shows for a device released while
// it was stuck: it keeps the device, gives it to nobody, and closes it
// once the stuck operation answers.
const OwnerStuck = "(stuck)"

// ownerRecover is the owner of a device while Recover works on it.
const ownerRecover = "(recovering)"

// DeviceInfo describes one device of a Registry, as List and ListAll read
// it. Nothing in it is read from the device as it is listed: a device
// that does not answer never holds up a listing.
type DeviceInfo struct {
	Spec string // canonical spec
	// Opened: the registry has the device open. A host device listed by
	// ListAll from sysfs alone is not opened: its Flags, State and
	// DataSize are unknown (0).
	Opened   bool
	Flags    Flags
	State    State  // the state last read or set through the registry's device
	Owner    string // "" when free; OwnerStuck after a release while stuck
	DataSize uint64 // estimated stop-copy size; 0 when unknown
	// Stuck: an operation of the device has not answered within the
	// device timeout; Error names it.
	Stuck bool
	// Error says why the device is not usable, or how its last failed
	// operation failed; "" when nothing is wrong.
	Error string
}

// Registry opens devices by spec and keeps them open across migrations,
// so the state a migration leaves in a device can be observed after it
// (a destination's verified state, a source's return to RUNNING). A device
// has at most one owner at a time. Every device it hands out is a
// GuardedDevice with the registry's device timeout. A Registry is safe for
// concurrent use, and none of its methods waits on a stuck device.
type Registry struct {
	opts     RegistryOptions
	open     func(Spec) (Device, error)
	listHost func() ([]Spec, error)

	mu      sync.Mutex             // guards the fields below; never held across a device operation
	devices map[string]*registered // by canonical spec; added on first Acquire
	closed  bool
}

// registered is one device of a Registry.
type registered struct {
	name string
	// dev is nil while the first acquirer opens the device, outside the
	// registry's lock; that acquirer already owns the entry.
	dev   *GuardedDevice
	owner string // "" when free
	lease uint64 // counts acquisitions, so a stale release does nothing
	// retired is the owner that released the device while it was stuck:
	// the registry holds it for nobody and closes it, dropping the
	// entry, once the stuck operation answers.
	retired string
	// lent is set for a device a VMM lent (vmm: specs); nil for a
	// device the registry opened.
	lent *lending
}

// NewRegistry returns an empty registry.
func NewRegistry(opts RegistryOptions) *Registry {
	r := &Registry{opts: opts, open: opts.Open, listHost: opts.ListHost, devices: make(map[string]*registered)}
	if r.open == nil {
		r.open = Open
	}
	if r.listHost == nil {
		r.listHost = ListKernelDevices
	}
	return r
}

// Acquire gives owner exclusive use of the device spec names, opening it
// on first use (outside the registry's lock: a slow open holds up nobody
// else). Specs are compared in canonical form, so "sim:seed=7,size=1GiB"
// and "sim:size=1GiB,seed=7" are the same device. The device stays open
// when released; the returned release func gives it up and may be called
// any number of times. A device released while stuck is held by
// OwnerStuck until its operation answers; then, if its owner's settle
// (GuardedDevice.WhenAnswered) returned it to RUNNING, it is free again,
// and otherwise it is closed and the next Acquire opens it afresh. Errors wrap ErrBadSpec, ErrNotAllowed (sim: without
// AllowSim, a host device outside RegistryOptions.Devices), ErrBusy (held
// by another owner, who is named, or being opened by one; with ErrStuck
// for a stuck device) or the device's open error.
func (r *Registry) Acquire(spec string, owner string) (Device, func(), error) {
	s, err := ParseSpec(spec)
	if err != nil {
		return nil, nil, err
	}
	name := s.String()
	if owner == "" {
		return nil, nil, fmt.Errorf("acquire %s: empty owner", name)
	}
	if err := r.Allowed(s); err != nil {
		return nil, nil, fmt.Errorf("acquire %w", err)
	}
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return nil, nil, fmt.Errorf("acquire %s: registry: %w", name, fs.ErrClosed)
	}
	e := r.devices[name]
	switch {
	case e == nil && s.Kind == SpecVMM:
		r.mu.Unlock()
		return nil, nil, fmt.Errorf("acquire %s: %w", name, ErrNotLent)
	case e != nil && e.lent != nil && e.lent.withdrawing:
		r.mu.Unlock()
		return nil, nil, fmt.Errorf("acquire %s: being withdrawn by its VMM: %w", name, ErrBusy)
	case e == nil:
		e = &registered{name: name, owner: owner, lease: 1}
		r.devices[name] = e
		r.mu.Unlock()
		return r.openEntry(s, e)
	case e.retired != "":
		op, _, _ := e.dev.StuckInfo()
		r.mu.Unlock()
		return nil, nil, fmt.Errorf("acquire %s: released by %q while stuck in %s: %w: %w", name, e.retired, op, ErrBusy, ErrStuck)
	case e.dev == nil:
		who := e.owner
		r.mu.Unlock()
		return nil, nil, fmt.Errorf("acquire %s: being opened for %q: %w", name, who, ErrBusy)
	case e.owner != "":
		who := e.owner
		r.mu.Unlock()
		return nil, nil, fmt.Errorf("acquire %s: held by %q: %w", name, who, ErrBusy)
	}
	if op, _, stuck := e.dev.StuckInfo(); stuck {
		r.mu.Unlock()
		return nil, nil, fmt.Errorf("acquire %s: %s has not answered: %w", name, op, ErrStuck)
	}
	e.owner = owner
	e.lease++
	lease := e.lease
	if e.lent != nil {
		e.lent.freed = make(chan struct{})
	}
	r.mu.Unlock()
	r.notify(e)
	return e.dev, func() { r.release(e, lease) }, nil
}

// openEntry opens the device of the new entry e, which its acquirer
// already owns, and reads its state and size once so that listings have
// them.
func (r *Registry) openEntry(s Spec, e *registered) (Device, func(), error) {
	dev, err := r.open(s)
	if err != nil {
		r.drop(e)
		return nil, nil, err
	}
	g := newGuard(dev, r.opts.OpTimeout, func() { r.unstuck(e) }, nil)
	g.State()
	g.DataSize()
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		g.Close()
		return nil, nil, fmt.Errorf("acquire %s: registry: %w", e.name, fs.ErrClosed)
	}
	e.dev = g
	lease := e.lease
	r.mu.Unlock()
	return g, func() { r.release(e, lease) }, nil
}

// drop removes e if it is still the entry of its spec.
func (r *Registry) drop(e *registered) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.devices[e.name] == e {
		delete(r.devices, e.name)
	}
}

// release frees e if lease is still the current acquisition; a stuck
// device is retired instead.
func (r *Registry) release(e *registered, lease uint64) {
	r.mu.Lock()
	if e.lease != lease || e.owner == "" {
		r.mu.Unlock()
		return
	}
	if _, _, stuck := e.dev.StuckInfo(); stuck && e.lent == nil {
		e.retired = e.owner
	}
	e.owner = ""
	var orphaned bool // a Withdraw gave up waiting: drop the device now
	if l := e.lent; l != nil {
		l.frozen = false
		if l.freed != nil {
			close(l.freed)
			l.freed = nil
		} else {
			orphaned = l.withdrawing
		}
	}
	r.mu.Unlock()
	if orphaned {
		r.dropLent(e)
		return
	}
	r.notify(e)
}

// unstuck is called by e's device when its stuck mark clears (after the
// settle its owner left with the guard, see GuardedDevice.WhenAnswered).
// A retired device its settle returned to RUNNING is free again, kept
// open as any released device is, so a VM's state in it stays; any other
// retired device is closed and forgotten.
func (r *Registry) unstuck(e *registered) {
	r.mu.Lock()
	retired := e.retired != "" && r.devices[e.name] == e
	r.mu.Unlock()
	if !retired {
		return
	}
	st, err := e.dev.State()
	r.mu.Lock()
	if e.retired == "" || r.devices[e.name] != e {
		r.mu.Unlock()
		return
	}
	if err == nil && st == StateRunning {
		e.retired = ""
		r.mu.Unlock()
		r.notify(e)
		return
	}
	delete(r.devices, e.name)
	r.mu.Unlock()
	e.dev.Close()
}

// List describes every device the registry has open, sorted by spec,
// from what the registry remembers: it asks no device anything.
func (r *Registry) List() []DeviceInfo {
	type entry struct {
		name    string
		dev     *GuardedDevice
		owner   string
		retired string
	}
	r.mu.Lock()
	entries := make([]entry, 0, len(r.devices))
	for _, e := range r.devices {
		if e.dev != nil {
			entries = append(entries, entry{e.name, e.dev, e.owner, e.retired})
		}
	}
	r.mu.Unlock()

	infos := make([]DeviceInfo, 0, len(entries))
	for _, e := range entries {
		in := e.dev.info()
		info := DeviceInfo{Spec: e.name, Opened: true, Flags: e.dev.Flags(), State: in.state,
			Owner: e.owner, Stuck: in.stuck, Error: in.err}
		if in.sizeOK {
			info.DataSize = in.size
		}
		if e.retired != "" {
			info.Owner = OwnerStuck
			info.Error = fmt.Sprintf("released by %q while stuck, closed once it answers: %s", e.retired, info.Error)
		}
		infos = append(infos, info)
	}
	slices.SortFunc(infos, func(a, b DeviceInfo) int { return strings.Compare(a.Spec, b.Spec) })
	return infos
}

// ListAll is List followed by the host's VFIO devices the registry has
// not opened and its allowlist admits, described from sysfs alone
// (Opened false): listing never opens a device, which would reset a
// vfio-pci function and race a VMM's open. Sorted by spec.
func (r *Registry) ListAll() []DeviceInfo {
	infos := r.List()
	host, err := r.listHost()
	if err != nil {
		return infos
	}
	known := make(map[string]bool, len(infos))
	for _, d := range infos {
		known[d.Spec] = true
	}
	for _, s := range host {
		if name := s.String(); !known[name] && r.Allowed(s) == nil {
			known[name] = true
			infos = append(infos, DeviceInfo{Spec: name})
		}
	}
	slices.SortFunc(infos, func(a, b DeviceInfo) int { return strings.Compare(a.Spec, b.Spec) })
	return infos
}

// Recover gives an idle device back for a new user of the host: a device
// no owner holds that rests in a state other than RUNNING (STOP after a
// migration, ERROR after a failure) returns to RUNNING, by the arcs to it
// or, when reset is set, when the device is in ERROR or when the arcs
// fail, by a reset. A device in RUNNING is left alone unless reset is
// set. It opens the device when the registry has not yet. Errors wrap
// ErrBusy (another owner holds it: the caller answers DEVICE_BUSY; with
// ErrStuck for a stuck device), ErrStuck (the device did not answer), the
// errors of Acquire, or the device's own; the DeviceInfo describes the
// device afterwards in every case where it is known.
func (r *Registry) Recover(spec string, reset bool) (DeviceInfo, error) {
	dev, release, err := r.Acquire(spec, ownerRecover)
	if err != nil {
		return r.describe(spec), err
	}
	err = recoverDevice(dev, reset)
	release()
	return r.describe(spec), err
}

// Recover returns dev, a device no registry lends out, to RUNNING: by
// the arcs to it, or by a reset when reset is set, when the device is in
// ERROR, or when the arcs fail (see Registry.Recover). A VMM uses it on
// its own descriptor when the agent it lent the device to died
// mid-migration.
func Recover(dev Device, reset bool) error { return recoverDevice(dev, reset) }

// recoverDevice returns dev to RUNNING (see Recover).
func recoverDevice(dev Device, reset bool) error {
	st, err := dev.State()
	switch {
	case errors.Is(err, ErrStuck):
		return fmt.Errorf("recover %s: %w", dev.Spec(), err)
	case err != nil || reset || st == StateError:
		if rerr := dev.Reset(); rerr != nil {
			return fmt.Errorf("recover %s: %w", dev.Spec(), rerr)
		}
		return nil
	case st == StateRunning:
		return nil
	}
	_, err = dev.SetState(StateRunning)
	if err == nil || errors.Is(err, ErrStuck) {
		return err
	}
	if rerr := dev.Reset(); rerr != nil {
		return fmt.Errorf("recover %s: %w; then reset: %w", dev.Spec(), err, rerr)
	}
	return nil
}

// describe returns the List entry of spec, or just its spec when the
// registry does not have it open.
func (r *Registry) describe(spec string) DeviceInfo {
	s, err := ParseSpec(spec)
	if err != nil {
		return DeviceInfo{Spec: spec}
	}
	name := s.String()
	r.mu.Lock()
	e := r.devices[name]
	r.mu.Unlock()
	if e == nil || e.dev == nil {
		return DeviceInfo{Spec: name}
	}
	for _, d := range r.List() {
		if d.Spec == name {
			return d
		}
	}
	return DeviceInfo{Spec: name}
}

// Close closes every device and makes later Acquires fail. Devices still
// held are closed too: their owners see errors from them. It waits for no
// device: a stuck device is closed as far as its backend allows without
// waiting, and reported in the error (wrapping ErrStuck). Idempotent.
func (r *Registry) Close() error {
	r.mu.Lock()
	var devs []*GuardedDevice
	for _, e := range r.devices {
		if e.dev != nil {
			devs = append(devs, e.dev)
		}
	}
	clear(r.devices)
	r.closed = true
	r.mu.Unlock()
	var errs []error
	for _, d := range devs {
		if err := d.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close %s: %w", d.Spec(), err))
		}
	}
	return errors.Join(errs...)
}

// LetGo closes an idle device the registry opened, and forgets it, so
// that another process can open it: a new VM's VMM, which the open
// descriptors of the registry would refuse (a VFIO group is open in one
// process at a time). The kernel ends the device's state on the last
// close (vfio-pci resets the function): a loaded destination device
// loses what it holds, so hand such a device to its VMM through the VMM
// socket instead. A device the registry has not opened is let go
// already. Errors wrap ErrBusy (an owner holds it, or it is stuck), or
// ErrNotAllowed for a lent device, which its VMM withdraws.
func (r *Registry) LetGo(spec string) error {
	s, err := ParseSpec(spec)
	if err != nil {
		return err
	}
	name := s.String()
	r.mu.Lock()
	e := r.devices[name]
	switch {
	case e == nil:
		r.mu.Unlock()
		return nil
	case e.lent != nil:
		r.mu.Unlock()
		return fmt.Errorf("let go of %s: lent by its VMM, which withdraws it: %w", name, ErrNotAllowed)
	case e.dev == nil || e.owner != "" || e.retired != "":
		who := e.owner
		if who == "" {
			who = e.retired
		}
		r.mu.Unlock()
		return fmt.Errorf("let go of %s: held by %q: %w", name, who, ErrBusy)
	}
	if op, _, stuck := e.dev.StuckInfo(); stuck {
		r.mu.Unlock()
		return fmt.Errorf("let go of %s: %s has not answered: %w: %w", name, op, ErrBusy, ErrStuck)
	}
	delete(r.devices, name)
	r.mu.Unlock()
	if err := e.dev.Close(); err != nil {
		return fmt.Errorf("let go of %s: %w", name, err)
	}
	return nil
}
