package source

import (
	"log/slog"
	"time"
)

// In flight. The destination's window bounds what a device may have
// unacknowledged (and the source's budget bounds the window, budget.go),
// but the window is sized for memory, not for the path: 64 MiB by
// default. A source that fills it keeps 64 MiB of chunks in flight on a
// path whose round trip needs a few, and reads every new chunk into the
// buffer of a chunk sent a window ago, long out of every cache, while
// the chunks wait in socket buffers as cold. On loopback between two
// cores, the machine quiet, a 16 MiB window ran at 2.76-2.86 GB/s against 2.40-2.53 for 64
// MiB, with the source's CPU per GiB down from 0.37-0.40 to 0.31-0.33,
// and a limit of 16 MiB did as well. A floor of 8 MiB was 3-5% faster
// again in plaintext at 8 channels but 7% slower under TLS at 4, where a
// chunk takes longer at each end and two per connection left them idle
// between window updates (docs/performance.md).
//
// So the source keeps in flight what the path needs, as a TCP sender's
// congestion window does under the receiver's window: twice the
// bandwidth-delay product it measures, at least inflightFloor, at most
// the device's cap. The delay is the shortest acknowledgement round trip
// seen (from a chunk's read to the window update that acknowledges it,
// which includes the destination's write and its feedback batching); the
// bandwidth the fastest the acknowledged frontier moved over an interval
// of at least rateInterval. While the limit holds the source back and
// the path has room, acknowledgements come back as fast as they did with
// less in flight, the measured rate rises, and so does the limit; once
// the path is full, queues lengthen the round trips but not the rate,
// and the limit stays at twice the product. A chunk sent again gives no
// round trip (it is not known which send was acknowledged).
//
// Only a destination that grants FEATURE_PROMPT_FEEDBACK gets a limit
// below its window: it sends a window update every 4 MiB its frontier
// moves (or the chunks in 4 MiB), and a source waiting at its limit,
// which has the floor less one chunk in flight (at least 15 MiB, or
// three chunks), always has three updates' worth or more there. An older
// destination updates every quarter window, which a 16 MiB limit under a
// 64 MiB window would turn into a stop-and-wait; to it the source keeps
// the whole window in flight, as before.

// inflightFloor is the least of a device's stream the source keeps in
// flight (when its window and budget allow as much), and at least
// inflightFloorChunks chunks.
const (
	inflightFloor       = 16 << 20
	inflightFloorChunks = 4
)

// inflightGain is how many bandwidth-delay products the source keeps in
// flight.
const inflightGain = 2

// rateInterval is the shortest interval a bandwidth sample is taken
// over, long enough to span several window updates.
const rateInterval = 20 * time.Millisecond

// inflight estimates a device's path and the bytes to keep in flight on
// it. It is a pure state machine: times come from the caller.
type inflight struct {
	// floor and ceil bound the limit; floor == ceil keeps the limit
	// there (a destination without prompt feedback).
	floor, ceil uint64
	// minRTT is the shortest round trip sampled, 0 before the first.
	minRTT time.Duration
	// maxRate is the fastest the frontier moved, in bytes per second.
	maxRate float64
	// markAt and markOffset start the current bandwidth interval; marked
	// once the first acknowledgement came.
	markAt     time.Duration
	markOffset uint64
	marked     bool
}

// newInflight returns the estimator of a device whose cap is ceil bytes,
// in chunks of chunk bytes; prompt tells whether the destination grants
// FEATURE_PROMPT_FEEDBACK.
func newInflight(ceil, chunk uint64, prompt bool) inflight {
	floor := ceil
	if prompt {
		floor = min(max(inflightFloor, inflightFloorChunks*chunk), ceil)
	}
	return inflight{floor: floor, ceil: ceil}
}

// acked takes an acknowledgement that arrived at now (on any monotonic
// clock the caller keeps) and moved the device's frontier to offset;
// rtt is the round trip of the newest chunk it acknowledged, 0 when that
// chunk was sent more than once.
func (f *inflight) acked(now time.Duration, offset uint64, rtt time.Duration) {
	if rtt > 0 && (f.minRTT == 0 || rtt < f.minRTT) {
		f.minRTT = rtt
	}
	if !f.marked {
		f.markAt, f.markOffset, f.marked = now, offset, true
		return
	}
	if d := now - f.markAt; d >= rateInterval {
		if r := float64(offset-f.markOffset) / d.Seconds(); r > f.maxRate {
			f.maxRate = r
		}
		f.markAt, f.markOffset = now, offset
	}
}

// limit is the bytes to keep in flight: inflightGain bandwidth-delay
// products, within [floor, ceil].
func (f *inflight) limit() uint64 {
	bdp := inflightGain * f.maxRate * f.minRTT.Seconds()
	if bdp >= float64(f.ceil) {
		return f.ceil
	}
	return max(uint64(bdp), f.floor)
}

// path is what the device's path was measured at: the in-flight limit,
// the shortest round trip, the fastest rate (bytes per second).
func (d *srcDevice) path() (limit uint64, rtt time.Duration, rate float64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.flight.limit(), d.flight.minRTT, d.flight.maxRate
}

// logFlight logs what the device's path was measured at, as the
// migration ends.
func (d *srcDevice) logFlight(log *slog.Logger) {
	limit, rtt, rate := d.path()
	log.Info("in flight", "device", d.index, "limit_bytes", limit,
		"min_round_trip", rtt, "path_bytes_per_second", uint64(rate))
}
