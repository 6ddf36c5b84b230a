// Package vmmsock serves an agent's VMM socket (`--vmm-socket PATH`):
// the local Unix socket on which a VMM that holds a VFIO device lends it
// to the agent for a migration. The protocol (frames, descriptors, the
// messages) is pkg/vmm's; this package is the agent's end of it.
//
// # What a VMM can do
//
// A VMM connects (the agent checks its uid and gid with SO_PEERCRED
// against the allowed lists; a refused peer gets one Reply with
// PERMISSION_DENIED, reason VMM_PEER_NOT_ALLOWED, and the connection
// closes) and sends Requests, each answered in order by a Reply:
//
//   - Attach{name, config_state} with the device's descriptor as
//     SCM_RIGHTS: the agent checks that it is a VFIO device's
//     (VMM_FD_NOT_VFIO_DEVICE otherwise) with migration support
//     (DEVICE_MIGRATION_UNSUPPORTED), and the device appears in
//     ListDevices as vmm:NAME, which migration specs may name. The
//     config state (at most 1 MiB, VMM_CONFIG_TOO_LARGE beyond) is the
//     VMM's own state of the device: a source sends it after the
//     device's data, and a destination hands it back with its device.
//   - UpdateConfig{name, config_state}: a newer config state, until the
//     switchover takes it (VMM_CONFIG_FROZEN after, until the migration
//     ends).
//   - Detach{name}: the agent lets go of the device. A migration
//     holding it is cancelled and rolled back first (a source device
//     back to RUNNING, a destination device reset), and the Reply comes
//     after. Any allowed peer may detach a device, as an operator
//     detaches one from a VM (`ferry vmm detach`); closing the connection
//     detaches everything it lent. A VERIFIED destination migration is
//     not failed by it (its source may have committed): the Reply waits
//     for the commit or the abort.
//   - Watch{name}: the events of a device another connection lent.
//   - FetchConfig{name}: the config state a destination migration
//     delivered with the device, once it verified.
//
// The connection that lent a device receives an Event for each change
// of it: its state as the agent reads or sets it, the migration holding
// it, the config state delivered, and the withdrawal, which is the last.
// Events never hold up the agent: when the VMM reads too slowly, the
// oldest wait in a queue of 256 and further ones are dropped and counted
// in the next Event's missed.
//
// # What the agent promises
//
// It never opens a path a peer names, never closes or resets a lent
// device behind the VMM's back (closing its own descriptor neither
// resets the device nor ends its state while the VMM's is open), and a
// failed migration leaves a source device in RUNNING and a destination
// device reset, as for every device. If the agent dies mid-migration
// the VMM's own descriptor still works: pkg/vmm's Recover returns the
// device to RUNNING.
package vmmsock
