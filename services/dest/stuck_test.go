package dest

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"testing/synctest"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/services/wire"
)

// hangingDevice is a simulated device whose resuming stream's Write
// blocks until unblock is closed, with the Stuck channel a device guard
// offers (stuckDevice), closed by the test.
type hangingDevice struct {
	vfio.Device
	stuck, unblock chan struct{}
	resets         atomic.Int32
}

func (d *hangingDevice) Stuck() <-chan struct{} { return d.stuck }

func (d *hangingDevice) Reset() error {
	d.resets.Add(1)
	return d.Device.Reset()
}

func (d *hangingDevice) SetState(s vfio.State) (vfio.DataStream, error) {
	st, err := d.Device.SetState(s)
	if st != nil && s == vfio.StateResuming {
		st = &hangingStream{DataStream: st, dev: d}
	}
	return st, err
}

type hangingStream struct {
	vfio.DataStream
	dev *hangingDevice
}

func (s *hangingStream) Write([]byte) (int, error) {
	<-s.dev.unblock
	return 0, errors.New("the write came back after the device was declared stuck")
}

// hungWrite is a migration of a healthy device and a hanging one, whose
// receiver is blocked in the hanging device's first write.
type hungWrite struct {
	a                *Agent
	reg              *vfio.Registry
	inc              *incoming
	dev              *hangingDevice
	healthy, hanging string
	released         *atomic.Int32
	accepted         chan error // the blocked receiver's accept
}

// newHungWrite sets up a hungWrite inside a synctest bubble.
func newHungWrite(t *testing.T) *hungWrite {
	t.Helper()
	reg := vfio.NewRegistry(vfio.RegistryOptions{AllowSim: true})
	t.Cleanup(func() { reg.Close() })
	a, err := New(Config{Registry: reg, MaxChunks: 8, MaxBytes: 128 << 10})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	h := &hungWrite{a: a, reg: reg, healthy: canonical(t, spec(1)), hanging: canonical(t, spec(2)), released: new(atomic.Int32), accepted: make(chan error, 1)}
	s, _ := vfio.ParseSpec(h.hanging)
	sim, err := vfio.NewSim(s)
	if err != nil {
		t.Fatal(err)
	}
	h.dev = &hangingDevice{Device: sim, stuck: make(chan struct{}), unblock: make(chan struct{})}
	a.acquire = func(spec, owner string) (vfio.Device, func(), error) {
		if spec == h.hanging {
			return h.dev, func() { h.released.Add(1) }, nil
		}
		return reg.Acquire(spec, owner)
	}
	prep, err := a.prepare(t.Context(), &ferryv1.PrepareIncomingRequest{MigrationId: "hang", Devices: []string{h.healthy, h.hanging}})
	if err != nil {
		t.Fatal(err)
	}
	tr := &transferServer{a: a}
	resp, err := tr.Open(t.Context(), &ferryv1.OpenRequest{MigrationId: "hang", Token: prep.GetToken(), Devices: []string{h.healthy, h.hanging}, ChunkSize: testChunk, Channels: 1})
	if err != nil {
		t.Fatal(err)
	}
	h.inc, _ = a.session(resp.GetSessionId())

	// A receiver, one of the agent's goroutines as a channel's is,
	// writes the hanging device's first chunk and blocks.
	state := sourceState(t, 2)
	hdr := dataChunk(0, state[:testChunk])
	hdr.Device = 1
	in := inChunk(t, hdr, state[:testChunk])
	a.crew.Go(func() { h.accepted <- h.inc.accept(in) })
	synctest.Wait()
	return h
}

// A device write that never returns holds up nothing: cancelling the
// migration releases its budget and buffers at once and resets the
// healthy device; the stuck device is left held, reported stuck, and is
// reset and released only when its write returns.
func TestCleanupDoesNotWaitForAStuckWrite(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHungWrite(t)
		a, reg, inc, dev, healthy, released, accepted := h.a, h.reg, h.inc, h.dev, h.healthy, h.released, h.accepted

		inc.fail(wire.Errorf(codes.Canceled, wire.ReasonCancelled, "cancelled"), ferryv1.MigrationPhase_MIGRATION_PHASE_CANCELLED, failAsked)
		synctest.Wait()
		// Budget and buffers went at once; the healthy device is reset and
		// free; the clean-up waits for the hanging one's guard.
		if n := a.BudgetInUse(); n != 0 {
			t.Fatalf("budget in use %d while a write hangs, want 0", n)
		}
		for _, d := range reg.List() {
			if d.Spec == healthy && (d.Owner != "" || d.State != vfio.StateRunning) {
				t.Fatalf("the healthy device: owner %q, state %v; want free and RUNNING", d.Owner, d.State)
			}
		}
		if isClosed(inc.done) {
			t.Fatal("the migration ended before its hanging device was declared stuck")
		}

		// The guard declares it stuck: the migration ends, reporting it,
		// and leaves it held.
		close(dev.stuck)
		synctest.Wait()
		if !isClosed(inc.done) {
			t.Fatal("the migration did not end once its device was declared stuck")
		}
		m, _, _ := inc.snapshot()
		if m.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_CANCELLED || !m.GetDevices()[1].GetStuck() || m.GetDevices()[0].GetStuck() {
			t.Fatalf("the migration: %v, stuck %v %v; want CANCELLED, only device 1 stuck", m.GetPhase(), m.GetDevices()[0].GetStuck(), m.GetDevices()[1].GetStuck())
		}
		if released.Load() != 0 || dev.resets.Load() != 0 {
			t.Fatalf("the stuck device: released %d times, reset %d times while its write hangs; want 0 and 0", released.Load(), dev.resets.Load())
		}

		// The write returns: its writer resets the device, whose partial
		// state is worthless, and hands it back.
		close(dev.unblock)
		synctest.Wait()
		<-accepted // the receiver returns too
		if released.Load() != 1 || dev.resets.Load() != 1 {
			t.Fatalf("after the write returned: released %d times, reset %d times; want 1 and 1", released.Load(), dev.resets.Load())
		}
	})
}

// A control call that waits for a rollback held up by a hanging device
// ends with its caller's context, as a gRPC status (CANCELLED), not as a
// bare context error (which the interceptors log and count as UNKNOWN).
func TestCancelIncomingEndsWithItsCaller(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHungWrite(t)
		defer func() { // the device answers at last, even if the test failed
			close(h.dev.stuck)
			close(h.dev.unblock)
			<-h.accepted
		}()
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan error, 1)
		go func() {
			_, err := (&controlServer{a: h.a}).CancelIncoming(ctx, &ferryv1.CancelIncomingRequest{MigrationId: "hang"})
			done <- err
		}()
		synctest.Wait()
		select {
		case err := <-done:
			t.Fatalf("CancelIncoming returned (%v) while the rollback waits for a hanging device", err)
		default:
		}
		cancel()
		if err := <-done; status.Code(err) != codes.Canceled {
			t.Fatalf("CancelIncoming whose caller left: %v (code %v), want CANCELLED", err, status.Code(err))
		}
	})
}

// A device whose write is declared stuck fails its migration at once,
// with UNAVAILABLE and DEVICE_STUCK, which its channels answer: the
// source rolls back then, instead of waiting out its switchover deadline
// with the VM paused. The healthy device is reset and freed; the stuck
// one stays held until its write returns.
func TestStuckWriteFailsTheMigration(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHungWrite(t)
		defer func() { // the device answers at last, even if the test failed
			close(h.dev.unblock)
			<-h.accepted
		}()
		if isClosed(h.inc.done) {
			t.Fatal("the migration ended while its device's write was not yet declared stuck")
		}

		close(h.dev.stuck)
		synctest.Wait()
		if !isClosed(h.inc.done) {
			t.Fatal("the migration goes on after its device was declared stuck")
		}
		m, _, _ := h.inc.snapshot()
		if m.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED || m.GetError().GetReason() != wire.ReasonDeviceStuck || codes.Code(m.GetError().GetCode()) != codes.Unavailable {
			t.Fatalf("the migration: %v, %v; want FAILED with UNAVAILABLE %s", m.GetPhase(), m.GetError(), wire.ReasonDeviceStuck)
		}
		if err := h.inc.finalStatus(); wire.Reason(err) != wire.ReasonDeviceStuck {
			t.Fatalf("its channels answer %v, want %s", err, wire.ReasonDeviceStuck)
		}
		if !m.GetDevices()[1].GetStuck() || m.GetDevices()[0].GetStuck() {
			t.Fatalf("stuck: %v %v; want only device 1", m.GetDevices()[0].GetStuck(), m.GetDevices()[1].GetStuck())
		}
		for _, d := range h.reg.List() {
			if d.Spec == h.healthy && (d.Owner != "" || d.State != vfio.StateRunning) {
				t.Fatalf("the healthy device: owner %q, state %v; want free and RUNNING", d.Owner, d.State)
			}
		}
		if h.released.Load() != 0 {
			t.Fatal("the stuck device was released while its write hangs")
		}
	})
}

// The agent's Close does not wait for a goroutine blocked in a device its
// guard declared stuck: a write the kernel never returns from must not
// hold the agent's shutdown for good. When the write returns at last, its
// writer still resets and releases the device.
func TestCloseDoesNotWaitForAStuckWrite(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHungWrite(t)
		closed := make(chan struct{})
		go func() {
			h.a.Close()
			close(closed)
		}()
		synctest.Wait()
		if isClosed(closed) {
			t.Fatal("Close returned while a write was in progress and its device not declared stuck")
		}
		close(h.dev.stuck)
		synctest.Wait()
		if !isClosed(closed) {
			t.Fatal("Close waits for a write into a device declared stuck")
		}
		close(h.dev.unblock)
		<-h.accepted
		synctest.Wait()
		if h.released.Load() != 1 || h.dev.resets.Load() != 1 {
			t.Fatalf("after the write returned: released %d times, reset %d times; want 1 and 1", h.released.Load(), h.dev.resets.Load())
		}
	})
}
