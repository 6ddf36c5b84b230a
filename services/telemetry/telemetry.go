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
// A nil *Metrics is valid and records nothing: agents take one in their
// Config and call it unconditionally.
package telemetry

import (
	"sync"
	"time"

	grpcprom "github.com/grpc-ecosystem/go-grpc-middleware/providers/prometheus"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"google.golang.org/grpc"
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
	// Stalls counts the times the device's reader waited for window
	// credit; StallTime is the time it spent waiting.
	Stalls    uint64
	StallTime time.Duration
	// PrecopyBytes is the part of Bytes read before the switchover, while
	// the VM ran (pre-copy).
	PrecopyBytes uint64
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
	srcDone map[string]SourceDevice
	dstDone map[string]DestDevice
}

// descs describes the metrics the collector builds at scrape time.
type descs struct {
	sentBytes, sentChunks, stalls, stallSeconds, retrans, loadedBytes, loadedChunks, duplicates, buffered, window, active *prometheus.Desc
	precopyBytes, predicted, dirtyRate                                                                                    *prometheus.Desc
}

func newDescs() descs {
	return descs{
		sentBytes:    prometheus.NewDesc("ferry_source_sent_bytes_total", "Bytes of device state read from the device and sent, per source device.", []string{"device"}, nil),
		sentChunks:   prometheus.NewDesc("ferry_source_sent_chunks_total", "Chunks of device state sent, per source device.", []string{"device"}, nil),
		stalls:       prometheus.NewDesc("ferry_source_window_stalls_total", "Times a source device's reader waited for the destination's window.", []string{"device"}, nil),
		stallSeconds: prometheus.NewDesc("ferry_source_window_stall_seconds_total", "Seconds a source device's reader spent waiting for the destination's window.", []string{"device"}, nil),
		retrans:      prometheus.NewDesc("ferry_source_retransmitted_chunks_total", "Chunks sent again after a channel broke, per source device.", []string{"device"}, nil),
		loadedBytes:  prometheus.NewDesc("ferry_dest_loaded_bytes_total", "Bytes of device state written into the device, per destination device.", []string{"device"}, nil),
		loadedChunks: prometheus.NewDesc("ferry_dest_loaded_chunks_total", "Chunks of device state written into the device, per destination device.", []string{"device"}, nil),
		duplicates:   prometheus.NewDesc("ferry_dest_duplicate_chunks_total", "Chunks received again (retransmitted) and dropped, per destination device.", []string{"device"}, nil),
		buffered:     prometheus.NewDesc("ferry_dest_buffered_bytes", "Bytes received and waiting to be written, per destination device of a running migration.", []string{"device"}, nil),
		window:       prometheus.NewDesc("ferry_dest_window_bytes", "The window in bytes that bounds ferry_dest_buffered_bytes, per destination device of a running migration.", []string{"device"}, nil),
		active:       prometheus.NewDesc("ferry_migrations_active", "Migrations accepted and not yet ended.", []string{"role"}, nil),
		precopyBytes: prometheus.NewDesc("ferry_source_precopy_bytes_total", "Bytes of device state read and sent while the VM ran (pre-copy), per source device.", []string{"device"}, nil),
		predicted:    prometheus.NewDesc("ferry_source_predicted_downtime_seconds", "The downtime a running pre-copy migration predicts if it switched over now.", []string{"migration"}, nil),
		dirtyRate:    prometheus.NewDesc("ferry_source_dirty_bytes_per_second", "The rate at which a running pre-copy migration's devices dirty their state.", []string{"migration"}, nil),
	}
}

// New returns the metrics, registered on reg together with the Go runtime
// and process collectors.
func New(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		Server: grpcprom.NewServerMetrics(),
		Client: grpcprom.NewClientMetrics(),
		migrations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ferry_migrations_total",
			Help: "Migrations ended, by role and outcome (succeeded, failed, cancelled).",
		}, []string{"role", "outcome"}),
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
		srcDone: make(map[string]SourceDevice),
		dstDone: make(map[string]DestDevice),
	}
	for _, role := range []string{RoleSource, RoleDest} {
		for _, o := range []Outcome{Succeeded, Failed, Cancelled} {
			m.migrations.WithLabelValues(role, string(o))
		}
	}
	for _, r := range []string{DataOpened, DataFailed} {
		m.dataConns.WithLabelValues(RoleSource, r)
	}
	for _, r := range []string{DataAttached, DataRefusedBusy, DataRefusedHandshake, DataRefusedPreamble, DataRefusedKey, DataRefusedIdentity} {
		m.dataConns.WithLabelValues(RoleDest, r)
	}
	reg.MustRegister(m.Server, m.Client, m.migrations, m.dataConns, m.duration, m.downtime, m.predRatio, m.notConv, (*collector)(m),
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
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
func (m *Metrics) TrackSource(read func() []SourceDevice) *Tracker {
	if m == nil {
		return nil
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.nextID++
	m.sources[m.nextID] = read
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
func (m *Metrics) TrackDest(read func() []DestDevice) *Tracker {
	if m == nil {
		return nil
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.nextID++
	m.dests[m.nextID] = read
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
		switch t.role {
		case RoleSource:
			for _, d := range m.sources[t.id]() {
				sum := m.srcDone[d.Device]
				addSource(&sum, d)
				m.srcDone[d.Device] = sum
			}
			delete(m.sources, t.id)
			delete(m.precopy, t.id)
		case RoleDest:
			for _, d := range m.dests[t.id]() {
				sum := m.dstDone[d.Device]
				addDest(&sum, d)
				m.dstDone[d.Device] = sum
			}
			delete(m.dests, t.id)
		}
		m.mu.Unlock()
		m.migrations.WithLabelValues(t.role, string(e.Outcome)).Inc()
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
	sum.Stalls += d.Stalls
	sum.StallTime += d.StallTime
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
		c.d.precopyBytes, c.d.predicted, c.d.dirtyRate} {
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
	for _, read := range m.sources {
		for _, d := range read() {
			sum := src[d.Device]
			addSource(&sum, d)
			src[d.Device] = sum
		}
	}
	dst := make(map[string]DestDevice, len(m.dstDone))
	for k, v := range m.dstDone {
		dst[k] = v
	}
	var live []DestDevice
	for _, read := range m.dests {
		for _, d := range read() {
			sum := dst[d.Device]
			addDest(&sum, d)
			dst[d.Device] = sum
			live = append(live, d)
		}
	}
	var pre []Precopy
	for _, read := range m.precopy {
		pre = append(pre, read())
	}
	activeSrc, activeDst := len(m.sources), len(m.dests)
	m.mu.Unlock()

	counter := func(d *prometheus.Desc, v float64, device string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, device)
	}
	for dev, s := range src {
		counter(c.d.sentBytes, float64(s.Bytes), dev)
		counter(c.d.sentChunks, float64(s.Chunks), dev)
		counter(c.d.stalls, float64(s.Stalls), dev)
		counter(c.d.stallSeconds, s.StallTime.Seconds(), dev)
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
	seen := make(map[string]bool, len(live))
	for _, d := range live {
		if seen[d.Device] {
			continue
		}
		seen[d.Device] = true
		ch <- prometheus.MustNewConstMetric(c.d.buffered, prometheus.GaugeValue, float64(d.Buffered), d.Device)
		ch <- prometheus.MustNewConstMetric(c.d.window, prometheus.GaugeValue, float64(d.Window), d.Device)
	}
	ch <- prometheus.MustNewConstMetric(c.d.active, prometheus.GaugeValue, float64(activeSrc), RoleSource)
	ch <- prometheus.MustNewConstMetric(c.d.active, prometheus.GaugeValue, float64(activeDst), RoleDest)
}
