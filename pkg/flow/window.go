package flow

import (
	"errors"
	"fmt"
	"math"
)

// Errors. Every error this package returns wraps exactly one of these, so
// callers (the services, when they pick a gRPC code) test with errors.Is.
var (
	// ErrBadLimits: a Limits value that could never admit a chunk, or whose
	// ring would be unreasonably large. Returned by Limits.Validate.
	ErrBadLimits = errors.New("bad flow limits")

	// ErrOutsideWindow: the peer sent a chunk the advertised window did not
	// allow, or one that would make the destination hold more than its
	// limits. An honest source never causes it.
	ErrOutsideWindow = errors.New("chunk outside window")

	// ErrBadLength: a DATA chunk of 0 bytes or of more than the chunk size,
	// or an END marker that carries bytes.
	ErrBadLength = errors.New("bad chunk length")

	// ErrConflict: a chunk whose sequence number was already seen with a
	// different offset, length or kind (not a faithful resend), or a second
	// END marker at another sequence number.
	ErrConflict = errors.New("conflicting chunk")

	// ErrAfterEnd: a chunk numbered after the stream's END marker, or an END
	// marker numbered before a chunk that is already held.
	ErrAfterEnd = errors.New("chunk after end of stream")

	// ErrGap: the chunk at the frontier does not start where the previous
	// chunk ended, so the byte stream has a hole or an overlap.
	ErrGap = errors.New("gap or overlap in byte stream")

	// ErrClosed is what Gate.Wait returns after Close(nil).
	ErrClosed = errors.New("flow gate closed")
)

// MaxWindowChunks is the largest Limits.MaxChunks that Validate accepts.
// A Reassembly allocates one ring slot per chunk of window up front (a few
// dozen bytes each, payload excluded), so an unchecked count taken from a
// request could make the destination allocate gigabytes for bookkeeping
// alone. 2^20 slots is far beyond any useful window: 1 Mi chunks of 64 KiB
// is a 64 GiB window.
const MaxWindowChunks = 1 << 20

// Limits is the per-device window a destination grants: how far ahead of its
// frontier (the next chunk it will write into the device) a source may send.
// Both limits apply at once; whichever is reached first stops the source.
//
// The byte limit is what bounds memory: the destination holds at most
// MaxBytes of chunk payload per device, and the source reads at most
// MaxBytes ahead of what the destination has written. The count limit bounds
// the bookkeeping (one ring slot per chunk) and matters when chunks are
// short, as pre-copy reads often are.
//
// Sizing follows the bandwidth-delay product. To keep a device's stream
// moving, the window must cover everything in flight between the source's
// read and the destination's write: bandwidth × (round trip + the skew
// between the slowest and fastest of the N channels, since a chunk held up
// on a slow channel holds the frontier while the others keep delivering).
// At 3 GB/s (a 25 Gb/s link) with a 1 ms round trip and a few ms of skew,
// that is about 16 MB; MaxBytes = 64 MiB leaves room. A window smaller than
// that does not fail anything, it only slows the device down to
// MaxBytes / round-trip. MaxChunks should be at least MaxBytes / chunk size
// (1024 for 64 MiB of 64 KiB chunks), or the count limit binds first.
type Limits struct {
	// MaxChunks is how many chunks, counted from the frontier, the source may
	// have sent and the destination may hold: the window admits sequence
	// numbers [frontier, frontier+MaxChunks). At least 1, at most
	// MaxWindowChunks.
	MaxChunks uint32

	// MaxBytes is how many bytes of the device's stream, counted from the
	// frontier's offset, the source may have sent and the destination may
	// hold. At least the chunk size, so the chunk at the frontier always
	// fits.
	MaxBytes uint64
}

// Validate reports whether the limits can carry a stream cut into chunks of
// at most chunkSize bytes. The rule that matters is chunkSize <= MaxBytes: a
// byte window smaller than one chunk would never admit a full chunk, and the
// stream would stop forever instead of failing. Errors wrap ErrBadLimits.
func (l Limits) Validate(chunkSize uint32) error {
	switch {
	case chunkSize == 0:
		return fmt.Errorf("%w: chunk size is 0", ErrBadLimits)
	case l.MaxChunks == 0:
		return fmt.Errorf("%w: max chunks is 0: the window would admit no chunk", ErrBadLimits)
	case l.MaxChunks > MaxWindowChunks:
		return fmt.Errorf("%w: max chunks %d is more than %d", ErrBadLimits, l.MaxChunks, MaxWindowChunks)
	case l.MaxBytes < uint64(chunkSize):
		return fmt.Errorf("%w: max bytes %d is less than the chunk size %d: a full chunk would never fit the window",
			ErrBadLimits, l.MaxBytes, chunkSize)
	}
	return nil
}

// Window is what a destination advertises for one device: the source may
// send chunk (seq, offset, len) only while seq < LimitSeq and
// offset+len <= LimitOffset. It is computed as frontier + Limits, so both
// fields only ever grow. The zero Window admits nothing.
type Window struct {
	// LimitSeq is one past the highest sequence number that may be sent.
	LimitSeq uint64
	// LimitOffset is one past the highest byte offset that may be sent.
	LimitOffset uint64
}

// Admits reports whether chunk (seq, offset, length) may be sent under w.
// It does not overflow, whatever its arguments.
func (w Window) Admits(seq, offset, length uint64) bool {
	return seq < w.LimitSeq && offset <= w.LimitOffset && length <= w.LimitOffset-offset
}

// String formats w for errors and logs.
func (w Window) String() string {
	return fmt.Sprintf("seq < %d, offset+len <= %d", w.LimitSeq, w.LimitOffset)
}

// satAdd is a+b, or the largest uint64 if that overflows: a window near the
// top of the number space stays closed above instead of wrapping round.
func satAdd(a, b uint64) uint64 {
	if s := a + b; s >= a {
		return s
	}
	return math.MaxUint64
}
