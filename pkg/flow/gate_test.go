package flow

import (
	"context"
	"errors"
	"testing"
	"testing/synctest"
	"time"
)

type waitResult struct {
	seq, offset uint64
	err         error
}

// startWait runs g.Wait in a goroutine of the synctest bubble.
func startWait(ctx context.Context, g *Gate, maxLen uint64) <-chan waitResult {
	ch := make(chan waitResult, 1)
	go func() {
		seq, offset, err := g.Wait(ctx, maxLen)
		ch <- waitResult{seq, offset, err}
	}()
	return ch
}

// stillBlocked fails unless the Wait behind ch is blocked. Call it inside a
// bubble: synctest.Wait returns once every goroutine in it is blocked, so a
// Wait that could return has returned.
func stillBlocked(t *testing.T, ch <-chan waitResult, why string) {
	t.Helper()
	synctest.Wait()
	select {
	case r := <-ch:
		t.Fatalf("%s: Wait returned %+v, want it blocked", why, r)
	default:
	}
}

// returned fails unless the Wait behind ch has returned, and gives its result.
func returned(t *testing.T, ch <-chan waitResult, why string) waitResult {
	t.Helper()
	synctest.Wait()
	select {
	case r := <-ch:
		return r
	default:
		t.Fatalf("%s: Wait still blocked", why)
		return waitResult{}
	}
}

// send is Wait then Sent, for a Wait that must not block.
func send(t *testing.T, g *Gate, maxLen, n uint64) (seq, offset uint64) {
	t.Helper()
	seq, offset, ok, err := g.tryWait(maxLen)
	if !ok || err != nil {
		t.Fatalf("tryWait(%d) = %t, %v; window %v", maxLen, ok, err, g.Window())
	}
	g.Sent(n)
	return seq, offset
}

func TestGateSequence(t *testing.T) {
	g := NewGate(Window{LimitSeq: 8, LimitOffset: 100})
	ctx := t.Context()
	for _, want := range []struct{ seq, offset, n uint64 }{{0, 0, 10}, {1, 10, 3}, {2, 13, 10}, {3, 23, 0}} {
		seq, offset, err := g.Wait(ctx, 10)
		if err != nil || seq != want.seq || offset != want.offset {
			t.Fatalf("Wait = %d, %d, %v; want %d, %d", seq, offset, err, want.seq, want.offset)
		}
		g.Sent(want.n)
	}
	if n, d := g.Stalls(); n != 0 || d != 0 {
		t.Fatalf("Stalls() = %d, %v without blocking", n, d)
	}
}

func TestGateBlocksOnSeq(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := NewGate(Window{LimitSeq: 2, LimitOffset: 100})
		send(t, g, 10, 10)
		send(t, g, 10, 10)
		ch := startWait(t.Context(), g, 10)
		stillBlocked(t, ch, "window of 2 chunks used up")
		g.Update(Window{LimitSeq: 2, LimitOffset: 200})
		stillBlocked(t, ch, "more bytes but no more chunks")
		g.Update(Window{LimitSeq: 3, LimitOffset: 200})
		if r := returned(t, ch, "one more chunk"); r.err != nil || r.seq != 2 || r.offset != 20 {
			t.Fatalf("Wait = %+v, want seq 2 offset 20", r)
		}
	})
}

func TestGateBlocksOnBytes(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := NewGate(Window{LimitSeq: 10, LimitOffset: 25})
		send(t, g, 10, 10)
		send(t, g, 10, 10)
		// 20+10 > 25: a full chunk does not fit, though 5 bytes would.
		ch := startWait(t.Context(), g, 10)
		stillBlocked(t, ch, "5 bytes of window left for a 10-byte chunk")
		g.Update(Window{LimitSeq: 10, LimitOffset: 29})
		stillBlocked(t, ch, "9 bytes of window left")
		g.Update(Window{LimitSeq: 10, LimitOffset: 30})
		if r := returned(t, ch, "10 bytes of window"); r.err != nil || r.seq != 2 || r.offset != 20 {
			t.Fatalf("Wait = %+v, want seq 2 offset 20", r)
		}
	})
}

func TestGateIgnoresStaleUpdates(t *testing.T) {
	g := NewGate(Window{LimitSeq: 5, LimitOffset: 50})
	for _, tt := range []struct {
		update, want Window
	}{
		{Window{3, 30}, Window{5, 50}},   // older in both
		{Window{5, 50}, Window{5, 50}},   // the same again
		{Window{4, 60}, Window{5, 60}},   // each field keeps its maximum
		{Window{6, 40}, Window{6, 60}},   // ...in both directions
		{Window{}, Window{6, 60}},        // zero
		{Window{9, 90}, Window{9, 90}},   // newer
		{Window{7, 70}, Window{9, 90}},   // late
		{Window{10, 90}, Window{10, 90}}, // one field newer
	} {
		g.Update(tt.update)
		if got := g.Window(); got != tt.want {
			t.Fatalf("after Update(%v): Window() = %v, want %v", tt.update, got, tt.want)
		}
	}

	synctest.Test(t, func(t *testing.T) {
		g := NewGate(Window{LimitSeq: 1, LimitOffset: 10})
		send(t, g, 10, 10)
		ch := startWait(t.Context(), g, 10)
		stillBlocked(t, ch, "window used up")
		g.Update(Window{LimitSeq: 1, LimitOffset: 5})
		stillBlocked(t, ch, "stale update")
		g.Update(Window{LimitSeq: 2, LimitOffset: 20})
		if r := returned(t, ch, "fresh update"); r.err != nil || r.seq != 1 || r.offset != 10 {
			t.Fatalf("Wait = %+v, want seq 1 offset 10", r)
		}
	})
}

func TestGateContextCancel(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := NewGate(Window{LimitSeq: 1, LimitOffset: 10})
		send(t, g, 10, 10)
		ctx, cancel := context.WithCancel(t.Context())
		ch := startWait(ctx, g, 10)
		stillBlocked(t, ch, "window used up")
		cancel()
		if r := returned(t, ch, "cancelled"); !errors.Is(r.err, context.Canceled) {
			t.Fatalf("Wait = %+v, want context.Canceled", r)
		}
		mustPanic(t, "Sent after a failed Wait", func() { g.Sent(0) })

		// A done context fails Wait even when the window admits the chunk.
		g.Update(Window{LimitSeq: 2, LimitOffset: 20})
		if _, _, err := g.Wait(ctx, 10); !errors.Is(err, context.Canceled) {
			t.Fatalf("Wait with a cancelled context = %v", err)
		}
		if seq, off, err := g.Wait(t.Context(), 10); err != nil || seq != 1 || off != 10 {
			t.Fatalf("Wait = %d, %d, %v after the cancelled ones; want 1, 10", seq, off, err)
		}
	})
}

func TestGateDeadline(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := NewGate(Window{})
		ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
		defer cancel()
		start := time.Now()
		_, _, err := g.Wait(ctx, 1)
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Wait = %v, want DeadlineExceeded", err)
		}
		if d := time.Since(start); d != 5*time.Second {
			t.Fatalf("Wait took %v, want 5s", d)
		}
		if n, d := g.Stalls(); n != 1 || d != 5*time.Second {
			t.Fatalf("Stalls() = %d, %v; want 1, 5s", n, d)
		}
	})
}

func TestGateClose(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := NewGate(Window{LimitSeq: 1, LimitOffset: 10})
		send(t, g, 10, 10)
		ch := startWait(t.Context(), g, 10)
		stillBlocked(t, ch, "window used up")
		errPeer := errors.New("peer went away")
		g.Close(errPeer)
		if r := returned(t, ch, "closed"); !errors.Is(r.err, errPeer) {
			t.Fatalf("Wait = %+v, want the Close error", r)
		}
		g.Close(errors.New("second close"))
		g.Update(Window{LimitSeq: 100, LimitOffset: 1000})
		if _, _, err := g.Wait(t.Context(), 10); !errors.Is(err, errPeer) {
			t.Fatalf("Wait after Close = %v, want the first Close error", err)
		}
	})

	g := NewGate(Window{LimitSeq: 1, LimitOffset: 10})
	g.Close(nil)
	if _, _, err := g.Wait(t.Context(), 10); !errors.Is(err, ErrClosed) {
		t.Fatalf("Wait after Close(nil) = %v, want ErrClosed", err)
	}
}

func TestGateStalls(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := NewGate(Window{LimitSeq: 1, LimitOffset: 10})
		send(t, g, 10, 10)

		ch := startWait(t.Context(), g, 10)
		stillBlocked(t, ch, "window used up")
		time.Sleep(3 * time.Second) // fake time: the bubble's clock moves on
		if n, d := g.Stalls(); n != 1 || d != 3*time.Second {
			t.Fatalf("Stalls() during a stall = %d, %v; want 1, 3s", n, d)
		}
		// A window that grows but still does not admit the chunk wakes the
		// Wait, which goes back to waiting: still the same stall.
		g.Update(Window{LimitSeq: 2, LimitOffset: 10})
		stillBlocked(t, ch, "seq admitted, bytes not")
		time.Sleep(time.Second)
		g.Update(Window{LimitSeq: 2, LimitOffset: 20})
		returned(t, ch, "window grew")
		g.Sent(10)
		if n, d := g.Stalls(); n != 1 || d != 4*time.Second {
			t.Fatalf("Stalls() = %d, %v; want 1, 4s", n, d)
		}

		// A Wait the window admits at once is not a stall.
		g.Update(Window{LimitSeq: 4, LimitOffset: 30})
		send(t, g, 10, 10)
		if _, _, err := g.Wait(t.Context(), 0); err != nil {
			t.Fatal(err)
		}
		g.Sent(0)
		if n, d := g.Stalls(); n != 1 || d != 4*time.Second {
			t.Fatalf("Stalls() = %d, %v; want 1, 4s", n, d)
		}

		ch = startWait(t.Context(), g, 10)
		stillBlocked(t, ch, "window used up again")
		time.Sleep(2 * time.Second)
		g.Update(Window{LimitSeq: 5, LimitOffset: 50})
		returned(t, ch, "window grew again")
		if n, d := g.Stalls(); n != 2 || d != 6*time.Second {
			t.Fatalf("Stalls() = %d, %v; want 2, 6s", n, d)
		}
	})
}

// A reader that polls sees the same credit and stalls as one that waits,
// and Ready tells it when to poll again.
func TestGatePoll(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := NewGate(Window{LimitSeq: 1, LimitOffset: 10})
		if seq, off, ok, err := g.Poll(10); !ok || err != nil || seq != 0 || off != 0 {
			t.Fatalf("Poll = %d, %d, %t, %v; want 0, 0, admitted", seq, off, ok, err)
		}
		g.Sent(10)
		if n, _ := g.Stalls(); n != 0 {
			t.Fatalf("Stalls() = %d after a Poll that was admitted", n)
		}
		for range 2 {
			if _, _, ok, err := g.Poll(10); ok || err != nil {
				t.Fatalf("Poll on a used-up window = %t, %v; want not admitted", ok, err)
			}
			time.Sleep(time.Second)
		}
		select {
		case <-g.Ready():
			t.Fatal("Ready before the window grew")
		default:
		}
		g.Update(Window{LimitSeq: 2, LimitOffset: 20})
		select {
		case <-g.Ready():
		default:
			t.Fatal("no Ready after the window grew")
		}
		if seq, off, ok, err := g.Poll(10); !ok || err != nil || seq != 1 || off != 10 {
			t.Fatalf("Poll = %d, %d, %t, %v; want 1, 10, admitted", seq, off, ok, err)
		}
		g.Sent(5)
		// Two Polls without credit, two seconds apart: one stall of two seconds.
		if n, d := g.Stalls(); n != 1 || d != 2*time.Second {
			t.Fatalf("Stalls() = %d, %v; want 1, 2s", n, d)
		}
		errPeer := errors.New("peer went away")
		g.Close(errPeer)
		<-g.Ready()
		if _, _, ok, err := g.Poll(10); ok || !errors.Is(err, errPeer) {
			t.Fatalf("Poll after Close = %t, %v; want the Close error", ok, err)
		}
	})
}

func TestGateSentPanics(t *testing.T) {
	g := NewGate(Window{LimitSeq: 10, LimitOffset: 100})
	mustPanic(t, "Sent without Wait", func() { g.Sent(1) })
	if _, _, err := g.Wait(t.Context(), 10); err != nil {
		t.Fatal(err)
	}
	mustPanic(t, "Sent of more than Wait admitted", func() { g.Sent(11) })
	// Waiting again before Sent reserves the same chunk with the new length.
	if seq, off, err := g.Wait(t.Context(), 5); err != nil || seq != 0 || off != 0 {
		t.Fatalf("second Wait = %d, %d, %v", seq, off, err)
	}
	mustPanic(t, "Sent of more than the second Wait admitted", func() { g.Sent(6) })
	g.Sent(5)
	mustPanic(t, "Sent twice", func() { g.Sent(0) })
}

func TestGateNoAllocs(t *testing.T) {
	const chunk = 4096
	g := NewGate(Window{LimitSeq: 4, LimitOffset: 4 * chunk})
	ctx := t.Context()
	var seq uint64
	allocs := testing.AllocsPerRun(1000, func() {
		if _, _, err := g.Wait(ctx, chunk); err != nil {
			panic(err)
		}
		g.Sent(chunk)
		seq++
		g.Update(Window{LimitSeq: seq + 4, LimitOffset: (seq + 4) * chunk})
	})
	if allocs != 0 {
		t.Fatalf("%v allocations per Wait/Sent/Update, want 0", allocs)
	}
}
