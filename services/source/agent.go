package source

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/internal/tracing"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/services/chunkwire"
	"github.com/vfio-ferry/ferry/services/deviceapi"
	"github.com/vfio-ferry/ferry/services/telemetry"
	"github.com/vfio-ferry/ferry/services/wire"
)

// Config configures the source agent.
type Config struct {
	// Registry opens and owns the devices.
	Registry *vfio.Registry
	// Pool holds chunk buffers.
	Pool *chunkwire.Pool
	// Logger gets one line per phase change.
	Logger *slog.Logger
	// PeerCreds are the transport credentials for dialling destination
	// agents.
	PeerCreds credentials.TransportCredentials
	// ReconnectTimeout is how long a lost channel or an unreachable
	// destination is retried before the migration fails (0: the default).
	ReconnectTimeout time.Duration
	// ProgressTimeout is how long a channel's send may block, or the
	// chunks it sent go unacknowledged with their device's
	// acknowledgements standing still, before it is re-dialled (stall.go;
	// 0: the default).
	ProgressTimeout time.Duration
	// Metrics, when set, tracks every migration (nil: no metrics).
	Metrics *telemetry.Metrics
	// Tracing, when set, traces every migration and its calls to the
	// destination (nil: no tracing; internal/tracing).
	Tracing *tracing.Tracing
	// MemoryBudget bounds the chunks held unacknowledged by all outgoing
	// migrations together (0: DefaultMemoryBudget; see budget.go).
	MemoryBudget uint64
	// DialOptions are added to the options of every connection to a
	// destination: tests put a source of another version's wire
	// behaviour in front of the destination with an interceptor.
	DialOptions []grpc.DialOption
	// MaxBandwidth is the node-wide bandwidth limit, bytes per second,
	// shared by every outgoing migration of the agent together, beside
	// each one's own max_bandwidth (0: none; else at least MinBandwidth;
	// see bandwidth.go).
	MaxBandwidth uint64
}

// Agent is the source agent.
type Agent struct {
	ferryv1.UnimplementedSourceAgentServer
	cfg Config

	mu         sync.Mutex
	migrations map[string]*migration
	draining   bool // set by Drain: new migrations are refused
	budgetUsed uint64

	// lingering counts goroutines left waiting on a device that stopped
	// answering (stuck.go): Close does not wait for them.
	lingering atomic.Int32

	// nodeBandwidth is the node-wide limit all migrations' senders pass.
	nodeBandwidth *bandwidthLimit

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
		cfg.Pool = chunkwire.NewPool()
	}
	if cfg.ReconnectTimeout == 0 {
		cfg.ReconnectTimeout = DefaultReconnectTimeout
	}
	if cfg.ProgressTimeout == 0 {
		cfg.ProgressTimeout = DefaultProgressTimeout
	}
	if cfg.MemoryBudget == 0 {
		cfg.MemoryBudget = DefaultMemoryBudget
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if err := validateBandwidth("source: the node-wide bandwidth limit", cfg.MaxBandwidth); err != nil {
		return nil, errors.New(wire.Message(err))
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Agent{cfg: cfg, migrations: make(map[string]*migration), ctx: ctx, cancel: cancel, nodeBandwidth: newBandwidthLimit(cfg.MaxBandwidth)}, nil
}

// Register registers the SourceAgent service.
func (a *Agent) Register(s grpc.ServiceRegistrar) { ferryv1.RegisterSourceAgentServer(s, a) }

// Close cancels every running migration (rolling it back) and waits.
//
// It does not wait for goroutines blocked in a device operation that
// never returned (a stuck device): it names how many there are.
func (a *Agent) Close() {
	a.cancel()
	a.wg.Wait()
	if n := a.lingering.Load(); n > 0 {
		a.cfg.Logger.Error("goroutines are still blocked in device operations that did not return; they end with the process", "goroutines", n)
	}
}

// ListDevices implements SourceAgent.
func (a *Agent) ListDevices(context.Context, *ferryv1.ListDevicesRequest) (*ferryv1.ListDevicesResponse, error) {
	return deviceapi.List(a.cfg.Registry), nil
}

// StartMigration implements SourceAgent.
func (a *Agent) StartMigration(ctx context.Context, req *ferryv1.StartMigrationRequest) (*ferryv1.StartMigrationResponse, error) {
	if err := validateStart(req); err != nil {
		return nil, err
	}
	a.mu.Lock()
	if m, ok := a.migrations[req.GetMigrationId()]; ok {
		a.mu.Unlock()
		if field := requestDiff(m.req, req); field != "" {
			return nil, wire.Errorf(codes.AlreadyExists, wire.ReasonSpecMismatch,
				"migration %s exists with a different %s; the running migration is left alone (use a new id for a new request)", m.id, field)
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
	// The migration's work and its calls to the destination belong to the
	// trace of this call (set before the migration is visible).
	m.ctx, m.trace = tracing.StartMigration(a.cfg.Tracing.TracerProvider(), m.ctx, ctx, "source", m.id, m.phase)
	a.migrations[m.id] = m
	a.forgetOldLocked()
	a.mu.Unlock()

	if err := m.acquire(); err != nil {
		a.mu.Lock()
		delete(a.migrations, m.id)
		a.mu.Unlock()
		m.cancel(nil)
		close(m.done)
		m.trace.End(ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED, wire.Reason(err), wire.Message(err))
		return nil, err
	}
	m.track = a.cfg.Metrics.TrackSource(m.deviceCounters, m.liveState)
	if m.precopy != nil {
		m.track.Precopy(m.precopyReading)
	}
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
	if err := validateServerName(req.GetDestTlsServerName()); err != nil {
		return err
	}
	if t := req.GetToken(); t == "" || len(t) > wire.MaxTokenLength {
		return wire.Errorf(codes.InvalidArgument, wire.ReasonInvalidArgument, "token must be 1 to %d characters", wire.MaxTokenLength)
	}
	if err := wire.ValidateDeviceCount(len(req.GetDevices())); err != nil {
		return err
	}
	seen := make(map[string]bool)
	for i, p := range req.GetDevices() {
		src, err := deviceapi.CanonicalSpec(p.GetSourceDevice())
		if err != nil {
			return wire.Errorf(codes.InvalidArgument, wire.ReasonInvalidArgument, "devices[%d].source_device: %s", i, wire.Message(err))
		}
		if _, err := deviceapi.CanonicalSpec(p.GetDestDevice()); err != nil {
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
	if err := validateBandwidth("max_bandwidth", req.GetMaxBandwidth()); err != nil {
		return err
	}
	switch req.GetMode() {
	case ferryv1.MigrationMode_MIGRATION_MODE_UNSPECIFIED, ferryv1.MigrationMode_MIGRATION_MODE_STOP_COPY,
		ferryv1.MigrationMode_MIGRATION_MODE_PRECOPY:
	default:
		return wire.Errorf(codes.InvalidArgument, wire.ReasonInvalidArgument, "unknown mode %d", req.GetMode())
	}
	if d := req.GetSwitchoverDeadline(); d != nil {
		if err := d.CheckValid(); err != nil || d.AsDuration() <= 0 || d.AsDuration() > maxSwitchoverDeadline {
			return wire.Errorf(codes.InvalidArgument, wire.ReasonInvalidArgument, "switchover_deadline must be more than 0 and at most %s", maxSwitchoverDeadline)
		}
	}
	if _, err := chunkwire.NewDigest(req.GetDigest()); err != nil {
		return wire.Errorf(codes.InvalidArgument, wire.ReasonInvalidArgument, "%v", err)
	}
	return validatePrecopy(req)
}

// validatePrecopy checks the pre-copy fields: only a pre-copy migration
// sets them, and within bounds.
func validatePrecopy(req *ferryv1.StartMigrationRequest) error {
	precopy := req.GetMode() == ferryv1.MigrationMode_MIGRATION_MODE_PRECOPY
	for _, f := range []struct {
		name string
		d    *durationpb.Duration
		max  time.Duration
	}{{"downtime_limit", req.GetDowntimeLimit(), maxDowntimeLimit}, {"precopy_timeout", req.GetPrecopyTimeout(), maxPrecopyTimeout}} {
		if f.d == nil {
			continue
		}
		if err := f.d.CheckValid(); err != nil || f.d.AsDuration() < 0 || f.d.AsDuration() > f.max {
			return wire.Errorf(codes.InvalidArgument, wire.ReasonInvalidArgument, "%s must be between 0 and %s", f.name, f.max)
		}
		if !precopy && f.d.AsDuration() != 0 {
			return wire.Errorf(codes.InvalidArgument, wire.ReasonInvalidArgument, "%s is for MIGRATION_MODE_PRECOPY only", f.name)
		}
	}
	switch a := req.GetOnPrecopyTimeout(); {
	case a < 0 || a > ferryv1.PrecopyTimeoutAction_PRECOPY_TIMEOUT_ACTION_SWITCHOVER:
		return wire.Errorf(codes.InvalidArgument, wire.ReasonInvalidArgument, "unknown on_precopy_timeout %d", a)
	case !precopy && a != ferryv1.PrecopyTimeoutAction_PRECOPY_TIMEOUT_ACTION_UNSPECIFIED:
		return wire.Errorf(codes.InvalidArgument, wire.ReasonInvalidArgument, "on_precopy_timeout is for MIGRATION_MODE_PRECOPY only")
	}
	return nil
}

// The longest pre-copy limits a request may set.
const (
	maxDowntimeLimit  = time.Hour
	maxPrecopyTimeout = 7 * 24 * time.Hour
)

// validateServerName checks dest_tls_server_name: empty, or a DNS name or
// an IP address.
func validateServerName(name string) error {
	if len(name) > 253 {
		return wire.Errorf(codes.InvalidArgument, wire.ReasonInvalidArgument, "dest_tls_server_name is longer than 253 characters")
	}
	for _, c := range name {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '-' || c == ':') {
			return wire.Errorf(codes.InvalidArgument, wire.ReasonInvalidArgument, "dest_tls_server_name %q: want a DNS name or an IP address", name)
		}
	}
	return nil
}

// maxSwitchoverDeadline is the longest switchover deadline a request may
// set.
const maxSwitchoverDeadline = time.Hour

// requestDiff names the first field in which two start requests for one
// migration id differ, or "" when they are the same request.
func requestDiff(x, y *ferryv1.StartMigrationRequest) string {
	switch {
	case x.GetDestAddress() != y.GetDestAddress():
		return "dest_address"
	case x.GetToken() != y.GetToken():
		return "token"
	case x.GetDestTlsServerName() != y.GetDestTlsServerName():
		return "dest_tls_server_name"
	case len(x.GetDevices()) != len(y.GetDevices()):
		return "number of devices"
	}
	for i := range x.GetDevices() {
		if !proto.Equal(x.GetDevices()[i], y.GetDevices()[i]) {
			return fmt.Sprintf("devices[%d]", i)
		}
	}
	switch {
	case x.GetChannels() != y.GetChannels():
		return "channels"
	case x.GetChunkSize() != y.GetChunkSize():
		return "chunk_size"
	case x.GetMode() != y.GetMode():
		return "mode"
	case x.GetDigest() != y.GetDigest():
		return "digest"
	case !proto.Equal(x.GetSwitchoverDeadline(), y.GetSwitchoverDeadline()):
		return "switchover_deadline"
	case !proto.Equal(x, y):
		return "request"
	}
	return ""
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

// Switchover implements SourceAgent: a pre-copy migration starts its
// switchover (precopy.go); stop-copy migrations switch over by themselves.
// It reports the current state.
func (a *Agent) Switchover(ctx context.Context, req *ferryv1.SwitchoverRequest) (*ferryv1.SwitchoverResponse, error) {
	m, err := a.lookup(req.GetMigrationId())
	if err != nil {
		return nil, err
	}
	m.switchover(req.GetForce())
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
	if err := m.cancelByUser(); err != nil {
		return nil, err
	}
	select {
	case <-m.done:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	snap, _, _ := m.snapshot()
	return &ferryv1.CancelMigrationResponse{Migration: snap}, nil
}

// SetBandwidth implements SourceAgent.
func (a *Agent) SetBandwidth(ctx context.Context, req *ferryv1.SetBandwidthRequest) (*ferryv1.SetBandwidthResponse, error) {
	if err := validateBandwidth("max_bandwidth", req.GetMaxBandwidth()); err != nil {
		return nil, err
	}
	m, err := a.lookup(req.GetMigrationId())
	if err != nil {
		return nil, err
	}
	m.mu.Lock()
	final := wire.Final(m.phase)
	phase := m.phase
	m.mu.Unlock()
	if final {
		return nil, wire.Errorf(codes.FailedPrecondition, wire.ReasonSessionState, "migration %s is %s: its bandwidth limit no longer applies", m.id, phase)
	}
	old := m.bandwidth.limit()
	m.bandwidth.set(req.GetMaxBandwidth())
	m.log.Info("bandwidth limit changed", "from_bytes_per_second", old, "to_bytes_per_second", req.GetMaxBandwidth())
	m.watch.Notify()
	snap, _, _ := m.snapshot()
	return &ferryv1.SetBandwidthResponse{Migration: snap}, nil
}

// rpcTimeout bounds the unary calls to the destination that do not wait
// for data (Open, SwitchoverStart, Abort).
const rpcTimeout = 30 * time.Second

// maxHistory bounds the migrations the agent remembers; the oldest
// finished ones are forgotten first, so a control plane that starts
// migrations for ever does not grow the agent for ever.
const maxHistory = 1024

// forgetOldLocked drops the oldest finished migrations beyond maxHistory.
// The caller holds a.mu.
func (a *Agent) forgetOldLocked() {
	if len(a.migrations) <= maxHistory {
		return
	}
	var done []*migration
	for _, m := range a.migrations {
		select {
		case <-m.done:
			done = append(done, m)
		default:
		}
	}
	slices.SortFunc(done, func(x, y *migration) int { return x.createTime.Compare(y.createTime) })
	for _, m := range done[:min(len(done), len(a.migrations)-maxHistory)] {
		delete(a.migrations, m.id)
	}
}

// ReleaseDevice implements SourceAgent: it gives an idle device back for
// a new VM on this host (vfio.Registry.Recover), and lets go of it
// (vfio.Registry.LetGo) unless a VMM lent it.
func (a *Agent) ReleaseDevice(ctx context.Context, req *ferryv1.ReleaseDeviceRequest) (*ferryv1.ReleaseDeviceResponse, error) {
	spec, err := deviceapi.CanonicalSpec(req.GetDevice())
	if err != nil {
		return nil, err
	}
	info, err := a.cfg.Registry.Recover(spec, req.GetReset_())
	if err != nil {
		return nil, deviceapi.Error(spec, "release", err)
	}
	letGo := !strings.HasPrefix(spec, "vmm:")
	if letGo {
		if err := a.cfg.Registry.LetGo(spec); err != nil {
			return nil, deviceapi.Error(spec, "let go of", err)
		}
	}
	a.cfg.Logger.Info("device released", "device", spec, "reset", req.GetReset_(), "state", info.State.String(), "let_go", letGo)
	return &ferryv1.ReleaseDeviceResponse{Device: deviceapi.ToProto(info), LetGo: letGo}, nil
}
