package chunkwire

import (
	"google.golang.org/grpc/mem"

	"github.com/vfio-ferry/ferry/internal/crc32c"
)

// Payload is a received chunk's bytes, in the pieces gRPC received them
// in: references to gRPC's buffers, not a copy (see InChunk). Payloads
// are pooled with their slice of pieces, so receiving a chunk allocates
// nothing in steady state.
type Payload struct {
	bufs mem.BufferSlice
	n    int
	pool *Pool
	// crc is the bytes' CRC32C when crcKnown: computed as they were read
	// (direct data connections, see ReadCRC32C), not over them again.
	crc      uint32
	crcKnown bool
}

// newPayload returns an empty Payload from the pool.
func (p *Pool) newPayload() *Payload {
	if pl, _ := p.payloads.Get().(*Payload); pl != nil {
		return pl
	}
	return &Payload{pool: p}
}

// ownPayload makes a Payload of a buffer from the pool, which it then
// owns (Free returns the buffer), whose CRC32C, crc, is already known.
func (p *Pool) ownPayload(bp *[]byte, crc uint32) *Payload {
	pl := p.newPayload()
	pl.bufs = append(pl.bufs, mem.NewBuffer(bp, p))
	pl.n = len(*bp)
	pl.crc, pl.crcKnown = crc, true
	return pl
}

// refPayload takes a reference to the bytes of s from offset skip on.
func (p *Pool) refPayload(s mem.BufferSlice, skip int) *Payload {
	pl := p.newPayload()
	for _, b := range s {
		d := b.Len()
		switch {
		case skip >= d:
			skip -= d
			continue
		case skip > 0:
			// A view of the buffer's tail holds a reference to it.
			pl.bufs = append(pl.bufs, b.Slice(skip, d))
			pl.n += d - skip
			skip = 0
		default:
			b.Ref()
			pl.bufs = append(pl.bufs, b)
			pl.n += d
		}
	}
	return pl
}

// Len is the number of bytes (0 for a nil Payload).
func (p *Payload) Len() int {
	if p == nil {
		return 0
	}
	return p.n
}

// Buffers are the pieces, in order. They stay valid until Free.
func (p *Payload) Buffers() mem.BufferSlice {
	if p == nil {
		return nil
	}
	return p.bufs
}

// CRC32C is the Castagnoli CRC of the bytes, as CRC32C of them in one
// piece would be: the one computed as they were read, when there was one.
func (p *Payload) CRC32C() uint32 {
	if p != nil && p.crcKnown {
		return p.crc
	}
	var crc uint32
	for _, b := range p.Buffers() {
		crc = crc32c.Update(crc, b.ReadOnlyData())
	}
	return crc
}

// Materialize returns a copy of the bytes in one slice (nil for a nil
// Payload); for tests and slow paths only.
func (p *Payload) Materialize() []byte {
	if p == nil {
		return nil
	}
	return p.bufs.Materialize()
}

// Free releases the references to gRPC's buffers, which return to their
// pool once gRPC is done with them too, and recycles p. p must not be
// used afterwards. Free on a nil Payload does nothing.
func (p *Payload) Free() {
	if p == nil {
		return
	}
	for i, b := range p.bufs {
		b.Free()
		p.bufs[i] = nil
	}
	p.bufs, p.n, p.crcKnown = p.bufs[:0], 0, false
	p.pool.payloads.Put(p)
}
