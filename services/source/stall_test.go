package source

import (
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

// fakeAcks is one device's acknowledgements, moved by the test, with
// times since epoch.
type fakeAcks struct {
	epoch time.Time
	next  atomic.Uint64
	moved atomic.Int64
}

func newFakeAcks() *fakeAcks { return &fakeAcks{epoch: time.Now()} }

func (a *fakeAcks) read(int) (uint64, int64) { return a.next.Load(), a.moved.Load() }

// ack acknowledges the chunks below next.
func (a *fakeAcks) ack(next uint64) {
	a.next.Store(next)
	a.moved.Store(int64(time.Since(a.epoch)))
}

// The stall rule, on a fake clock: a stream is stalled when a send has
// not returned for the progress timeout with the destination silent, or
// when a chunk it sent is unacknowledged and its device's
// acknowledgements have not moved for the timeout; never while they move
// (however slowly, however long the stream lives), never when nothing is
// owed, and never after the watchdog was stopped. The end-to-end test of
// a slow, healthy migration can only check the outcome; this checks the
// rule.
func TestWatchdog(t *testing.T) {
	const timeout = time.Second
	cases := []struct {
		name string
		// run drives the stream for a while; fired tells the result.
		run  func(p *progress, a *fakeAcks)
		want bool
	}{
		{"each chunk acknowledged while chunks flow", func(p *progress, a *fakeAcks) {
			for seq := range uint64(40) {
				p.sending()
				time.Sleep(timeout / 4)
				p.sentChunk(0, seq, true)
				p.word()
				time.Sleep(timeout / 4)
				a.ack(seq + 1)
			}
		}, false},
		{"a slow device: acknowledgements move, this stream's chunk waits its turn", func(p *progress, a *fakeAcks) {
			p.sending()
			p.sentChunk(0, 20, true)
			for next := range uint64(21) {
				time.Sleep(timeout / 2)
				a.ack(next)
				p.word()
			}
		}, false},
		{"nothing owed, silent for long", func(p *progress, a *fakeAcks) {
			p.word()
			time.Sleep(10 * timeout)
		}, false},
		{"everything sent acknowledged, then silence", func(p *progress, a *fakeAcks) {
			p.sending()
			p.sentChunk(0, 3, true)
			a.ack(4)
			time.Sleep(10 * timeout)
		}, false},
		{"a send blocked for the timeout", func(p *progress, a *fakeAcks) {
			p.word()
			p.sending()
			time.Sleep(timeout + timeout/2)
		}, true},
		{"a chunk sent, never acknowledged", func(p *progress, a *fakeAcks) {
			p.sending()
			p.sentChunk(0, 0, true)
			time.Sleep(timeout + timeout/2)
		}, true},
		// The soak's wedge: the chunk went into a connection that stalled,
		// and the destination kept speaking on the stream (other chunks
		// were written) until the window filled; then nothing moved.
		{"words come, but the chunk is never acknowledged", func(p *progress, a *fakeAcks) {
			p.sending()
			p.sentChunk(0, 5, true)
			for next := range uint64(5) {
				time.Sleep(timeout / 10)
				a.ack(next)
				p.word()
			}
			for range 20 {
				time.Sleep(timeout / 4)
				p.word()
			}
		}, true},
		{"a late acknowledgement just in time", func(p *progress, a *fakeAcks) {
			p.sending()
			p.sentChunk(0, 0, true)
			time.Sleep(timeout - timeout/10)
			a.ack(1)
			time.Sleep(timeout - timeout/10)
		}, false},
		{"a failed send owes nothing", func(p *progress, a *fakeAcks) {
			p.sending()
			p.sentChunk(0, 0, false)
			time.Sleep(10 * timeout)
		}, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				var fired atomic.Bool
				a := newFakeAcks()
				p := newProgress(a.epoch, 1, a.read)
				dog := newWatchdog(timeout, p, func() { fired.Store(true) })
				tc.run(p, a)
				synctest.Wait()
				if got := fired.Load(); got != tc.want {
					t.Errorf("fired %v, want %v", got, tc.want)
				}
				dog.stop()
			})
		})
	}
}

// A stopped watchdog neither fires nor re-arms, even when its timer was
// due as it stopped.
func TestWatchdogStopped(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var fired atomic.Bool
		a := newFakeAcks()
		p := newProgress(a.epoch, 1, a.read)
		p.sending()
		dog := newWatchdog(time.Second, p, func() { fired.Store(true) })
		time.Sleep(time.Second / 2)
		dog.stop()
		time.Sleep(10 * time.Second)
		synctest.Wait()
		if fired.Load() {
			t.Error("a stopped watchdog fired")
		}
	})
}
