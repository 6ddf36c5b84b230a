package source

import (
	"fmt"
	"runtime/debug"
	"testing"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/flow"
)

// BenchmarkReadDevice is the source's per-chunk path up to the channels'
// queue: window credit, the read from a simulated device straight into a
// pooled buffer, CRC32C, digest, the unacked store; and, on a second
// goroutine standing in for the channels and the destination, the
// sender's release, the acknowledgement that frees the chunk and the
// window update that grants the next. One op is one 1 MiB chunk. In steady state it allocates
// nothing: buffers come back to the pool and chunks to the device's free
// list when acknowledged.
func BenchmarkReadDevice(b *testing.B) {
	const chunk, window = 1 << 20, 64
	m, d := readingDevice(b, fmt.Sprintf("sim:size=%d,seed=3", uint64(b.N)*chunk), chunk,
		flow.Window{LimitSeq: window, LimitOffset: window * chunk})
	queue := make(chan *outChunk, window+1)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for c := range queue {
			next := c.hdr.Seq + 1
			end := c.hdr.Kind == ferryv1.ChunkKind_CHUNK_KIND_END
			c.release() // a sender's, once gRPC has the chunk
			d.ack(next)
			d.gate.Update(flow.Window{LimitSeq: next + window, LimitOffset: (next + window) * chunk})
			if end {
				return
			}
		}
	}()
	b.SetBytes(chunk)
	b.ReportAllocs()
	b.ResetTimer()
	if err := m.readDevice(b.Context(), d, queue); err != nil {
		b.Fatal(err)
	}
	<-done
}

// TestReadNextDoesNotAllocate holds the source's per-chunk path (credit,
// the device read into a pooled buffer, CRC32C, digest, the unacked
// store, the sender's release, the acknowledgement and the window update)
// to no allocation per chunk in steady state. The race detector makes
// sync.Pool drop buffers on purpose, so `make unit` runs it again without.
func TestReadNextDoesNotAllocate(t *testing.T) {
	if raceEnabled {
		t.Skip("sync.Pool drops buffers under the race detector")
	}
	const chunk, window, chunks = 1 << 20, 8, 64
	m, d := readingDevice(t, fmt.Sprintf("sim:size=%d,seed=6", chunks*chunk), chunk, flow.Window{LimitSeq: window, LimitOffset: window * chunk})
	step := func() {
		seq, off, ok, err := d.gate.Poll(d.want(chunk))
		if !ok || err != nil {
			t.Fatalf("no credit for chunk %d: %v", seq, err)
		}
		c, err := m.readNext(d, seq, off)
		if err != nil {
			t.Fatal(err)
		}
		c.release() // the sender's, once the chunk is written
		d.ack(seq + 1)
		d.gate.Update(flow.Window{LimitSeq: seq + 1 + window, LimitOffset: (seq + 1 + window) * chunk})
	}
	step() // the pool and the free list fill
	// A collection empties the buffer pools (sync.Pool keeps its items
	// through one GC, not two), and refilling them is the pool's cost, not
	// the path's: measure with the collector off.
	defer debug.SetGCPercent(debug.SetGCPercent(-1))
	if n := testing.AllocsPerRun(chunks-3, step); n != 0 {
		t.Errorf("%v allocations per chunk read, want 0", n)
	}
}
