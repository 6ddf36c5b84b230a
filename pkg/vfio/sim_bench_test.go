package vfio

import (
	"fmt"
	"testing"
)

// BenchmarkSimVerifyWritePieces is BenchmarkSimVerifyWrite as a Ferry
// destination writes: each 1 MiB chunk in the 16 KiB pieces gRPC received
// it in, 64 writes per op. Against BenchmarkSimVerifyWrite it shows the
// per-write cost of the device (lock, checks, and no clock read when the
// stream is uncapped).
func BenchmarkSimVerifyWritePieces(b *testing.B) {
	const size, chunk, piece = 64 << 20, 1 << 20, 16 << 10
	d := newSim(b, fmt.Sprintf("sim:size=%d,seed=1", size))
	state := make([]byte, size)
	d.content.fill(state, 0)
	ws := setState(b, d, StateResuming)
	off := 0
	b.SetBytes(chunk)
	b.ReportAllocs()
	for b.Loop() {
		if off == size {
			b.StopTimer()
			setState(b, d, StateStop)
			ws = setState(b, d, StateResuming)
			off = 0
			b.StartTimer()
		}
		for p := off; p < off+chunk; p += piece {
			if _, err := ws.Write(state[p : p+piece]); err != nil {
				b.Fatal(err)
			}
		}
		off += chunk
	}
}

// BenchmarkSimContent measures the simulated device's own work per core,
// with the bytes in cache as a Ferry agent has them (the source reads
// and checksums a chunk 64 KiB at a time; the destination verifies a
// chunk it has just received): generating the state, and checking it.
// Both must run at 10 GB/s or more, so that device work, which Ferry and
// raw TCP pay alike, does not hide the transport.
func BenchmarkSimContent(b *testing.B) {
	c := newContent(SimConfig{Seed: 1})
	buf := make([]byte, 256<<10)
	b.Run("generate", func(b *testing.B) {
		b.SetBytes(int64(len(buf)))
		off := uint64(0)
		for b.Loop() {
			c.fill(buf, off)
			off += uint64(len(buf))
		}
	})
	b.Run("verify", func(b *testing.B) {
		c.fill(buf, 0)
		b.SetBytes(int64(len(buf)))
		for b.Loop() {
			if i := c.mismatch(buf, 0); i >= 0 {
				b.Fatalf("mismatch at %d", i)
			}
		}
	})
}
