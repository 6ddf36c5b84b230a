// Package dest is the destination agent, `ferry dest`: it serves the
// DestAgent control-plane API and the Transfer service the source agent
// streams into.
//
// # Lifecycle of an incoming migration
//
//  1. PrepareIncoming opens the destination devices through the registry,
//     moves each to RESUMING (keeping its write-only data stream), reserves
//     the devices' windows from the node's memory budget (each window's
//     bytes and its reassembly ring, see WindowCost) and returns a one-time
//     token. A prepare that does not fit the budget is refused with
//     RESOURCE_EXHAUSTED before any device is touched. The same id and
//     request answer the same migration, also to a retry that arrives while
//     the first is still opening the devices; another request under an id
//     in use is refused (ALREADY_EXISTS, MIGRATION_SPEC_MISMATCH, naming
//     the field) and the migration left alone; an id whose migration
//     failed or was cancelled is prepared anew. A prepared migration that
//     no source opens within the source timeout (or the token's shorter
//     lifetime) is failed and released; an Open refused for its token or
//     its parameters leaves it open to a correct one.
//  2. Open (Transfer), with that token, starts the session: one
//     flow.Reassembly and one loader goroutine per device.
//  3. Channel streams deliver chunks in any order (with ServeData running
//     and the source asking for it, each stream's chunks come on its direct
//     data connection instead; see direct.go). Each is validated
//     (device index, kind, length, CRC32C) and handed to its device's
//     reassembly, which refuses anything outside the window before keeping
//     it, so the memory a session holds is bounded by its windows. The
//     chunk at the frontier goes into the device, in order: written by the
//     receiver whose chunk completed the frontier, on its own thread while
//     the bytes are in its core's cache, or, while another holds the
//     device's write turn, by whoever holds it or the device's loader.
//     Then the frontier advances and every channel's feedback sender is
//     woken, which sends the new windows (the acknowledgement) back.
//  4. SwitchoverStart is accepted only while every device is in RESUMING,
//     every channel is connected and everything sent so far is written.
//  5. END closes a device's stream: the loader checks the length, the chunk
//     count and the end-to-end digest, then moves the device RESUMING->STOP,
//     where the device validates its new state. When every device has
//     passed, the migration is VERIFIED (not final); Finish answers the
//     verified verdict, as often as it is asked.
//  6. The source's Commit makes it SUCCEEDED: the destination owns the
//     devices, which rest in STOP for the VMM that receives the VM.
//  7. Any failure, a protocol violation by the peer, Abort or
//     CancelIncoming before the verdict ends the session: the devices are
//     reset, their buffers and budget released, and the migration is
//     FAILED or CANCELLED with the reason.
//
// # The commit rule
//
// The source owns the commit. A VERIFIED migration holds its devices in
// STOP with the owner in doubt (Migration.owner DEVICE_OWNER_IN_DOUBT):
// the source may have its verdict and have committed, or have lost the
// Finish and taken its own devices back to RUNNING. So in VERIFIED the
// destination never decides by itself: no source timeout, token expiry,
// stray chunk, device error or agent shutdown resets the devices (a
// shutdown leaves them in STOP, held, and logs it). Only four calls
// resolve it:
//
//   - Transfer.Commit (the source has the verdict): SUCCEEDED, owner
//     DESTINATION. Idempotent; FAILED_PRECONDITION, SESSION_STATE in any
//     phase but VERIFIED or SUCCEEDED.
//   - Transfer.Abort (the source rolled back): the devices are reset,
//     FAILED with MIGRATION_ABORTED, owner SOURCE. A committed migration
//     is not aborted: FAILED_PRECONDITION, MIGRATION_COMMITTED.
//   - DestAgent.CommitIncoming: as Commit, for a control plane that read
//     SUCCEEDED at the source.
//   - DestAgent.CancelIncoming: as Abort, CANCELLED, for a control plane
//     that found the source owns the devices. A committed migration is not
//     cancelled (MIGRATION_COMMITTED).
//
// The owner is SOURCE in every phase before VERIFIED and after a
// rollback, DESTINATION once SUCCEEDED. The reassembly buffers and the
// budget are released at VERIFIED already: no more chunks can come (a
// late resend is counted as a duplicate and freed).
//
// # Devices that do not answer
//
// The clean-up waits for no goroutine blocked in a device. It releases the
// buffers and the budget first, then closes each device on its own: it
// takes the device's write turn, or, while a writer holds it, waits for
// that writer or for the device's guard to declare the device stuck (a
// device offering Stuck() <-chan struct{}). Healthy devices are reset and
// released at once. A stuck device is not touched while stuck: the
// migration reports it (DeviceProgress.stuck) and ends. The writer whose
// write hung resets and releases it when the write returns; a device
// stuck in a state change is released to its guard, which resets it once
// the change answers (vfio.GuardedDevice.WhenAnswered). A device without
// a guard cannot be declared stuck; its clean-up waits for its write.
//
// A device declared stuck before the migration ends fails it at once,
// with UNAVAILABLE and DEVICE_STUCK, which every channel answers: the
// source rolls back then rather than at its switchover deadline (stuck.go).
// The agent's Close waits for every goroutine it started but those left
// blocked in a stuck device, and logs how many there are.
//
// GetIncoming and WatchIncoming show the channels connected and when the
// source was last heard (a chunk or a message), so a dead source shows at
// once; chunks received twice are counted as duplicate_chunks (the
// destination retransmits nothing).
package dest
