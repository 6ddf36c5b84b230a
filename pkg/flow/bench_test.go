package flow

import (
	"context"
	"testing"
)

// BenchmarkReassembly measures the destination's per-chunk cost: Accept,
// then Next and Advance. Chunks arrive in swapped pairs (1, 0, 3, 2, ...), so
// every other chunk is held in the ring before it is written.
func BenchmarkReassembly(b *testing.B) {
	const chunk = 64 << 10
	r := NewReassembly[[]byte](Limits{MaxChunks: 16, MaxBytes: 16 * chunk}, chunk)
	payload := make([]byte, chunk)
	b.ReportAllocs()
	var i uint64
	for b.Loop() {
		seq := i ^ 1
		if _, err := r.Accept(Chunk[[]byte]{Seq: seq, Offset: seq * chunk, Len: chunk, Payload: payload}); err != nil {
			b.Fatal(err)
		}
		for {
			_, ok, err := r.Next()
			if err != nil {
				b.Fatal(err)
			}
			if !ok {
				break
			}
			r.Advance()
		}
		i++
	}
}

// BenchmarkGate measures the source's per-chunk cost: Wait, Sent and the
// Update that the destination's window brings back.
func BenchmarkGate(b *testing.B) {
	const chunk = 64 << 10
	ctx := context.Background()

	// open: the window is always ahead, Wait never blocks.
	b.Run("open", func(b *testing.B) {
		g := NewGate(Window{LimitSeq: 16, LimitOffset: 16 * chunk})
		b.ReportAllocs()
		var seq uint64
		for b.Loop() {
			if _, _, err := g.Wait(ctx, chunk); err != nil {
				b.Fatal(err)
			}
			g.Sent(chunk)
			seq++
			g.Update(Window{LimitSeq: seq + 16, LimitOffset: (seq + 16) * chunk})
		}
	})

	// handoff: a one-chunk window, so every Wait blocks until another
	// goroutine's Update: the cost of a stall and its wake-up.
	b.Run("handoff", func(b *testing.B) {
		g := NewGate(Window{LimitSeq: 1, LimitOffset: chunk})
		sent := make(chan uint64, 1)
		done := make(chan struct{})
		go func() {
			defer close(done)
			for seq := range sent {
				g.Update(Window{LimitSeq: seq + 1, LimitOffset: (seq + 1) * chunk})
			}
		}()
		b.ReportAllocs()
		var seq uint64
		for b.Loop() {
			if _, _, err := g.Wait(ctx, chunk); err != nil {
				b.Fatal(err)
			}
			g.Sent(chunk)
			seq++
			sent <- seq
		}
		close(sent)
		<-done
	})
}
