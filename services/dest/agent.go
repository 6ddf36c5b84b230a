package dest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/internal/tracing"
	"github.com/vfio-ferry/ferry/pkg/flow"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/services/chunkwire"
	"github.com/vfio-ferry/ferry/services/telemetry"
	"github.com/vfio-ferry/ferry/services/wire"
)

// Config configures the destination agent.
type Config struct {
	// Registry opens and owns the devices.
	Registry *vfio.Registry
	// Pool holds chunk buffers (the same pool the server's codec receives
	// into).
	Pool *chunkwire.Pool
	// Logger gets one line per phase change.
	Logger *slog.Logger
	// MaxChunks is the default and largest per-device window in chunks
	// (--max-buffers).
	MaxChunks uint32
	// MaxBytes is the default and largest per-device window in bytes
	// (--max-buffer-bytes). It bounds the memory a device stream holds.
	MaxBytes uint64
	// MemoryBudget bounds the sum of the windows of every incoming
	// migration on the node, their reassembly rings included (see
	// WindowCost; --memory-budget).
	MemoryBudget uint64
	// TokenTTL is how long a prepared migration's token is valid; the
	// migration waits for the source's Open at most SourceTimeout of it.
	TokenTTL time.Duration
	// SourceTimeout is how long a prepared migration waits for the
	// source's Open, and how long an opened session may have no channel
	// connected, before it fails and its devices are reset: the source
	// agent died, failed or lost its network (0: DefaultSourceTimeout).
	// A VERIFIED migration is never failed for it.
	SourceTimeout time.Duration
	// Metrics, when set, tracks every incoming migration (nil: no
	// metrics).
	Metrics *telemetry.Metrics
	// Tracing, when set, traces every incoming migration (nil: no
	// tracing; internal/tracing).
	Tracing *tracing.Tracing
}

// Defaults for Config's zero fields.
const (
	DefaultMaxChunks     = 64
	DefaultMaxBytes      = 64 << 20
	DefaultMemoryBudget  = 2 << 30
	DefaultTokenTTL      = 10 * time.Minute
	DefaultSourceTimeout = 60 * time.Second
)

func (c *Config) setDefaults() error {
	if c.Registry == nil {
		return errors.New("dest: a device registry is required")
	}
	if c.Pool == nil {
		c.Pool = chunkwire.NewPool()
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.MaxChunks == 0 {
		c.MaxChunks = DefaultMaxChunks
	}
	if c.MaxBytes == 0 {
		c.MaxBytes = DefaultMaxBytes
	}
	if c.MemoryBudget == 0 {
		c.MemoryBudget = DefaultMemoryBudget
	}
	if c.TokenTTL == 0 {
		c.TokenTTL = DefaultTokenTTL
	}
	if c.SourceTimeout == 0 {
		c.SourceTimeout = DefaultSourceTimeout
	}
	if err := (flow.Limits{MaxChunks: c.MaxChunks, MaxBytes: c.MaxBytes}).Validate(wire.MinChunkSize); err != nil {
		return err
	}
	if c.MaxBytes > wire.MaxWindowBytes {
		return fmt.Errorf("dest: a device window of %d bytes is more than a source admits (%d)", c.MaxBytes, uint64(wire.MaxWindowBytes))
	}
	if c.MemoryBudget < WindowCost(c.MaxChunks, c.MaxBytes) {
		return fmt.Errorf("dest: the memory budget must hold at least one device window (%d bytes with its reassembly ring)", WindowCost(c.MaxChunks, c.MaxBytes))
	}
	return nil
}

// Agent is the destination agent.
type Agent struct {
	cfg Config

	mu         sync.Mutex
	incoming   map[string]*incoming       // by migration id
	sessions   map[string]*incoming       // by session id
	preparing  map[string]*pendingPrepare // by migration id, while its devices open
	budgetUsed uint64
	peakBudget uint64
	draining   bool // set by Drain: new migrations are refused
	// dataKeys are the Channel streams waiting for their direct data
	// connection, by key (direct.go).
	dataKeys map[[chunkwire.DataKeyLen]byte]*dataAttach
	// dataPort is the direct data listener's port while ServeData runs.
	dataPort atomic.Uint32

	// zstd decodes compressed chunks for every session.
	zstd *chunkwire.Decompressor

	// acquire gives a migration a device: the registry's Acquire (tests
	// put devices of their own behind it).
	acquire func(spec, owner string) (vfio.Device, func(), error)

	// crew owns every goroutine the agent starts: loaders, channel
	// receivers and clean-ups (stuck.go).
	crew   crew
	ctx    context.Context
	cancel context.CancelFunc
}

// New returns an agent.
func New(cfg Config) (*Agent, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	dec, err := chunkwire.NewDecompressor(wire.MaxChunkSize)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Agent{
		zstd:      dec,
		cfg:       cfg,
		incoming:  make(map[string]*incoming),
		sessions:  make(map[string]*incoming),
		preparing: make(map[string]*pendingPrepare),
		acquire:   cfg.Registry.Acquire,
		dataKeys:  make(map[[chunkwire.DataKeyLen]byte]*dataAttach),
		crew:      crew{changed: make(chan struct{}, 1)},
		ctx:       ctx,
		cancel:    cancel,
	}, nil
}

// Register registers the DestAgent and Transfer services.
func (a *Agent) Register(s grpc.ServiceRegistrar) {
	ferryv1.RegisterDestAgentServer(s, &controlServer{a: a})
	ferryv1.RegisterTransferServer(s, &transferServer{a: a})
}

// Close fails every migration still running (resetting its devices) and
// waits for the agent's goroutines, but those blocked in a device its
// guard declared stuck: it names how many there are. A VERIFIED migration is left as it
// is, its devices held in STOP: its source may have committed, so only
// the source or the control plane may decide (it is logged loudly).
func (a *Agent) Close() {
	a.mu.Lock()
	all := make([]*incoming, 0, len(a.incoming))
	for _, inc := range a.incoming {
		all = append(all, inc)
	}
	a.mu.Unlock()
	for _, inc := range all {
		phase := inc.fail(wire.Errorf(codes.Unavailable, wire.ReasonAborted, "destination agent shutting down"), ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED, failFound)
		if phase == ferryv1.MigrationPhase_MIGRATION_PHASE_VERIFIED {
			inc.log.Error("agent stopping with a verified migration not committed: its devices are left in STOP, not reset; ask the source who owns them (SUCCEEDED there: this host)",
				"owner", ferryv1.DeviceOwner_DEVICE_OWNER_IN_DOUBT.String())
		}
	}
	a.cancel()
	if n := a.crew.wait(); n > 0 {
		a.cfg.Logger.Error("goroutines are still blocked in device operations that did not return; they end with the process", "goroutines", n)
	}
	a.zstd.Close()
}

// BudgetInUse reports the bytes of memory budget reserved now.
func (a *Agent) BudgetInUse() uint64 {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.budgetUsed
}

// reserve takes n bytes of budget.
func (a *Agent) reserve(n uint64) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.budgetUsed+n > a.cfg.MemoryBudget || a.budgetUsed+n < a.budgetUsed {
		return false
	}
	a.budgetUsed += n
	a.peakBudget = max(a.peakBudget, a.budgetUsed)
	return true
}

func (a *Agent) unreserve(n uint64) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.budgetUsed -= n
}

func (a *Agent) lookup(id string) (*incoming, error) {
	if err := wire.ValidateID(id); err != nil {
		return nil, err
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	inc, ok := a.incoming[id]
	if !ok {
		return nil, wire.Errorf(codes.NotFound, wire.ReasonMigrationNotFound, "no incoming migration %q", id)
	}
	return inc, nil
}

func (a *Agent) session(id string) (*incoming, error) {
	if id == "" || len(id) > wire.MaxTokenLength {
		return nil, wire.Errorf(codes.InvalidArgument, wire.ReasonSessionNotFound, "session id must be 1 to %d characters", wire.MaxTokenLength)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	inc, ok := a.sessions[id]
	if !ok {
		return nil, wire.Errorf(codes.NotFound, wire.ReasonSessionNotFound, "no session %q", id)
	}
	return inc, nil
}

// randomID returns 128 random bits in hex.
func randomID() string {
	var b [16]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// maxHistory bounds the incoming migrations the agent remembers; the
// oldest finished ones are forgotten first.
const maxHistory = 1024

// forgetOldLocked drops the oldest finished migrations (and their
// sessions) beyond maxHistory. The caller holds a.mu.
func (a *Agent) forgetOldLocked() {
	if len(a.incoming) <= maxHistory {
		return
	}
	var done []*incoming
	for _, inc := range a.incoming {
		if isClosed(inc.done) {
			done = append(done, inc)
		}
	}
	slices.SortFunc(done, func(x, y *incoming) int { return x.createTime.Compare(y.createTime) })
	for _, inc := range done[:min(len(done), len(a.incoming)-maxHistory)] {
		delete(a.incoming, inc.id)
		delete(a.sessions, inc.sessionID)
	}
}
