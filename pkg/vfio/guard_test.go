package vfio

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

// fakeDevice is a Device whose operations block on gates a test opens,
// and that counts the calls that reached it.
type fakeDevice struct {
	spec string

	mu    sync.Mutex
	state State
	gates map[string]chan struct{} // op -> closed to let it return; absent: return at once
	calls map[string]int
	// readDelay is how long each read takes.
	readDelay time.Duration
	closed    bool
}

// The operations of a fakeDevice, for gates and calls.
const (
	fakeState = "state"
	fakeSet   = "set"
	fakeReset = "reset"
	fakeSize  = "size"
	fakeRead  = "read"
	fakeWrite = "write"
	fakeClose = "close"
)

func newFake(spec string) *fakeDevice {
	return &fakeDevice{spec: spec, state: StateRunning, gates: map[string]chan struct{}{}, calls: map[string]int{}}
}

// block makes op block until the returned func is called.
func (f *fakeDevice) block(op string) (release func()) {
	f.mu.Lock()
	defer f.mu.Unlock()
	ch := make(chan struct{})
	f.gates[op] = ch
	return sync.OnceFunc(func() {
		f.mu.Lock()
		delete(f.gates, op)
		f.mu.Unlock()
		close(ch)
	})
}

// enter counts op and waits at its gate.
func (f *fakeDevice) enter(op string) {
	f.mu.Lock()
	f.calls[op]++
	ch := f.gates[op]
	f.mu.Unlock()
	if ch != nil {
		<-ch
	}
}

func (f *fakeDevice) count(op string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls[op]
}

func (f *fakeDevice) Spec() string { return f.spec }
func (f *fakeDevice) Flags() Flags { return FlagStopCopy | FlagP2P }

func (f *fakeDevice) State() (State, error) {
	f.enter(fakeState)
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.state, nil
}

func (f *fakeDevice) SetState(target State) (DataStream, error) {
	f.enter(fakeSet)
	f.mu.Lock()
	defer f.mu.Unlock()
	from := f.state
	f.state = target
	if OpensStream(from, target) {
		return &fakeStream{f: f}, nil
	}
	return nil, nil
}

func (f *fakeDevice) DataSize() (uint64, error) {
	f.enter(fakeSize)
	return 1 << 20, nil
}

func (f *fakeDevice) Reset() error {
	f.enter(fakeReset)
	f.mu.Lock()
	defer f.mu.Unlock()
	f.state = StateRunning
	return nil
}

func (f *fakeDevice) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls[fakeClose]++
	f.closed = true
	return nil
}

func (f *fakeDevice) isClosed() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.closed
}

// fakeStream reads and writes whole buffers, blocking at the device's
// read and write gates.
type fakeStream struct{ f *fakeDevice }

func (s *fakeStream) Read(p []byte) (int, error) {
	s.f.enter(fakeRead)
	s.f.mu.Lock()
	d := s.f.readDelay
	s.f.mu.Unlock()
	time.Sleep(d)
	return len(p), nil
}
func (s *fakeStream) Write(p []byte) (int, error) { s.f.enter(fakeWrite); return len(p), nil }
func (s *fakeStream) Close() error                { return nil }

const testTimeout = 10 * time.Second

// isClosed reports whether ch is closed, without waiting.
func isClosed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// TestGuardControlStuck holds each control operation past the device
// timeout: the call returns ErrStuck naming the operation when the timeout
// passes, the device is marked stuck, every further operation fails at
// once without reaching the device, State answers the cached state, and
// the mark clears when the operation answers.
func TestGuardControlStuck(t *testing.T) {
	tests := []struct {
		name string
		gate string
		op   string // in the error
		call func(g *GuardedDevice) error
	}{
		{"set-state", fakeSet, "SET_STATE to STOP did not answer within 10s", func(g *GuardedDevice) error {
			_, err := g.SetState(StateStop)
			return err
		}},
		{"reset", fakeReset, "RESET did not answer within 10s", func(g *GuardedDevice) error { return g.Reset() }},
		{"data-size", fakeSize, "DATA_SIZE did not answer within 10s", func(g *GuardedDevice) error {
			_, err := g.DataSize()
			return err
		}},
		{"state", fakeState, "GET_STATE did not answer within 10s", func(g *GuardedDevice) error {
			_, err := g.State()
			return err
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				f := newFake("fake:1")
				g := Guard(f, testTimeout)
				defer g.Close()
				// A stream opened before the device got stuck.
				if _, err := g.SetState(StateStop); err != nil {
					t.Fatal(err)
				}
				rs, err := g.SetState(StateStopCopy)
				if err != nil {
					t.Fatal(err)
				}
				release := f.block(tt.gate)
				defer release()

				start := time.Now()
				err = tt.call(g)
				if !errors.Is(err, ErrStuck) || !strings.Contains(err.Error(), tt.op) {
					t.Fatalf("call: %v; want ErrStuck with %q", err, tt.op)
				}
				if waited := time.Since(start); waited != testTimeout {
					t.Errorf("call returned after %v, want the timeout %v", waited, testTimeout)
				}
				op, since, stuck := g.StuckInfo()
				if !stuck || !strings.HasPrefix(tt.op, op) || !since.Equal(start) || !isClosed(g.Stuck()) {
					t.Errorf("StuckInfo() = %q, %v, %v; Stuck() closed %v; want the op, since %v",
						op, since, stuck, isClosed(g.Stuck()), start)
				}

				// Every further operation fails at once, and none reaches
				// the device.
				before := time.Now()
				calls := map[string]int{}
				for _, k := range []string{fakeSet, fakeReset, fakeSize, fakeState, fakeRead} {
					calls[k] = f.count(k)
				}
				checks := map[string]error{
					"SetState": func() error { _, err := g.SetState(StateRunning); return err }(),
					"Reset":    g.Reset(),
					"DataSize": func() error { _, err := g.DataSize(); return err }(),
					"Read":     func() error { _, err := rs.Read(make([]byte, 8)); return err }(),
					"Write":    func() error { _, err := rs.Write(make([]byte, 8)); return err }(),
				}
				for name, err := range checks {
					if !errors.Is(err, ErrStuck) {
						t.Errorf("%s while stuck: %v, want ErrStuck", name, err)
					}
				}
				if st, err := g.State(); !errors.Is(err, ErrStuck) || st != StateStopCopy {
					t.Errorf("State while stuck = %v, %v; want the cached STOP_COPY and ErrStuck", st, err)
				}
				if time.Since(before) != 0 {
					t.Errorf("operations on a stuck device took %v, want no wait", time.Since(before))
				}
				for k, n := range calls {
					if f.count(k) != n {
						t.Errorf("%d %s calls reached the stuck device", f.count(k)-n, k)
					}
				}

				// The operation answers at last: the mark clears.
				stuckCh := g.Stuck()
				release()
				synctest.Wait()
				if _, _, stuck := g.StuckInfo(); stuck || isClosed(g.Stuck()) {
					t.Error("still stuck after the operation answered")
				}
				if !isClosed(stuckCh) {
					t.Error("the Stuck channel of the episode reopened")
				}
				if in := g.info(); !strings.Contains(in.err, "answered after 10s") {
					t.Errorf("info error = %q, want how the stuck operation ended", in.err)
				}
				if _, err := g.DataSize(); err != nil {
					t.Errorf("DataSize after the device answered: %v", err)
				}
			})
		})
	}
}

// TestGuardStateDoesNotWait checks that State answers the state last set,
// at once and without asking the device, while an operation is in
// progress within its deadline.
func TestGuardStateDoesNotWait(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFake("fake:1")
		g := Guard(f, testTimeout)
		defer g.Close()
		if _, err := g.SetState(StateRunningP2P); err != nil {
			t.Fatal(err)
		}
		release := f.block(fakeSet)
		done := make(chan error, 1)
		go func() {
			_, err := g.SetState(StateStop)
			done <- err
		}()
		synctest.Wait()
		before, reads := time.Now(), f.count(fakeState)
		if st, err := g.State(); err != nil || st != StateRunningP2P {
			t.Errorf("State during SET_STATE = %v, %v; want the cached RUNNING_P2P", st, err)
		}
		if time.Since(before) != 0 || f.count(fakeState) != reads {
			t.Error("State waited for, or asked, a device busy with SET_STATE")
		}
		release()
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		if st, err := g.State(); err != nil || st != StateStop {
			t.Errorf("State after SET_STATE = %v, %v; want STOP", st, err)
		}
	})
}

// TestGuardDataStuck holds a read or a write of a stream past the
// timeout: the operation runs on the caller's goroutine, the watchdog
// marks the device stuck (not before the timeout, at most a tick after)
// and closes Stuck, further calls fail at once, and the mark clears when
// the call returns.
func TestGuardDataStuck(t *testing.T) {
	for _, tt := range []struct {
		name, gate, op string
		state          State
		call           func(DataStream, []byte) (int, error)
	}{
		{"read", fakeRead, "READ at byte 4096", StateStopCopy, DataStream.Read},
		{"write", fakeWrite, "WRITE at byte 4096", StateResuming, DataStream.Write},
	} {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				f := newFake("fake:1")
				g := Guard(f, testTimeout)
				defer g.Close()
				setState(t, g, StateStop)
				s := setState(t, g, tt.state)
				buf := make([]byte, 4096)
				if _, err := tt.call(s, buf); err != nil {
					t.Fatal(err)
				}
				release := f.block(tt.gate)
				defer release()
				start := time.Now()
				done := make(chan error, 1)
				go func() {
					_, err := tt.call(s, buf)
					done <- err
				}()
				stuck := g.Stuck()
				time.Sleep(testTimeout - time.Millisecond)
				if isClosed(stuck) {
					t.Fatalf("stuck after %v, before the timeout", time.Since(start))
				}
				select {
				case <-stuck:
				case <-time.After(g.watchTick() + 2*time.Millisecond):
					t.Fatal("not stuck a tick after the timeout")
				}
				op, since, ok := g.StuckInfo()
				if !ok || op != tt.op || since.Before(start) || since.Sub(start) > g.watchTick() {
					t.Errorf("StuckInfo() = %q, %v, %v; want %q since about %v", op, since, ok, tt.op, start)
				}
				if _, err := tt.call(s, buf); !errors.Is(err, ErrStuck) || !strings.Contains(err.Error(), tt.op) {
					t.Errorf("second call while stuck: %v, want ErrStuck naming %q", err, tt.op)
				}
				if _, err := g.SetState(StateRunning); !errors.Is(err, ErrStuck) {
					t.Errorf("SetState while stuck: %v, want ErrStuck", err)
				}
				if n := f.count(tt.gate); n != 2 || f.count(fakeSet) != 2 {
					t.Errorf("%d %s and %d set calls reached the device, want 2 and 2", n, tt.gate, f.count(fakeSet))
				}
				release()
				if err := <-done; err != nil {
					t.Errorf("the stuck call returned %v", err)
				}
				if _, _, ok := g.StuckInfo(); ok {
					t.Error("still stuck after the call returned")
				}
				if _, err := tt.call(s, buf); err != nil {
					t.Errorf("call after the device answered: %v", err)
				}
			})
		})
	}
}

// TestGuardSlowDataNotStuck checks that a stream whose calls keep
// returning is never marked stuck, however long it is busy in all.
func TestGuardSlowDataNotStuck(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFake("fake:1")
		g := Guard(f, testTimeout)
		defer g.Close()
		setState(t, g, StateStop)
		s := setState(t, g, StateStopCopy)
		f.mu.Lock()
		f.readDelay = testTimeout / 2
		f.mu.Unlock()
		buf := make([]byte, 8)
		for range 10 {
			if _, err := s.Read(buf); err != nil {
				t.Fatal(err)
			}
		}
		if _, _, stuck := g.StuckInfo(); stuck {
			t.Error("reads of half the timeout each made the device stuck")
		}
	})
}

// TestGuardCloseDoesNotWait checks that Close of a stuck device returns
// at once, closes the wrapped device and reports the stuck operation.
func TestGuardCloseDoesNotWait(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFake("fake:1")
		g := Guard(f, testTimeout)
		release := f.block(fakeReset)
		defer release()
		if err := g.Reset(); !errors.Is(err, ErrStuck) {
			t.Fatalf("Reset: %v, want ErrStuck", err)
		}
		before := time.Now()
		err := g.Close()
		if !errors.Is(err, ErrStuck) || !strings.Contains(err.Error(), "RESET") || time.Since(before) != 0 {
			t.Errorf("Close of a stuck device: %v after %v; want ErrStuck naming RESET, at once", err, time.Since(before))
		}
		if !f.isClosed() {
			t.Error("the wrapped device was not closed")
		}
		if err := g.Close(); err != nil {
			t.Errorf("second Close: %v", err)
		}
		if _, err := g.DataSize(); !errors.Is(err, fs.ErrClosed) {
			t.Errorf("DataSize after Close: %v, want fs.ErrClosed", err)
		}
		release()
	})
}

// TestGuardAbandonedStreamClosed checks that the stream a SET_STATE opens
// after its caller gave up is closed, not leaked.
func TestGuardAbandonedStreamClosed(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFake("fake:1")
		var cs closeCounter
		g := Guard(&streamSpy{Device: f, cs: &cs}, testTimeout)
		defer g.Close()
		setState(t, g, StateStop)
		release := f.block(fakeSet)
		if _, err := g.SetState(StateStopCopy); !errors.Is(err, ErrStuck) {
			t.Fatalf("SetState: %v, want ErrStuck", err)
		}
		release()
		synctest.Wait()
		if n := cs.n.Load(); n != 1 {
			t.Errorf("the abandoned stream was closed %d times, want 1", n)
		}
	})
}

type closeCounter struct{ n atomic.Int32 }

// streamSpy counts Close on the streams its device opens.
type streamSpy struct {
	Device
	cs *closeCounter
}

func (s *streamSpy) SetState(target State) (DataStream, error) {
	ds, err := s.Device.SetState(target)
	if ds != nil {
		ds = &countingStream{ds, s.cs}
	}
	return ds, err
}

type countingStream struct {
	DataStream
	cs *closeCounter
}

func (c *countingStream) Close() error { c.cs.n.Add(1); return c.DataStream.Close() }

// TestGuardedStreamDoesNotAllocate holds the guarded read and write path
// to no allocation per call.
func TestGuardedStreamDoesNotAllocate(t *testing.T) {
	spec := "sim:size=1TiB,seed=1"
	src, dst := Guard(newSim(t, spec), 0), Guard(newSim(t, spec), 0)
	defer src.Close()
	defer dst.Close()
	setState(t, src, StateStop)
	setState(t, dst, StateStop)
	rs := setState(t, src, StateStopCopy)
	ws := setState(t, dst, StateResuming)
	buf := make([]byte, 64<<10)
	allocs := testing.AllocsPerRun(50, func() {
		if _, err := rs.Read(buf); err != nil {
			t.Fatal(err)
		}
		if _, err := ws.Write(buf); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Errorf("%v allocations per guarded read and write, want 0", allocs)
	}
}

// TestGuardSimHang drives a simulated device's hangs through the guard:
// the device is reported stuck, and Close ends the hang.
func TestGuardSimHang(t *testing.T) {
	for _, tt := range []struct{ spec, op string }{
		{"sim:size=1MiB,hang=read@64KiB", "READ at byte 65536"},
		{"sim:size=1MiB,hang=state:STOP_COPY", "SET_STATE to STOP_COPY"},
	} {
		t.Run(tt.op, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				g := Guard(newSim(t, tt.spec), testTimeout)
				setState(t, g, StateStop)
				done := make(chan error, 1)
				go func() {
					s, err := g.SetState(StateStopCopy)
					if err == nil {
						_, err = io.Copy(io.Discard, s)
					}
					done <- err
				}()
				<-g.Stuck()
				if op, _, _ := g.StuckInfo(); op != tt.op {
					t.Errorf("stuck in %q, want %q", op, tt.op)
				}
				if err := g.Close(); !errors.Is(err, ErrStuck) {
					t.Errorf("Close: %v, want ErrStuck", err)
				}
				if err := <-done; err == nil {
					t.Error("the hung operation succeeded after Close")
				}
				synctest.Wait()
			})
		})
	}
}

func ExampleStuckReporter() {
	g := Guard(newFakeForExample(), time.Second)
	defer g.Close()
	var dev Device = g
	if sr, ok := dev.(StuckReporter); ok {
		select {
		case <-sr.Stuck():
			op, _, _ := sr.StuckInfo()
			fmt.Println("stuck in", op)
		default:
			fmt.Println("answering")
		}
	}
	// Output: answering
}

func newFakeForExample() Device { return newFake("fake:example") }

// TestGuardWhenAnswered checks that an owner that gives up on a stuck
// device gets it settled once the stuck operation answers, however late,
// and before the registry hears of it; and that a device that is not
// stuck is left for the owner to settle itself.
func TestGuardWhenAnswered(t *testing.T) {
	for _, tt := range []struct {
		name string
		gate string
		hang func(g *GuardedDevice, s DataStream)
	}{
		{"set-state", fakeSet, func(g *GuardedDevice, _ DataStream) { g.SetState(StateStop) }},
		{"read", fakeRead, func(_ *GuardedDevice, s DataStream) { s.Read(make([]byte, 8)) }},
	} {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				f := newFake("fake:1")
				var order []string
				g := newGuard(f, testTimeout, func() { order = append(order, "registry") }, nil)
				defer g.Close()
				settle := func(d Device) {
					order = append(order, "settle")
					if _, err := d.SetState(StateRunning); err != nil {
						t.Errorf("settle: %v", err)
					}
				}
				if g.WhenAnswered(settle) {
					t.Fatal("WhenAnswered took a device that is not stuck")
				}
				setState(t, g, StateStop)
				s := setState(t, g, StateStopCopy)
				release := f.block(tt.gate)
				defer release()
				go tt.hang(g, s)
				<-g.Stuck()
				if !g.WhenAnswered(settle) {
					t.Fatal("WhenAnswered refused a stuck device")
				}
				synctest.Wait()
				if len(order) != 0 {
					t.Fatalf("%v ran before the device answered", order)
				}
				release()
				synctest.Wait()
				if want := []string{"settle", "registry"}; !slices.Equal(order, want) {
					t.Errorf("after the answer: %v, want %v", order, want)
				}
				if st, err := f.State(); err != nil || st != StateRunning {
					t.Errorf("device in %v (%v), want RUNNING", st, err)
				}
			})
		})
	}
}
