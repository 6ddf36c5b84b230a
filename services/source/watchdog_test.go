package source

import (
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

// The stall watchdog, on a fake clock: it fires only when chunks are
// outstanding and the destination has been silent for the whole progress
// timeout, never while the destination speaks (however long the stream
// lives), and never after it was stopped. The end-to-end test of a slow,
// healthy migration can only check the outcome; this checks the rule.
func TestWatchdog(t *testing.T) {
	const timeout = time.Second
	cases := []struct {
		name string
		// run drives the stream for a while; fired tells the result.
		run  func(p *progress)
		want bool
	}{
		{"the destination speaks while chunks flow", func(p *progress) {
			for range 40 {
				p.sending(true)
				time.Sleep(timeout / 4)
				p.sending(false)
				p.word()
				time.Sleep(timeout / 4)
			}
		}, false},
		{"nothing outstanding, silent for long", func(p *progress) {
			p.word()
			time.Sleep(10 * timeout)
		}, false},
		{"a send blocked for the timeout", func(p *progress) {
			p.word()
			p.sending(true)
			time.Sleep(timeout + timeout/2)
		}, true},
		{"chunks sent, no word back", func(p *progress) {
			p.sending(true)
			p.sending(false)
			time.Sleep(timeout + timeout/2)
		}, true},
		{"a late word just in time", func(p *progress) {
			p.sending(true)
			p.sending(false)
			time.Sleep(timeout - timeout/10)
			p.word()
			time.Sleep(timeout - timeout/10)
		}, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				var fired atomic.Bool
				p := newProgress()
				dog := newWatchdog(timeout, p, func() { fired.Store(true) })
				tc.run(p)
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
		p := newProgress()
		p.sending(true)
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
