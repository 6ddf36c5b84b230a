package source

import (
	"fmt"
	"math"
	"strings"
	"time"
)

// The downtime prediction of a pre-copy migration (docs/design.md): what
// the VM would wait for if the devices stopped now,
//
//	remaining bytes / throughput + fixed costs.
//
// The remaining bytes of a device with PRE_COPY are what its last
// VFIO_MIG_GET_PRECOPY_INFO reported (initial_bytes + dirty_bytes), or its
// MIG_DATA_SIZE when that is larger: the uAPI defines both as what an
// immediate STOP_COPY would return, so they are the same quantity, and the
// larger is the safe one to take (a sum would count it twice). A device
// without PRE_COPY has only MIG_DATA_SIZE. The kernel's reports may be
// wrong: an answer over maxSaneSize, or a failed one, is no estimate, the
// sums saturate, and a device with no estimate at all leaves the
// migration without a prediction, so no downtime limit is ever met on a
// guess (QEMU assumes 100 GiB then, to the same end).
//
// The throughput is measured over the last seconds in which the channels
// were busy: a sample in which a pre-copy reader found nothing new to send
// says how fast the device dirties, not how fast Ferry sends, and is left
// out. The fixed costs are measured too: the state changes of the stop
// (each source device's, as its PRE_COPY entry took), the round trips
// inside the downtime (the last chunks' acknowledgement, Finish and
// Commit; each the slowest recent round trip, see rttTracker), and the
// destination's RESUMING->STOP (as its RESUMING entry took).

// maxSaneSize is the largest size report taken at its word: 1 PiB.
const maxSaneSize = 1 << 50

// sizeReport is one device's report of what remains to be sent.
type sizeReport struct {
	spec string
	// precopy: the device streams in PRE_COPY, and info (when infoOK) is
	// its last VFIO_MIG_GET_PRECOPY_INFO.
	precopy         bool
	infoOK          bool
	initial, dirty  uint64
	sizeOK          bool
	size            uint64 // MIG_DATA_SIZE
	stateChangeTime time.Duration
}

// fixedCosts are the measured costs of a switchover beyond the bytes.
type fixedCosts struct {
	rtt             time.Duration // the control connection's round trip
	destStateChange time.Duration // the destination's slowest RESUMING entry
}

// prediction is the predicted downtime and what it rests on.
type prediction struct {
	ok        bool // a prediction could be made
	downtime  time.Duration
	remaining uint64
	// noSize lists the devices that gave no usable size estimate.
	noSize []string
	note   string
}

// remainingOf is what device r still has to send, and whether it said.
func remainingOf(r sizeReport) (n uint64, ok bool, noSize bool) {
	sizeOK := r.sizeOK && r.size <= maxSaneSize
	if r.precopy && r.infoOK && r.initial <= maxSaneSize && r.dirty <= maxSaneSize {
		n = r.initial + r.dirty
		if sizeOK {
			n = max(n, r.size)
		}
		return n, true, !sizeOK
	}
	if sizeOK {
		return r.size, true, false
	}
	return 0, false, true
}

// predict is the downtime if the devices stopped now, given each device's
// report, the busy throughput in bytes per second (0 when none was
// measured) and the fixed costs.
func predict(reports []sizeReport, throughput float64, fixed fixedCosts) prediction {
	var p prediction
	var unknown []string
	var stops, slowest time.Duration
	for _, r := range reports {
		n, ok, noSize := remainingOf(r)
		if noSize {
			p.noSize = append(p.noSize, r.spec)
		}
		if !ok {
			unknown = append(unknown, r.spec)
			continue
		}
		p.remaining = satAdd(p.remaining, n)
		// The stop: two state changes per device, one after the other
		// (PRE_COPY_P2P or RUNNING_P2P, then STOP_COPY); the end: each
		// device's STOP_COPY->STOP, on its own reader.
		stops += 2 * r.stateChangeTime
		slowest = max(slowest, r.stateChangeTime)
	}
	switch {
	case len(unknown) > 0:
		p.note = fmt.Sprintf("no estimate of the state left on %s", strings.Join(unknown, ", "))
		return p
	case p.remaining > 0 && !(throughput > 0) || math.IsInf(throughput, 0):
		p.note = "no throughput measured yet"
		return p
	}
	fixedTime := stops + slowest + 3*fixed.rtt + fixed.destStateChange
	var transfer time.Duration
	if p.remaining > 0 {
		secs := float64(p.remaining) / throughput
		if secs >= float64(math.MaxInt64/int64(time.Second)) {
			p.note = "the state left would take longer than can be told"
			return p
		}
		transfer = time.Duration(secs * float64(time.Second))
	}
	p.ok, p.downtime = true, fixedTime+transfer
	if len(p.noSize) > 0 {
		p.note = fmt.Sprintf("%s gave no stop-copy size estimate: counted from the pre-copy info alone", strings.Join(p.noSize, ", "))
	}
	return p
}

func satAdd(a, b uint64) uint64 {
	if a > math.MaxUint64-b {
		return math.MaxUint64
	}
	return a + b
}

// rttSamples is how many recent round trips the prediction looks at.
const rttSamples = 8

// rttTracker keeps the recent round trips of the control connection.
// The switchover's control steps (the last chunks' delivery, Finish,
// Commit) each happen once, and each may land on a slow moment of a
// busy host: the prediction takes the slowest of the recent round
// trips, not the last one, which on a 2-core host spreads by a factor of
// two from one sample to the next.
type rttTracker struct {
	recent [rttSamples]time.Duration
	n      int // samples taken, ever
}

func (r *rttTracker) add(d time.Duration) {
	r.recent[r.n%rttSamples] = d
	r.n++
}

// slowest is the slowest of the recent round trips; 0 before any.
func (r *rttTracker) slowest() time.Duration {
	var m time.Duration
	for _, d := range r.recent[:min(r.n, rttSamples)] {
		m = max(m, d)
	}
	return m
}

// rateWindow is how much busy time the throughput is measured over.
const rateWindow = 2 * time.Second

// rateSample is one sampling interval of a pre-copy migration.
type rateSample struct {
	dt    time.Duration
	bytes uint64 // read from the devices in it
	// busy: no pre-copy reader found its device empty in it, so the
	// bytes moved as fast as Ferry could send them.
	busy bool
	// dirtied is the bytes the devices produced in it beyond their
	// initial data; dirtyOK when that could be told (every pre-copy
	// device answered its info, and none reinitialised).
	dirtied uint64
	dirtyOK bool
}

// rateMeter keeps the recent samples: the busy throughput and the dirty
// rate come from them.
type rateMeter struct {
	busy, dirty []rateSample // newest last, each within rateWindow
	best        float64      // the fastest sample ever, busy or not
}

func (r *rateMeter) add(s rateSample) {
	if s.dt <= 0 {
		return
	}
	if rate := float64(s.bytes) / s.dt.Seconds(); rate > r.best {
		r.best = rate
	}
	if s.busy && s.bytes > 0 {
		r.busy = keepWindow(append(r.busy, s))
	}
	if s.dirtyOK {
		r.dirty = keepWindow(append(r.dirty, s))
	}
}

// keepWindow drops the oldest samples beyond rateWindow of time.
func keepWindow(s []rateSample) []rateSample {
	var total time.Duration
	for i := len(s) - 1; i >= 0; i-- {
		total += s[i].dt
		if total >= rateWindow {
			return append(s[:0], s[i:]...)
		}
	}
	return s
}

// throughput is the bytes per second of the recent busy samples; with
// none, the fastest sample seen, a lower bound of what Ferry can send; 0
// when nothing was ever sent.
func (r *rateMeter) throughput() float64 {
	var b uint64
	var t time.Duration
	for _, s := range r.busy {
		b, t = b+s.bytes, t+s.dt
	}
	if t > 0 {
		return float64(b) / t.Seconds()
	}
	return r.best
}

// dirtyRate is the bytes per second the devices dirtied recently, and
// whether it could be told.
func (r *rateMeter) dirtyRate() (float64, bool) {
	var b uint64
	var t time.Duration
	for _, s := range r.dirty {
		b, t = satAdd(b, s.dirtied), t+s.dt
	}
	if t <= 0 {
		return 0, false
	}
	return float64(b) / t.Seconds(), true
}
