package vfio

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"slices"
)

// Errors of lent devices. Compare with errors.Is.
var (
	// ErrNotLent: no VMM has lent a device under the name (a vmm: spec
	// names no device the registry holds).
	ErrNotLent = errors.New("no device lent under that name")
	// ErrLent: a device is already lent under the name.
	ErrLent = errors.New("a device is already lent under that name")
	// ErrWithdrawn: the VMM took its device back, or went away; the
	// migration holding it is cancelled.
	ErrWithdrawn = errors.New("device withdrawn by its VMM")
	// ErrConfigFrozen: the device's config state was taken for a
	// switchover; it may change again once the migration has ended.
	ErrConfigFrozen = errors.New("config state taken for a switchover")
)

// DeviceEvent is one change of a lent device, as Lend's watch sees it.
type DeviceEvent struct {
	Spec  string // vmm:NAME
	State State  // the state last read or set
	Owner string // the migration holding it; "" when free
	// Config is set when a destination stored the config state it
	// received with the device (SetReceivedConfig).
	Config []byte
	// Withdrawn: the last event of the device; the registry has closed
	// its descriptor.
	Withdrawn bool
}

// lending is what the registry keeps of a lent device beside its entry.
type lending struct {
	watch func(DeviceEvent) // called without the registry's lock; must not block
	// config is the VMM's config state of the device; frozen once a
	// source took it for a switchover, until the owner releases it.
	config []byte
	frozen bool
	// received is the config state a destination migration delivered.
	received    []byte
	withdrawing bool
	// freed is closed when the current owner releases the device; nil
	// while nobody holds it.
	freed chan struct{}
}

// Lend adds dev, a device a VMM holds and lends to the agent, as
// vmm:NAME, with the VMM's config state (opaque to Ferry). The registry
// never opens a vmm: spec: such a device exists only while lent. watch,
// when not nil, learns every change of the device: its state as the
// agent reads or sets it, its owner, a delivered config state, and its
// withdrawal; it is called without the registry's lock and must not
// block. The registry guards dev with its device timeout and closes it
// (the agent's descriptor only: the VMM keeps its own) on Withdraw or
// Close. Errors wrap ErrBadSpec (a bad name), ErrLent, or fs.ErrClosed.
func (r *Registry) Lend(name string, dev Device, config []byte, watch func(DeviceEvent)) error {
	if err := ValidateVMMName(name); err != nil {
		return err
	}
	spec := Spec{Kind: SpecVMM, VMM: name}.String()
	e := &registered{name: spec, lent: &lending{watch: watch, config: slices.Clone(config)}}
	g := newGuard(dev, r.opts.OpTimeout, func() { r.unstuck(e) }, func(State) { r.notify(e) })
	e.dev = g
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		g.Close()
		return fmt.Errorf("lend %s: registry closed: %w", spec, fs.ErrClosed)
	}
	if r.devices[spec] != nil {
		r.mu.Unlock()
		g.Close()
		return fmt.Errorf("lend %s: %w", spec, ErrLent)
	}
	r.devices[spec] = e
	r.mu.Unlock()
	// The first state read is the watch's first event; a device that
	// does not answer gets one all the same.
	if _, err := g.State(); err != nil {
		r.notify(e)
	}
	g.DataSize()
	return nil
}

// Withdraw takes back the device lent as vmm:NAME. A migration holding
// it is evicted (RegistryOptions.Evict: cancelled and rolled back, so a
// source device returns to RUNNING and a destination device is reset),
// and Withdraw waits, until ctx ends, for its owner to release it; then
// the registry drops the device and closes its descriptor. A device
// being withdrawn is refused to new owners. Errors wrap ErrNotLent or
// ctx's error (the withdrawal then goes on: the device is dropped once
// released).
func (r *Registry) Withdraw(ctx context.Context, name string) error {
	spec := Spec{Kind: SpecVMM, VMM: name}.String()
	r.mu.Lock()
	e := r.devices[spec]
	if e == nil || e.lent == nil {
		r.mu.Unlock()
		return fmt.Errorf("withdraw %s: %w", spec, ErrNotLent)
	}
	e.lent.withdrawing = true
	owner, freed := e.owner, e.lent.freed
	r.mu.Unlock()
	if owner != "" && owner != ownerRecover && r.opts.Evict != nil {
		r.opts.Evict(owner, spec, ErrWithdrawn)
	}
	if freed != nil {
		select {
		case <-freed:
		case <-ctx.Done():
			r.mu.Lock()
			if e.owner != "" {
				e.lent.freed = nil // release drops it
				r.mu.Unlock()
				return fmt.Errorf("withdraw %s: %q still holds it: %w", spec, owner, ctx.Err())
			}
			r.mu.Unlock()
		}
	}
	r.dropLent(e)
	return nil
}

// dropLent removes the lent entry e and closes its descriptor.
func (r *Registry) dropLent(e *registered) {
	r.mu.Lock()
	mine := r.devices[e.name] == e
	if mine {
		delete(r.devices, e.name)
	}
	r.mu.Unlock()
	if !mine {
		return
	}
	e.dev.Close()
	if w := e.lent.watch; w != nil {
		w(DeviceEvent{Spec: e.name, State: e.dev.cachedState(), Withdrawn: true})
	}
}

// SetConfig replaces the config state of the device lent as vmm:NAME.
// Errors wrap ErrNotLent, or ErrConfigFrozen once a source took it for a
// switchover (until that migration ends).
func (r *Registry) SetConfig(name string, config []byte) error {
	spec := Spec{Kind: SpecVMM, VMM: name}.String()
	r.mu.Lock()
	defer r.mu.Unlock()
	e := r.devices[spec]
	switch {
	case e == nil || e.lent == nil:
		return fmt.Errorf("update config of %s: %w", spec, ErrNotLent)
	case e.lent.frozen:
		return fmt.Errorf("update config of %s: %w", spec, ErrConfigFrozen)
	}
	e.lent.config = slices.Clone(config)
	return nil
}

// TakeConfig returns the config state a source sends with the device
// spec names and freezes it until its owner releases the device: the
// one current at switchover is what travels. A device not lent by a VMM
// has none (nil).
func (r *Registry) TakeConfig(spec string) []byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	e := r.devices[spec]
	if e == nil || e.lent == nil {
		return nil
	}
	e.lent.frozen = true
	return slices.Clone(e.lent.config)
}

// SetReceivedConfig stores the config state a destination migration
// delivered with the device spec names, once the device verified, and
// tells the lending VMM (its watch sees the event with Config set). A
// device not lent by a VMM keeps nothing here: its migration's result
// carries the config state.
func (r *Registry) SetReceivedConfig(spec string, config []byte) {
	r.mu.Lock()
	e := r.devices[spec]
	if e == nil || e.lent == nil {
		r.mu.Unlock()
		return
	}
	e.lent.received = slices.Clone(config)
	r.mu.Unlock()
	r.notifyConfig(e, config)
}

// ReceivedConfig returns the config state a destination migration
// delivered with the device lent as vmm:NAME, and whether one did.
func (r *Registry) ReceivedConfig(name string) ([]byte, bool, error) {
	spec := Spec{Kind: SpecVMM, VMM: name}.String()
	r.mu.Lock()
	defer r.mu.Unlock()
	e := r.devices[spec]
	if e == nil || e.lent == nil {
		return nil, false, fmt.Errorf("config of %s: %w", spec, ErrNotLent)
	}
	return slices.Clone(e.lent.received), e.lent.received != nil, nil
}

// notify tells e's watch its state and owner now.
func (r *Registry) notify(e *registered) { r.notifyConfig(e, nil) }

func (r *Registry) notifyConfig(e *registered, config []byte) {
	if e.lent == nil || e.lent.watch == nil || e.dev == nil {
		return
	}
	r.mu.Lock()
	owner := e.owner
	r.mu.Unlock()
	e.lent.watch(DeviceEvent{Spec: e.name, State: e.dev.cachedState(), Owner: owner, Config: config})
}
