package vfio

import (
	"errors"
	"fmt"
	"io/fs"
	"slices"
	"strings"
	"sync"
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
}

// DeviceInfo describes one device of a Registry, as read by List.
type DeviceInfo struct {
	Spec     string // canonical spec
	Flags    Flags
	State    State  // read live; StateError when it cannot be read
	Owner    string // "" when free
	DataSize uint64 // estimated stop-copy size; 0 when unknown
}

// Registry opens devices by spec and keeps them open across migrations,
// so the state a migration leaves in a device can be observed after it
// (a destination's verified state, a source's return to RUNNING). A device
// has at most one owner at a time. A Registry is safe for concurrent use.
type Registry struct {
	opts RegistryOptions

	mu      sync.Mutex             // guards the fields below
	devices map[string]*registered // by canonical spec; opened on first Acquire
	closed  bool
}

// registered is one open device of a Registry.
type registered struct {
	dev   Device
	owner string // "" when free
	lease uint64 // counts acquisitions, so a stale release does nothing
}

// NewRegistry returns an empty registry.
func NewRegistry(opts RegistryOptions) *Registry {
	return &Registry{opts: opts, devices: make(map[string]*registered)}
}

// Acquire gives owner exclusive use of the device spec names, opening it
// on first use. Specs are compared in canonical form, so
// "sim:seed=7,size=1GiB" and "sim:size=1GiB,seed=7" are the same device.
// The device stays open when released; the returned release func gives
// it up and may be called any number of times. Errors wrap ErrBadSpec,
// ErrNotAllowed (sim: without AllowSim, a host device outside
// RegistryOptions.Devices), ErrBusy (held by another owner,
// who is named) or the device's open error.
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
	defer r.mu.Unlock()
	if r.closed {
		return nil, nil, fmt.Errorf("acquire %s: registry: %w", name, fs.ErrClosed)
	}
	e, err := r.lookup(s, name)
	if err != nil {
		return nil, nil, err
	}
	if e.owner != "" {
		return nil, nil, fmt.Errorf("acquire %s: held by %q: %w", name, e.owner, ErrBusy)
	}
	e.owner = owner
	e.lease++
	lease := e.lease
	return e.dev, func() { r.release(e, lease) }, nil
}

// lookup returns the registered device of spec s, opening it if needed.
// r.mu must be held.
func (r *Registry) lookup(s Spec, name string) (*registered, error) {
	if e := r.devices[name]; e != nil {
		return e, nil
	}
	dev, err := Open(s)
	if err != nil {
		return nil, err
	}
	e := &registered{dev: dev}
	r.devices[name] = e
	return e, nil
}

// release frees e if lease is still the current acquisition.
func (r *Registry) release(e *registered, lease uint64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if e.lease == lease {
		e.owner = ""
	}
}

// List describes every device the registry has open, sorted by spec.
// States and sizes are read from the devices as List runs.
func (r *Registry) List() []DeviceInfo {
	type entry struct {
		name  string
		dev   Device
		owner string
	}
	r.mu.Lock()
	entries := make([]entry, 0, len(r.devices))
	for name, e := range r.devices {
		entries = append(entries, entry{name, e.dev, e.owner})
	}
	r.mu.Unlock()

	infos := make([]DeviceInfo, 0, len(entries))
	for _, e := range entries {
		info := DeviceInfo{Spec: e.name, Flags: e.dev.Flags(), Owner: e.owner}
		if st, err := e.dev.State(); err == nil {
			info.State = st
		} else {
			info.State = StateError
		}
		if n, err := e.dev.DataSize(); err == nil {
			info.DataSize = n
		}
		infos = append(infos, info)
	}
	slices.SortFunc(infos, func(a, b DeviceInfo) int { return strings.Compare(a.Spec, b.Spec) })
	return infos
}

// Close closes every device and makes later Acquires fail. Devices still
// held are closed too: their owners see errors from them. Idempotent.
func (r *Registry) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	var errs []error
	for name, e := range r.devices {
		if err := e.dev.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close %s: %w", name, err))
		}
	}
	clear(r.devices)
	r.closed = true
	return errors.Join(errs...)
}
