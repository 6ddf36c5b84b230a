package chunkwire

import (
	"testing"

	"google.golang.org/grpc/mem"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
)

const benchChunk = 1 << 20

// keepPool is a mem.BufferPool whose buffers are never recycled: a
// benchmark wraps the same frame bytes in fresh mem.Buffers every round,
// as gRPC hands over the frames it read, without copying them again.
type keepPool struct{}

func (keepPool) Get(n int) *[]byte { b := make([]byte, n); return &b }
func (keepPool) Put(*[]byte)       {}

// benchFrames encodes a 1 MiB chunk as the codec does and cuts the message
// where gRPC's 16 KiB HTTP/2 frames cut it (the first frame also carried
// gRPC's 5-byte message prefix).
func benchFrames(b *testing.B, c *Codec) [][]byte {
	payload := make([]byte, benchChunk)
	for i := range payload {
		payload[i] = byte(i * 31)
	}
	hdr := &ferryv1.ChannelRequest{Device: 1, Seq: 1234, Offset: 1234 << 20, Kind: ferryv1.ChunkKind_CHUNK_KIND_DATA, Crc32C: CRC32C(payload)}
	out, err := c.Marshal(&OutChunk{Header: hdr, Payload: mem.SliceBuffer(payload)})
	if err != nil {
		b.Fatal(err)
	}
	msg := out.Materialize()
	out.Free()
	var frames [][]byte
	for n := 16<<10 - 5; len(msg) > 0; n = 16 << 10 {
		// Each frame in a 16 KiB buffer of its own, as gRPC reads them.
		k := min(n, len(msg))
		frames = append(frames, append(make([]byte, 0, 16<<10), msg[:k]...))
		msg = msg[k:]
	}
	return frames
}

// BenchmarkCodecMarshal is the source's per-chunk encoding: the header
// with protobuf, the payload beside it as a reference. It must not depend
// on the chunk size (no copy); the one allocation is the BufferSlice that
// gRPC keeps until its writer is done with it.
func BenchmarkCodecMarshal(b *testing.B) {
	pool := NewPool()
	c := NewCodec(pool)
	bp := pool.Get(benchChunk)
	payload := mem.NewBuffer(bp, pool)
	hdr := &ferryv1.ChannelRequest{Device: 1, Seq: 1234, Offset: 1234 << 20, Kind: ferryv1.ChunkKind_CHUNK_KIND_DATA, Crc32C: 0xdeadbeef}
	out := &OutChunk{Header: hdr, Payload: payload}
	b.SetBytes(benchChunk)
	b.ReportAllocs()
	for b.Loop() {
		s, err := c.Marshal(out)
		if err != nil {
			b.Fatal(err)
		}
		s.Free() // what gRPC does once the bytes are written
	}
	payload.Free()
}

// BenchmarkCodecUnmarshal is the destination's per-chunk decoding of a
// 1 MiB chunk that arrived in 16 KiB frames, with the CRC32C that accept
// computes over it.
//
//   - ref: what the codec does: the chunk keeps references to gRPC's
//     frame buffers (InChunk, Payload);
//   - copy: the previous codec, which copied the payload into one pooled
//     buffer first; kept here as the yardstick for ref.
func BenchmarkCodecUnmarshal(b *testing.B) {
	pool := NewPool()
	c := NewCodec(pool)
	frames := benchFrames(b, c)
	bufs := make([]*[]byte, len(frames))
	for i := range frames {
		bufs[i] = &frames[i]
	}
	slice := make(mem.BufferSlice, len(frames))
	in := &InChunk{}
	b.Run("ref", func(b *testing.B) {
		b.SetBytes(benchChunk)
		b.ReportAllocs()
		for b.Loop() {
			for i := range bufs {
				slice[i] = mem.NewBuffer(bufs[i], keepPool{})
			}
			if err := c.Unmarshal(slice, in); err != nil {
				b.Fatal(err)
			}
			slice.Free() // gRPC's own references
			if in.Data.CRC32C() != in.Msg.GetCrc32C() {
				b.Fatal("CRC mismatch")
			}
			in.Data.Free()
		}
	})
	b.Run("copy", func(b *testing.B) {
		b.SetBytes(benchChunk)
		b.ReportAllocs()
		for b.Loop() {
			for i := range bufs {
				slice[i] = mem.NewBuffer(bufs[i], keepPool{})
			}
			if err := c.Unmarshal(slice, in); err != nil {
				b.Fatal(err)
			}
			slice.Free()
			// The previous codec's copy into one contiguous pool buffer.
			buf := pool.Get(in.Data.Len())
			in.Data.Buffers().CopyTo(*buf)
			in.Data.Free()
			if CRC32C(*buf) != in.Msg.GetCrc32C() {
				b.Fatal("CRC mismatch")
			}
			pool.Put(buf)
		}
	})
}

// BenchmarkDigest is the per-chunk cost of the default stream digest,
// which hashes a 16-byte record per chunk, against SHA-256 over the bytes.
func BenchmarkDigest(b *testing.B) {
	data := make([]byte, benchChunk)
	for _, alg := range []ferryv1.DigestAlgorithm{ferryv1.DigestAlgorithm_DIGEST_ALGORITHM_CRC32C_CHAIN, ferryv1.DigestAlgorithm_DIGEST_ALGORITHM_SHA256} {
		b.Run(alg.String(), func(b *testing.B) {
			d, err := NewDigest(alg)
			if err != nil {
				b.Fatal(err)
			}
			b.SetBytes(benchChunk)
			b.ReportAllocs()
			var off uint64
			for b.Loop() {
				d.Add(off, data, 0x12345678)
				off += benchChunk
			}
		})
	}
}
