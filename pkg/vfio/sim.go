package vfio

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math"
	"sync"
	"time"
)

// Errors of the simulated device. Compare with errors.Is.
var (
	// ErrInjectedFault: a read reached the offset of a fault injected with
	// "fault=" (the kernel would answer EIO), or an arc or a reset failed
	// as "fail=" asked.
	ErrInjectedFault = errors.New("injected I/O fault")
	// ErrStreamTooLong: a write would take the resuming stream past the
	// size of the device's state; nothing of it was accepted (the
	// kernel's ENOMEM).
	ErrStreamTooLong = errors.New("stream longer than the device state")
)

const (
	// simPageSize is the unit of the zero fraction: a page is all zero or
	// all generated.
	simPageSize = 4096
	// paceStep is the most data a paced read or write step carries, in
	// time at the capped rate, and the longest single sleep, so a stream
	// that ends stops its sleepers within a step.
	paceStep = 10 * time.Millisecond
	// gamma is splitmix64's increment (2^64 / golden ratio).
	gamma = 0x9e3779b97f4a7c15
)

// SimDevice is the simulated migration-capable device described by a sim:
// spec (see SimConfig and the package documentation). It is as strict as a
// kernel driver: the kernel's state machine and data-stream rules apply,
// and a resuming device checks every byte written to it against its own
// state. All methods are safe for concurrent use.
type SimDevice struct {
	// Immutable after NewSim.
	spec    Spec
	name    string // canonical spec
	content content
	done    chan struct{} // closed by Close: ends every hang

	mu       sync.Mutex // guards the fields below
	state    State
	closed   bool
	stream   *simStream // open session: non-nil exactly in STOP_COPY, RESUMING, PRE_COPY(_P2P)
	resume   *simStream // current or last resuming session, for Written
	verified bool       // last RESUMING -> STOP verified; cleared by a new resume or a reset
	// arcHook, when set (by tests), is called under mu for every single
	// arc the device completes.
	arcHook func(from, to State)
}

// NewSim returns a simulated device in RUNNING, the state a device is in
// when it is opened.
func NewSim(s Spec) (*SimDevice, error) {
	if s.Kind != SpecSim {
		return nil, fmt.Errorf("new sim %q: not a sim spec: %w", s, ErrBadSpec)
	}
	if err := s.Sim.validate(); err != nil {
		return nil, fmt.Errorf("new sim %q: %v: %w", s, err, ErrBadSpec)
	}
	return &SimDevice{
		spec:    s,
		name:    s.String(),
		content: newContent(s.Sim),
		done:    make(chan struct{}),
		state:   StateRunning,
	}, nil
}

// Spec returns the canonical spec of the device.
func (d *SimDevice) Spec() string { return d.name }

// Flags returns the migration flags of the spec ("flags=").
func (d *SimDevice) Flags() Flags { return d.spec.Sim.Flags }

// State returns the device's current migration state.
func (d *SimDevice) State() (State, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return StateError, d.errClosed()
	}
	return d.state, nil
}

// DataSize answers MIG_DATA_SIZE: what an immediate STOP_COPY would
// return. That is the spec's "size", but while a pre-copy saving session
// is open what it has not yet sent (see recSaver.remaining). With
// "datasize=none" it fails with ErrNotSupported, as a kernel without the
// feature.
func (d *SimDevice) DataSize() (uint64, error) {
	if d.spec.Sim.NoDataSize {
		return 0, fmt.Errorf("%s: MIG_DATA_SIZE: %w", d.name, ErrNotSupported)
	}
	d.mu.Lock()
	s := d.stream
	d.mu.Unlock()
	if s != nil && !s.resume {
		s.mu.Lock()
		defer s.mu.Unlock()
		if s.saver != nil && !s.ended {
			return s.saver.remaining(), nil
		}
	}
	return d.spec.Sim.Size, nil
}

// SetState walks the kernel's arcs from the current state to target, one
// at a time (see Path). An impossible target, ERROR at either end and the
// blocked STOP_COPY -> PRE_COPY(_P2P) fail with ErrInvalidTransition and
// leave the state alone. STOP -> STOP_COPY, STOP -> RESUMING and, with the
// precopy flag, RUNNING(_P2P) -> PRE_COPY(_P2P) open a new stream, which is
// returned when it is the last arc (it always is). Leaving the saving or
// resuming states ends the stream. RESUMING -> STOP verifies what was
// written: on a mismatch or a short stream it fails with ErrVerify and the
// device stays in RESUMING, its stream still open, until a Reset.
func (d *SimDevice) SetState(target State) (DataStream, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil, d.errClosed()
	}
	path, err := Path(d.spec.Sim.Flags, d.state, target)
	if err != nil {
		return nil, fmt.Errorf("%s: set state: %w", d.name, err)
	}
	var opened *simStream
	for _, next := range path {
		if h := d.spec.Sim.Hang; h.Op == HangState && h.State == next {
			// Hang without the lock, so that Close (and State) still can
			// take it.
			d.mu.Unlock()
			<-d.done
			d.mu.Lock()
			return nil, fmt.Errorf("%s: set state %v -> %v: hung until closed: %w", d.name, d.state, next, fs.ErrClosed)
		}
		if opened, err = d.arc(next); err != nil {
			return nil, err
		}
	}
	if opened == nil {
		return nil, nil // no typed nil in the interface
	}
	return opened, nil
}

// arc executes the single arc from the current state to next and returns
// the stream it opens, if any. On error the state is unchanged.
func (d *SimDevice) arc(next State) (*simStream, error) {
	from := d.state
	if cfg := &d.spec.Sim; cfg.FailArc && next == cfg.FailState {
		d.endStream()
		d.state, d.verified = StateError, false
		return nil, fmt.Errorf("%s: set state %v -> %v: injected failure, device now in ERROR: %w",
			d.name, from, next, ErrInjectedFault)
	}
	var opened *simStream
	switch {
	case from == StateResuming && next == StateStop:
		if err := d.stream.verifyAndEnd(); err != nil {
			return nil, err
		}
		d.stream, d.verified = nil, true
	case EndsStream(from, next):
		d.endStream()
	case OpensStream(from, next):
		opened = newSimStream(d, next)
		d.stream = opened
		if next == StateResuming {
			d.resume, d.verified = opened, false
		}
	case next == StateStopCopy:
		// PRE_COPY(_P2P) -> STOP_COPY: the same stream carries on with
		// the stop-copy data.
		d.stream.stopCopy()
	}
	d.state = next
	if d.arcHook != nil {
		d.arcHook(from, next)
	}
	return opened, nil
}

// Reset moves the device from any state to RUNNING and ends its stream, as
// VFIO_DEVICE_RESET does. The state a resume loaded is gone: Verified
// becomes false.
func (d *SimDevice) Reset() error {
	if d.spec.Sim.Hang.Op == HangReset {
		<-d.done
		return fmt.Errorf("%s: reset: hung until closed: %w", d.name, fs.ErrClosed)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return d.errClosed()
	}
	if d.spec.Sim.FailReset {
		return fmt.Errorf("%s: reset: injected failure, device still in %v: %w", d.name, d.state, ErrInjectedFault)
	}
	d.endStream()
	d.state, d.verified = StateRunning, false
	return nil
}

// Close ends the device's stream, ends every hang ("hang=") and releases
// the device; later calls other than Close, Spec, Flags and DataSize fail.
// It never waits for a hung operation. Idempotent.
func (d *SimDevice) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.endStream()
	if !d.closed {
		close(d.done)
	}
	d.closed = true
	return nil
}

// Written returns the number of bytes the current or last resuming stream
// accepted.
func (d *SimDevice) Written() uint64 {
	d.mu.Lock()
	s := d.resume
	d.mu.Unlock()
	if s == nil {
		return 0
	}
	return s.written()
}

// Verified reports whether the last RESUMING -> STOP succeeded, so the
// device holds exactly its own state, loaded from a stream. Entering
// RESUMING again or a Reset clears it.
func (d *SimDevice) Verified() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.verified
}

// endStream ends the open stream, if any. d.mu must be held.
func (d *SimDevice) endStream() {
	if d.stream != nil {
		d.stream.end()
		d.stream = nil
	}
}

func (d *SimDevice) errClosed() error {
	return fmt.Errorf("%s: %w", d.name, fs.ErrClosed)
}

// simStream is one data-stream session of a SimDevice: the saving stream
// opened by STOP -> STOP_COPY or RUNNING(_P2P) -> PRE_COPY(_P2P), or the
// resuming stream opened by STOP -> RESUMING. It holds no lock of the
// device; the device ends it under its own.
type simStream struct {
	dev    *SimDevice // for its immutable spec, name and content only
	resume bool       // a resuming (write-only) stream; else saving (read-only)

	mu         sync.Mutex // guards the fields below
	precopy    bool       // saving stream still in PRE_COPY(_P2P): no data now
	ended      bool       // the session ended (the kernel's ENODEV)
	closed     bool       // the caller closed this handle
	pos        uint64     // bytes read or accepted so far
	mismatched bool       // a written byte differed from the device's state
	mismatchAt uint64     // offset of the first such byte
	pace       pacer      // rate cap of this stream's direction
	// With flags including precopy the stream carries records (see
	// sim_precopy.go): saver produces a saving stream's, loader applies a
	// resuming stream's. Both nil otherwise: the raw state.
	saver  *recSaver
	loader *recLoader
}

func newSimStream(d *SimDevice, state State) *simStream {
	s := &simStream{dev: d, resume: state == StateResuming}
	s.precopy = state == StatePreCopy || state == StatePreCopyP2P
	s.pace.rate = d.spec.Sim.ReadRate
	if s.resume {
		s.pace.rate = d.spec.Sim.WriteRate
	}
	if d.spec.Sim.Flags&FlagPreCopy != 0 {
		if s.resume {
			s.loader = newRecLoader(d)
		} else {
			s.saver = newRecSaver(d)
			s.saver.run(s.precopy)
		}
	}
	return s
}

// Read reads the device state in STOP_COPY: the content from offset 0 to
// the size, then io.EOF forever. With flags including precopy the stream
// carries records instead (see sim_precopy.go), and in PRE_COPY(_P2P) a
// read with nothing new fails with ErrNoData (the kernel's ENOMSG); the
// stream carries on in STOP_COPY. With a rate cap a read carries at most paceStep's worth
// of data and returns when the cap allows it. At an injected fault the
// read that would cross it stops short, and every later read fails with
// ErrInjectedFault.
func (s *simStream) Read(p []byte) (int, error) {
	n, due, err := s.readStep(p)
	if err == errHang {
		return 0, s.hang("read")
	}
	if n > 0 {
		s.sleepUntil(due)
	}
	return n, err
}

// readStep produces the next bytes of the stream under the lock and
// returns when they are due under the rate cap.
func (s *simStream) readStep(p []byte) (int, time.Time, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.usable(); err != nil {
		return 0, time.Time{}, err
	}
	cfg := &s.dev.spec.Sim
	switch {
	case s.resume:
		return 0, time.Time{}, fmt.Errorf("%s: read on a resuming stream: %w", s.dev.name, ErrNotSupported)
	case s.saver == nil && s.pos == cfg.Size:
		return 0, time.Time{}, io.EOF
	case cfg.HasFault && s.pos == cfg.FaultOffset:
		return 0, time.Time{}, fmt.Errorf("%s: read at byte %d: %w", s.dev.name, s.pos, ErrInjectedFault)
	case cfg.Hang.Op == HangRead && s.pos == cfg.Hang.Offset && len(p) > 0:
		return 0, time.Time{}, errHang
	}
	n := min(uint64(len(p)), s.pace.stepBytes())
	if s.saver == nil {
		n = min(n, cfg.Size-s.pos)
	}
	if cfg.HasFault && s.pos < cfg.FaultOffset && cfg.FaultOffset < s.pos+n {
		n = cfg.FaultOffset - s.pos
	}
	if cfg.Hang.Op == HangRead && s.pos < cfg.Hang.Offset && cfg.Hang.Offset < s.pos+n {
		n = cfg.Hang.Offset - s.pos
	}
	if s.saver != nil {
		m, err := s.saver.read(p[:n])
		if err == io.EOF {
			return 0, time.Time{}, io.EOF
		}
		if err != nil {
			return 0, time.Time{}, fmt.Errorf("%s: read at byte %d: %w", s.dev.name, s.pos, err)
		}
		s.pos += uint64(m)
		return m, s.pace.admitNow(uint64(m)), nil
	}
	s.dev.content.fill(p[:n], s.pos)
	s.pos += n
	return int(n), s.pace.admitNow(n), nil
}

// Write accepts the next bytes of a resuming stream, in any chunking, and
// checks each against the device's own state; the first mismatch is
// remembered and reported at RESUMING -> STOP. A write that would take
// the stream past the state's size fails whole with ErrStreamTooLong.
// With a rate cap the write is taken in steps of paceStep's worth and
// returns when the cap allows the last one.
func (s *simStream) Write(p []byte) (int, error) {
	done := 0
	for {
		n, due, err := s.writeStep(p[done:])
		done += n
		if err == errHang {
			return done, s.hang("write")
		}
		if err != nil {
			return done, err
		}
		s.sleepUntil(due)
		if done == len(p) {
			return done, nil
		}
	}
}

// writeStep verifies and accepts the next step of p under the lock and
// returns when it is due under the rate cap.
func (s *simStream) writeStep(p []byte) (int, time.Time, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.usable(); err != nil {
		return 0, time.Time{}, err
	}
	size := s.dev.spec.Sim.Size
	switch {
	case !s.resume:
		return 0, time.Time{}, fmt.Errorf("%s: write on a saving stream: %w", s.dev.name, ErrNotSupported)
	case s.loader == nil && uint64(len(p)) > size-s.pos:
		return 0, time.Time{}, fmt.Errorf("%s: write of %d bytes at byte %d passes the state size %d: %w",
			s.dev.name, len(p), s.pos, size, ErrStreamTooLong)
	}
	n := min(uint64(len(p)), s.pace.stepBytes())
	if h := s.dev.spec.Sim.Hang; h.Op == HangWrite && len(p) > 0 {
		switch {
		case s.pos == h.Offset:
			return 0, time.Time{}, errHang
		case s.pos < h.Offset && h.Offset < s.pos+n:
			n = h.Offset - s.pos
		}
	}
	if s.loader != nil {
		if err := s.loader.write(p[:n]); err != nil {
			return 0, time.Time{}, fmt.Errorf("%s: write at byte %d: %w", s.dev.name, s.pos, err)
		}
	} else if !s.mismatched {
		if i := s.dev.content.mismatch(p[:n], s.pos); i >= 0 {
			s.mismatched, s.mismatchAt = true, s.pos+uint64(i)
		}
	}
	s.pos += n
	return int(n), s.pace.admitNow(n), nil
}

// Close releases the caller's handle: later reads and writes on it fail
// with fs.ErrClosed. As with the kernel's data_fd, the session itself
// lives on until the device leaves the state: what was written counts.
// Idempotent.
func (s *simStream) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	return nil
}

// errHang is how readStep and writeStep say the next byte is where
// "hang=" blocks; it never leaves the package.
var errHang = errors.New("hang")

// hang blocks a read or write until the device is closed, holding no
// lock, and returns the error of a closed device.
func (s *simStream) hang(op string) error {
	<-s.dev.done
	return fmt.Errorf("%s: %s at byte %d: hung until closed: %w", s.dev.name, op, s.written(), fs.ErrClosed)
}

// usable returns the error for a read or write on a closed handle or an
// ended session. s.mu must be held.
func (s *simStream) usable() error {
	switch {
	case s.closed:
		return fmt.Errorf("%s: data stream: %w", s.dev.name, fs.ErrClosed)
	case s.ended:
		return fmt.Errorf("%s: %w", s.dev.name, ErrStreamEnded)
	}
	return nil
}

// sleepUntil sleeps until due, in steps of at most paceStep, and returns
// early when the session ends.
func (s *simStream) sleepUntil(due time.Time) {
	if due.IsZero() {
		return
	}
	for {
		d := time.Until(due)
		if d <= 0 || s.isEnded() {
			return
		}
		time.Sleep(min(d, paceStep))
	}
}

func (s *simStream) isEnded() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.ended
}

// end ends the session: later reads and writes fail with ErrStreamEnded.
func (s *simStream) end() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.ended = true
}

// stopCopy moves a saving stream from PRE_COPY to STOP_COPY: the device
// stops, and dirties nothing more.
func (s *simStream) stopCopy() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.precopy = false
	if s.saver != nil {
		s.saver.run(false)
	}
}

// PrecopyInfo answers VFIO_MIG_GET_PRECOPY_INFO: valid only while the
// device is in PRE_COPY(_P2P) (ErrNotPreCopy elsewhere, on a resuming
// stream too). InitialBytes counts the initial data not yet read (its
// pages, without the record headers), DirtyBytes the pages dirtied
// after they were read; Reinit is reported once, by the first answer
// after new initial data appeared.
func (s *simStream) PrecopyInfo() (PrecopyInfo, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.usable(); err != nil {
		return PrecopyInfo{}, err
	}
	if !s.precopy || s.saver == nil {
		return PrecopyInfo{}, fmt.Errorf("%s: precopy info: %w", s.dev.name, ErrNotPreCopy)
	}
	return s.saver.info(), nil
}

func (s *simStream) written() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.pos
}

// verifyAndEnd is the device's check at RESUMING -> STOP: the stream must
// be complete and match the device's state byte for byte. On success the
// session ends; on failure it stays open, as the device stays in RESUMING.
func (s *simStream) verifyAndEnd() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.loader != nil {
		if err := s.loader.verify(); err != nil {
			return fmt.Errorf("%s: %v: %w", s.dev.name, err, ErrVerify)
		}
		s.ended = true
		return nil
	}
	size := s.dev.spec.Sim.Size
	switch {
	case s.mismatched && s.mismatchAt == 0:
		return fmt.Errorf("%s: state mismatch at byte 0 (stream is not this device's state): %w",
			s.dev.name, ErrVerify)
	case s.mismatched:
		return fmt.Errorf("%s: state mismatch at byte %d (stream corrupt or out of order): %w",
			s.dev.name, s.mismatchAt, ErrVerify)
	case s.pos < size:
		return fmt.Errorf("%s: short stream: %d of %d bytes: %w", s.dev.name, s.pos, size, ErrVerify)
	}
	s.ended = true
	return nil
}

// pacer caps a byte rate: each admitted step moves a due time forward by
// the step's length at the rate, and the caller sleeps until it. Time the
// caller spent elsewhere (or oversleeping: a sleep of a few hundred
// microseconds takes a millisecond or more) earns credit of at most
// paceStep, so small reads keep the rate and no burst exceeds paceStep's
// worth of bytes.
type pacer struct {
	rate uint64    // bytes per second; 0 is unlimited
	due  time.Time // when the bytes admitted so far are paid for
}

// stepBytes is the most bytes one step may carry: paceStep at the rate,
// at least 1.
func (p *pacer) stepBytes() uint64 {
	if p.rate == 0 {
		return math.MaxUint64
	}
	return max(p.rate/uint64(time.Second/paceStep), 1)
}

// admitNow is admit at the current time. An uncapped stream reads no
// clock: a destination writes a chunk in the pieces gRPC received it in,
// 64 per MiB, and two clock reads per piece showed in its profile.
func (p *pacer) admitNow(n uint64) time.Time {
	if p.rate == 0 {
		return time.Time{}
	}
	return p.admit(time.Now(), n)
}

// admit accounts n bytes at time now and returns when they are due. The
// zero time means at once.
func (p *pacer) admit(now time.Time, n uint64) time.Time {
	if p.rate == 0 {
		return time.Time{}
	}
	if earliest := now.Add(-paceStep); p.due.Before(earliest) {
		p.due = earliest
	}
	p.due = p.due.Add(time.Duration(float64(n) / float64(p.rate) * float64(time.Second)))
	return p.due
}
