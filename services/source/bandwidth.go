package source

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"
	"google.golang.org/grpc/codes"

	"github.com/vfio-ferry/ferry/services/telemetry"
	"github.com/vfio-ferry/ferry/services/wire"
)

// Bandwidth limits. A migration's senders put each chunk's payload
// through two token buckets before it reaches a socket (a Channel
// message or a direct data connection): the migration's own, at its
// max_bandwidth, and the agent's node-wide one, at Config.MaxBandwidth,
// which every outgoing migration shares. Either may be unlimited. The
// buckets count bytes as sent, resends included, so the limit is what the
// link sees; the channels share their migration's bucket, so the limit
// holds over all of them together (QEMU's multifd channels each took the
// whole cap).
//
// A sender that finds too few tokens waits, and that wait is a bandwidth
// stall, counted per device apart from the window stalls (which are the
// destination's back-pressure, not the operator's cap). A limit changed
// while senders wait (SetBandwidth) wakes them: their reservations are
// given back and taken again at the new rate, so lifting a limit takes
// effect at once, not after the waits the old rate set.

// MinBandwidth is the lowest limit a migration or an agent takes, in
// bytes per second: below it a migration of any size would outlast every
// deadline.
const MinBandwidth = 1_000_000

// limiterBurstTime is how much of the rate a bucket holds: the most a
// sender may send at once above the rate after an idle spell.
const limiterBurstTime = 10 * time.Millisecond

// minLimiterBurst is the smallest bucket, in bytes.
const minLimiterBurst = 64 << 10

// bandwidthLimit is one token bucket over bytes, with the limit in force
// and what passed through it. Safe for concurrent use.
type bandwidthLimit struct {
	lim *rate.Limiter

	mu sync.Mutex
	// bps is the limit in force, 0 for none; changed is closed and
	// replaced each time it changes, to wake the waiters.
	bps     uint64
	changed chan struct{}

	// bytes counts the bytes admitted; stalls the admissions that waited
	// and stallNanos the time they waited.
	bytes, stalls atomic.Uint64
	stallNanos    atomic.Int64
}

func newBandwidthLimit(bps uint64) *bandwidthLimit {
	b := &bandwidthLimit{lim: rate.NewLimiter(rate.Inf, minLimiterBurst), changed: make(chan struct{})}
	b.set(bps)
	return b
}

// set changes the limit (0: none) and wakes the senders waiting on it.
func (b *bandwidthLimit) set(bps uint64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if bps == 0 {
		b.lim.SetLimit(rate.Inf)
	} else {
		b.lim.SetBurst(burstOf(bps))
		b.lim.SetLimit(rate.Limit(bps))
	}
	b.bps = bps
	close(b.changed)
	b.changed = make(chan struct{})
}

// burstOf is the bucket size at bps bytes per second.
func burstOf(bps uint64) int {
	return int(max(bps*uint64(limiterBurstTime)/uint64(time.Second), minLimiterBurst))
}

// limit is the limit in force, 0 for none.
func (b *bandwidthLimit) limit() uint64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.bps
}

// wait admits n bytes: it returns once the bucket had their tokens, or
// with ctx's error. It returns how long it waited (0 when the tokens were
// there). A payload larger than the bucket is admitted a bucketful at a
// time; when ctx ends, the piece being waited for gives its tokens back
// (those of the pieces before it were spent).
func (b *bandwidthLimit) wait(ctx context.Context, n int) (time.Duration, error) {
	if n <= 0 {
		return 0, nil
	}
	if b.limit() == 0 {
		return 0, nil // no limit: no clock read, no reservation per chunk
	}
	var waited time.Duration
	total := n
	for n > 0 {
		b.mu.Lock()
		changed, piece := b.changed, min(n, b.lim.Burst())
		b.mu.Unlock()
		now := time.Now()
		r := b.lim.ReserveN(now, piece)
		delay := r.DelayFrom(now)
		if !r.OK() {
			// Only a bucket of no size refuses: take it as unlimited.
			delay = 0
		}
		if delay > 0 {
			t := time.NewTimer(delay)
			select {
			case <-ctx.Done():
				t.Stop()
				r.Cancel()
				return 0, ctx.Err()
			case <-changed:
				// The limit changed: give the tokens back and take them
				// again at the new rate.
				t.Stop()
				r.Cancel()
				waited += time.Since(now)
				continue
			case <-t.C:
			}
			waited += time.Since(now)
		}
		n -= piece
	}
	b.bytes.Add(uint64(total))
	if waited > 0 {
		b.stalls.Add(1)
		b.stallNanos.Add(int64(waited))
	}
	return waited, nil
}

// validateBandwidth checks a max_bandwidth: 0 or at least MinBandwidth.
func validateBandwidth(field string, bps uint64) error {
	if bps != 0 && bps < MinBandwidth {
		return wire.Errorf(codes.InvalidArgument, wire.ReasonInvalidArgument, "%s %d B/s is below the least limit of %d B/s (0 lifts the limit)", field, bps, MinBandwidth)
	}
	return nil
}

// throttle admits a chunk's payload through the migration's and the
// agent's bandwidth limits before it is sent, and counts a wait on either
// as a bandwidth stall of the chunk's device.
func (m *migration) throttle(ctx context.Context, ch *outChunk) error {
	n := 0
	if ch.payload != nil {
		n = ch.payload.Len()
	}
	if n == 0 {
		return nil
	}
	var waited time.Duration
	stalled := false
	for _, l := range [...]*bandwidthLimit{m.bandwidth, m.a.nodeBandwidth} {
		d, err := l.wait(ctx, n)
		if err != nil {
			return err
		}
		if d > 0 {
			stalled = true
			waited += d
		}
	}
	m.limitedBytes.Add(uint64(n))
	if stalled {
		ch.dev.bwStalls.Add(1)
		ch.dev.bwStallNanos.Add(int64(waited))
	}
	return nil
}

// bandwidthCap is the lower of the limits in force, 0 when neither is
// set: no throughput above it can be expected.
func (m *migration) bandwidthCap() uint64 {
	own, node := m.bandwidth.limit(), m.a.nodeBandwidth.limit()
	switch {
	case own == 0:
		return node
	case node == 0:
		return own
	}
	return min(own, node)
}

// capThroughput bounds a measured throughput by the bandwidth limit in
// force (0: none). Just after a limit was lowered the measurement still
// holds the old rate: a downtime predicted from it would be too short.
func capThroughput(measured float64, limit uint64) float64 {
	if limit > 0 && measured > float64(limit) {
		return float64(limit)
	}
	return measured
}

// NodeBandwidth is the agent's node-wide bandwidth limit, for the metrics.
func (a *Agent) NodeBandwidth() telemetry.NodeBandwidth {
	b := a.nodeBandwidth
	return telemetry.NodeBandwidth{Limit: b.limit, Bytes: b.bytes.Load, Stalls: b.stalls.Load}
}
