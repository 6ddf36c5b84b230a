package source

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"google.golang.org/grpc/mem"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/services/chunkwire"
	"github.com/vfio-ferry/ferry/services/deviceapi"
)

// readDevice reads one device's state to its end on a goroutine of its
// own, chunk by chunk, each under window credit, and queues the chunks and
// END for the channels. A migration of several devices reads each so,
// whatever the number of channels: slow devices are read in parallel.
func (m *migration) readDevice(ctx context.Context, d *srcDevice, queue chan<- *outChunk) error {
	if m.precopy != nil && !d.precopyDev.Load() {
		// A device without PRE_COPY stays RUNNING until the switchover.
		select {
		case <-m.precopy.stopped:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	for !d.finished {
		seq, off, err := d.gate.Wait(ctx, d.want(m.chunkSize))
		if err != nil {
			return err
		}
		c, err := m.readNext(d, seq, off)
		if err != nil {
			return err
		}
		if d.precopyDev.Load() {
			d.notePrecopy(c == nil)
		}
		if c == nil {
			// PRE_COPY has nothing new now: look again soon, or at once
			// when the device stops.
			if err := m.precopy.idle(ctx); err != nil {
				return err
			}
			continue
		}
		select {
		case queue <- c:
		case <-ctx.Done():
			// Kept for a resend, but no queue holds it.
			c.release()
			return ctx.Err()
		}
	}
	return m.leaveStopCopy(d)
}

// want is how many bytes the device's next chunk may hold: the chunk
// size, what is left of the config state after the data, or 0 for END.
func (d *srcDevice) want(chunkSize uint32) uint64 {
	if !d.atEnd {
		return uint64(chunkSize)
	}
	return uint64(min(d.configLeft(), int(chunkSize)))
}

// configLeft is how many bytes of the config state are still to send.
func (d *srcDevice) configLeft() int {
	if p := d.config.Load(); p != nil {
		return len(*p) - d.configSent
	}
	return 0
}

// readNext reads what comes next in the device's state, which the gate
// admitted at seq and offset for d.want bytes: a DATA chunk, or, at the
// end of the state, END (then d.finished is set, and the caller leaves
// STOP_COPY once END is on its way). The chunk is kept for a resend and
// counted as sent with the gate. Only the device's reader calls it.
func (m *migration) readNext(d *srcDevice, seq, off uint64) (*outChunk, error) {
	if !d.atEnd {
		pool := m.a.cfg.Pool
		bp := pool.Get(int(m.chunkSize))
		// The CRC is computed as the device is read, while the bytes
		// are in cache.
		// A read that starts in PRE_COPY may find nothing new (ENOMSG,
		// or 0 as some drivers answer): that is no end of the state.
		pre := d.inPrecopy.Load()
		n, crc, rerr := chunkwire.ReadCRC32C(d.stream, *bp, chunkwire.DevicePiece)
		eof := errors.Is(rerr, io.EOF) || errors.Is(rerr, io.ErrUnexpectedEOF)
		if pre && (eof || errors.Is(rerr, vfio.ErrNoData)) {
			if n == 0 {
				pool.Put(bp)
				return nil, nil
			}
			rerr, eof = nil, false
		}
		if rerr != nil && !eof {
			pool.Put(bp)
			return nil, deviceapi.Error(d.spec, fmt.Sprintf("read the state at byte %d", off), rerr)
		}
		if n > 0 {
			m.markStart()
			*bp = (*bp)[:n]
			d.digest.Add(off, *bp, crc)
			c := d.chunk()
			c.hdr = ferryv1.ChannelRequest{Device: uint32(d.index), Seq: seq, Offset: off, Kind: ferryv1.ChunkKind_CHUNK_KIND_DATA, Crc32C: crc}
			m.encode(d, c, bp)
			d.keep(c)
			d.gate.Sent(uint64(n))
			d.read.Add(uint64(n))
			d.chunks.Add(1)
			// END follows, under credit of its own.
			d.atEnd = eof
			return c, nil
		}
		// The state ended exactly at a chunk boundary: the config state
		// or END takes this chunk's place.
		pool.Put(bp)
		d.atEnd = true
	}
	if left := d.configLeft(); left > 0 {
		return m.configChunk(d, seq, off, min(left, int(m.chunkSize))), nil
	}
	var configBytes uint64
	if p := d.config.Load(); p != nil {
		configBytes = uint64(len(*p))
	}
	end := d.chunk()
	end.hdr = ferryv1.ChannelRequest{Device: uint32(d.index), Seq: seq, Offset: off, Kind: ferryv1.ChunkKind_CHUNK_KIND_END,
		TotalBytes: off, TotalChunks: seq, Digest: d.digest.Sum(), ConfigBytes: configBytes}
	d.keep(end)
	d.gate.Sent(0)
	d.total.Store(off - configBytes) // the device's state alone, as Bytes counts it
	d.finished = true
	return end, nil
}

// encode gives c its payload, the n bytes read into bp (which it
// takes): where the destination takes zero chunks, as nothing when they
// are all zero and without their zero pages when some are; else
// compressed when the migration compresses and the frame is shorter;
// else as they are. The header's CRC32C stays the bytes'.
func (m *migration) encode(d *srcDevice, c *outChunk, bp *[]byte) {
	pool := m.a.cfg.Pool
	n := len(*bp)
	if m.features.Has(ferryv1.Feature_FEATURE_ZERO_CHUNKS) {
		switch pageMap, zeros := chunkwire.ZeroPages(*bp); {
		case zeros > 0 && zeros*chunkwire.PageSize >= n:
			pool.Put(bp)
			c.hdr.Encoding, c.hdr.Length = ferryv1.ChunkEncoding_CHUNK_ENCODING_ZERO, uint32(n)
			return
		case zeros > 0:
			// The zero pages stay home: the rest travels packed, moved
			// down within the same buffer.
			*bp = chunkwire.PackPages((*bp)[:0], *bp, pageMap)
			c.hdr.Encoding, c.hdr.Length, c.hdr.ZeroPages = ferryv1.ChunkEncoding_CHUNK_ENCODING_ZERO_PAGES, uint32(n), pageMap
			c.payload = mem.NewBuffer(bp, pool)
			d.wireBytes.Add(uint64(len(*bp)))
			return
		}
	}
	if m.compressor != nil && d.comp.try() {
		cb := pool.Get(n)
		out := m.compressor.Compress((*cb)[:0], *bp)
		// Sent compressed only when shorter, and still in the pool's
		// buffer (a frame that outgrew it was reallocated).
		shrank := len(out) > 0 && len(out) < n && &out[0] == &(*cb)[:1][0]
		d.comp.result(shrank)
		if shrank {
			*cb = out
			pool.Put(bp)
			c.payload = mem.NewBuffer(cb, pool)
			c.hdr.Encoding, c.hdr.Length = ferryv1.ChunkEncoding_CHUNK_ENCODING_ZSTD, uint32(n)
			d.wireBytes.Add(uint64(len(out)))
			return
		}
		pool.Put(cb)
	}
	c.payload = mem.NewBuffer(bp, pool)
	d.wireBytes.Add(uint64(n))
}

// compBackoff decides which chunks a compressing migration tries to
// compress: every one while they shrink; after one that did not, the
// next is tried only after skipping 1, then 2, 4, ... up to
// maxCompSkip chunks, so incompressible state (most device state is)
// costs a compression every 64 chunks rather than every chunk. A chunk
// that shrinks resets it. The device's reader alone uses it.
type compBackoff struct {
	skip, skipped int
}

// maxCompSkip bounds the chunks skipped between two tries.
const maxCompSkip = 64

// try reports whether this chunk is to be compressed.
func (b *compBackoff) try() bool {
	if b.skipped < b.skip {
		b.skipped++
		return false
	}
	b.skipped = 0
	return true
}

// result takes whether the chunk tried shrank.
func (b *compBackoff) result(shrank bool) {
	if shrank {
		b.skip = 0
		return
	}
	b.skip = min(max(2*b.skip, 1), maxCompSkip)
}

// configChunk makes the next CONFIG chunk, of n bytes of the device's
// config state, at seq and offset: after the data, in the same stream,
// under the digest like data. The data stream has ended, so STOP_COPY
// is left only once END is on its way, as without config state.
func (m *migration) configChunk(d *srcDevice, seq, off uint64, n int) *outChunk {
	pool := m.a.cfg.Pool
	bp := pool.Get(n)
	*bp = (*bp)[:n]
	copy(*bp, (*d.config.Load())[d.configSent:])
	crc := chunkwire.CRC32C(*bp)
	d.digest.Add(off, *bp, crc)
	c := d.chunk()
	c.payload = mem.NewBuffer(bp, pool)
	c.hdr = ferryv1.ChannelRequest{Device: uint32(d.index), Seq: seq, Offset: off, Kind: ferryv1.ChunkKind_CHUNK_KIND_CONFIG, Crc32C: crc}
	d.wireBytes.Add(uint64(n))
	d.keep(c)
	d.gate.Sent(uint64(n))
	d.configSent += n
	d.chunks.Add(1)
	return c
}

// leaveStopCopy ends a device's STOP_COPY once its whole state is read:
// the data stream closes and the device moves to STOP.
func (m *migration) leaveStopCopy(d *srcDevice) error {
	d.stream.Close()
	d.stream = nil
	if _, err := d.dev.SetState(vfio.StateStop); err != nil {
		return deviceapi.Error(d.spec, "leave STOP_COPY", err)
	}
	return nil
}

func (m *migration) markStart() {
	m.mu.Lock()
	if m.startTime.IsZero() {
		m.startTime = time.Now()
	}
	m.mu.Unlock()
}

// readAll reads every device on a reader goroutine of its own and returns
// the first error, once every reader returned, or, when a device stops
// answering, once every reader of a device that still answers returned:
// the reader blocked in the stuck device's operation is left to end by
// itself (the agent counts it as lingering), and rollback touches none of
// what it holds.
func (m *migration) readAll(ctx context.Context, queue chan<- *outChunk) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	type result struct {
		i   int
		err error
	}
	results := make(chan result, len(m.devs))
	for i, d := range m.devs {
		m.a.lingering.Add(1)
		go func() {
			defer m.a.lingering.Add(-1)
			results <- result{i, m.readDevice(ctx, d, queue)}
		}()
	}
	var first error
	running := make(map[int]bool, len(m.devs))
	for i := range m.devs {
		running[i] = true
	}
	stuck := m.stuck
	for len(running) > 0 {
		if first != nil && m.onlyStuck(running) {
			return first
		}
		select {
		case r := <-results:
			delete(running, r.i)
			if r.err != nil && first == nil {
				first = r.err
				cancel()
			}
		case <-stuck:
			stuck = nil
			if first == nil {
				first = m.stuckError()
			}
			cancel()
		case <-m.stuckMore:
		}
	}
	return first
}

// onlyStuck reports whether every device in running is stuck.
func (m *migration) onlyStuck(running map[int]bool) bool {
	for i := range running {
		if !m.devs[i].isStuck() {
			return false
		}
	}
	return true
}
