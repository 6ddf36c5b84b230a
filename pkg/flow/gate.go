package flow

import (
	"context"
	"fmt"
	"sync"
	"time"
)

// Gate is the source's side of one device's stream: it holds the newest
// window the destination advertised and makes the device's reader wait for
// credit before it reads the next chunk.
//
// Two kinds of goroutine use it:
//   - the device's reader, alone, calls Wait (or Poll, watching Ready) then
//     Sent for each chunk, in sequence order (END included); the reader
//     may change from chunk to chunk (the channel senders of a one-device
//     migration take turns), but only one reads at a time;
//   - any goroutine (the channels' receivers) calls Update with the windows
//     the destination sends, in whatever order they arrive, and the owner of
//     the stream calls Close to give up.
//
// Because the reader waits before it reads, a full window stops the reads
// themselves: the source holds no more of the device's data than the window
// allows, and a device whose window is full never takes a place in the
// channels' send queue that another device could use.
type Gate struct {
	// wake carries one wake-up from Update or Close to a Wait that is about
	// to block or blocked. It is 1-buffered, so a wake-up sent between Wait's
	// check and its select is kept, and extra ones are dropped: Wait
	// re-checks the window after every wake-up anyway.
	wake chan struct{}

	mu sync.Mutex
	// w is the newest window: each field the largest any Update has given.
	w Window
	// err is set once, by Close; then every Wait fails with it.
	err error
	// seq and offset are the next chunk the reader will send; Sent advances
	// them.
	seq, offset uint64
	// reserved is set by a successful Wait and cleared by Sent; maxLen is
	// the length that Wait admitted, which Sent must not exceed.
	reserved bool
	maxLen   uint64
	// stalls counts the Waits that had to block, stalled adds up the time
	// they spent blocked; stalling is set while one is blocked, since
	// stallStart. Written by Wait, read by Stalls.
	stalls     uint64
	stalled    time.Duration
	stalling   bool
	stallStart time.Time
}

// NewGate returns a Gate for a stream starting at seq 0, offset 0, under the
// initial window w (from the session's handshake).
func NewGate(w Window) *Gate {
	return &Gate{wake: make(chan struct{}, 1), w: w}
}

// Wait blocks until the current window admits the next chunk with up to
// maxLen bytes, and returns that chunk's seq and offset. The reader then
// reads at most maxLen bytes from the device and calls Sent with the number
// it read (0 for the END marker, which is admitted with any maxLen that was).
//
// maxLen must be at most the destination's MaxBytes (the chunk size, which
// Limits.Validate checks against MaxBytes), or no window will ever admit it.
//
// Wait returns ctx.Err() once ctx is done, and the Close error once the gate
// is closed, even if the window would admit the chunk. Calling Wait again
// before Sent reserves the same chunk again, with the new maxLen.
func (g *Gate) Wait(ctx context.Context, maxLen uint64) (seq, offset uint64, err error) {
	done := ctx.Done()
	g.mu.Lock()
	for {
		var ok bool
		seq, offset, ok, err = g.pollLocked(maxLen, ctx.Err())
		if ok || err != nil {
			g.mu.Unlock()
			return seq, offset, err
		}
		g.mu.Unlock()
		select {
		case <-done:
		case <-g.wake:
		}
		g.mu.Lock()
	}
}

// Poll is Wait without blocking, for a reader that has other things to
// watch while it waits for credit: ok is false when the window does not
// admit the chunk now, and Ready then tells when to Poll again. From a
// Poll that finds no credit to the Poll that gets it counts as one stall,
// as a Wait that blocks does. Poll returns the Close error once the gate
// is closed.
func (g *Gate) Poll(maxLen uint64) (seq, offset uint64, ok bool, err error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.pollLocked(maxLen, nil)
}

// pollLocked reserves the next chunk if the window admits it, unless stop
// (a Wait's ended context) says to give up, and keeps the stall count: a
// stall starts when the window first turns a reader away and ends when it
// admits one, or the reader gives up.
func (g *Gate) pollLocked(maxLen uint64, stop error) (seq, offset uint64, ok bool, err error) {
	if err = stop; err == nil {
		seq, offset, ok, err = g.reserveLocked(maxLen)
	}
	switch {
	case ok || err != nil:
		g.endStallLocked()
	case !g.stalling:
		g.stalls++
		g.stalling, g.stallStart = true, time.Now()
	}
	return seq, offset, ok, err
}

// Ready receives a wake-up after the window grew or the gate closed: then
// Poll may admit what it did not. It is the channel a blocked Wait waits
// on, so only the device's reader may receive from it.
func (g *Gate) Ready() <-chan struct{} { return g.wake }

// tryWait is Wait without blocking: ok is false if the window does not admit
// the chunk now. The step-driven simulation in the tests uses it.
func (g *Gate) tryWait(maxLen uint64) (seq, offset uint64, ok bool, err error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.reserveLocked(maxLen)
}

func (g *Gate) reserveLocked(maxLen uint64) (seq, offset uint64, ok bool, err error) {
	if g.err != nil {
		return 0, 0, false, g.err
	}
	if !g.w.Admits(g.seq, g.offset, maxLen) {
		return 0, 0, false, nil
	}
	g.reserved, g.maxLen = true, maxLen
	return g.seq, g.offset, true, nil
}

func (g *Gate) endStallLocked() {
	if g.stalling {
		g.stalled += time.Since(g.stallStart)
		g.stalling = false
	}
}

// Sent records that the chunk the last Wait admitted was read with n bytes
// (0 for END) and handed to the channels: the next chunk is seq+1 at
// offset+n. It panics without a preceding successful Wait or if n exceeds
// the maxLen that Wait admitted: both are bugs in the reader.
func (g *Gate) Sent(n uint64) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if !g.reserved {
		panic("flow: Gate.Sent without a successful Wait")
	}
	if n > g.maxLen {
		panic(fmt.Sprintf("flow: Gate.Sent(%d) exceeds the %d bytes Wait admitted", n, g.maxLen))
	}
	g.reserved = false
	g.seq++
	g.offset += n
}

// Update applies a window from the destination. Windows may arrive late and
// out of order over the N channels; since a destination's windows only grow,
// Update keeps the larger of the old and new value of each field, so a stale
// window changes nothing. If the window grew, a blocked Wait wakes up.
func (g *Gate) Update(w Window) {
	g.mu.Lock()
	grew := false
	if w.LimitSeq > g.w.LimitSeq {
		g.w.LimitSeq, grew = w.LimitSeq, true
	}
	if w.LimitOffset > g.w.LimitOffset {
		g.w.LimitOffset, grew = w.LimitOffset, true
	}
	g.mu.Unlock()
	if grew {
		g.signal()
	}
}

// Close fails a blocked Wait and every later one with err (ErrClosed if err
// is nil). Only the first Close counts; later ones change nothing.
func (g *Gate) Close(err error) {
	if err == nil {
		err = ErrClosed
	}
	g.mu.Lock()
	if g.err == nil {
		g.err = err
	}
	g.mu.Unlock()
	g.signal()
}

func (g *Gate) signal() {
	select {
	case g.wake <- struct{}{}:
	default:
	}
}

// Window returns the newest window the gate has.
func (g *Gate) Window() Window {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.w
}

// Stalls returns how many Waits had to block for credit, and the total time
// they spent blocked, including the time so far of a Wait blocked now. A
// device that stalls often is limited by its window (or the destination's
// writes), not by its reads or the network.
func (g *Gate) Stalls() (count uint64, d time.Duration) {
	g.mu.Lock()
	defer g.mu.Unlock()
	d = g.stalled
	if g.stalling {
		d += time.Since(g.stallStart)
	}
	return g.stalls, d
}
