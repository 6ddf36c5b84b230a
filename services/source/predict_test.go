package source

import (
	"math"
	"strings"
	"testing"
	"time"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
)

func TestRemainingOf(t *testing.T) {
	for _, tc := range []struct {
		name       string
		r          sizeReport
		n          uint64
		ok, noSize bool
	}{
		{"info and a larger size take the size", sizeReport{precopy: true, infoOK: true, initial: 10, dirty: 5, sizeOK: true, size: 40}, 40, true, false},
		{"info larger than the size takes the info", sizeReport{precopy: true, infoOK: true, initial: 30, dirty: 20, sizeOK: true, size: 40}, 50, true, false},
		{"info without a size", sizeReport{precopy: true, infoOK: true, initial: 7, dirty: 3}, 10, true, true},
		{"stop-copy device with a size", sizeReport{sizeOK: true, size: 99}, 99, true, false},
		{"stop-copy device without a size", sizeReport{}, 0, false, true},
		{"pre-copy device without info or size", sizeReport{precopy: true}, 0, false, true},
		{"garbage size is no estimate", sizeReport{sizeOK: true, size: math.MaxUint64}, 0, false, true},
		{"garbage size beside good info", sizeReport{precopy: true, infoOK: true, initial: 1, dirty: 1, sizeOK: true, size: maxSaneSize + 1}, 2, true, true},
		{"garbage info falls back to the size", sizeReport{precopy: true, infoOK: true, initial: math.MaxUint64, dirty: 1, sizeOK: true, size: 8}, 8, true, false},
		{"a size of 1 PiB is believed", sizeReport{sizeOK: true, size: maxSaneSize}, maxSaneSize, true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n, ok, noSize := remainingOf(tc.r)
			if n != tc.n || ok != tc.ok || noSize != tc.noSize {
				t.Errorf("remainingOf = %d, %v, %v; want %d, %v, %v", n, ok, noSize, tc.n, tc.ok, tc.noSize)
			}
		})
	}
}

func TestPredict(t *testing.T) {
	const mb = 1_000_000
	fixed := fixedCosts{rtt: time.Millisecond, destStateChange: 2 * time.Millisecond}
	for _, tc := range []struct {
		name       string
		reports    []sizeReport
		throughput float64
		fixed      fixedCosts
		ok         bool
		downtime   time.Duration
		remaining  uint64
		note       string // a part of the note; "" for none
	}{
		{
			name:       "bytes over throughput plus the fixed costs",
			reports:    []sizeReport{{spec: "a", sizeOK: true, size: 100 * mb, stateChangeTime: 5 * time.Millisecond}},
			throughput: 1000 * mb, fixed: fixed, ok: true,
			// 100 ms of bytes; 2×5 ms of stops, 5 ms of the end, 3 ms
			// of round trips, 2 ms at the destination.
			downtime:  100*time.Millisecond + 10*time.Millisecond + 5*time.Millisecond + 3*time.Millisecond + 2*time.Millisecond,
			remaining: 100 * mb,
		},
		{
			name: "stops add up, the end is the slowest device's",
			reports: []sizeReport{
				{spec: "a", sizeOK: true, size: 10 * mb, stateChangeTime: 4 * time.Millisecond},
				{spec: "b", precopy: true, infoOK: true, initial: 0, dirty: 10 * mb, sizeOK: true, size: 1, stateChangeTime: 1 * time.Millisecond},
			},
			throughput: 1000 * mb, ok: true,
			downtime:  20*time.Millisecond + 2*(4+1)*time.Millisecond + 4*time.Millisecond,
			remaining: 20 * mb,
		},
		{
			name:    "nothing left costs the fixed costs alone",
			reports: []sizeReport{{spec: "a", precopy: true, infoOK: true, sizeOK: true, stateChangeTime: time.Millisecond}},
			fixed:   fixed, ok: true,
			downtime: 2*time.Millisecond + time.Millisecond + 3*time.Millisecond + 2*time.Millisecond,
		},
		{
			name:       "a device without an estimate leaves no prediction",
			reports:    []sizeReport{{spec: "a", sizeOK: true, size: mb}, {spec: "sim:b"}},
			throughput: 1000 * mb, note: "no estimate of the state left on sim:b",
			remaining: mb,
		},
		{
			name:    "no throughput yet",
			reports: []sizeReport{{spec: "a", sizeOK: true, size: mb}},
			note:    "no throughput measured yet", remaining: mb,
		},
		{
			name:       "an infinite throughput is none",
			reports:    []sizeReport{{spec: "a", sizeOK: true, size: mb}},
			throughput: math.Inf(1), note: "no throughput measured yet", remaining: mb,
		},
		{
			name:       "NaN throughput is none",
			reports:    []sizeReport{{spec: "a", sizeOK: true, size: mb}},
			throughput: math.NaN(), note: "no throughput measured yet", remaining: mb,
		},
		{
			name:       "a remainder too large to tell",
			reports:    []sizeReport{{spec: "a", sizeOK: true, size: maxSaneSize}, {spec: "b", sizeOK: true, size: maxSaneSize}},
			throughput: 1e-9, note: "longer than can be told", remaining: 2 * maxSaneSize,
		},
		{
			name:       "pre-copy info alone is a prediction, with a note",
			reports:    []sizeReport{{spec: "sim:p", precopy: true, infoOK: true, initial: 50 * mb}},
			throughput: 1000 * mb, ok: true, downtime: 50 * time.Millisecond,
			remaining: 50 * mb, note: "sim:p gave no stop-copy size estimate",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := predict(tc.reports, tc.throughput, tc.fixed)
			if p.ok != tc.ok || p.remaining != tc.remaining {
				t.Fatalf("predict: ok %v remaining %d (%q); want ok %v remaining %d", p.ok, p.remaining, p.note, tc.ok, tc.remaining)
			}
			if tc.ok && p.downtime != tc.downtime {
				t.Errorf("downtime %v, want %v", p.downtime, tc.downtime)
			}
			if tc.note == "" && p.note != "" || !strings.Contains(p.note, tc.note) {
				t.Errorf("note %q, want one with %q", p.note, tc.note)
			}
		})
	}
}

func TestSatAdd(t *testing.T) {
	if got := satAdd(math.MaxUint64-1, 5); got != math.MaxUint64 {
		t.Errorf("satAdd overflowed to %d", got)
	}
	if got := satAdd(2, 3); got != 5 {
		t.Errorf("satAdd(2, 3) = %d", got)
	}
}

func TestRateMeter(t *testing.T) {
	const tick = 100 * time.Millisecond
	var r rateMeter
	if r.throughput() != 0 {
		t.Fatal("a meter that saw nothing has a throughput")
	}
	if _, ok := r.dirtyRate(); ok {
		t.Fatal("a meter that saw nothing has a dirty rate")
	}
	// An idle sample (a reader found its device empty) is no measure of
	// Ferry's speed, but the fastest sample is the fallback.
	r.add(rateSample{dt: tick, bytes: 10_000_000})
	if got := r.throughput(); got != 100e6 {
		t.Fatalf("fallback throughput %v, want the best sample's 1e8", got)
	}
	// Busy samples are what counts, over the last rateWindow only.
	for range 30 {
		r.add(rateSample{dt: tick, bytes: 50_000_000, busy: true})
	}
	for range 20 {
		r.add(rateSample{dt: tick, bytes: 20_000_000, busy: true})
	}
	if got := r.throughput(); got != 200e6 {
		t.Errorf("throughput %v, want the last 2 s's 2e8", got)
	}
	if len(r.busy) != int(rateWindow/tick) {
		t.Errorf("%d busy samples kept, want %d", len(r.busy), rateWindow/tick)
	}
	// A sample of no length is ignored, not divided by.
	r.add(rateSample{dt: 0, bytes: 1 << 40, busy: true, dirtyOK: true, dirtied: 1 << 40})
	if got := r.throughput(); got != 200e6 {
		t.Errorf("a zero-length sample moved the throughput to %v", got)
	}
	if _, ok := r.dirtyRate(); ok {
		t.Error("a zero-length sample gave a dirty rate")
	}
	// The dirty rate counts samples that could tell it.
	r.add(rateSample{dt: tick, dirtied: 3_000_000, dirtyOK: true})
	r.add(rateSample{dt: tick, dirtied: 99_000_000})
	r.add(rateSample{dt: tick, dirtied: 1_000_000, dirtyOK: true})
	if got, ok := r.dirtyRate(); !ok || got != 20e6 {
		t.Errorf("dirty rate %v %v, want 2e7", got, ok)
	}
}

func TestDecide(t *testing.T) {
	limit := &precopy{downtimeLimit: 300 * time.Millisecond}
	failing := &precopy{}
	switching := &precopy{onTimeout: ferryv1.PrecopyTimeoutAction_PRECOPY_TIMEOUT_ACTION_SWITCHOVER}
	fits := prediction{ok: true, downtime: 200 * time.Millisecond}
	long := prediction{ok: true, downtime: time.Second}
	for _, tc := range []struct {
		name                           string
		p                              *precopy
		ready, asked, forced, timedOut bool
		pred                           prediction
		step                           precopyStep
		trigger                        string
	}{
		{"nothing yet", failing, false, false, false, false, fits, stepWait, ""},
		{"ready, not asked, no limit", failing, true, false, false, false, fits, stepWait, ""},
		{"asked before ready waits", failing, false, true, false, false, fits, stepWait, ""},
		{"asked and ready", failing, true, true, false, false, long, stepSwitch, triggerRequested},
		{"forced before ready", failing, false, true, true, false, prediction{}, stepSwitch, triggerForced},
		{"the limit is met", limit, true, false, false, false, fits, stepSwitch, triggerDowntimeLimit},
		{"the limit is met exactly", limit, true, false, false, false, prediction{ok: true, downtime: 300 * time.Millisecond}, stepSwitch, triggerDowntimeLimit},
		{"the limit is not met", limit, true, false, false, false, long, stepWait, ""},
		{"the limit needs READY", limit, false, false, false, false, fits, stepWait, ""},
		{"no prediction never meets the limit", limit, true, false, false, false, prediction{}, stepWait, ""},
		{"timeout fails by default", failing, true, false, false, true, long, stepFail, ""},
		{"timeout before ready fails", failing, false, true, false, true, long, stepFail, ""},
		{"timeout switches over when asked to", switching, false, false, false, true, long, stepSwitch, triggerTimeout},
		{"a met limit wins over the timeout", limit, true, false, false, true, fits, stepSwitch, triggerDowntimeLimit},
	} {
		t.Run(tc.name, func(t *testing.T) {
			step, trigger := decide(tc.p, tc.ready, tc.asked, tc.forced, tc.timedOut, tc.pred)
			if step != tc.step || trigger != tc.trigger {
				t.Errorf("decide = %v %q, want %v %q", step, trigger, tc.step, tc.trigger)
			}
		})
	}
}

func TestRTTTrackerTakesTheSlowestRecent(t *testing.T) {
	var r rttTracker
	if r.slowest() != 0 {
		t.Fatal("a round trip before any sample")
	}
	ms := time.Millisecond
	r.add(2 * ms)
	r.add(1 * ms)
	if got := r.slowest(); got != 2*ms {
		t.Fatalf("slowest %v, want 2ms", got)
	}
	// The slow sample ages out after rttSamples newer ones.
	for range rttSamples {
		r.add(ms / 2)
	}
	if got := r.slowest(); got != ms/2 {
		t.Fatalf("slowest %v after the slow one aged out, want 0.5ms", got)
	}
}
