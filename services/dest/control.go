package dest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/flow"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/services/wire"
)

// controlServer is the DestAgent service.
type controlServer struct {
	ferryv1.UnimplementedDestAgentServer
	a *Agent
}

func (s *controlServer) ListDevices(context.Context, *ferryv1.ListDevicesRequest) (*ferryv1.ListDevicesResponse, error) {
	return wire.ListDevices(s.a.cfg.Registry), nil
}

func (s *controlServer) PrepareIncoming(ctx context.Context, req *ferryv1.PrepareIncomingRequest) (*ferryv1.PrepareIncomingResponse, error) {
	return s.a.prepare(req)
}

func (s *controlServer) GetIncoming(ctx context.Context, req *ferryv1.GetIncomingRequest) (*ferryv1.GetIncomingResponse, error) {
	inc, err := s.a.lookup(req.GetMigrationId())
	if err != nil {
		return nil, err
	}
	m, _, _ := inc.snapshot()
	return &ferryv1.GetIncomingResponse{Migration: m}, nil
}

func (s *controlServer) WatchIncoming(req *ferryv1.WatchIncomingRequest, stream grpc.ServerStreamingServer[ferryv1.WatchIncomingResponse]) error {
	inc, err := s.a.lookup(req.GetMigrationId())
	if err != nil {
		return err
	}
	return wire.Watch(stream.Context(), &inc.watch, inc.snapshot, func(m *ferryv1.Migration) error {
		return stream.Send(&ferryv1.WatchIncomingResponse{Migration: m})
	})
}

func (s *controlServer) CancelIncoming(ctx context.Context, req *ferryv1.CancelIncomingRequest) (*ferryv1.CancelIncomingResponse, error) {
	inc, err := s.a.lookup(req.GetMigrationId())
	if err != nil {
		return nil, err
	}
	inc.terminate(wire.Errorf(codes.Canceled, wire.ReasonCancelled, "incoming migration %s cancelled by the control plane", inc.id), ferryv1.MigrationPhase_MIGRATION_PHASE_CANCELLED)
	select {
	case <-inc.done:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	m, _, _ := inc.snapshot()
	return &ferryv1.CancelIncomingResponse{Migration: m}, nil
}

// prepare validates a PrepareIncomingRequest, reserves its budget, opens
// its devices in RESUMING and registers the migration.
func (a *Agent) prepare(req *ferryv1.PrepareIncomingRequest) (*ferryv1.PrepareIncomingResponse, error) {
	if err := wire.ValidateID(req.GetMigrationId()); err != nil {
		return nil, err
	}
	if err := wire.ValidateDeviceCount(len(req.GetDevices())); err != nil {
		return nil, err
	}
	specs := make([]string, len(req.GetDevices()))
	seen := make(map[string]bool, len(specs))
	for i, raw := range req.GetDevices() {
		spec, err := wire.CanonicalSpec(raw)
		if err != nil {
			return nil, err
		}
		if seen[spec] {
			return nil, wire.Errorf(codes.InvalidArgument, wire.ReasonInvalidArgument, "device %s is listed twice", spec)
		}
		seen[spec] = true
		specs[i] = spec
	}
	limits := flow.Limits{MaxChunks: req.GetMaxChunks(), MaxBytes: req.GetMaxBytes()}
	if limits.MaxChunks == 0 || limits.MaxChunks > a.cfg.MaxChunks {
		limits.MaxChunks = a.cfg.MaxChunks
	}
	if limits.MaxBytes == 0 || limits.MaxBytes > a.cfg.MaxBytes {
		limits.MaxBytes = a.cfg.MaxBytes
	}
	if err := limits.Validate(wire.MinChunkSize); err != nil {
		return nil, wire.Errorf(codes.InvalidArgument, wire.ReasonInvalidArgument, "window: %v", err)
	}

	a.mu.Lock()
	if inc, ok := a.incoming[req.GetMigrationId()]; ok {
		a.mu.Unlock()
		if !proto.Equal(inc.req, req) {
			return nil, wire.Errorf(codes.AlreadyExists, wire.ReasonSpecMismatch, "incoming migration %s exists with a different request", inc.id)
		}
		return inc.prepareResponse(), nil
	}
	draining := a.draining
	a.mu.Unlock()
	if draining {
		return nil, wire.ErrDraining("destination")
	}

	need := limits.MaxBytes * uint64(len(specs))
	if !a.reserve(need) {
		return nil, wire.Errorf(codes.ResourceExhausted, wire.ReasonBudgetExhausted,
			"preparing %d device windows of %d bytes needs %d bytes of the node's memory budget; %d of %d are in use",
			len(specs), limits.MaxBytes, need, a.BudgetInUse(), a.cfg.MemoryBudget)
	}
	inc, err := a.openDevices(req, specs, limits, need)
	if err != nil {
		a.unreserve(need)
		return nil, err
	}

	a.mu.Lock()
	if other, ok := a.incoming[inc.id]; ok {
		// A concurrent prepare of the same id won the race.
		a.mu.Unlock()
		inc.terminate(wire.Errorf(codes.Aborted, wire.ReasonAborted, "duplicate prepare"), ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED)
		<-inc.done
		if !proto.Equal(other.req, req) {
			return nil, wire.Errorf(codes.AlreadyExists, wire.ReasonSpecMismatch, "incoming migration %s exists with a different request", other.id)
		}
		return other.prepareResponse(), nil
	}
	if a.draining {
		// Drain began while the devices were being opened.
		a.mu.Unlock()
		inc.terminate(wire.ErrDraining("destination"), ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED)
		<-inc.done
		return nil, wire.ErrDraining("destination")
	}
	inc.track = a.cfg.Metrics.TrackDest(inc.deviceCounters)
	// The timer is set before the migration is visible, so Open and
	// terminate see it (they read inc.expiry unlocked).
	inc.expiry = time.AfterFunc(time.Until(inc.tokenTTL), func() { inc.expire(a.cfg.TokenTTL) })
	a.incoming[inc.id] = inc
	a.forgetOldLocked()
	a.mu.Unlock()
	inc.setPhase(ferryv1.MigrationPhase_MIGRATION_PHASE_WAITING)
	return inc.prepareResponse(), nil
}

// openDevices acquires the devices and moves them to RESUMING; on any
// failure it resets and releases what it opened.
func (a *Agent) openDevices(req *ferryv1.PrepareIncomingRequest, specs []string, limits flow.Limits, reserved uint64) (*incoming, error) {
	ctx, cancel := context.WithCancel(a.ctx)
	inc := &incoming{
		a:          a,
		id:         req.GetMigrationId(),
		req:        proto.CloneOf(req),
		token:      newToken(),
		limits:     limits,
		reserved:   reserved,
		createTime: time.Now(),
		log:        a.cfg.Logger.With("migration", req.GetMigrationId(), "role", "dest", "devices", specs),
		ctx:        ctx,
		cancel:     cancel,
		done:       make(chan struct{}),
		fb:         make(map[int]*chanReg),
		phase:      ferryv1.MigrationPhase_MIGRATION_PHASE_PREPARING,
		pending:    len(specs),
	}
	inc.tokenTTL = inc.createTime.Add(a.cfg.TokenTTL)
	undo := func() {
		for _, d := range inc.devs {
			if d.stream != nil {
				d.stream.Close()
			}
			if err := d.dev.Reset(); err != nil {
				inc.log.Error("device reset failed", "device", d.spec, "error", err)
			}
			d.release()
		}
		cancel()
	}
	for i, spec := range specs {
		dev, release, err := a.cfg.Registry.Acquire(spec, inc.id)
		if err != nil {
			undo()
			return nil, wire.DeviceError(spec, "open", err)
		}
		d := &devStream{index: i, spec: spec, dev: dev, release: release, notify: make(chan struct{}, 1)}
		inc.devs = append(inc.devs, d)
		if dev.Flags()&vfio.FlagStopCopy == 0 {
			undo()
			return nil, wire.Errorf(codes.FailedPrecondition, wire.ReasonDeviceUnsupported, "device %s does not support STOP_COPY migration (flags %s)", spec, dev.Flags())
		}
		stream, err := dev.SetState(vfio.StateResuming)
		if err != nil {
			undo()
			return nil, wire.DeviceError(spec, "enter RESUMING", err)
		}
		if stream == nil {
			undo()
			return nil, wire.Errorf(codes.Internal, wire.ReasonDeviceState, "device %s: RESUMING opened no data stream", spec)
		}
		d.stream = stream
	}
	inc.log.Info("prepared", "window_chunks", limits.MaxChunks, "window_bytes", limits.MaxBytes)
	return inc, nil
}

func (inc *incoming) prepareResponse() *ferryv1.PrepareIncomingResponse {
	m, _, _ := inc.snapshot()
	return &ferryv1.PrepareIncomingResponse{
		Token:           inc.token,
		Migration:       m,
		MaxChunks:       inc.limits.MaxChunks,
		MaxBytes:        inc.limits.MaxBytes,
		TokenExpireTime: timestamppb.New(inc.tokenTTL),
	}
}

// newToken returns 256 random bits in hex.
func newToken() string {
	var b [32]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}
