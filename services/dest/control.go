package dest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"reflect"
	"slices"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/internal/tracing"
	"github.com/vfio-ferry/ferry/pkg/flow"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/services/deviceapi"
	"github.com/vfio-ferry/ferry/services/wire"
)

// controlServer is the DestAgent service.
type controlServer struct {
	ferryv1.UnimplementedDestAgentServer
	a *Agent
}

func (s *controlServer) ListDevices(context.Context, *ferryv1.ListDevicesRequest) (*ferryv1.ListDevicesResponse, error) {
	return deviceapi.List(s.a.cfg.Registry), nil
}

func (s *controlServer) PrepareIncoming(ctx context.Context, req *ferryv1.PrepareIncomingRequest) (*ferryv1.PrepareIncomingResponse, error) {
	return s.a.prepare(ctx, req)
}

func (s *controlServer) GetIncoming(ctx context.Context, req *ferryv1.GetIncomingRequest) (*ferryv1.GetIncomingResponse, error) {
	inc, err := s.a.lookup(req.GetMigrationId())
	if err != nil {
		return nil, err
	}
	m, _, _ := inc.snapshot()
	return &ferryv1.GetIncomingResponse{Migration: m, ConfigStates: inc.configStates()}, nil
}

func (s *controlServer) ListIncoming(context.Context, *ferryv1.ListIncomingRequest) (*ferryv1.ListIncomingResponse, error) {
	s.a.mu.Lock()
	all := make([]*incoming, 0, len(s.a.incoming))
	for _, inc := range s.a.incoming {
		all = append(all, inc)
	}
	s.a.mu.Unlock()
	slices.SortFunc(all, func(x, y *incoming) int { return y.createTime.Compare(x.createTime) })
	resp := &ferryv1.ListIncomingResponse{}
	for _, inc := range all {
		m, _, _ := inc.snapshot()
		resp.Migrations = append(resp.Migrations, m)
	}
	return resp, nil
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

// CancelIncoming rolls the migration back: before the verdict, and in
// VERIFIED too (the control plane read the source and found it owns the
// devices). A committed migration is not cancelled: FAILED_PRECONDITION,
// MIGRATION_COMMITTED.
func (s *controlServer) CancelIncoming(ctx context.Context, req *ferryv1.CancelIncomingRequest) (*ferryv1.CancelIncomingResponse, error) {
	inc, err := s.a.lookup(req.GetMigrationId())
	if err != nil {
		return nil, err
	}
	phase := inc.fail(wire.Errorf(codes.Canceled, wire.ReasonCancelled, "incoming migration %s cancelled by the control plane", inc.id), ferryv1.MigrationPhase_MIGRATION_PHASE_CANCELLED, failAsked)
	if phase == ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED {
		return nil, errCommitted(inc.id)
	}
	select {
	case <-inc.done:
	case <-ctx.Done():
		return nil, status.FromContextError(ctx.Err()).Err()
	}
	m, _, _ := inc.snapshot()
	return &ferryv1.CancelIncomingResponse{Migration: m}, nil
}

// CommitIncoming commits a VERIFIED migration whose source committed but
// could not say so: the control plane read SUCCEEDED at the source.
func (s *controlServer) CommitIncoming(ctx context.Context, req *ferryv1.CommitIncomingRequest) (*ferryv1.CommitIncomingResponse, error) {
	inc, err := s.a.lookup(req.GetMigrationId())
	if err != nil {
		return nil, err
	}
	if err := inc.commitAndWait(ctx); err != nil {
		return nil, err
	}
	m, _, _ := inc.snapshot()
	return &ferryv1.CommitIncomingResponse{Migration: m}, nil
}

// pendingPrepare is a prepare whose devices are being opened. A
// concurrent prepare of the same id and request waits for it and answers
// the same (see Agent.prepare).
type pendingPrepare struct {
	specs []string
	req   *ferryv1.PrepareIncomingRequest
	done  chan struct{}
	inc   *incoming // set before done closes, on success
	err   error     // set before done closes, on failure
}

// requestDiff names what differs between a prepared request (its
// canonical specs and the request) and another, "" when they ask the
// same.
func requestDiff(specs []string, prep *ferryv1.PrepareIncomingRequest, asked []string, req *ferryv1.PrepareIncomingRequest) string {
	switch {
	case !slices.Equal(specs, asked):
		return fmt.Sprintf("devices %v were prepared, %v are asked for", specs, asked)
	case prep.GetMaxChunks() != req.GetMaxChunks():
		return fmt.Sprintf("max_chunks %d was prepared, %d is asked for", prep.GetMaxChunks(), req.GetMaxChunks())
	case prep.GetMaxBytes() != req.GetMaxBytes():
		return fmt.Sprintf("max_bytes %d was prepared, %d is asked for", prep.GetMaxBytes(), req.GetMaxBytes())
	}
	return ""
}

func errSpecMismatch(id, diff string) error {
	return wire.Errorf(codes.AlreadyExists, wire.ReasonSpecMismatch, "incoming migration %s exists with a different request: %s; it is left as it is", id, diff)
}

// prepare validates a PrepareIncomingRequest, reserves its budget, opens
// its devices in RESUMING and registers the migration.
//
// The same id and request answer the same migration, also while its
// devices are being opened (a concurrent retry waits for the first);
// another request under an id in use is refused with ALREADY_EXISTS,
// MIGRATION_SPEC_MISMATCH, naming what differs, and the migration is left
// alone. An id whose migration failed or was cancelled is prepared anew:
// it is not burnt.
func (a *Agent) prepare(ctx context.Context, req *ferryv1.PrepareIncomingRequest) (*ferryv1.PrepareIncomingResponse, error) {
	if err := wire.ValidateID(req.GetMigrationId()); err != nil {
		return nil, err
	}
	if err := wire.ValidateDeviceCount(len(req.GetDevices())); err != nil {
		return nil, err
	}
	specs := make([]string, len(req.GetDevices()))
	seen := make(map[string]bool, len(specs))
	for i, raw := range req.GetDevices() {
		spec, err := deviceapi.CanonicalSpec(raw)
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
	id := req.GetMigrationId()

	a.mu.Lock()
	if inc, ok := a.incoming[id]; ok && !inc.rolledBack() {
		a.mu.Unlock()
		if diff := requestDiff(inc.specs(), inc.req, specs, req); diff != "" {
			return nil, errSpecMismatch(id, diff)
		}
		return inc.prepareResponse(), nil
	}
	if p, ok := a.preparing[id]; ok {
		a.mu.Unlock()
		if diff := requestDiff(p.specs, p.req, specs, req); diff != "" {
			return nil, errSpecMismatch(id, diff)
		}
		select {
		case <-p.done:
		case <-ctx.Done():
			return nil, status.FromContextError(ctx.Err()).Err()
		}
		if p.err != nil {
			return nil, p.err
		}
		return p.inc.prepareResponse(), nil
	}
	if a.draining {
		a.mu.Unlock()
		return nil, wire.ErrDraining("destination")
	}
	p := &pendingPrepare{specs: specs, req: proto.CloneOf(req), done: make(chan struct{})}
	a.preparing[id] = p
	a.mu.Unlock()

	inc, err := a.prepareNew(ctx, req, specs, limits)
	p.inc, p.err = inc, err
	a.mu.Lock()
	delete(a.preparing, id)
	a.mu.Unlock()
	close(p.done)
	if err != nil {
		return nil, err
	}
	return inc.prepareResponse(), nil
}

// prepareNew reserves the budget of a new incoming migration, opens its
// devices and registers it (replacing a rolled-back one of the same id).
func (a *Agent) prepareNew(ctx context.Context, req *ferryv1.PrepareIncomingRequest, specs []string, limits flow.Limits) (*incoming, error) {
	cost := WindowCost(limits.MaxChunks, limits.MaxBytes)
	need := cost * uint64(len(specs))
	if !a.reserve(need) {
		return nil, wire.Errorf(codes.ResourceExhausted, wire.ReasonBudgetExhausted,
			"preparing %d device windows of %d bytes (%d with their reassembly rings of %d chunks) needs %d bytes of the node's memory budget; %d of %d are in use",
			len(specs), limits.MaxBytes, cost, limits.MaxChunks, need, a.BudgetInUse(), a.cfg.MemoryBudget)
	}
	inc, err := a.openDevices(req, specs, limits, need)
	if err != nil {
		a.unreserve(need)
		return nil, err
	}

	a.mu.Lock()
	if a.draining {
		// Drain began while the devices were being opened.
		a.mu.Unlock()
		inc.fail(wire.ErrDraining("destination"), ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED, failFound)
		<-inc.done
		return nil, wire.ErrDraining("destination")
	}
	if old, ok := a.incoming[inc.id]; ok {
		// A rolled-back migration of the same id: the new one replaces it.
		delete(a.sessions, old.sessionID)
	}
	inc.track = a.cfg.Metrics.TrackDest(inc.deviceCounters, inc.liveState)
	// The migration's span is a child of this PrepareIncoming.
	_, inc.trace = tracing.StartMigration(a.cfg.Tracing.TracerProvider(), context.Background(), ctx, "dest", inc.id, inc.phase)
	// The timer is set before the migration is visible, so Open and the
	// migration's end see it (they read inc.expiry unlocked).
	inc.expiry = time.AfterFunc(time.Until(inc.tokenTTL), func() { inc.expire(inc.tokenTTL.Sub(inc.createTime)) })
	a.incoming[inc.id] = inc
	a.forgetOldLocked()
	a.mu.Unlock()
	inc.setPhase(ferryv1.MigrationPhase_MIGRATION_PHASE_WAITING)
	inc.watchStuck()
	return inc, nil
}

// rolledBack reports whether the migration failed or was cancelled and
// its clean-up ran: its id may be prepared anew.
func (inc *incoming) rolledBack() bool {
	inc.mu.Lock()
	p := inc.phase
	inc.mu.Unlock()
	return (p == ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED || p == ferryv1.MigrationPhase_MIGRATION_PHASE_CANCELLED) && isClosed(inc.done)
}

// specs are the migration's canonical device specs, in order.
func (inc *incoming) specs() []string {
	specs := make([]string, len(inc.devs))
	for i, d := range inc.devs {
		specs[i] = d.spec
	}
	return specs
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
		verifiedCh: make(chan struct{}),
		done:       make(chan struct{}),
		fb:         make(map[int]*chanReg),
		phase:      ferryv1.MigrationPhase_MIGRATION_PHASE_PREPARING,
		pending:    len(specs),
	}
	// A prepared migration that no source opens is released after the
	// source timeout at the latest, not held for the token's whole life.
	inc.tokenTTL = inc.createTime.Add(min(a.cfg.TokenTTL, a.cfg.SourceTimeout))
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
		dev, release, err := a.acquire(spec, inc.id)
		if err != nil {
			undo()
			return nil, deviceapi.Error(spec, "open", err)
		}
		d := &devStream{index: i, spec: spec, dev: dev, release: release, notify: make(chan struct{}, 1), turn: make(chan struct{}, 1), freed: make(chan struct{}, 1)}
		inc.devs = append(inc.devs, d)
		if dev.Flags()&vfio.FlagStopCopy == 0 {
			undo()
			return nil, wire.Errorf(codes.FailedPrecondition, wire.ReasonDeviceUnsupported, "device %s does not support STOP_COPY migration (flags %s)", spec, dev.Flags())
		}
		began := time.Now()
		stream, err := dev.SetState(vfio.StateResuming)
		d.resumeTook = time.Since(began)
		if err != nil {
			undo()
			return nil, deviceapi.Error(spec, "enter RESUMING", err)
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

// ringSlot mirrors one slot of a flow.Reassembly ring (a chunk and the
// flag that says it is held): a device window allocates MaxChunks of them
// when its session opens.
type ringSlot struct {
	c    flow.Chunk[payload]
	held bool
}

// WindowCost is the memory budget one device window of maxChunks chunks
// and maxBytes bytes reserves: the bytes it may hold and its reassembly
// ring (about 48 bytes a chunk).
func WindowCost(maxChunks uint32, maxBytes uint64) uint64 {
	return maxBytes + uint64(maxChunks)*uint64(reflect.TypeFor[ringSlot]().Size())
}

// commitAndWait commits the migration and waits until its devices are
// handed over (or ctx ends).
func (inc *incoming) commitAndWait(ctx context.Context) error {
	if err := inc.commit(); err != nil {
		return err
	}
	select {
	case <-inc.done:
		return nil
	case <-ctx.Done():
		return status.FromContextError(ctx.Err()).Err()
	}
}
