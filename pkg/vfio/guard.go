package vfio

import (
	"errors"
	"fmt"
	"io/fs"
	"sync"
	"sync/atomic"
	"time"
)

// DefaultOpTimeout is the device timeout when none is given: how long a
// device operation may take before the device is reported stuck.
const DefaultOpTimeout = 10 * time.Second

// ErrStuck: the device did not answer an operation within the device
// timeout, or an operation was refused because an earlier one has not
// answered yet. Compare with errors.Is.
var ErrStuck = errors.New("device stuck")

// StuckReporter is implemented by devices whose operations run under a
// deadline: the GuardedDevice, which every Registry hands out. A caller
// that waits on a device (a reader blocked in Read, say) selects on Stuck
// beside its own work, and abandons the wait when the device is stuck.
type StuckReporter interface {
	// Stuck returns a channel closed once the device is stuck. When the
	// stuck operation answers at last the mark clears, and later calls
	// return a fresh channel; ask again before each wait.
	Stuck() <-chan struct{}
	// StuckInfo names the operation that has not answered ("SET_STATE to
	// STOP_COPY", "READ at byte 67108864") and when it started, while the
	// device is stuck.
	StuckInfo() (op string, since time.Time, stuck bool)
}

// GuardedDevice wraps a Device so that no operation of it can hold its
// caller beyond the device timeout.
//
// Control operations (SetState, Reset, DataSize, and State when it asks
// the device) run one at a time on a goroutine of the guard; the caller
// waits at most the timeout, then gets an error wrapping ErrStuck that
// names the operation, and the device is marked stuck. Reads and writes
// of its data streams are the hot path: they run on the caller's
// goroutine, untouched but for a few atomic counters, and a watchdog
// goroutine marks the device stuck when one has been in progress for the
// timeout (to within an eighth of it). While the device is stuck every
// operation fails at once with ErrStuck: no second call is started on a
// device that does not answer. State never waits for an operation in
// progress: it returns the state last read or set (and, while stuck, an
// error wrapping ErrStuck beside it). When the stuck operation returns,
// the mark clears and Error records how it ended.
//
// Close never waits either: it closes the wrapped device at once (the
// simulated device ends its hangs, the kernel's device closes its
// descriptors when the ioctl in progress returns) and reports a device
// closed while stuck with an error wrapping ErrStuck.
type GuardedDevice struct {
	dev       Device
	spec      string
	flags     Flags
	timeout   time.Duration
	onUnstuck func()        // called, without mu, each time the stuck mark clears; may be nil
	onState   func(State)   // called, without mu, with each state read or set that differs from the last; may be nil
	quit      chan struct{} // closed by Close: the watchdog returns
	watchDone chan struct{} // closed when the watchdog has returned

	// The data path, lock-free: the stream's caller writes these around
	// each Read and Write, the watchdog reads them.
	dataInflight atomic.Int32  // reads and writes in progress
	dataDone     atomic.Uint64 // reads and writes returned, ever
	dataWrite    atomic.Bool   // the last one to start was a write
	dataOff      atomic.Uint64 // its stream offset
	stuckFlag    atomic.Bool   // stuck (set first, as a claim, by the watchdog; see markDataStuck)

	mu        sync.Mutex
	ctl       *guardOp      // the control operation in progress; nil when none
	ctlStuck  bool          // ctl is past its deadline
	dataStuck bool          // a read or write is past its deadline
	dataSeen  uint64        // dataDone when the watchdog marked it
	dataOp    string        // the stuck read or write, named
	dataSince time.Time     // when the watchdog first saw it in progress
	stuck     bool          // ctlStuck || dataStuck
	stuckCh   chan struct{} // closed while stuck; replaced when the mark clears
	state     State         // last read or set
	size      uint64        // last DataSize answer
	sizeOK    bool
	lastErr   string // the last failed control operation, or how a stuck one ended; "" after a success
	closed    bool
	// settle is what the owner that gave up on the device while it was
	// stuck asked done once it answers (WhenAnswered); nil when nothing.
	settle func(Device)
}

// guardOp is one control operation of a GuardedDevice.
type guardOp struct {
	name  string
	start time.Time
	done  chan struct{} // closed when fn has returned
	// Written by the operation's goroutine before done is closed.
	err    error
	state  State
	size   uint64
	info   PrecopyInfo
	stream DataStream
	// abandoned (under the guard's mu): the caller stopped waiting, so
	// nobody takes stream.
	abandoned bool
}

// Guard wraps dev with the device timeout (DefaultOpTimeout when timeout
// is 0 or less) and starts its watchdog; Close stops it. The guard takes
// over dev: close the guard, not dev.
func Guard(dev Device, timeout time.Duration) *GuardedDevice {
	return newGuard(dev, timeout, nil, nil)
}

func newGuard(dev Device, timeout time.Duration, onUnstuck func(), onState func(State)) *GuardedDevice {
	if timeout <= 0 {
		timeout = DefaultOpTimeout
	}
	g := &GuardedDevice{
		dev: dev, spec: dev.Spec(), flags: dev.Flags(), timeout: timeout, onUnstuck: onUnstuck, onState: onState,
		quit: make(chan struct{}), watchDone: make(chan struct{}), stuckCh: make(chan struct{}),
	}
	go g.watch()
	return g
}

// Spec returns the wrapped device's spec.
func (g *GuardedDevice) Spec() string { return g.spec }

// Flags returns the wrapped device's migration flags.
func (g *GuardedDevice) Flags() Flags { return g.flags }

// Timeout is the device timeout.
func (g *GuardedDevice) Timeout() time.Duration { return g.timeout }

// Stuck returns a channel closed once the device is stuck (see
// StuckReporter).
func (g *GuardedDevice) Stuck() <-chan struct{} {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.stuckCh
}

// StuckInfo names the operation that has not answered and when it
// started, while the device is stuck.
func (g *GuardedDevice) StuckInfo() (op string, since time.Time, stuck bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.stuckInfoLocked()
}

func (g *GuardedDevice) stuckInfoLocked() (string, time.Time, bool) {
	switch {
	case g.ctlStuck:
		return g.ctl.name, g.ctl.start, true
	case g.dataStuck:
		return g.dataOp, g.dataSince, true
	}
	return "", time.Time{}, false
}

// State returns the device's migration state. It asks the device only
// when no other operation is in progress; otherwise it returns the state
// last read or set, at once, with a nil error, or with an error wrapping
// ErrStuck while the device is stuck.
func (g *GuardedDevice) State() (State, error) {
	g.mu.Lock()
	if err := g.refuseLocked("GET_STATE"); err != nil {
		st := g.state
		g.mu.Unlock()
		return st, err
	}
	if g.ctl != nil {
		st := g.state
		g.mu.Unlock()
		return st, nil
	}
	o := g.startLocked("GET_STATE", func(o *guardOp) error {
		s, err := g.dev.State()
		if err == nil {
			g.noteState(s)
		}
		o.state = s
		return err
	})
	g.mu.Unlock()
	if err := g.wait(o); err != nil {
		if errors.Is(err, ErrStuck) {
			return g.cachedState(), err
		}
		return o.state, err
	}
	return o.state, nil
}

// SetState moves the device to target (see Device.SetState) under the
// deadline. A stream the device opens after its caller gave up waiting is
// closed.
func (g *GuardedDevice) SetState(target State) (DataStream, error) {
	o, err := g.do("SET_STATE to "+target.String(), func(o *guardOp) error {
		s, err := g.dev.SetState(target)
		if err != nil {
			g.noteErr(err)
			if st, serr := g.dev.State(); serr == nil {
				g.noteState(st)
			}
			return err
		}
		g.noteState(target)
		g.noteErr(nil)
		o.stream = s
		return nil
	})
	if err != nil {
		return nil, err
	}
	if o.stream == nil {
		return nil, nil
	}
	gs := &guardedStream{g: g, s: o.stream}
	if pi, ok := o.stream.(PrecopyInfoer); ok {
		return &guardedPrecopyStream{guardedStream: gs, pi: pi}, nil
	}
	return gs, nil
}

// DataSize asks the device for its stop-copy size estimate under the
// deadline.
func (g *GuardedDevice) DataSize() (uint64, error) {
	o, err := g.do("DATA_SIZE", func(o *guardOp) error {
		n, err := g.dev.DataSize()
		if err == nil {
			g.mu.Lock()
			g.size, g.sizeOK = n, true
			g.mu.Unlock()
		}
		o.size = n
		return err
	})
	if err != nil {
		return 0, err
	}
	return o.size, nil
}

// Reset resets the device (see Device.Reset) under the deadline.
func (g *GuardedDevice) Reset() error {
	_, err := g.do("RESET", func(*guardOp) error {
		if err := g.dev.Reset(); err != nil {
			g.noteErr(err)
			if st, serr := g.dev.State(); serr == nil {
				g.noteState(st)
			}
			return err
		}
		g.noteState(StateRunning)
		g.noteErr(nil)
		return nil
	})
	return err
}

// Close stops the watchdog and closes the wrapped device without waiting
// for an operation in progress. Closing a stuck device returns an error
// wrapping ErrStuck that names the operation. Idempotent.
func (g *GuardedDevice) Close() error {
	g.mu.Lock()
	if g.closed {
		g.mu.Unlock()
		return nil
	}
	g.closed = true
	close(g.quit)
	op, since, stuck := g.stuckInfoLocked()
	g.mu.Unlock()
	<-g.watchDone
	err := g.dev.Close()
	if stuck {
		return errors.Join(fmt.Errorf("%s: closed while %s had not answered for %v: %w",
			g.spec, op, time.Since(since).Round(time.Millisecond), ErrStuck), err)
	}
	return err
}

// guardInfo is what a GuardedDevice knows without asking the device.
type guardInfo struct {
	state   State
	size    uint64
	sizeOK  bool
	stuck   bool
	err     string // why the device is not usable, or how its last operation failed
	closed  bool
	stuckOp string
}

// info describes the device from what the guard remembers: no call to
// the device, no wait.
func (g *GuardedDevice) info() guardInfo {
	g.mu.Lock()
	defer g.mu.Unlock()
	in := guardInfo{state: g.state, size: g.size, sizeOK: g.sizeOK, err: g.lastErr, closed: g.closed}
	if g.closed {
		in.state, in.err = StateError, "device closed"
	}
	if op, since, stuck := g.stuckInfoLocked(); stuck {
		in.stuck, in.stuckOp = true, op
		in.err = fmt.Sprintf("%s has not answered for %v (device timeout %v)",
			op, time.Since(since).Round(time.Millisecond), g.timeout)
	} else if in.err == "" && in.state == StateError {
		in.err = "device in ERROR: only a reset leaves it"
	}
	return in
}

func (g *GuardedDevice) cachedState() State {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.state
}

func (g *GuardedDevice) noteState(s State) {
	g.mu.Lock()
	changed := g.state != s
	g.state = s
	g.mu.Unlock()
	if changed && g.onState != nil {
		g.onState(s)
	}
}

func (g *GuardedDevice) noteErr(err error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.lastErr = ""
	if err != nil {
		g.lastErr = err.Error()
	}
}

// refuseLocked returns the error for an operation that must not start:
// the guard is closed or the device is stuck. g.mu must be held.
func (g *GuardedDevice) refuseLocked(name string) error {
	if g.closed {
		return fmt.Errorf("%s: %s: %w", g.spec, name, fs.ErrClosed)
	}
	if op, since, stuck := g.stuckInfoLocked(); stuck {
		return fmt.Errorf("%s: %s refused: %s has not answered for %v (device timeout %v): %w",
			g.spec, name, op, time.Since(since).Round(time.Millisecond), g.timeout, ErrStuck)
	}
	return nil
}

// do runs the control operation fn under the deadline, after the one in
// progress (if any) has returned; while the device is stuck it refuses at
// once.
func (g *GuardedDevice) do(name string, fn func(*guardOp) error) (*guardOp, error) {
	g.mu.Lock()
	for g.ctl != nil && !g.stuck && !g.closed {
		done, stuck := g.ctl.done, g.stuckCh
		g.mu.Unlock()
		select {
		case <-done:
		case <-stuck:
		}
		g.mu.Lock()
	}
	if err := g.refuseLocked(name); err != nil {
		g.mu.Unlock()
		return nil, err
	}
	o := g.startLocked(name, fn)
	g.mu.Unlock()
	if err := g.wait(o); err != nil {
		return nil, err
	}
	return o, nil
}

// startLocked starts fn as the control operation in progress, on its own
// goroutine. g.mu must be held and no control operation in progress.
func (g *GuardedDevice) startLocked(name string, fn func(*guardOp) error) *guardOp {
	o := &guardOp{name: name, start: time.Now(), done: make(chan struct{})}
	g.ctl = o
	go g.run(o, fn)
	return o
}

// run runs a control operation to its end, however late, and clears the
// stuck mark it left.
func (g *GuardedDevice) run(o *guardOp, fn func(*guardOp) error) {
	err := fn(o)
	g.mu.Lock()
	o.err = err
	g.ctl = nil
	cleared := false
	if g.ctlStuck {
		g.ctlStuck = false
		end := "answered"
		if err != nil {
			end = "failed: " + err.Error()
		}
		g.lastErr = fmt.Sprintf("%s %s after %v, past the device timeout %v",
			o.name, end, time.Since(o.start).Round(time.Millisecond), g.timeout)
		cleared = g.updateLocked()
	}
	abandoned := o.abandoned
	close(o.done)
	g.mu.Unlock()
	if abandoned && o.stream != nil {
		o.stream.Close()
	}
	if cleared {
		g.answered()
	}
}

// WhenAnswered is how an owner gives up on a stuck device without leaving
// it in whatever state its late answer leaves it: if the device is stuck
// now, settle runs once the stuck operation answers (before the registry
// hears of it), with the guard as its device, and WhenAnswered reports
// true. If the device is not stuck it reports false and the owner settles
// the device itself: the check and the registration are one step, so a
// device that answers at the moment the owner looks is settled by one of
// them, never by neither. A later call replaces an earlier settle.
//
// A source rolls its device back to RUNNING this way, so the VM keeps its
// state; a destination resets its own.
func (g *GuardedDevice) WhenAnswered(settle func(Device)) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if !g.stuck || g.closed {
		return false
	}
	g.settle = settle
	return true
}

// answered follows a stuck mark's clearing: the owner's settle runs
// first, then the registry hears of it, unless the settle left the device
// stuck again (its next answer tells the registry).
func (g *GuardedDevice) answered() {
	g.mu.Lock()
	settle := g.settle
	g.settle = nil
	g.mu.Unlock()
	if settle != nil {
		settle(g)
	}
	g.mu.Lock()
	again := g.stuck
	g.mu.Unlock()
	if !again && g.onUnstuck != nil {
		g.onUnstuck()
	}
}

// wait waits for o until the deadline; past it the device is stuck.
func (g *GuardedDevice) wait(o *guardOp) error {
	t := time.NewTimer(g.timeout)
	defer t.Stop()
	select {
	case <-o.done:
		return o.err
	case <-t.C:
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	select {
	case <-o.done: // answered as the timer fired
		return o.err
	default:
	}
	o.abandoned = true
	g.ctlStuck = true
	g.updateLocked()
	return fmt.Errorf("%s: %s did not answer within %v: %w", g.spec, o.name, g.timeout, ErrStuck)
}

// updateLocked sets stuck from its causes, closing or replacing the
// Stuck channel, and reports whether the mark cleared. g.mu must be held.
func (g *GuardedDevice) updateLocked() (cleared bool) {
	now := g.ctlStuck || g.dataStuck
	switch {
	case now && !g.stuck:
		g.stuck = true
		g.stuckFlag.Store(true)
		close(g.stuckCh)
	case !now && g.stuck:
		g.stuck = false
		g.stuckFlag.Store(false)
		g.stuckCh = make(chan struct{})
		return true
	}
	return false
}

// watchTick is how often the watchdog looks at the data path: a read or
// write is declared stuck between timeout and timeout+tick after it
// started.
func (g *GuardedDevice) watchTick() time.Duration {
	return max(g.timeout/8, time.Millisecond)
}

// watch is the watchdog of the data path. A read or write in progress is
// stuck when no read or write has returned for the timeout: the one that
// was in progress when the watchdog first saw it still is.
func (g *GuardedDevice) watch() {
	defer close(g.watchDone)
	t := time.NewTicker(g.watchTick())
	defer t.Stop()
	var (
		watching bool
		seen     uint64
		seenAt   time.Time
	)
	for {
		var now time.Time
		select {
		case <-g.quit:
			return
		case now = <-t.C:
		}
		n, done := g.dataInflight.Load(), g.dataDone.Load()
		switch {
		case n <= 0 || !watching || done != seen:
			watching, seen, seenAt = n > 0, done, now
		case now.Sub(seenAt) >= g.timeout:
			g.markDataStuck(done, seenAt)
		}
	}
}

// markDataStuck marks the read or write in progress stuck, unless it has
// returned meanwhile. The claim on stuckFlag comes before the second look
// at dataDone, so a read that returns at the same moment either sees the
// flag (and clears the mark in dataExited) or is seen here.
func (g *GuardedDevice) markDataStuck(done uint64, since time.Time) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed || g.dataStuck {
		return
	}
	g.stuckFlag.Store(true)
	if g.dataDone.Load() != done || g.dataInflight.Load() <= 0 {
		g.stuckFlag.Store(g.stuck)
		return
	}
	op := "READ"
	if g.dataWrite.Load() {
		op = "WRITE"
	}
	g.dataStuck, g.dataSeen, g.dataSince = true, done, since
	g.dataOp = fmt.Sprintf("%s at byte %d", op, g.dataOff.Load())
	g.updateLocked()
}

// dataExited clears the mark of a stuck read or write that has returned.
func (g *GuardedDevice) dataExited() {
	g.mu.Lock()
	cleared := false
	if g.dataStuck && (g.dataDone.Load() != g.dataSeen || g.dataInflight.Load() <= 0) {
		g.dataStuck = false
		g.lastErr = fmt.Sprintf("%s returned after %v, past the device timeout %v",
			g.dataOp, time.Since(g.dataSince).Round(time.Millisecond), g.timeout)
		cleared = g.updateLocked()
	}
	g.mu.Unlock()
	if cleared {
		g.answered()
	}
}

// refuse is refuseLocked for the data path.
func (g *GuardedDevice) refuse(name string) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if err := g.refuseLocked(name); err != nil {
		return err
	}
	// The mark cleared since the caller looked.
	return nil
}

// guardedStream is a data stream of a GuardedDevice: its reads and writes
// run on the caller's goroutine, counted for the watchdog.
type guardedStream struct {
	g   *GuardedDevice
	s   DataStream
	pos atomic.Uint64 // bytes read or written through this handle
}

// Read reads the stream on the caller's goroutine; it fails at once with
// ErrStuck while the device is stuck.
func (s *guardedStream) Read(p []byte) (int, error) { return s.transfer(false, p) }

// Write writes the stream on the caller's goroutine; it fails at once
// with ErrStuck while the device is stuck.
func (s *guardedStream) Write(p []byte) (int, error) { return s.transfer(true, p) }

// transfer is a Read or a Write, watched: the watchdog sees it in flight.
func (s *guardedStream) transfer(write bool, p []byte) (int, error) {
	g := s.g
	if g.stuckFlag.Load() {
		op := "READ"
		if write {
			op = "WRITE"
		}
		if err := g.refuse(op); err != nil {
			return 0, err
		}
	}
	g.dataWrite.Store(write)
	g.dataOff.Store(s.pos.Load())
	g.dataInflight.Add(1)
	var n int
	var err error
	if write {
		n, err = s.s.Write(p)
	} else {
		n, err = s.s.Read(p)
	}
	s.pos.Add(uint64(n))
	g.dataInflight.Add(-1)
	g.dataDone.Add(1)
	if g.stuckFlag.Load() {
		g.dataExited()
	}
	return n, err
}

// Close closes the wrapped stream; it never waits for the device.
func (s *guardedStream) Close() error { return s.s.Close() }

// guardedPrecopyStream is a guardedStream over a stream that answers
// PrecopyInfo, so the guarded stream answers it too: a caller that finds
// PrecopyInfoer on the device's stream finds it on the guard's.
type guardedPrecopyStream struct {
	*guardedStream
	pi PrecopyInfoer
}

// PrecopyInfo asks the wrapped stream as a control operation under the
// deadline ("PRECOPY_INFO"): it is an ioctl that may not answer, like a
// SET_STATE, not a transfer, and a caller polls it between reads, so one
// goroutine per call costs nothing that matters. It waits for a control
// operation in progress, and fails at once with ErrStuck while the device
// is stuck.
func (s *guardedPrecopyStream) PrecopyInfo() (PrecopyInfo, error) {
	o, err := s.g.do("PRECOPY_INFO", func(o *guardOp) error {
		info, err := s.pi.PrecopyInfo()
		o.info = info
		return err
	})
	if err != nil {
		return PrecopyInfo{}, err
	}
	return o.info, nil
}
