// Package source is the source agent, `ferry source`: it serves the
// SourceAgent control-plane API and streams device state to a destination
// agent's Transfer service.
//
// # A migration
//
// StartMigration validates the request and acquires the source devices
// (so an unknown, refused or busy device is answered at once), then a
// runner goroutine owned by the agent:
//
//  1. opens the session with Transfer.Open, presenting the destination's
//     token, and learns each device's initial window;
//  2. dials one connection per channel and opens a Channel stream on each;
//     the destination's first window update on a channel says it is up.
//     When the destination offered direct data in Open, that update also
//     carries the stream's key, and the channel opens a second connection
//     to the destination's data port for its chunks (or, if it cannot,
//     sends them in Channel messages);
//  3. asks Transfer.SwitchoverStart, and only once it is accepted moves the
//     devices to STOP_COPY (through RUNNING_P2P first, for every device,
//     when they support P2P);
//  4. reads the devices: before each read it waits for window credit
//     (flow.Gate), so a full window stops the reads and source memory stays
//     bounded by the windows; reads a chunk straight into a pooled buffer,
//     computing its CRC32C 64 KiB at a time as it goes; records the CRC in
//     the stream digest; and keeps the chunk until acknowledged. At the
//     end of the device state (read returns 0) comes END, and the device
//     moves to STOP. With one device the channels' senders do the reading
//     themselves, taking turns, and each sends the chunk it read while the
//     bytes are in its core's cache (see puller); with several, one reader
//     per device queues its chunks, so slow devices are read in parallel;
//  5. every channel's sender sends chunks as they come (a chunk to resend
//     first), so a slow channel never holds up the others, and every
//     channel's receiver applies the window updates (acknowledgements)
//     from the destination;
//  6. calls Transfer.Finish for the verdict.
//
// Any failure or cancellation before a verified verdict rolls back: every
// source device returns to RUNNING (by a reset if that arc fails, logged as
// an error), then the destination is told to Abort, which resets its
// devices; the migration is reported ended after that. An Open whose
// answer never came may have opened a session all the same: it is aborted
// by migration id and token. A failed migration never costs the VM its
// device.
//
// # Channels that break or stall
//
// A channel whose stream or data connection breaks is re-dialled, and its
// unacknowledged chunks are sent again on it, for as long as the
// reconnect timeout allows without the destination acknowledging
// anything new. A connection that stalls without closing breaks nothing
// by itself: a channel is taken for stalled, and re-dialled, when a send
// has not returned for the progress timeout, or when a chunk it sent is
// unacknowledged and its device's acknowledgements have not moved for as
// long (stall.go). A word on the stream proves nothing: the destination
// speaks on every stream whenever any chunk is written.
package source
