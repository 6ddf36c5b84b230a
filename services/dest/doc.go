// Package dest is the destination agent, `ferry dest`: it serves the
// DestAgent control-plane API and the Transfer service the source agent
// streams into.
//
// # Lifecycle of an incoming migration
//
//  1. PrepareIncoming opens the destination devices through the registry,
//     moves each to RESUMING (keeping its write-only data stream), reserves
//     the devices' windows from the node's memory budget and returns a
//     one-time token. A prepare that does not fit the budget is refused
//     with RESOURCE_EXHAUSTED before any device is touched.
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
//     passed, the verdict is SUCCEEDED; Finish returns it.
//  6. Any failure, a protocol violation by the peer, Abort or
//     CancelIncoming ends the session: the devices are reset, their
//     buffers and budget released, and the migration is FAILED or
//     CANCELLED with the reason.
//
// Verified destination devices rest in STOP, as the uAPI leaves them after
// loading: the VMM that receives the VM starts them.
package dest
