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
