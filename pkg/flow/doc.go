// Package flow is Ferry's per-device flow control: a sliding window, counted
// in chunks and in bytes, that the destination advertises and the source
// obeys. It bounds the memory both agents spend on a device's stream and it
// cannot deadlock. It knows nothing of gRPC, protos or devices: the services
// carry windows and chunks over the wire and call in here.
//
// # The stream
//
// A device's state is one byte stream, cut by the source into chunks. Each
// chunk has a sequence number (seq, counting chunks from 0), the byte offset
// where it starts and a length: 1 to chunk-size bytes for DATA. The END
// marker closes the stream: seq = the number of DATA chunks, offset = the
// total length, length 0. The source sends chunks in sequence order, but
// over N parallel channels they arrive in any order, and a chunk re-sent
// after a broken channel may arrive twice.
//
// # The window rule
//
// The destination keeps the frontier: the seq and offset of the next chunk
// it will write into the device. For Limits {MaxChunks, MaxBytes} it
// advertises the Window
//
//	LimitSeq    = frontier seq    + MaxChunks
//	LimitOffset = frontier offset + MaxBytes
//
// and the source may send chunk (seq, offset, len) only while
// seq < LimitSeq and offset+len <= LimitOffset (Window.Admits). Windows only
// grow, so an old window that arrives late can be ignored. A session checks
// Limits.Validate(chunkSize) when it opens: MaxChunks >= 1 and
// chunkSize <= MaxBytes, or even the chunk at the frontier could not fit.
//
// # Why it cannot deadlock
//
// The destination only ever waits for the chunk at its frontier. The source
// sends in sequence order, and it reserves a full chunk of credit before it
// reads: when the source wants chunk s at offset o, every chunk before s has
// been sent. Once those arrive and are written, the frontier is (s, o) and
// the window is (s+MaxChunks, o+MaxBytes), which admits chunk s since
// MaxChunks >= 1 and chunkSize <= MaxBytes. So the chunk the destination
// waits for is always either on its way or admitted by the next window: the
// window never forbids the one chunk that would let it move.
//
// That argument needs the destination to advertise its window once it has
// written everything it can. It may coalesce updates (one per batch of
// writes rather than one per chunk), but it must not sit on a changed window
// while it has nothing left to write: that is exactly the state in which the
// source may be waiting for it.
//
// # Memory
//
// Reassembly holds only chunks inside the window, at most MaxChunks of them
// and at most MaxBytes of payload, whatever the peer sends: chunks outside
// the window, and overlapping chunks that would add up to more than
// MaxBytes, are refused with an error before anything is kept. Its ring of
// MaxChunks slots is allocated once; accepting, writing and advancing
// allocate nothing. On the source, the reader waits for credit before it
// reads, so it has read at most MaxBytes past the frontier of the newest
// window it received.
//
// # Who calls what
//
// Destination, per device: one Reassembly, under the device stream's lock.
// Each channel's receiver calls Accept for every chunk (freeing the payload
// of a duplicate); the writer loops Next, writes the chunk into the device,
// Advance; after a batch, the current Window goes back to the source on any
// channel. Any error from Accept or Next is a protocol violation by the
// peer and fails the stream. Done reports that END was written.
//
// Source, per device: one Gate. The device's reader is the only goroutine
// that calls Wait (blocking, with a context, for credit for up to one chunk
// size), reads at most that many bytes, hands the chunk to the channels and
// calls Sent with the bytes read (0 for END). Every channel's receiver calls
// Update with the windows it receives, in whatever order. The stream's
// owner calls Close to fail a blocked reader. Stalls tells how often and how
// long the reader waited for credit.
//
// Acknowledgements (which chunks the source may forget) are not part of
// this package.
package flow
