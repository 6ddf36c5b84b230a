package source

import (
	"errors"
	"fmt"
)

// errWithdrawn is the cancel cause of a migration one of whose vmm:
// devices its VMM took back.
var errWithdrawn = errors.New("a device was withdrawn by its VMM")

// Evict cancels the migration owner (its id) because the VMM that lent
// the device spec withdrew it, or went away (vfio.RegistryOptions.Evict):
// the migration fails with DEVICE_WITHDRAWN and rolls back, which
// returns the device to RUNNING and releases it. A committed migration
// is left to end: the destination owns the state by then. It reports
// whether owner is one of this agent's migrations; it never blocks.
func (a *Agent) Evict(owner, spec string, why error) bool {
	a.mu.Lock()
	m, ok := a.migrations[owner]
	a.mu.Unlock()
	if !ok {
		return false
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.committed {
		return true
	}
	a.cfg.Logger.Warn("device withdrawn by its VMM: cancelling the migration", "migration", owner, "device", spec, "why", why)
	m.cancel(fmt.Errorf("%w: %s: %w", errWithdrawn, spec, why))
	return true
}
