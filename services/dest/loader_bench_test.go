package dest

import (
	"fmt"
	"runtime/debug"
	"testing"
	"time"

	"google.golang.org/grpc/mem"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/services/chunkwire"
)

// framePool is a mem.BufferPool that never recycles: the benchmark wraps
// the same frame bytes in fresh mem.Buffers every round, as gRPC hands
// over the frames it read.
type framePool struct{}

func (framePool) Get(n int) *[]byte { b := make([]byte, n); return &b }
func (framePool) Put(*[]byte)       {}

// BenchmarkAcceptLoad is the destination's per-chunk path after gRPC has
// read a chunk's frames: the codec's Unmarshal (references, no copy),
// accept (validation, CRC32C, reassembly) and the device write (in 16
// KiB pieces, and the digest), both on the channel's goroutine since its
// chunks arrive in order, into a simulated device that checks every
// byte. One op is one 1 MiB chunk; every 64 chunks the device's stream is
// complete and verified and a new session starts, off the clock. A
// session's last op waits for the loader to verify END.
func BenchmarkAcceptLoad(b *testing.B) {
	r := newAcceptRig(b)
	b.SetBytes(rigChunk)
	b.ReportAllocs()
	for b.Loop() {
		r.chunk()
		if r.next == rigChunks {
			// The loader's last writes count; the verification does not.
			for r.inc.devs[0].chunks.Load() < rigChunks {
				time.Sleep(20 * time.Microsecond)
			}
			b.StopTimer()
			r.renew()
			b.StartTimer()
		}
	}
}

// TestAcceptLoadDoesNotAllocate holds BenchmarkAcceptLoad's path to no
// allocation per chunk in steady state. The race detector makes sync.Pool
// drop buffers on purpose, so `make unit` runs it again without.
func TestAcceptLoadDoesNotAllocate(t *testing.T) {
	if raceEnabled {
		t.Skip("sync.Pool drops buffers under the race detector")
	}
	r := newAcceptRig(t)
	r.chunk() // the pools fill
	// AllocsPerRun runs once more first: 63 of the session's 64 chunks.
	// A collection empties the buffer pools (sync.Pool keeps its items
	// through one GC, not two), and refilling them is the pool's cost, not
	// the path's: measure with the collector off.
	defer debug.SetGCPercent(debug.SetGCPercent(-1))
	if n := testing.AllocsPerRun(rigChunks-3, r.chunk); n != 0 {
		t.Errorf("%v allocations per chunk accepted and written, want 0", n)
	}
}

const (
	rigChunk  = 1 << 20
	rigChunks = 64
	rigSize   = rigChunks * rigChunk
)

// acceptRig feeds a session the chunks of a simulated device's state,
// encoded and cut into 16 KiB frames as gRPC would have read them.
type acceptRig struct {
	tb       testing.TB
	a        *Agent
	spec     string
	codec    *chunkwire.Codec
	frames   [][]*[]byte
	sum      []byte
	sessions int
	inc      *incoming
	in       *chunkwire.InChunk
	slice    mem.BufferSlice
	next     int
}

func newAcceptRig(tb testing.TB) *acceptRig {
	spec := fmt.Sprintf("sim:size=%d,seed=9", rigSize)
	pool := chunkwire.NewPool()
	r := &acceptRig{tb: tb, a: simAgent(tb, pool, rigChunks, rigSize), spec: spec, codec: chunkwire.NewCodec(pool), in: &chunkwire.InChunk{}}
	state := stateOf(tb, spec)
	digest, _ := chunkwire.NewDigest(ferryv1.DigestAlgorithm_DIGEST_ALGORITHM_UNSPECIFIED)
	r.frames = make([][]*[]byte, rigChunks)
	for i := range r.frames {
		b := state[i*rigChunk : (i+1)*rigChunk]
		crc := chunkwire.CRC32C(b)
		digest.Add(uint64(i*rigChunk), b, crc)
		out, err := r.codec.Marshal(&chunkwire.OutChunk{
			Header:  &ferryv1.ChannelRequest{Seq: uint64(i), Offset: uint64(i * rigChunk), Kind: ferryv1.ChunkKind_CHUNK_KIND_DATA, Crc32C: crc},
			Payload: mem.SliceBuffer(b),
		})
		if err != nil {
			tb.Fatal(err)
		}
		msg := out.Materialize()
		out.Free()
		for n := 16<<10 - 5; len(msg) > 0; n = 16 << 10 {
			k := min(n, len(msg))
			f := append(make([]byte, 0, 16<<10), msg[:k]...)
			r.frames[i] = append(r.frames[i], &f)
			msg = msg[k:]
		}
	}
	r.sum = digest.Sum()
	r.slice = make(mem.BufferSlice, len(r.frames[0]))
	r.open()
	return r
}

func (r *acceptRig) open() {
	r.sessions++
	r.inc = openSession(r.tb, r.a, fmt.Sprintf("bench-%d", r.sessions), r.spec, rigChunk, 1)
	r.next = 0
}

// chunk decodes the session's next chunk as gRPC hands it over and
// accepts it.
func (r *acceptRig) chunk() {
	fs := r.frames[r.next]
	r.slice = r.slice[:len(fs)]
	for i, f := range fs {
		r.slice[i] = mem.NewBuffer(f, framePool{})
	}
	if err := r.codec.Unmarshal(r.slice, r.in); err != nil {
		r.tb.Fatal(err)
	}
	r.slice.Free() // gRPC's own references, once RecvMsg returns
	if err := r.inc.accept(r.in); err != nil {
		r.tb.Fatal(err)
	}
	r.next++
}

// renew ends the session with END, waits for its verdict and opens the
// next.
func (r *acceptRig) renew() {
	end := &chunkwire.InChunk{}
	end.Msg = ferryv1.ChannelRequest{Seq: rigChunks, Offset: rigSize, Kind: ferryv1.ChunkKind_CHUNK_KIND_END, TotalBytes: rigSize, TotalChunks: rigChunks, Digest: r.sum}
	if err := r.inc.accept(end); err != nil {
		r.tb.Fatal(err)
	}
	<-r.inc.verifiedCh
	if err := r.inc.commit(); err != nil {
		r.tb.Fatal(err)
	}
	<-r.inc.done
	r.open()
}
