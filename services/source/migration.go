package source

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/internal/tracing"
	"github.com/vfio-ferry/ferry/pkg/flow"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/services/chunkwire"
	"github.com/vfio-ferry/ferry/services/deviceapi"
	"github.com/vfio-ferry/ferry/services/telemetry"
	"github.com/vfio-ferry/ferry/services/wire"
)

// errCancelled is the cancel cause of a migration cancelled by the control
// plane.
var errCancelled = errors.New("cancelled by the control plane")

// errSwitchoverDeadline is the cancel cause of a migration whose devices
// stayed stopped past the switchover deadline without a verdict.
var errSwitchoverDeadline = errors.New("switchover deadline passed")

// DefaultSwitchoverDeadline is the switchover deadline of a migration that
// sets none: how long the source devices may stay stopped without a
// verdict before the source rolls back.
const DefaultSwitchoverDeadline = 60 * time.Second

// migration is one outgoing migration.
type migration struct {
	a          *Agent
	id         string
	req        *ferryv1.StartMigrationRequest
	channels   uint32
	chunkSize  uint32
	createTime time.Time
	log        *slog.Logger
	watch      wire.Broadcast
	devs       []*srcDevice
	// dataAddr is the destination's direct data listener, when the session
	// uses one, and dataAuthority the destination's host:port, for the TLS
	// handshake: both set under mu before the channels start, which read
	// them without.
	dataAddr      string
	dataAuthority string
	// fallbacks counts streams that could not open their data connection
	// and sent in Channel messages.
	fallbacks atomic.Uint64
	// bandwidth is the migration's own bandwidth limit (bandwidth.go);
	// limitedBytes counts the bytes its senders passed through the limits.
	bandwidth    *bandwidthLimit
	limitedBytes atomic.Uint64
	// connected counts the channel streams up now; lastWord is when the
	// destination last spoke on any (Unix nanoseconds, 0 before).
	connected atomic.Int32
	lastWord  atomic.Int64
	// switchoverDeadline bounds the time from the devices' stop to the
	// verdict.
	switchoverDeadline time.Duration
	// stuck is closed once a device of the migration stops answering
	// (see watchStuck).
	stuck     chan struct{}
	stuckOnce sync.Once
	// stuckMore gets a token each time one more device gets stuck.
	stuckMore chan struct{}
	stuckDev  atomic.Pointer[srcDevice]

	ctx    context.Context
	cancel context.CancelCauseFunc
	done   chan struct{}

	mu             sync.Mutex
	phase          ferryv1.MigrationPhase
	err            *ferryv1.MigrationError
	startTime      time.Time
	switchoverTime time.Time
	// resumeTime is when the destination acknowledged the commit (or
	// was last asked to): the end of the downtime of a migration that
	// succeeded. A failed one's downtime ends at endTime, rolled back.
	resumeTime   time.Time
	endTime      time.Time
	peakBuffered uint64
	windowBytes  uint64
	// committed is set at the commit point (see commit), and cleared
	// only when the destination answers the Commit that it rolled back
	// first; committing while that Commit is in flight; commitUnheard
	// when the destination never answered it.
	committed, committing, commitUnheard bool
	// reserved is what the migration holds of the agent's memory budget.
	reserved uint64

	track *telemetry.Tracker // set before run starts
	trace *tracing.Migration // set before the migration is visible

	// precopy is set for a pre-copy migration (precopy.go).
	precopy *precopy

	// pull is set when the channels' senders read the device themselves
	// (a one-device migration; see puller), before the channels start.
	pull *puller

	// peer is the destination's control connection and what to abort
	// there; only run's goroutine uses it.
	peer destPeer
	// features are what the destination granted in Open, destVersion
	// its agent version ("" for 0.1.0); set once, under mu, before the
	// channels start.
	features    wire.Features
	destVersion string
	// compressor compresses chunks when the migration asked for it and
	// the destination granted it; nil otherwise.
	compressor *chunkwire.Compressor
}

// destPeer is the source's control connection to the destination agent.
type destPeer struct {
	conn     *grpc.ClientConn
	transfer ferryv1.TransferClient
	// abort names what the destination holds for this migration once Open
	// may have been served: the session, or, when Open went unanswered,
	// the incoming migration by id and token. nil: nothing is held.
	abort *ferryv1.AbortRequest
}

func (a *Agent) newMigration(req *ferryv1.StartMigrationRequest) *migration {
	channels, _ := wire.Channels(req.GetChannels())
	chunkSize, _ := wire.ChunkSize(req.GetChunkSize())
	ctx, cancel := context.WithCancelCause(a.ctx)
	deadline := DefaultSwitchoverDeadline
	if d := req.GetSwitchoverDeadline(); d != nil {
		deadline = d.AsDuration()
	}
	return &migration{
		switchoverDeadline: deadline,
		bandwidth:          newBandwidthLimit(req.GetMaxBandwidth()),
		precopy:            precopyOf(req),
		stuck:              make(chan struct{}),
		stuckMore:          make(chan struct{}, 1),
		a:                  a,
		id:                 req.GetMigrationId(),
		req:                proto.CloneOf(req),
		channels:           channels,
		chunkSize:          chunkSize,
		createTime:         time.Now(),
		log:                a.cfg.Logger.With("migration", req.GetMigrationId(), "role", "source", "devices", sourceSpecs(req)),
		ctx:                ctx,
		cancel:             cancel,
		done:               make(chan struct{}),
		phase:              ferryv1.MigrationPhase_MIGRATION_PHASE_PREPARING,
	}
}

// cancelByUser cancels the migration for the control plane, unless it
// has committed: then it fails with MIGRATION_COMMITTED, and the
// destination owns the devices.
func (m *migration) cancelByUser() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.committed {
		return wire.Errorf(codes.FailedPrecondition, wire.ReasonCommitted, "migration %s has committed: the destination owns its devices", m.id)
	}
	m.cancel(errCancelled)
	return nil
}

// acquire takes the source devices from the registry.
//
// The devices are published in m.devs (which snapshot reads under m.mu)
// only once all are taken.
func (m *migration) acquire() error {
	var devs []*srcDevice
	releaseAll := func() {
		for _, d := range devs {
			d.release()
		}
	}
	for i, p := range m.req.GetDevices() {
		spec, _ := deviceapi.CanonicalSpec(p.GetSourceDevice())
		peer, _ := deviceapi.CanonicalSpec(p.GetDestDevice())
		dev, release, err := m.a.cfg.Registry.Acquire(spec, m.id)
		if err != nil {
			releaseAll()
			return deviceapi.Error(spec, "open", err)
		}
		d := &srcDevice{index: i, spec: spec, peer: peer, dev: dev, release: release, epoch: m.createTime}
		devs = append(devs, d)
		if dev.Flags()&vfio.FlagStopCopy == 0 {
			releaseAll()
			return wire.Errorf(codes.FailedPrecondition, wire.ReasonDeviceUnsupported, "device %s does not support STOP_COPY migration (flags %s)", spec, dev.Flags())
		}
		st, err := dev.State()
		switch {
		case err != nil:
			releaseAll()
			return deviceapi.Error(spec, "read the state", err)
		case st == vfio.StateStop:
			releaseAll()
			return wire.Errorf(codes.FailedPrecondition, wire.ReasonDeviceState,
				"device %s is in STOP, not RUNNING: an earlier migration moved its state away; give it back with ReleaseDevice (ferry release) before migrating it again", spec)
		case st != vfio.StateRunning:
			releaseAll()
			return wire.Errorf(codes.FailedPrecondition, wire.ReasonDeviceState,
				"device %s is in %v, not RUNNING; give it back with ReleaseDevice (ferry release)", spec, st)
		}
		if n, err := dev.DataSize(); err == nil {
			d.total.Store(n)
		}
	}
	m.mu.Lock()
	m.devs = devs
	m.mu.Unlock()
	return nil
}

func (m *migration) setPhase(p ferryv1.MigrationPhase) {
	m.mu.Lock()
	changed := m.phase != p
	m.phase = p
	m.mu.Unlock()
	if changed {
		m.trace.Phase(p)
		m.log.Info("phase", "phase", p.String())
		m.watch.Notify()
	}
}

// snapshot renders the migration for the API.
func (m *migration) snapshot() (*ferryv1.Migration, bool, uint64) {
	m.mu.Lock()
	s := &ferryv1.Migration{
		Id:                    m.id,
		Phase:                 m.phase,
		Error:                 proto.CloneOf(m.err),
		Channels:              m.channels,
		ChunkSize:             m.chunkSize,
		CreateTime:            timestamppb.New(m.createTime),
		PeakBufferedBytes:     m.peakBuffered,
		WindowBytes:           m.windowBytes,
		DirectData:            m.dataAddr != "" && m.fallbacks.Load() == 0,
		Owner:                 ferryv1.DeviceOwner_DEVICE_OWNER_SOURCE,
		ConnectedChannels:     uint32(max(m.connected.Load(), 0)),
		SwitchoverDeadline:    durationpb.New(m.switchoverDeadline),
		MaxBandwidth:          m.bandwidth.limit(),
		NodeMaxBandwidth:      m.a.nodeBandwidth.limit(),
		BandwidthLimitedBytes: m.limitedBytes.Load(),
	}
	switch {
	case m.committing:
		s.Owner = ferryv1.DeviceOwner_DEVICE_OWNER_IN_DOUBT
	case m.committed:
		s.Owner = ferryv1.DeviceOwner_DEVICE_OWNER_DESTINATION
	}
	if t := m.lastWord.Load(); t != 0 {
		s.LastPeerActivityTime = timestamppb.New(time.Unix(0, t))
	}
	start, sw, end, downEnd := m.startTime, m.switchoverTime, m.endTime, m.downtimeEnd()
	devs := m.devs
	gates := make([]*flow.Gate, len(devs))
	for i, d := range devs {
		gates[i] = d.gate
	}
	m.mu.Unlock()
	if !start.IsZero() {
		s.StartTime = timestamppb.New(start)
	}
	if !end.IsZero() {
		s.EndTime = timestamppb.New(end)
	}
	var total uint64
	var bwStallTime time.Duration
	for _, d := range devs {
		p := &ferryv1.DeviceProgress{
			Device:              d.spec,
			WireBytes:           d.wireBytes.Load(),
			PeerDevice:          d.peer,
			Bytes:               d.read.Load(),
			Chunks:              d.chunks.Load(),
			TotalBytes:          d.total.Load(),
			RetransmittedChunks: d.retrans.Load(),
			Verified:            s.Phase == ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED,
		}
		if st, err := d.dev.State(); err == nil {
			p.State = deviceapi.StateToProto(st)
		}
		if g := gates[d.index]; g != nil {
			n, dur := g.Stalls()
			p.WindowStalls, p.WindowStallTime = n, durationpb.New(dur)
		}
		if e := d.errMsg.Load(); e != nil {
			p.Error = *e
		}
		p.BandwidthStalls = d.bwStalls.Load()
		p.BandwidthStallTime = durationpb.New(time.Duration(d.bwStallNanos.Load()))
		s.BandwidthStalls += p.BandwidthStalls
		bwStallTime += p.BandwidthStallTime.AsDuration()
		p.Stuck = d.isStuck()
		if d.flightLimit.Load() != 0 {
			limit, rtt, rate := d.path()
			p.InFlightLimitBytes, p.PathBytesPerSecond = limit, rate
			if rtt > 0 {
				p.MinRoundTrip = durationpb.New(rtt)
			}
		}
		if c := d.config.Load(); c != nil {
			p.ConfigStateBytes = uint64(len(*c))
		}
		total += p.Bytes
		s.WireBytes += p.WireBytes
		s.RetransmittedChunks += p.RetransmittedChunks
		s.Devices = append(s.Devices, p)
	}
	s.Bytes = total
	s.BandwidthStallTime = durationpb.New(bwStallTime)
	if !start.IsZero() && !end.IsZero() && end.After(start) && s.Phase == ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED {
		s.ThroughputBytesPerSecond = float64(total) / end.Sub(start).Seconds()
	}
	if !sw.IsZero() && !downEnd.IsZero() {
		s.Downtime = durationpb.New(downEnd.Sub(sw))
	}
	m.precopySnapshot(s)
	fin := wire.Final(s.Phase)
	return s, fin, total
}

// dataHost takes the destination's host (to dial its direct data port on)
// and its host:port (the TLS authority, as gRPC uses it) from a gRPC
// target: host:port, or dns:/// or passthrough:/// before it. ok is false
// for anything else (a unix socket, a name resolver Ferry cannot see
// through): chunks then travel on the Channel streams.
func dataHost(target string) (host, authority string, ok bool) {
	for _, scheme := range []string{"dns:///", "passthrough:///"} {
		target = strings.TrimPrefix(target, scheme)
	}
	host, _, err := net.SplitHostPort(target)
	if err != nil || host == "" || strings.Contains(target, "/") {
		return "", "", false
	}
	return host, target, true
}

// downtimeEnd is when the VM stopped waiting: the destination's commit
// acknowledgement, or, for a migration that failed after its switchover,
// its end (rolled back). Zero while neither happened. The caller holds
// m.mu.
func (m *migration) downtimeEnd() time.Time {
	if !m.resumeTime.IsZero() {
		return m.resumeTime
	}
	return m.endTime
}
