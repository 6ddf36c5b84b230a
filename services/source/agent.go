package source

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"slices"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/proto"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/services/telemetry"
	"github.com/vfio-ferry/ferry/services/wire"
)

// Config configures the source agent.
type Config struct {
	// Registry opens and owns the devices.
	Registry *vfio.Registry
	// Pool holds chunk buffers.
	Pool *wire.Pool
	// Logger gets one line per phase change.
	Logger *slog.Logger
	// PeerCreds are the transport credentials for dialling destination
	// agents.
	PeerCreds credentials.TransportCredentials
	// ReconnectTimeout is how long a lost channel or an unreachable
	// destination is retried before the migration fails (0: the default).
	ReconnectTimeout time.Duration
	// ProgressTimeout is how long a channel with chunks in flight may hear
	// nothing from the destination before it is re-dialled (0: the
	// default).
	ProgressTimeout time.Duration
	// Metrics, when set, tracks every migration (nil: no metrics).
	Metrics *telemetry.Metrics
}

// Agent is the source agent.
type Agent struct {
	ferryv1.UnimplementedSourceAgentServer
	cfg Config

	mu         sync.Mutex
	migrations map[string]*migration
	draining   bool // set by Drain: new migrations are refused

	wg     sync.WaitGroup
	ctx    context.Context
	cancel context.CancelFunc
}

// New returns an agent.
func New(cfg Config) (*Agent, error) {
	if cfg.Registry == nil {
		return nil, errors.New("source: a device registry is required")
	}
	if cfg.PeerCreds == nil {
		return nil, errors.New("source: peer transport credentials are required")
	}
	if cfg.Pool == nil {
		cfg.Pool = wire.NewPool()
	}
	if cfg.ReconnectTimeout == 0 {
		cfg.ReconnectTimeout = DefaultReconnectTimeout
	}
	if cfg.ProgressTimeout == 0 {
		cfg.ProgressTimeout = DefaultProgressTimeout
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Agent{cfg: cfg, migrations: make(map[string]*migration), ctx: ctx, cancel: cancel}, nil
}

// Register registers the SourceAgent service.
func (a *Agent) Register(s *grpc.Server) { ferryv1.RegisterSourceAgentServer(s, a) }

// Close cancels every running migration (rolling it back) and waits.
func (a *Agent) Close() {
	a.cancel()
	a.wg.Wait()
}

// ListDevices implements SourceAgent.
func (a *Agent) ListDevices(context.Context, *ferryv1.ListDevicesRequest) (*ferryv1.ListDevicesResponse, error) {
	return wire.ListDevices(a.cfg.Registry), nil
}

// StartMigration implements SourceAgent.
func (a *Agent) StartMigration(ctx context.Context, req *ferryv1.StartMigrationRequest) (*ferryv1.StartMigrationResponse, error) {
	if err := validateStart(req); err != nil {
		return nil, err
	}
	a.mu.Lock()
	if m, ok := a.migrations[req.GetMigrationId()]; ok {
		a.mu.Unlock()
		if !proto.Equal(m.req, req) {
			return nil, wire.Errorf(codes.AlreadyExists, wire.ReasonSpecMismatch, "migration %s exists with a different request", m.id)
		}
		snap, _, _ := m.snapshot()
		return &ferryv1.StartMigrationResponse{Migration: snap}, nil
	}
	if a.draining {
		a.mu.Unlock()
		return nil, wire.ErrDraining("source")
	}
	// Hold the id while the devices are acquired so a concurrent start of
	// the same id waits for this one.
	m := a.newMigration(req)
	a.migrations[m.id] = m
	a.mu.Unlock()

	if err := m.acquire(); err != nil {
		a.mu.Lock()
		delete(a.migrations, m.id)
		a.mu.Unlock()
		m.cancel(nil)
		close(m.done)
		return nil, err
	}
	m.track = a.cfg.Metrics.TrackSource(m.deviceCounters)
	a.wg.Go(m.run)
	snap, _, _ := m.snapshot()
	return &ferryv1.StartMigrationResponse{Migration: snap}, nil
}

func validateStart(req *ferryv1.StartMigrationRequest) error {
	if err := wire.ValidateID(req.GetMigrationId()); err != nil {
		return err
	}
	addr := req.GetDestAddress()
	if len(addr) > 256 {
		return wire.Errorf(codes.InvalidArgument, wire.ReasonInvalidArgument, "dest_address is longer than 256 characters")
	}
	if _, _, err := net.SplitHostPort(addr); err != nil {
		return wire.Errorf(codes.InvalidArgument, wire.ReasonInvalidArgument, "dest_address %q: want host:port (%v)", addr, err)
	}
	if t := req.GetToken(); t == "" || len(t) > wire.MaxTokenLength {
		return wire.Errorf(codes.InvalidArgument, wire.ReasonInvalidArgument, "token must be 1 to %d characters", wire.MaxTokenLength)
	}
	if err := wire.ValidateDeviceCount(len(req.GetDevices())); err != nil {
		return err
	}
	seen := make(map[string]bool)
	for i, p := range req.GetDevices() {
		src, err := wire.CanonicalSpec(p.GetSourceDevice())
		if err != nil {
			return wire.Errorf(codes.InvalidArgument, wire.ReasonInvalidArgument, "devices[%d].source_device: %s", i, wire.Message(err))
		}
		if _, err := wire.CanonicalSpec(p.GetDestDevice()); err != nil {
			return wire.Errorf(codes.InvalidArgument, wire.ReasonInvalidArgument, "devices[%d].dest_device: %s", i, wire.Message(err))
		}
		if seen[src] {
			return wire.Errorf(codes.InvalidArgument, wire.ReasonInvalidArgument, "source device %s is listed twice", src)
		}
		seen[src] = true
	}
	if _, err := wire.Channels(req.GetChannels()); err != nil {
		return err
	}
	if _, err := wire.ChunkSize(req.GetChunkSize()); err != nil {
		return err
	}
	switch req.GetMode() {
	case ferryv1.MigrationMode_MIGRATION_MODE_UNSPECIFIED, ferryv1.MigrationMode_MIGRATION_MODE_STOP_COPY:
	case ferryv1.MigrationMode_MIGRATION_MODE_PRECOPY:
		return wire.Errorf(codes.Unimplemented, wire.ReasonNotImplemented, "pre-copy migrations are not served yet")
	default:
		return wire.Errorf(codes.InvalidArgument, wire.ReasonInvalidArgument, "unknown mode %d", req.GetMode())
	}
	if _, err := wire.NewDigest(req.GetDigest()); err != nil {
		return wire.Errorf(codes.InvalidArgument, wire.ReasonInvalidArgument, "%v", err)
	}
	return nil
}

func (a *Agent) lookup(id string) (*migration, error) {
	if err := wire.ValidateID(id); err != nil {
		return nil, err
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	m, ok := a.migrations[id]
	if !ok {
		return nil, wire.Errorf(codes.NotFound, wire.ReasonMigrationNotFound, "no migration %q", id)
	}
	return m, nil
}

// GetMigration implements SourceAgent.
func (a *Agent) GetMigration(ctx context.Context, req *ferryv1.GetMigrationRequest) (*ferryv1.GetMigrationResponse, error) {
	m, err := a.lookup(req.GetMigrationId())
	if err != nil {
		return nil, err
	}
	snap, _, _ := m.snapshot()
	return &ferryv1.GetMigrationResponse{Migration: snap}, nil
}

// ListMigrations implements SourceAgent.
func (a *Agent) ListMigrations(context.Context, *ferryv1.ListMigrationsRequest) (*ferryv1.ListMigrationsResponse, error) {
	a.mu.Lock()
	all := make([]*migration, 0, len(a.migrations))
	for _, m := range a.migrations {
		all = append(all, m)
	}
	a.mu.Unlock()
	slices.SortFunc(all, func(x, y *migration) int { return y.createTime.Compare(x.createTime) })
	resp := &ferryv1.ListMigrationsResponse{}
	for _, m := range all {
		snap, _, _ := m.snapshot()
		resp.Migrations = append(resp.Migrations, snap)
	}
	return resp, nil
}

// WatchMigration implements SourceAgent.
func (a *Agent) WatchMigration(req *ferryv1.WatchMigrationRequest, stream grpc.ServerStreamingServer[ferryv1.WatchMigrationResponse]) error {
	m, err := a.lookup(req.GetMigrationId())
	if err != nil {
		return err
	}
	return wire.Watch(stream.Context(), &m.watch, m.snapshot, func(s *ferryv1.Migration) error {
		return stream.Send(&ferryv1.WatchMigrationResponse{Migration: s})
	})
}

// Switchover implements SourceAgent. Stop-copy migrations switch over by
// themselves, so it reports the current state.
func (a *Agent) Switchover(ctx context.Context, req *ferryv1.SwitchoverRequest) (*ferryv1.SwitchoverResponse, error) {
	m, err := a.lookup(req.GetMigrationId())
	if err != nil {
		return nil, err
	}
	snap, _, _ := m.snapshot()
	return &ferryv1.SwitchoverResponse{Migration: snap}, nil
}

// CancelMigration implements SourceAgent: it waits until the rollback is
// done (or ctx ends) and returns the final state.
func (a *Agent) CancelMigration(ctx context.Context, req *ferryv1.CancelMigrationRequest) (*ferryv1.CancelMigrationResponse, error) {
	m, err := a.lookup(req.GetMigrationId())
	if err != nil {
		return nil, err
	}
	m.cancelByUser()
	select {
	case <-m.done:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	snap, _, _ := m.snapshot()
	return &ferryv1.CancelMigrationResponse{Migration: snap}, nil
}

// rpcTimeout bounds the unary calls to the destination that do not wait
// for data (Open, SwitchoverStart, Abort).
const rpcTimeout = 30 * time.Second
