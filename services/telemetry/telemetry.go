// Package telemetry is Ferry's Prometheus metrics: the gRPC server and
// client metrics of go-grpc-middleware's prometheus provider, and Ferry's
// own per-device and per-migration metrics.
//
// The agents do no per-chunk work for metrics. A running migration is
// tracked by a function that reads the counters the agent keeps anyway
// (the same ones its status API reports); a scrape calls it. When the
// migration ends its final counters are added to per-device totals and its
// outcome, duration and downtime are recorded. So a device's counter is
// the sum over every migration of that device on this agent, exact at any
// scrape, and it never goes down.
//
// An agent exports the series of the roles it plays only: a destination
// agent has no ferry_source_* series and no role="source" label values,
// not even at zero. A device is labelled by what it is, not by how it is
// tuned: a simulated device's label is its size and seed alone (see
// DeviceLabel), so a rate= or wrate= variant adds no series.
//
// A nil *Metrics is valid and records nothing: agents take one in their
// Config and call it unconditionally.
package telemetry

import (
	"slices"
	"strings"
	"sync"
	"time"

	grpcprom "github.com/grpc-ecosystem/go-grpc-middleware/providers/prometheus"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"google.golang.org/grpc"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/internal/buildinfo"
	"github.com/vfio-ferry/ferry/pkg/vfio"
)

// Role labels.
const (
	RoleSource = "source"
	RoleDest   = "dest"
)

// Outcome is how a migration ended: the value of the outcome label.
type Outcome string

// The outcomes.
const (
	Succeeded Outcome = "succeeded"
	Failed    Outcome = "failed"
	Cancelled Outcome = "cancelled"
)

// SourceDevice is one source device's counters in one migration, as the
// source agent reads them.
type SourceDevice struct {
	// Device is the device's spec (the device label).
	Device string
	// Bytes and Chunks are the state read from the device and queued to
	// the channels.
	Bytes, Chunks uint64
	// Retransmitted counts chunks sent again after a channel broke.
	Retransmitted uint64
	// WireBytes are the bytes of those chunks as they travel: fewer than
	// Bytes where zero pages stayed home or compression shrank them.
	WireBytes uint64
	// Stalls counts the times the device's reader waited for window
	// credit; StallTime is the time it spent waiting.
	Stalls    uint64
	StallTime time.Duration
	// BandwidthStalls counts the device's chunks that waited for a
	// bandwidth limit (the migration's or the node's) before they were
	// sent; BandwidthStallTime is the time they waited.
	BandwidthStalls    uint64
	BandwidthStallTime time.Duration
	// InFlightLimit is what the device keeps in flight at most, 0 before
	// its session opened; MinRoundTrip the shortest acknowledgement round
	// trip measured, 0 before one was (services/source/inflight.go).
	InFlightLimit uint64
	MinRoundTrip  time.Duration
	// PrecopyBytes is the part of Bytes read before the switchover, while
	// the VM ran (pre-copy).
	PrecopyBytes uint64
	// TotalBytes is the state the device is expected to have in all, 0
	// when unknown: its estimate while it streams, its final size once its
	// stream ended.
	TotalBytes uint64
}

// Live is a running migration's phase, as a scrape reads it.
type Live struct {
	Phase ferryv1.MigrationPhase
	// Opened is false for a destination migration that was prepared and
	// whose source has not opened the session: it shows as phase
	// "prepared" and is not active (ferry_migrations_active), since a
	// control plane may prepare a destination and never start the source.
	// A source migration is opened from its StartMigration.
	Opened bool
}

// Precopy is a running pre-copy migration's prediction, as the source
// agent reads it.
type Precopy struct {
	// Migration is the migration id (the migration label).
	Migration string
	// PredictedDowntime is the downtime predicted if the devices stopped
	// now, when HasPrediction.
	PredictedDowntime time.Duration
	HasPrediction     bool
	// DirtyRate is the bytes per second the devices dirty, when
	// HasDirtyRate.
	DirtyRate    float64
	HasDirtyRate bool
}

// DestDevice is one destination device's counters in one migration, as the
// destination agent reads them.
type DestDevice struct {
	// Device is the device's spec (the device label).
	Device string
	// Bytes and Chunks are the state written (loaded) into the device.
	Bytes, Chunks uint64
	// Duplicates counts chunks received again and dropped.
	Duplicates uint64
	// Buffered is the bytes received and not yet written, held against
	// Window, the device's window in bytes.
	Buffered, Window uint64
}

// Ended is what a migration's end records.
type Ended struct {
	Outcome Outcome
	// Reason is the ErrorInfo reason of a failed or cancelled migration
	// (DEVICE_VERIFY_FAILED, PEER_UNAVAILABLE, ...): the reason label of
	// ferry_migrations_total; "" for a success.
	Reason string
	// Duration runs from the agent's acceptance of the migration
	// (StartMigration on the source, PrepareIncoming on the destination)
	// to its final phase.
	Duration time.Duration
	// Downtime runs from the accepted switchover start to the final phase;
	// it is recorded only when SwitchedOver.
	Downtime     time.Duration
	SwitchedOver bool
	// Predicted is the downtime predicted before a pre-copy switchover,
	// when HasPrediction: the ratio of Downtime to it is recorded.
	Predicted     time.Duration
	HasPrediction bool
}

// Metrics holds every Ferry metric. Build it with New in main and hand it
// to the agents through their Config.
type Metrics struct {
	// Server counts the calls of an agent's gRPC server: wire it into
	// the server's interceptors.
	Server *grpcprom.ServerMetrics
	// Client counts the calls on the connections the source agent dials.
	Client *grpcprom.ClientMetrics

	roles      []string
	migrations *prometheus.CounterVec
	dataConns  *prometheus.CounterVec
	duration   *prometheus.HistogramVec
	downtime   *prometheus.HistogramVec
	predRatio  prometheus.Histogram
	notConv    prometheus.Counter
	d          descs

	// mu guards the live migrations and the totals of ended ones. A
	// scrape reads the live migrations under it, and End moves a
	// migration's counters into the totals under it, so no scrape counts
	// a migration twice or not at all.
	mu      sync.Mutex
	nextID  uint64
	sources map[uint64]func() []SourceDevice
	precopy map[uint64]func() Precopy
	dests   map[uint64]func() []DestDevice
	live    map[uint64]liveReader
	srcDone map[string]SourceDevice
	dstDone map[string]DestDevice
}

// liveReader reads one tracked migration's phase.
type liveReader struct {
	role string
	read func() Live
}

// descs describes the metrics the collector builds at scrape time.
type descs struct {
	sentBytes, sentChunks, stalls, stallSeconds, retrans, loadedBytes, loadedChunks, duplicates, buffered, window, active *prometheus.Desc
	precopyBytes, predicted, dirtyRate, byPhase, totalBytes, remainingBytes                                               *prometheus.Desc
	bwStalls, bwStallSeconds                                                                                              *prometheus.Desc
	inFlight, roundTrip                                                                                                   *prometheus.Desc
	wireBytes                                                                                                             *prometheus.Desc
}

func newDescs() descs {
	return descs{
		sentBytes:      prometheus.NewDesc("ferry_source_sent_bytes_total", "Bytes of device state read from the device and sent, per source device.", []string{"device"}, nil),
		wireBytes:      prometheus.NewDesc("ferry_source_wire_bytes_total", "Bytes of the chunks sent as they travelled (after zero pages and compression), per source device: against ferry_source_sent_bytes_total, what the link was spared.", []string{"device"}, nil),
		sentChunks:     prometheus.NewDesc("ferry_source_sent_chunks_total", "Chunks of device state sent, per source device.", []string{"device"}, nil),
		stalls:         prometheus.NewDesc("ferry_source_window_stalls_total", "Times a source device's reader waited for the destination's window.", []string{"device"}, nil),
		stallSeconds:   prometheus.NewDesc("ferry_source_window_stall_seconds_total", "Seconds a source device's reader spent waiting for the destination's window.", []string{"device"}, nil),
		bwStalls:       prometheus.NewDesc("ferry_source_bandwidth_stalls_total", "Times a source device's chunk waited for a bandwidth limit (the migration's max_bandwidth or the node's --max-bandwidth) before it was sent; apart from the window stalls.", []string{"device"}, nil),
		bwStallSeconds: prometheus.NewDesc("ferry_source_bandwidth_stall_seconds_total", "Seconds a source device's chunks spent waiting for a bandwidth limit before they were sent.", []string{"device"}, nil),
		inFlight:       prometheus.NewDesc("ferry_source_in_flight_limit_bytes", "What a source device of a running migration keeps in flight (sent, not yet acknowledged) at most: twice the bandwidth-delay product it measured, at least 16 MiB, at most the window.", []string{"device"}, nil),
		roundTrip:      prometheus.NewDesc("ferry_source_min_round_trip_seconds", "The shortest acknowledgement round trip a source device of a running migration measured, from a chunk's read to the window update that acknowledged it.", []string{"device"}, nil),
		retrans:        prometheus.NewDesc("ferry_source_retransmitted_chunks_total", "Chunks sent again after a channel broke, per source device.", []string{"device"}, nil),
		loadedBytes:    prometheus.NewDesc("ferry_dest_loaded_bytes_total", "Bytes of device state written into the device, per destination device.", []string{"device"}, nil),
		loadedChunks:   prometheus.NewDesc("ferry_dest_loaded_chunks_total", "Chunks of device state written into the device, per destination device.", []string{"device"}, nil),
		duplicates:     prometheus.NewDesc("ferry_dest_duplicate_chunks_total", "Chunks received again (retransmitted) and dropped, per destination device.", []string{"device"}, nil),
		buffered:       prometheus.NewDesc("ferry_dest_buffered_bytes", "Bytes received and waiting to be written, per destination device of a running migration.", []string{"device"}, nil),
		window:         prometheus.NewDesc("ferry_dest_window_bytes", "The window in bytes that bounds ferry_dest_buffered_bytes, per destination device of a running migration.", []string{"device"}, nil),
		active:         prometheus.NewDesc("ferry_migrations_active", "Migrations running: accepted (source) or opened by their source (destination), and not yet ended.", []string{"role"}, nil),
		byPhase:        prometheus.NewDesc("ferry_migrations_by_phase", "Migrations not yet ended, by role and phase; phase \"stopcopy\" at the source is VMs paused right now, \"prepared\" at the destination a prepare its source has not opened.", []string{"role", "phase"}, nil),
		totalBytes:     prometheus.NewDesc("ferry_source_device_total_bytes", "The state a source device of a running migration is expected to send in all (its estimate, then its final size), when known.", []string{"device"}, nil),
		remainingBytes: prometheus.NewDesc("ferry_source_device_remaining_bytes", "ferry_source_device_total_bytes less the bytes read so far, per source device of a running migration: with rate(ferry_source_sent_bytes_total) an ETA.", []string{"device"}, nil),
		precopyBytes:   prometheus.NewDesc("ferry_source_precopy_bytes_total", "Bytes of device state read and sent while the VM ran (pre-copy), per source device.", []string{"device"}, nil),
		predicted:      prometheus.NewDesc("ferry_source_predicted_downtime_seconds", "The downtime a running pre-copy migration predicts if it switched over now.", []string{"migration"}, nil),
		dirtyRate:      prometheus.NewDesc("ferry_source_dirty_bytes_per_second", "The rate at which a running pre-copy migration's devices dirty their state.", []string{"migration"}, nil),
	}
}

// Options say what an agent's metrics cover.
type Options struct {
	// Roles are the roles the agent plays, RoleSource and/or RoleDest:
	// only their series are exported.
	Roles []string
	// Build is the running build, exported as ferry_build_info.
	Build buildinfo.Info
}

// New returns the metrics, registered on reg together with the Go runtime
// and process collectors.
func New(reg prometheus.Registerer, o Options) *Metrics {
	m := &Metrics{
		roles:  slices.Clone(o.Roles),
		Server: grpcprom.NewServerMetrics(),
		Client: grpcprom.NewClientMetrics(),
		migrations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ferry_migrations_total",
			Help: "Migrations ended, by role, outcome (succeeded, failed, cancelled) and reason (the ErrorInfo reason of a failure or cancel, empty for a success).",
		}, []string{"role", "outcome", "reason"}),
		dataConns: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ferry_data_connections_total",
			Help: "Direct data connections, by role and result: at the source opened or failed (the channel then sent in gRPC messages); at the destination attached, or refused for busy (too many in their handshake), handshake, preamble, key (unknown or spent) or identity (not the session's source).",
		}, []string{"role", "result"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "ferry_migration_duration_seconds",
			Help:    "Time from accepting a migration (StartMigration, PrepareIncoming) to its final phase.",
			Buckets: prometheus.ExponentialBuckets(0.1, 2, 16), // 0.1 s to 55 min
		}, []string{"role"}),
		downtime: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "ferry_migration_downtime_seconds",
			Help:    "Time from the accepted switchover start to the final phase (the devices are stopped).",
			Buckets: prometheus.ExponentialBuckets(0.01, 2, 14), // 10 ms to 82 s
		}, []string{"role"}),
		predRatio: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "ferry_source_downtime_prediction_ratio",
			Help:    "Measured downtime over the downtime predicted before the switchover, per pre-copy migration that switched over.",
			Buckets: []float64{0.25, 0.5, 0.75, 0.9, 1, 1.1, 1.25, 1.5, 2, 4},
		}),
		notConv: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "ferry_source_precopy_not_converged_total",
			Help: "Pre-copy migrations that reached their precopy_timeout and failed (PRECOPY_NOT_CONVERGED).",
		}),
		d:       newDescs(),
		sources: make(map[uint64]func() []SourceDevice),
		precopy: make(map[uint64]func() Precopy),
		dests:   make(map[uint64]func() []DestDevice),
		live:    make(map[uint64]liveReader),
		srcDone: make(map[string]SourceDevice),
		dstDone: make(map[string]DestDevice),
	}
	// The series a dashboard's queries need exist from the start, at
	// zero, for the roles the agent plays and no other.
	for _, role := range m.roles {
		m.migrations.WithLabelValues(role, string(Succeeded), "")
		m.duration.WithLabelValues(role)
		m.downtime.WithLabelValues(role)
	}
	if m.plays(RoleSource) {
		for _, r := range []string{DataOpened, DataFailed} {
			m.dataConns.WithLabelValues(RoleSource, r)
		}
	}
	if m.plays(RoleDest) {
		for _, r := range []string{DataAttached, DataRefusedBusy, DataRefusedHandshake, DataRefusedPreamble, DataRefusedKey, DataRefusedIdentity} {
			m.dataConns.WithLabelValues(RoleDest, r)
		}
	}
	cs := []prometheus.Collector{m.Server, m.migrations, m.dataConns, m.duration, m.downtime, (*collector)(m), buildInfo(o.Build),
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{})}
	if m.plays(RoleSource) {
		// Only the source agent dials (Transfer) and predicts downtimes.
		cs = append(cs, m.Client, m.predRatio, m.notConv)
	}
	reg.MustRegister(cs...)
	return m
}

// plays reports whether the agent plays role.
func (m *Metrics) plays(role string) bool { return slices.Contains(m.roles, role) }

// buildInfo is ferry_build_info: 1, with the build in its labels.
func buildInfo(b buildinfo.Info) prometheus.Collector {
	g := prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "ferry_build_info",
		Help: "The running build of Ferry: always 1, the build in its labels (version, revision, goversion).",
		ConstLabels: prometheus.Labels{
			"version":   b.Version,
			"revision":  b.ShortRevision(),
			"goversion": b.GoVersion,
		},
	})
	g.Set(1)
	return g
}

// DeviceLabel is the device label of a device spec: the canonical spec,
// except that a simulated device is named by its size and seed alone.
// Its other options (rate=, wrate=, precopy=, ...) tune how it behaves, not
// which state it holds, and would make a new series per variant.
func DeviceLabel(spec string) string {
	s, err := vfio.ParseSpec(spec)
	if err != nil {
		return spec
	}
	canon := s.String()
	if s.Kind != vfio.SpecSim {
		return canon
	}
	rest, ok := strings.CutPrefix(canon, "sim:")
	if !ok {
		return canon
	}
	var keep []string
	for item := range strings.SplitSeq(rest, ",") {
		if strings.HasPrefix(item, "size=") || strings.HasPrefix(item, "seed=") {
			keep = append(keep, item)
		}
	}
	return "sim:" + strings.Join(keep, ",")
}

// PhaseLabel is the phase label of a migration phase: its name in lower
// case without the MIGRATION_PHASE_ prefix ("stopcopy").
func PhaseLabel(p ferryv1.MigrationPhase) string {
	return strings.ToLower(strings.TrimPrefix(p.String(), "MIGRATION_PHASE_"))
}

// phasePrepared is the phase label of a destination migration its
// source has not opened.
const phasePrepared = "prepared"

// runningPhases are the phase labels exported for every role the agent
// plays, at zero when no migration is in them.
var runningPhases = map[string][]string{
	RoleSource: {"preparing", "waiting", "precopy", "ready", "stopcopy", "finishing"},
	RoleDest:   {phasePrepared, "waiting", "precopy", "ready", "stopcopy", "finishing", "verified"},
}

// Results of direct data connections (ferry_data_connections_total).
const (
	DataOpened           = "opened"
	DataFailed           = "failed"
	DataAttached         = "attached"
	DataRefusedBusy      = "busy"
	DataRefusedHandshake = "handshake"
	DataRefusedPreamble  = "preamble"
	DataRefusedKey       = "key"
	DataRefusedIdentity  = "identity"
)

// DataConnection counts one direct data connection of role with its
// result.
func (m *Metrics) DataConnection(role, result string) {
	if m == nil {
		return
	}
	m.dataConns.WithLabelValues(role, result).Inc()
}

// DialOptions are the options that count the calls on a client
// connection; none for nil metrics.
func (m *Metrics) DialOptions() []grpc.DialOption {
	if m == nil {
		return nil
	}
	return []grpc.DialOption{
		grpc.WithChainUnaryInterceptor(m.Client.UnaryClientInterceptor()),
		grpc.WithChainStreamInterceptor(m.Client.StreamClientInterceptor()),
	}
}

// WatchBudget exports the destination's memory budget: inUse is read at
// every scrape (it must not call back into the metrics).
func (m *Metrics) WatchBudget(reg prometheus.Registerer, inUse func() uint64, total uint64) {
	if m == nil {
		return
	}
	reg.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "ferry_dest_memory_budget_in_use_bytes",
			Help: "Bytes of the destination's memory budget reserved by incoming migrations' windows.",
		}, func() float64 { return float64(inUse()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "ferry_dest_memory_budget_bytes",
			Help: "The destination's memory budget for all incoming migrations' windows (--memory-budget).",
		}, func() float64 { return float64(total) }),
	)
}

// WatchSendBudget exports the source's memory budget for the chunks its
// outgoing migrations hold unacknowledged: inUse is read at every scrape
// (it must not call back into the metrics).
func (m *Metrics) WatchSendBudget(reg prometheus.Registerer, inUse func() uint64, total uint64) {
	if m == nil {
		return
	}
	reg.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "ferry_source_memory_budget_in_use_bytes",
			Help: "Bytes of the source's send budget reserved by outgoing migrations (their devices' caps on unacknowledged chunks).",
		}, func() float64 { return float64(inUse()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "ferry_source_memory_budget_bytes",
			Help: "The source's memory budget for all outgoing migrations' unacknowledged chunks (--send-memory-budget).",
		}, func() float64 { return float64(total) }),
	)
}

// NodeBandwidth is what the metrics read of a source agent's node-wide
// bandwidth limit at every scrape (the functions must not call back into
// the metrics).
type NodeBandwidth struct {
	// Limit is the limit in force, bytes per second, 0 for none.
	Limit func() uint64
	// Bytes counts the bytes all outgoing migrations passed through it;
	// Stalls the times one of their chunks waited on it.
	Bytes, Stalls func() uint64
}

// WatchNodeBandwidth exports the source's node-wide bandwidth limit.
func (m *Metrics) WatchNodeBandwidth(reg prometheus.Registerer, n NodeBandwidth) {
	if m == nil {
		return
	}
	reg.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "ferry_source_node_max_bandwidth_bytes_per_second",
			Help: "The source's node-wide bandwidth limit over all outgoing migrations (--max-bandwidth), 0 for none.",
		}, func() float64 { return float64(n.Limit()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "ferry_source_node_bandwidth_bytes_total",
			Help: "Bytes all outgoing migrations passed through the source's node-wide bandwidth limit before they reached a socket.",
		}, func() float64 { return float64(n.Bytes()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "ferry_source_node_bandwidth_stalls_total",
			Help: "Times a chunk of an outgoing migration waited for the source's node-wide bandwidth limit.",
		}, func() float64 { return float64(n.Stalls()) }),
	)
}

// ConvergenceFailure counts a pre-copy migration that failed at its
// timeout.
func (m *Metrics) ConvergenceFailure() {
	if m == nil {
		return
	}
	m.notConv.Inc()
}

// Tracker is one tracked migration. A nil *Tracker is valid.
type Tracker struct {
	m    *Metrics
	id   uint64
	role string
	once sync.Once
}

// TrackSource starts tracking a source migration whose devices' counters
// read returns. read is called at every scrape and once more by End; it
// may take the migration's own locks, and must not call into the metrics.
// live, when not nil, reads its phase at every scrape (nil: an opened
// migration of no particular phase).
func (m *Metrics) TrackSource(read func() []SourceDevice, live func() Live) *Tracker {
	if m == nil {
		return nil
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.nextID++
	m.sources[m.nextID] = read
	m.live[m.nextID] = liveReader{RoleSource, live}
	return &Tracker{m: m, id: m.nextID, role: RoleSource}
}

// Precopy adds a pre-copy migration's prediction to a tracked source
// migration: read is called at every scrape until End, as TrackSource's.
func (t *Tracker) Precopy(read func() Precopy) {
	if t == nil {
		return
	}
	t.m.mu.Lock()
	defer t.m.mu.Unlock()
	if _, live := t.m.sources[t.id]; live {
		t.m.precopy[t.id] = read
	}
}

// TrackDest starts tracking a destination migration, as TrackSource.
func (m *Metrics) TrackDest(read func() []DestDevice, live func() Live) *Tracker {
	if m == nil {
		return nil
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.nextID++
	m.dests[m.nextID] = read
	m.live[m.nextID] = liveReader{RoleDest, live}
	return &Tracker{m: m, id: m.nextID, role: RoleDest}
}

// End records the migration's end: its final counters join the device
// totals, and its outcome, duration and downtime are recorded. Only the
// first call counts.
func (t *Tracker) End(e Ended) {
	if t == nil {
		return
	}
	t.once.Do(func() {
		m := t.m
		m.mu.Lock()
		delete(m.live, t.id)
		switch t.role {
		case RoleSource:
			for _, d := range m.sources[t.id]() {
				d.Device = DeviceLabel(d.Device)
				sum := m.srcDone[d.Device]
				addSource(&sum, d)
				m.srcDone[d.Device] = sum
			}
			delete(m.sources, t.id)
			delete(m.precopy, t.id)
		case RoleDest:
			for _, d := range m.dests[t.id]() {
				d.Device = DeviceLabel(d.Device)
				sum := m.dstDone[d.Device]
				addDest(&sum, d)
				m.dstDone[d.Device] = sum
			}
			delete(m.dests, t.id)
		}
		m.mu.Unlock()
		reason := e.Reason
		if e.Outcome == Succeeded {
			reason = ""
		}
		m.migrations.WithLabelValues(t.role, string(e.Outcome), reason).Inc()
		m.duration.WithLabelValues(t.role).Observe(e.Duration.Seconds())
		if e.SwitchedOver {
			m.downtime.WithLabelValues(t.role).Observe(e.Downtime.Seconds())
			if e.HasPrediction && e.Predicted > 0 {
				m.predRatio.Observe(e.Downtime.Seconds() / e.Predicted.Seconds())
			}
		}
	})
}

func addSource(sum *SourceDevice, d SourceDevice) {
	sum.Device = d.Device
	sum.Bytes += d.Bytes
	sum.Chunks += d.Chunks
	sum.Retransmitted += d.Retransmitted
	sum.WireBytes += d.WireBytes
	sum.Stalls += d.Stalls
	sum.StallTime += d.StallTime
	sum.BandwidthStalls += d.BandwidthStalls
	sum.BandwidthStallTime += d.BandwidthStallTime
	sum.PrecopyBytes += d.PrecopyBytes
}

func addDest(sum *DestDevice, d DestDevice) {
	sum.Device = d.Device
	sum.Bytes += d.Bytes
	sum.Chunks += d.Chunks
	sum.Duplicates += d.Duplicates
}

// collector builds the per-device metrics at scrape time.
type collector Metrics

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.d.sentBytes, c.d.sentChunks, c.d.stalls, c.d.stallSeconds, c.d.retrans,
		c.d.loadedBytes, c.d.loadedChunks, c.d.duplicates, c.d.buffered, c.d.window, c.d.active,
		c.d.precopyBytes, c.d.predicted, c.d.dirtyRate, c.d.byPhase, c.d.totalBytes, c.d.remainingBytes, c.d.wireBytes, c.d.bwStalls, c.d.bwStallSeconds, c.d.inFlight, c.d.roundTrip} {
		ch <- d
	}
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	m := (*Metrics)(c)
	m.mu.Lock()
	src := make(map[string]SourceDevice, len(m.srcDone))
	for k, v := range m.srcDone {
		src[k] = v
	}
	var liveSrc []SourceDevice
	for _, read := range m.sources {
		for _, d := range read() {
			d.Device = DeviceLabel(d.Device)
			sum := src[d.Device]
			addSource(&sum, d)
			src[d.Device] = sum
			liveSrc = append(liveSrc, d)
		}
	}
	dst := make(map[string]DestDevice, len(m.dstDone))
	for k, v := range m.dstDone {
		dst[k] = v
	}
	var liveDst []DestDevice
	for _, read := range m.dests {
		for _, d := range read() {
			d.Device = DeviceLabel(d.Device)
			sum := dst[d.Device]
			addDest(&sum, d)
			dst[d.Device] = sum
			liveDst = append(liveDst, d)
		}
	}
	var pre []Precopy
	for _, read := range m.precopy {
		pre = append(pre, read())
	}
	active := map[string]int{}
	phases := map[string]map[string]int{}
	for _, role := range m.roles {
		phases[role] = map[string]int{}
		for _, p := range runningPhases[role] {
			phases[role][p] = 0
		}
	}
	for _, l := range m.live {
		st := Live{Opened: true}
		if l.read != nil {
			st = l.read()
		}
		if st.Opened {
			active[l.role]++
		}
		label := PhaseLabel(st.Phase)
		if !st.Opened {
			label = phasePrepared
		}
		if _, known := phases[l.role][label]; known {
			phases[l.role][label]++
		}
	}
	m.mu.Unlock()

	counter := func(d *prometheus.Desc, v float64, device string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, device)
	}
	for dev, s := range src {
		counter(c.d.sentBytes, float64(s.Bytes), dev)
		counter(c.d.wireBytes, float64(s.WireBytes), dev)
		counter(c.d.sentChunks, float64(s.Chunks), dev)
		counter(c.d.stalls, float64(s.Stalls), dev)
		counter(c.d.stallSeconds, s.StallTime.Seconds(), dev)
		counter(c.d.bwStalls, float64(s.BandwidthStalls), dev)
		counter(c.d.bwStallSeconds, s.BandwidthStallTime.Seconds(), dev)
		counter(c.d.retrans, float64(s.Retransmitted), dev)
		counter(c.d.precopyBytes, float64(s.PrecopyBytes), dev)
	}
	for _, p := range pre {
		if p.HasPrediction {
			ch <- prometheus.MustNewConstMetric(c.d.predicted, prometheus.GaugeValue, p.PredictedDowntime.Seconds(), p.Migration)
		}
		if p.HasDirtyRate {
			ch <- prometheus.MustNewConstMetric(c.d.dirtyRate, prometheus.GaugeValue, p.DirtyRate, p.Migration)
		}
	}
	for dev, d := range dst {
		counter(c.d.loadedBytes, float64(d.Bytes), dev)
		counter(c.d.loadedChunks, float64(d.Chunks), dev)
		counter(c.d.duplicates, float64(d.Duplicates), dev)
	}
	// One device is in at most one running migration (the registry lends
	// it to one owner), so the live gauges have one value per device.
	seen := make(map[string]bool, len(liveSrc))
	for _, d := range liveSrc {
		if seen[d.Device] {
			continue
		}
		seen[d.Device] = true
		if d.InFlightLimit != 0 {
			ch <- prometheus.MustNewConstMetric(c.d.inFlight, prometheus.GaugeValue, float64(d.InFlightLimit), d.Device)
		}
		if d.MinRoundTrip > 0 {
			ch <- prometheus.MustNewConstMetric(c.d.roundTrip, prometheus.GaugeValue, d.MinRoundTrip.Seconds(), d.Device)
		}
		if d.TotalBytes == 0 {
			continue
		}
		remaining := uint64(0)
		if d.TotalBytes > d.Bytes {
			remaining = d.TotalBytes - d.Bytes
		}
		ch <- prometheus.MustNewConstMetric(c.d.totalBytes, prometheus.GaugeValue, float64(d.TotalBytes), d.Device)
		ch <- prometheus.MustNewConstMetric(c.d.remainingBytes, prometheus.GaugeValue, float64(remaining), d.Device)
	}
	clear(seen)
	for _, d := range liveDst {
		if seen[d.Device] {
			continue
		}
		seen[d.Device] = true
		ch <- prometheus.MustNewConstMetric(c.d.buffered, prometheus.GaugeValue, float64(d.Buffered), d.Device)
		ch <- prometheus.MustNewConstMetric(c.d.window, prometheus.GaugeValue, float64(d.Window), d.Device)
	}
	for _, role := range m.roles {
		ch <- prometheus.MustNewConstMetric(c.d.active, prometheus.GaugeValue, float64(active[role]), role)
		for p, n := range phases[role] {
			ch <- prometheus.MustNewConstMetric(c.d.byPhase, prometheus.GaugeValue, float64(n), role, p)
		}
	}
}
