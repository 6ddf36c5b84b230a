package dest

import (
	"fmt"
	"testing"
	"time"

	"google.golang.org/grpc/mem"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/services/wire"
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
	const (
		chunk   = 1 << 20
		nChunks = 64
		size    = nChunks * chunk
	)
	spec := fmt.Sprintf("sim:size=%d,seed=9", size)
	pool := wire.NewPool()
	a := simAgent(b, pool, nChunks, size)

	// The source's side, off the clock: the device's state, cut into
	// chunks, encoded and split into 16 KiB frames as gRPC would.
	s, _ := vfio.ParseSpec(spec)
	src, err := vfio.NewSim(s)
	if err != nil {
		b.Fatal(err)
	}
	rs, err := src.SetState(vfio.StateStopCopy)
	if err != nil {
		b.Fatal(err)
	}
	codec := wire.NewCodec(pool)
	digest, _ := wire.NewDigest(ferryv1.DigestAlgorithm_DIGEST_ALGORITHM_UNSPECIFIED)
	frames := make([][]*[]byte, nChunks)
	state := make([]byte, chunk)
	for i := range frames {
		if _, err := rs.Read(state); err != nil {
			b.Fatal(err)
		}
		crc := wire.CRC32C(state)
		digest.Add(uint64(i*chunk), state, crc)
		out, err := codec.Marshal(&wire.OutChunk{
			Header:  &ferryv1.ChannelRequest{Seq: uint64(i), Offset: uint64(i * chunk), Kind: ferryv1.ChunkKind_CHUNK_KIND_DATA, Crc32C: crc},
			Payload: mem.SliceBuffer(state),
		})
		if err != nil {
			b.Fatal(err)
		}
		msg := out.Materialize()
		out.Free()
		for n := 16<<10 - 5; len(msg) > 0; n = 16 << 10 {
			k := min(n, len(msg))
			f := append(make([]byte, 0, 16<<10), msg[:k]...)
			frames[i] = append(frames[i], &f)
			msg = msg[k:]
		}
	}
	sum := digest.Sum()

	sessions := 0
	open := func() *incoming {
		sessions++
		return openSession(b, a, fmt.Sprintf("bench-%d", sessions), spec, chunk, 1)
	}
	finish := func(inc *incoming) {
		end := &wire.InChunk{}
		end.Msg = ferryv1.ChannelRequest{Seq: nChunks, Offset: size, Kind: ferryv1.ChunkKind_CHUNK_KIND_END, TotalBytes: size, TotalChunks: nChunks, Digest: sum}
		if err := inc.accept(end); err != nil {
			b.Fatal(err)
		}
		<-inc.done
		if err := inc.finalStatus(); err != nil {
			b.Fatal(err)
		}
	}

	inc := open()
	in := &wire.InChunk{}
	slice := make(mem.BufferSlice, len(frames[0]))
	next := 0
	b.SetBytes(chunk)
	b.ReportAllocs()
	for b.Loop() {
		fs := frames[next]
		slice = slice[:len(fs)]
		for i, f := range fs {
			slice[i] = mem.NewBuffer(f, framePool{})
		}
		if err := codec.Unmarshal(slice, in); err != nil {
			b.Fatal(err)
		}
		slice.Free() // gRPC's own references, once RecvMsg returns
		if err := inc.accept(in); err != nil {
			b.Fatal(err)
		}
		if next++; next == nChunks {
			// The loader's last writes count; the verification does not.
			for inc.devs[0].chunks.Load() < nChunks {
				time.Sleep(20 * time.Microsecond)
			}
			b.StopTimer()
			finish(inc)
			inc = open()
			next = 0
			b.StartTimer()
		}
	}
}
