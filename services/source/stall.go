package source

import (
	"sync"
	"sync/atomic"
	"time"
)

// A channel's stream is stalled when the destination stops taking what
// was sent on it: a connection that passes no bytes and sends no FIN (a
// dead peer behind a NAT, a partition, a proxy that froze) breaks
// nothing by itself, so the source must tell it from a slow destination
// and re-dial it, which sends its unacknowledged chunks again.
//
// The rule, on each stream:
//
//   - a send that has not returned for the progress timeout, while the
//     destination said nothing on the stream for as long, is a stall (the
//     write blocked on a connection that stopped draining);
//   - a chunk sent on the stream and not yet acknowledged is a stall once
//     its device's acknowledgements have not moved for the progress
//     timeout since it was sent.
//
// The second is about acknowledgements, not words. The destination
// speaks on every stream whenever a device's frontier moves, so a word on
// the stream says nothing about the chunks the stream carried: with
// direct data they travel on a connection of their own, and a chunk
// stuck in it left the stream hearing the other channels' progress until
// the window filled, and then nothing, with no send outstanding: no
// channel re-dialled and the migration waited out its switchover
// deadline (the soak found it with a 3-chunk window over 3 channels). A
// slow destination device still moves its frontier at least every chunk
// it writes, and the destination reports that within feedbackMaxDelay,
// so a slow, healthy stream is never taken for a stalled one.

// acksOf is what the stall rule reads of a device: the acknowledged
// frontier (chunks below next are acknowledged) and when it last moved
// (nanoseconds since the progress's epoch; 0: never).
type acksOf func(dev int) (next uint64, movedAt int64)

// progress is one stream's record for the stall rule. Times are
// nanoseconds since epoch, on the monotonic clock.
type progress struct {
	epoch time.Time
	acks  acksOf
	// lastWord is when the destination last spoke on the stream;
	// busySince when a send last began with none in progress.
	lastWord, busySince atomic.Int64
	inFlight            atomic.Int32 // sends in progress
	// sent holds, per device, the highest sequence number the stream
	// sent plus one (0: none) and when that send returned.
	sent []sentMark
}

type sentMark struct {
	seq atomic.Uint64
	at  atomic.Int64
}

// newProgress returns the record of a stream of a migration of devices
// devices, whose acknowledgements acks reads, with times since epoch.
func newProgress(epoch time.Time, devices int, acks acksOf) *progress {
	p := &progress{epoch: epoch, acks: acks, sent: make([]sentMark, devices)}
	p.lastWord.Store(p.now())
	return p
}

func (p *progress) now() int64 { return int64(time.Since(p.epoch)) }

// sending marks a send's start.
func (p *progress) sending() {
	if p.inFlight.Add(1) == 1 {
		p.busySince.Store(p.now())
	}
}

// sentChunk marks the end of the send of device dev's chunk seq; ok says
// it was sent whole.
func (p *progress) sentChunk(dev int, seq uint64, ok bool) {
	if ok && dev >= 0 && dev < len(p.sent) {
		m := &p.sent[dev]
		if seq+1 > m.seq.Load() {
			m.seq.Store(seq + 1)
		}
		m.at.Store(p.now())
	}
	p.inFlight.Add(-1)
}

// word records that the destination spoke on the stream.
func (p *progress) word() { p.lastWord.Store(p.now()) }

// silence is how long the stream has gone without progress by the rule
// above; 0 when it owes nothing.
func (p *progress) silence() time.Duration {
	now := p.now()
	var quiet int64
	if p.inFlight.Load() > 0 {
		quiet = now - max(p.lastWord.Load(), p.busySince.Load())
	}
	for dev := range p.sent {
		m := &p.sent[dev]
		seq := m.seq.Load()
		if seq == 0 {
			continue
		}
		next, moved := p.acks(dev)
		if seq <= next {
			continue // all of it acknowledged
		}
		quiet = max(quiet, now-max(m.at.Load(), moved))
	}
	return time.Duration(quiet)
}

// watchdog calls stalled once when a stream's progress shows it stalled
// for the timeout. stop ends it; after stop returns it neither fires nor
// re-arms (a timer re-armed from its own callback could otherwise outlive
// the stream).
type watchdog struct {
	mu      sync.Mutex
	t       *time.Timer
	stopped bool
}

func newWatchdog(timeout time.Duration, prog *progress, stalled func()) *watchdog {
	w := &watchdog{}
	w.mu.Lock()
	defer w.mu.Unlock()
	w.t = time.AfterFunc(timeout, func() {
		w.mu.Lock()
		defer w.mu.Unlock()
		if w.stopped {
			return
		}
		silent := prog.silence()
		if silent >= timeout {
			w.stopped = true
			stalled()
			return
		}
		w.t.Reset(timeout - silent)
	})
	return w
}

func (w *watchdog) stop() {
	w.mu.Lock()
	w.stopped = true
	w.t.Stop()
	w.mu.Unlock()
}

// acksOf reads device dev's acknowledgements for the stall rule.
func (m *migration) acksOf(dev int) (next uint64, movedAt int64) {
	d := m.devs[dev]
	return d.ackedSeq.Load(), d.ackMoved.Load()
}
