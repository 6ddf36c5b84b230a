package dest

import (
	"context"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/durationpb"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/services/wire"
)

// The destination's part of pre-copy: the switchover acknowledgement,
// per device (QEMU's switchover-ack).
//
// A pre-copy session opens in PRECOPY. The source tells, in SwitchoverAck,
// where each device's initial data ends in its stream once it has read it
// whole (the device's initial_bytes reached 0); a device is loaded once
// that much of its stream is written into it. When every device is
// loaded the migration is READY, and only then does an unforced
// SwitchoverStart pass. New initial data (the kernel's REINIT) comes with
// a higher generation: the device is no longer loaded, and the migration
// goes back to PRECOPY, until the source reports the new end and it is
// written. A stop-copy session has no initial data: it is never refused
// for it.

// initialData is what the source said of one device's initial data.
// Guarded by the device's mu.
type initialData struct {
	generation uint32
	complete   bool
	end        uint64
}

// precopy reports whether the session streams pre-copy data.
func (inc *incoming) precopySession() bool {
	inc.mu.Lock()
	defer inc.mu.Unlock()
	return inc.mode == ferryv1.MigrationMode_MIGRATION_MODE_PRECOPY
}

// note takes what the source says of d's initial data: the highest
// generation stands, and within it a complete report stands.
func (d *devStream) note(in *ferryv1.InitialData) {
	d.mu.Lock()
	defer d.mu.Unlock()
	cur := &d.initial
	switch {
	case in.GetGeneration() < cur.generation:
		return
	case in.GetGeneration() == cur.generation && cur.complete:
		return
	}
	*cur = initialData{generation: in.GetGeneration(), complete: in.GetComplete(), end: in.GetEnd()}
}

// initialLoaded reports whether d's initial data, as the source last told
// it, is written into the device.
func (d *devStream) initialLoaded() bool {
	d.mu.Lock()
	in := d.initial
	d.mu.Unlock()
	return in.complete && d.written.Load() >= in.end
}

// initialPending names a device whose initial data is not loaded, "" when
// every device's is (or the session is no pre-copy one).
func (inc *incoming) initialPending() string {
	if !inc.precopySession() {
		return ""
	}
	for _, d := range inc.devs {
		if !d.initialLoaded() {
			return d.spec
		}
	}
	return ""
}

// setReady moves a pre-copy migration between PRECOPY and READY, the one
// move back the phases make; it does nothing in any other phase.
func (inc *incoming) setReady(ready bool) {
	from, to := ferryv1.MigrationPhase_MIGRATION_PHASE_PRECOPY, ferryv1.MigrationPhase_MIGRATION_PHASE_READY
	if !ready {
		from, to = to, from
	}
	inc.moveIf(to, func(cur ferryv1.MigrationPhase) bool { return cur == from })
}

func (s *transferServer) SwitchoverAck(ctx context.Context, req *ferryv1.SwitchoverAckRequest) (*ferryv1.SwitchoverAckResponse, error) {
	inc, err := s.a.boundSession(ctx, req.GetSessionId())
	if err != nil {
		return nil, err
	}
	if !inc.precopySession() {
		return nil, wire.Errorf(codes.FailedPrecondition, wire.ReasonSessionState, "session of migration %s is not a pre-copy one", inc.id)
	}
	if len(req.GetDevices()) > len(inc.devs) {
		return nil, wire.Errorf(codes.InvalidArgument, wire.ReasonInvalidArgument, "the request names %d devices, the session has %d", len(req.GetDevices()), len(inc.devs))
	}
	for _, in := range req.GetDevices() {
		if int(in.GetDevice()) >= len(inc.devs) {
			return nil, wire.Errorf(codes.InvalidArgument, wire.ReasonInvalidArgument, "device %d: the session has %d", in.GetDevice(), len(inc.devs))
		}
	}
	inc.touch()
	for _, in := range req.GetDevices() {
		inc.devs[in.GetDevice()].note(in)
	}
	resp := &ferryv1.SwitchoverAckResponse{Loaded: make([]bool, len(inc.devs)), Ready: true}
	var slowest time.Duration
	for i, d := range inc.devs {
		resp.Loaded[i] = d.initialLoaded()
		resp.Ready = resp.Ready && resp.Loaded[i]
		slowest = max(slowest, d.resumeTook)
	}
	resp.StateChangeTime = durationpb.New(slowest)
	inc.setReady(resp.Ready)
	return resp, nil
}
