package source

import (
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/mem"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/flow"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/services/chunkwire"
	"github.com/vfio-ferry/ferry/services/wire"
)

// srcDevice is one source device and its outgoing stream.
type srcDevice struct {
	index   int
	spec    string
	peer    string
	dev     vfio.Device
	release func()
	stream  vfio.DataStream
	gate    *flow.Gate

	read      atomic.Uint64
	wireBytes atomic.Uint64 // of the chunks made, as they travel (after zero chunks and compression)
	chunks    atomic.Uint64
	retrans   atomic.Uint64
	// bwStalls counts the chunks that waited for a bandwidth limit before
	// they were sent, bwStallNanos the time they waited (bandwidth.go).
	bwStalls     atomic.Uint64
	bwStallNanos atomic.Int64
	total        atomic.Uint64 // estimate, then the final size
	errMsg       atomic.Pointer[string]

	// unacked holds the chunks sent but not yet written at the
	// destination, in sequence order; each holds one reference to its
	// payload. A broken channel's chunks can be sent again from here.
	mu      sync.Mutex
	unacked []*outChunk
	// sent is the frontier of the chunks kept in unacked so far.
	sent wire.Frontier
	// ackedSeq is the destination's acknowledged frontier (chunks below
	// it are written there), ackedOffset its byte offset, as the source
	// itself knows them: from the chunks it sent.
	ackedSeq, ackedOffset atomic.Uint64
	// ackMoved is when ackedSeq last moved, in nanoseconds since epoch
	// (the migration's creation, on the monotonic clock; 0: never), which
	// the channels' stall rule reads (stall.go).
	ackMoved atomic.Int64
	epoch    time.Time
	// capBytes and capChunks bound what the source holds for the device
	// beyond the acked frontier, whatever window the destination
	// advertises (budget.go).
	capBytes, capChunks uint64
	// chunkBytes is the migration's chunk size; flight estimates what of
	// the cap to keep in flight (inflight.go, under mu), flightLimit
	// holds its latest limit for clamp.
	chunkBytes  uint64
	flight      inflight
	flightLimit atomic.Uint64
	// free holds acknowledged chunks for the reader to reuse, so a chunk
	// costs no allocation in steady state (at most a window of them).
	free []*outChunk

	// The reading side, the device's reader's alone (see readNext):
	// digest covers what was read; atEnd is set once a read reached the
	// end of the state, so END comes next; finished once END is made.
	digest *chunkwire.Digest
	// precopyDev is set for a device of a pre-copy migration that has
	// PRE_COPY, before its reader starts (atomic: the API reads it);
	// inPrecopy while it is in PRE_COPY(_P2P), so a read that finds
	// nothing new is not the end.
	precopyDev      atomic.Bool
	inPrecopy       atomic.Bool
	atEnd, finished bool
	// config is the VMM's config state of the device (vmm: devices),
	// taken at the switchover (stopDevices); configSent is how much of
	// it the reader has sent, in CONFIG chunks after the data.
	config     atomic.Pointer[[]byte]
	configSent int
	// comp decides which chunks a compressing migration tries (read.go).
	comp compBackoff
	// pc is the device's pre-copy bookkeeping (precopy.go).
	pc devPrecopy
}

// outChunk is a chunk on its way: its header and its payload.
//
// A chunk is referenced by the device's unacked list until the destination
// acknowledges it, and by each queue entry until a sender has passed it to
// gRPC (which takes its own reference to the payload). When the last
// reference goes the payload returns to the pool and the struct to the
// device's free list, so a chunk costs no allocation in steady state and is
// never reused while a resend of it may still be queued.
type outChunk struct {
	hdr     ferryv1.ChannelRequest
	payload mem.Buffer // nil for END
	dev     *srcDevice
	refs    atomic.Int32
	acked   atomic.Bool
	// channel is the channel that last sent the chunk, -1 when none: a
	// lost channel's unacknowledged chunks are sent again.
	channel atomic.Int32
	// readAt is when the chunk was read (since the device's epoch), the
	// start of its round trip; resent is set when it is queued again,
	// and its acknowledgement then gives no round trip. Both under the
	// device's mu.
	readAt time.Duration
	resent bool
}

// release drops one reference.
func (c *outChunk) release() {
	if c.refs.Add(-1) != 0 {
		return
	}
	d := c.dev
	d.mu.Lock()
	d.recycleLocked(c)
	d.mu.Unlock()
}

func (d *srcDevice) recycleLocked(c *outChunk) {
	if c.payload != nil {
		c.payload.Free()
	}
	c.hdr = ferryv1.ChannelRequest{}
	c.payload = nil
	c.acked.Store(false)
	c.channel.Store(-1)
	c.resent = false
	d.free = append(d.free, c)
}

// ack drops the chunks below seq from the unacked list.
func (d *srcDevice) ack(seq uint64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	n := 0
	var rtt time.Duration
	now := time.Since(d.epoch)
	for n < len(d.unacked) && d.unacked[n].hdr.Seq < seq {
		c := d.unacked[n]
		d.ackedSeq.Store(c.hdr.Seq + 1)
		d.ackedOffset.Store(c.hdr.Offset + uint64(c.length()))
		rtt = 0
		if !c.resent {
			rtt = now - c.readAt
		}
		c.acked.Store(true)
		if c.refs.Add(-1) == 0 {
			d.recycleLocked(c)
		}
		n++
	}
	// Move what is left to the front (a window's worth of pointers at
	// most) rather than reslice, so keep's append reuses the array
	// instead of allocating a new one every so many chunks.
	if n > 0 {
		d.ackMoved.Store(int64(now))
		d.flight.acked(now, d.ackedOffset.Load(), rtt)
		d.flightLimit.Store(d.flight.limit())
	}
	left := copy(d.unacked, d.unacked[n:])
	clear(d.unacked[left:])
	d.unacked = d.unacked[:left]
}

// chunk returns an empty outChunk holding two references (the unacked
// list's and the send queue's), a recycled one when there is one.
func (d *srcDevice) chunk() *outChunk {
	d.mu.Lock()
	defer d.mu.Unlock()
	var c *outChunk
	if n := len(d.free); n > 0 {
		c = d.free[n-1]
		d.free[n-1] = nil
		d.free = d.free[:n-1]
	} else {
		c = &outChunk{dev: d}
	}
	c.channel.Store(-1)
	c.refs.Store(2)
	return c
}

// unsent collects the unacknowledged chunks last sent on channel, taking a
// queue reference to each, for a resend.
func (d *srcDevice) unsent(channel int32, dst []*outChunk) []*outChunk {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, c := range d.unacked {
		if c.channel.Load() == channel && !c.acked.Load() {
			c.channel.Store(-1)
			c.resent = true
			c.refs.Add(1)
			dst = append(dst, c)
		}
	}
	return dst
}

// length is the chunk's byte count in the device's stream (0 for END):
// what a zero or compressed chunk declares, else its payload's.
func (c *outChunk) length() int {
	if n := c.hdr.GetLength(); n != 0 {
		return int(n)
	}
	if c.payload == nil {
		return 0
	}
	return c.payload.Len()
}

func (d *srcDevice) keep(c *outChunk) {
	d.mu.Lock()
	c.readAt = time.Since(d.epoch)
	d.unacked = append(d.unacked, c)
	d.sent = wire.Frontier{Seq: c.hdr.Seq + 1, Offset: c.hdr.Offset + uint64(c.length())}
	d.mu.Unlock()
}

// sentFrontier is the frontier of what device i has handed to its
// channels, which an acknowledgement may not pass.
func (m *migration) sentFrontier(i int) wire.Frontier {
	d := m.devs[i]
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.sent
}
