package flow

import "fmt"

// Chunk is one piece of a device's stream as the destination receives it.
// Payload is whatever the caller keeps with it (the bytes, a pooled buffer);
// Reassembly never looks inside.
type Chunk[T any] struct {
	// Seq counts the device's chunks from 0. The END marker takes the
	// number of DATA chunks.
	Seq uint64
	// Offset is where the chunk's bytes start in the device's stream. For
	// END it is the stream's total length.
	Offset uint64
	// Len is the number of bytes: 1..chunk size for DATA, 0 for END.
	Len uint32
	// End marks the END marker.
	End bool
	// Payload travels with the chunk, untouched.
	Payload T
}

// sameChunk reports whether b is a faithful resend of a: same place in the
// stream, same size, same kind. Payloads are not compared (the caller checks
// CRCs before Accept).
func sameChunk[T any](a, b Chunk[T]) bool {
	return a.Seq == b.Seq && a.Offset == b.Offset && a.Len == b.Len && a.End == b.End
}

// slot is one place in the ring.
type slot[T any] struct {
	c    Chunk[T]
	held bool
}

// Reassembly is the destination's side of one device's stream: it takes
// chunks in any order from any channel, holds those that arrived ahead of
// the frontier, and hands them back one at a time in sequence order.
//
// It does no I/O, starts no goroutines and takes no lock: the caller
// serialises every call (one mutex per device stream is enough).
//
// The calling sequence is
//
//	dup, err := r.Accept(c) // from any channel's receiver, under the lock
//	for {
//		c, ok, err := r.Next()
//		if err != nil || !ok { break }
//		write c into the device
//		r.Advance()
//	}
//	advertise r.Window() if it changed
type Reassembly[T any] struct {
	limits    Limits
	chunkSize uint32

	// ring holds the chunks that arrived ahead of the frontier: chunk s sits
	// at ring[s % MaxChunks]. Accept admits only seq in
	// [frontier, frontier+MaxChunks), so two held chunks never share a slot
	// and the count of held chunks can never exceed MaxChunks.
	//
	// For MaxChunks = 4, frontier 5, chunks 6 and 8 held:
	//
	//	        frontier
	//	           v
	//	+-------+-------+-------+-------+
	//	|   8   |   -   |   6   |   -   |
	//	+-------+-------+-------+-------+
	//	   [0]     [1]     [2]     [3]
	ring []slot[T]

	// seq and offset are the frontier: the next chunk to write into the
	// device and the byte offset it must start at. Advance moves them.
	seq    uint64
	offset uint64

	held      int    // chunks in ring
	heldBytes uint64 // sum of their Len; never more than limits.MaxBytes
	peakBytes uint64 // largest heldBytes ever

	// top is one past the highest seq ever held (0 if none). Chunks below
	// the frontier were written, so any chunk at or above the frontier that
	// was ever accepted is still held: an END at seq e with top > e+1 would
	// leave a held chunk after the end.
	top uint64

	endKnown bool   // an END marker was accepted (held or written)
	endSeq   uint64 // its seq, if endKnown
	done     bool   // the END marker was written: the stream is complete
}

// NewReassembly returns a Reassembly for one device's stream, cut into
// chunks of at most chunkSize bytes, starting at seq 0, offset 0. It
// allocates the ring (Limits.MaxChunks slots) and nothing more afterwards.
// It panics if l.Validate(chunkSize) fails: validate limits where they enter
// the program, before building anything on them.
func NewReassembly[T any](l Limits, chunkSize uint32) *Reassembly[T] {
	if err := l.Validate(chunkSize); err != nil {
		panic("flow: NewReassembly: " + err.Error())
	}
	return &Reassembly[T]{
		limits:    l,
		chunkSize: chunkSize,
		ring:      make([]slot[T], l.MaxChunks),
	}
}

// Accept takes a chunk from the wire. It validates the chunk completely
// before keeping anything, so on error the Reassembly is unchanged (and the
// stream should be failed: every error means the peer broke the protocol).
//
// A resend of a chunk already written or already held is reported with
// dup = true and a nil error; the Reassembly keeps nothing of it, so the
// caller frees its payload. Otherwise, with a nil error, the chunk is held
// until Next hands it back; the caller must not reuse its payload.
//
// Errors, in the order they are checked:
//   - ErrBadLength: DATA of 0 or more than chunk size bytes, END with bytes;
//   - ErrConflict: a chunk below the frontier that cannot be a resend of
//     what was written there (it reaches past the frontier offset, or its
//     kind disagrees with where END was);
//   - ErrAfterEnd: seq after a known END; ErrConflict: an END at another
//     seq than a known END;
//   - ErrOutsideWindow: seq >= limit seq;
//   - ErrConflict: a different chunk is held at this seq;
//   - ErrOutsideWindow: offset below the frontier offset, or
//     offset+len > limit offset;
//   - ErrGap: the chunk is at the frontier seq but not at its offset;
//   - ErrAfterEnd: an END numbered before a chunk already held;
//   - ErrOutsideWindow: holding the chunk would exceed MaxBytes. Only
//     overlapping chunks can get here, so an honest source never does; it
//     bounds memory against a dishonest one.
func (r *Reassembly[T]) Accept(c Chunk[T]) (dup bool, err error) {
	switch {
	case c.End && c.Len != 0:
		return false, r.errorf(c, ErrBadLength, "END carries %d bytes", c.Len)
	case !c.End && (c.Len == 0 || c.Len > r.chunkSize):
		return false, r.errorf(c, ErrBadLength, "DATA must carry 1..%d bytes", r.chunkSize)
	}
	if c.Seq < r.seq {
		return r.acceptWritten(c)
	}
	if r.endKnown {
		if c.Seq > r.endSeq {
			return false, r.errorf(c, ErrAfterEnd, "END is seq %d", r.endSeq)
		}
		if c.End && c.Seq != r.endSeq {
			return false, r.errorf(c, ErrConflict, "END is already seq %d", r.endSeq)
		}
	}
	w := r.Window()
	if c.Seq >= w.LimitSeq {
		return false, r.errorf(c, ErrOutsideWindow, "seq beyond the window")
	}
	s := &r.ring[c.Seq%uint64(len(r.ring))]
	if s.held {
		// s.c.Seq == c.Seq: held chunks are all within one ring length.
		if sameChunk(s.c, c) {
			return true, nil
		}
		return false, r.errorf(c, ErrConflict, "held chunk has offset %d len %d end %t", s.c.Offset, s.c.Len, s.c.End)
	}
	if c.Offset < r.offset {
		return false, r.errorf(c, ErrOutsideWindow, "offset below the frontier")
	}
	if !w.Admits(c.Seq, c.Offset, uint64(c.Len)) {
		return false, r.errorf(c, ErrOutsideWindow, "bytes beyond the window")
	}
	if c.Seq == r.seq && c.Offset != r.offset {
		return false, r.errorf(c, ErrGap, "the frontier chunk must start at the frontier offset")
	}
	if c.End && r.top > c.Seq+1 {
		return false, r.errorf(c, ErrAfterEnd, "chunk seq %d is already held", r.top-1)
	}
	if uint64(c.Len) > r.limits.MaxBytes-r.heldBytes {
		// Each held chunk lies within [frontier offset, limit offset), so only
		// chunks that overlap each other can add up to more than MaxBytes.
		return false, r.errorf(c, ErrOutsideWindow, "holding %d more bytes would exceed max bytes %d (%d held)",
			c.Len, r.limits.MaxBytes, r.heldBytes)
	}

	*s = slot[T]{c: c, held: true}
	r.held++
	r.heldBytes += uint64(c.Len)
	r.peakBytes = max(r.peakBytes, r.heldBytes)
	r.top = max(r.top, c.Seq+1)
	if c.End {
		r.endKnown, r.endSeq = true, c.Seq
	}
	return false, nil
}

// acceptWritten handles a chunk below the frontier: it was written already,
// so a faithful resend is dropped. The chunk itself is gone, but what is
// known about it must agree: it ended at or before the frontier offset, and
// it is END exactly if END was written at its seq.
func (r *Reassembly[T]) acceptWritten(c Chunk[T]) (dup bool, err error) {
	wasEnd := r.endKnown && c.Seq == r.endSeq
	switch {
	case c.End && !wasEnd:
		return false, r.errorf(c, ErrConflict, "a DATA chunk was written at this seq")
	case !c.End && wasEnd:
		return false, r.errorf(c, ErrConflict, "END was written at this seq")
	case c.End && c.Offset != r.offset:
		return false, r.errorf(c, ErrConflict, "END was written at offset %d", r.offset)
	case c.Offset > r.offset || uint64(c.Len) > r.offset-c.Offset:
		return false, r.errorf(c, ErrConflict, "a written chunk cannot reach past the frontier offset")
	}
	return true, nil
}

// Next returns the chunk at the frontier, ok = false if it has not arrived
// (or the stream is done). It returns ErrGap if that chunk does not start at
// the frontier offset: the chunks before it left a hole or overlap it. Next
// does not change anything; Advance does.
func (r *Reassembly[T]) Next() (c Chunk[T], ok bool, err error) {
	s := &r.ring[r.seq%uint64(len(r.ring))]
	if r.done || !s.held {
		return c, false, nil
	}
	if s.c.Offset != r.offset {
		return c, false, r.errorf(s.c, ErrGap, "the frontier is at offset %d", r.offset)
	}
	return s.c, true, nil
}

// Advance records that the chunk Next returned has been written into the
// device: it drops the chunk (and the ring's reference to its payload) and
// moves the frontier past it. After the END marker, Done reports true.
//
// Advance panics unless Next would return ok: writing a chunk that is not
// there is a bug in the caller, not something the peer can cause.
func (r *Reassembly[T]) Advance() {
	c, ok, err := r.Next()
	if !ok {
		panic(fmt.Sprintf("flow: Advance at seq %d without a writable chunk (err %v)", r.seq, err))
	}
	r.ring[r.seq%uint64(len(r.ring))] = slot[T]{}
	r.held--
	r.heldBytes -= uint64(c.Len)
	r.seq++
	r.offset += uint64(c.Len)
	if c.End {
		r.done = true
	}
}

// Window is what the destination advertises: frontier + limits.
func (r *Reassembly[T]) Window() Window {
	return Window{
		LimitSeq:    satAdd(r.seq, uint64(r.limits.MaxChunks)),
		LimitOffset: satAdd(r.offset, r.limits.MaxBytes),
	}
}

// Frontier returns the next chunk to write and the offset it must start at.
// Once Done, they are the END's seq + 1 and the stream's total length.
func (r *Reassembly[T]) Frontier() (seq, offset uint64) { return r.seq, r.offset }

// Buffered returns how many chunks, and bytes of them, are held ahead of the
// frontier. They never exceed Limits.MaxChunks and Limits.MaxBytes.
func (r *Reassembly[T]) Buffered() (chunks int, bytes uint64) { return r.held, r.heldBytes }

// PeakBytes returns the largest number of bytes ever held at once.
func (r *Reassembly[T]) PeakBytes() uint64 { return r.peakBytes }

// Done reports whether the END marker has been written: the stream is
// complete and in order.
func (r *Reassembly[T]) Done() bool { return r.done }

// errorf wraps sentinel with the chunk, the detail and the window state.
func (r *Reassembly[T]) errorf(c Chunk[T], sentinel error, format string, args ...any) error {
	kind := "DATA"
	if c.End {
		kind = "END"
	}
	w := r.Window()
	return fmt.Errorf("%s seq %d offset %d len %d: %w: %s (frontier seq %d offset %d, window %v)",
		kind, c.Seq, c.Offset, c.Len, sentinel, fmt.Sprintf(format, args...), r.seq, r.offset, w)
}

// Drain hands every held chunk's payload to release and forgets the
// chunks, for a stream that is being abandoned (its buffers go back to
// their pool). The frontier does not move; Buffered reports zero after.
func (r *Reassembly[T]) Drain(release func(T)) {
	for i := range r.ring {
		if r.ring[i].held {
			release(r.ring[i].c.Payload)
			r.ring[i] = slot[T]{}
		}
	}
	r.held, r.heldBytes = 0, 0
}

// Held returns the chunk held at seq, if one is. Accept cannot compare
// payloads; a caller that can (by their checksums) uses Held to tell a
// faithful resend from a conflicting one before calling Accept.
func (r *Reassembly[T]) Held(seq uint64) (Chunk[T], bool) {
	if seq < r.seq || seq-r.seq >= uint64(len(r.ring)) {
		return Chunk[T]{}, false
	}
	s := r.ring[seq%uint64(len(r.ring))]
	if !s.held || s.c.Seq != seq {
		return Chunk[T]{}, false
	}
	return s.c, true
}
