package telemetry

import (
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/internal/buildinfo"
)

// value gathers reg and returns the value of the series name with labels,
// and whether it exists.
func value(t *testing.T, reg *prometheus.Registry, name string, labels map[string]string) (float64, bool) {
	t.Helper()
	fams, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fams {
		if f.GetName() != name {
			continue
		}
		for _, m := range f.GetMetric() {
			if !hasLabels(m, labels) {
				continue
			}
			switch {
			case m.Counter != nil:
				return m.GetCounter().GetValue(), true
			case m.Gauge != nil:
				return m.GetGauge().GetValue(), true
			case m.Histogram != nil:
				return float64(m.GetHistogram().GetSampleCount()), true
			}
		}
	}
	return 0, false
}

func hasLabels(m *dto.Metric, want map[string]string) bool {
	got := map[string]string{}
	for _, l := range m.GetLabel() {
		got[l.GetName()] = l.GetValue()
	}
	for k, v := range want {
		if got[k] != v {
			return false
		}
	}
	return true
}

func expect(t *testing.T, reg *prometheus.Registry, name string, labels map[string]string, want float64) {
	t.Helper()
	got, ok := value(t, reg, name, labels)
	if !ok {
		t.Fatalf("%s%v is missing", name, labels)
	}
	if got != want {
		t.Errorf("%s%v = %v, want %v", name, labels, got, want)
	}
}

var bothRoles = Options{Roles: []string{RoleSource, RoleDest}}

func TestSourceCountersAcrossMigrations(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := New(reg, bothRoles)
	dev := map[string]string{"device": "pci:0000:3b:00.2"}

	live := SourceDevice{Device: "pci:0000:3b:00.2", Bytes: 10, Chunks: 1, Stalls: 2, StallTime: 500 * time.Millisecond,
		BandwidthStalls: 7, BandwidthStallTime: 250 * time.Millisecond}
	tr := m.TrackSource(func() []SourceDevice { return []SourceDevice{live} }, nil)
	expect(t, reg, "ferry_source_sent_bytes_total", dev, 10)
	expect(t, reg, "ferry_migrations_active", map[string]string{"role": RoleSource}, 1)
	live.Bytes, live.Chunks = 30, 3
	expect(t, reg, "ferry_source_sent_bytes_total", dev, 30)
	expect(t, reg, "ferry_source_window_stall_seconds_total", dev, 0.5)
	// Bandwidth-limit stalls are their own series, not window stalls.
	expect(t, reg, "ferry_source_window_stalls_total", dev, 2)
	expect(t, reg, "ferry_source_bandwidth_stalls_total", dev, 7)
	expect(t, reg, "ferry_source_bandwidth_stall_seconds_total", dev, 0.25)

	tr.End(Ended{Outcome: Succeeded, Duration: 2 * time.Second, Downtime: time.Second, SwitchedOver: true})
	tr.End(Ended{Outcome: Failed}) // only the first End counts
	live.Bytes = 1 << 40           // no longer read
	expect(t, reg, "ferry_source_sent_bytes_total", dev, 30)
	expect(t, reg, "ferry_migrations_active", map[string]string{"role": RoleSource}, 0)
	expect(t, reg, "ferry_migrations_total", map[string]string{"role": RoleSource, "outcome": "succeeded"}, 1)
	if _, ok := value(t, reg, "ferry_migrations_total", map[string]string{"role": RoleSource, "outcome": "failed"}); ok {
		t.Error("a failed series exists without a failure")
	}
	expect(t, reg, "ferry_migration_duration_seconds", map[string]string{"role": RoleSource}, 1)
	expect(t, reg, "ferry_migration_downtime_seconds", map[string]string{"role": RoleSource}, 1)

	// A second migration of the same device adds to its counters.
	second := SourceDevice{Device: "pci:0000:3b:00.2", Bytes: 5, Chunks: 1, Retransmitted: 1}
	tr2 := m.TrackSource(func() []SourceDevice { return []SourceDevice{second} }, nil)
	expect(t, reg, "ferry_source_sent_bytes_total", dev, 35)
	tr2.End(Ended{Outcome: Cancelled, Reason: "CANCELLED", Duration: time.Second})
	expect(t, reg, "ferry_source_sent_bytes_total", dev, 35)
	expect(t, reg, "ferry_source_retransmitted_chunks_total", dev, 1)
	expect(t, reg, "ferry_migrations_total", map[string]string{"role": RoleSource, "outcome": "cancelled", "reason": "CANCELLED"}, 1)
	expect(t, reg, "ferry_migration_downtime_seconds", map[string]string{"role": RoleSource}, 1) // no switchover, no downtime
}

func TestDestGaugesOnlyWhileRunning(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := New(reg, bothRoles)
	inUse := uint64(128 << 20)
	m.WatchBudget(reg, func() uint64 { return inUse }, 1<<30)
	dev := map[string]string{"device": "sim:size=1GiB,seed=1"}
	live := DestDevice{Device: "sim:size=1GiB,seed=1", Bytes: 4096, Chunks: 1, Buffered: 8192, Window: 64 << 20}
	tr := m.TrackDest(func() []DestDevice { return []DestDevice{live} }, nil)
	expect(t, reg, "ferry_dest_buffered_bytes", dev, 8192)
	expect(t, reg, "ferry_dest_window_bytes", dev, 64<<20)
	expect(t, reg, "ferry_dest_loaded_bytes_total", dev, 4096)
	expect(t, reg, "ferry_dest_memory_budget_in_use_bytes", nil, 128<<20)
	expect(t, reg, "ferry_dest_memory_budget_bytes", nil, 1<<30)
	tr.End(Ended{Outcome: Failed, Reason: "DEVICE_VERIFY_FAILED", Duration: time.Second})
	if _, ok := value(t, reg, "ferry_dest_buffered_bytes", dev); ok {
		t.Error("buffered bytes of an ended migration are still exported")
	}
	expect(t, reg, "ferry_dest_loaded_bytes_total", dev, 4096)
	expect(t, reg, "ferry_migrations_total", map[string]string{"role": RoleDest, "outcome": "failed", "reason": "DEVICE_VERIFY_FAILED"}, 1)
}

func TestNilMetrics(t *testing.T) {
	var m *Metrics
	if m.DialOptions() != nil {
		t.Error("nil metrics add dial options")
	}
	m.WatchBudget(prometheus.NewRegistry(), func() uint64 { return 0 }, 0)
	tr := m.TrackSource(func() []SourceDevice { t.Fatal("read"); return nil }, nil)
	tr.End(Ended{Outcome: Succeeded})
	m.TrackDest(nil, nil).End(Ended{})
	m.DataConnection(RoleDest, DataAttached)
}

func TestDataConnections(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := New(reg, bothRoles)
	// Every result is exported from the start, at zero.
	expect(t, reg, "ferry_data_connections_total", map[string]string{"role": RoleDest, "result": DataRefusedIdentity}, 0)
	expect(t, reg, "ferry_data_connections_total", map[string]string{"role": RoleSource, "result": DataFailed}, 0)
	m.DataConnection(RoleDest, DataAttached)
	m.DataConnection(RoleDest, DataAttached)
	m.DataConnection(RoleDest, DataRefusedKey)
	m.DataConnection(RoleSource, DataOpened)
	expect(t, reg, "ferry_data_connections_total", map[string]string{"role": RoleDest, "result": DataAttached}, 2)
	expect(t, reg, "ferry_data_connections_total", map[string]string{"role": RoleDest, "result": DataRefusedKey}, 1)
	expect(t, reg, "ferry_data_connections_total", map[string]string{"role": RoleSource, "result": DataOpened}, 1)
}

// A pre-copy migration exports its prediction and dirty rate while it
// runs, its pre-copy bytes as a counter, and at its end the ratio of the
// measured downtime to the last prediction; convergence failures count.
func TestPrecopyMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := New(reg, bothRoles)
	dev := map[string]string{"device": "sim:size=1GiB,seed=3"}
	mig := map[string]string{"migration": "vm-1"}
	live := SourceDevice{Device: "sim:size=1GiB,seed=3", Bytes: 100, PrecopyBytes: 90}
	pre := Precopy{Migration: "vm-1"}
	tr := m.TrackSource(func() []SourceDevice { return []SourceDevice{live} }, nil)
	tr.Precopy(func() Precopy { return pre })
	expect(t, reg, "ferry_source_precopy_bytes_total", dev, 90)
	if _, ok := value(t, reg, "ferry_source_predicted_downtime_seconds", mig); ok {
		t.Error("a prediction is exported before one was made")
	}
	pre.PredictedDowntime, pre.HasPrediction = 250*time.Millisecond, true
	pre.DirtyRate, pre.HasDirtyRate = 32e6, true
	expect(t, reg, "ferry_source_predicted_downtime_seconds", mig, 0.25)
	expect(t, reg, "ferry_source_dirty_bytes_per_second", mig, 32e6)
	tr.End(Ended{Outcome: Succeeded, Duration: time.Second, Downtime: 200 * time.Millisecond, SwitchedOver: true, Predicted: 250 * time.Millisecond, HasPrediction: true})
	if _, ok := value(t, reg, "ferry_source_predicted_downtime_seconds", mig); ok {
		t.Error("the prediction of an ended migration is still exported")
	}
	expect(t, reg, "ferry_source_downtime_prediction_ratio", nil, 1)
	expect(t, reg, "ferry_source_precopy_bytes_total", dev, 90)
	m.ConvergenceFailure()
	expect(t, reg, "ferry_source_precopy_not_converged_total", nil, 1)
}

// A prepared destination migration is in the by-phase gauge as
// "prepared" and is not active until its source opens it; the phases of
// running migrations are counted per role.
func TestActiveAndPhases(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := New(reg, bothRoles)
	dst := Live{Phase: ferryv1.MigrationPhase_MIGRATION_PHASE_WAITING}
	dtr := m.TrackDest(func() []DestDevice { return nil }, func() Live { return dst })
	src := Live{Phase: ferryv1.MigrationPhase_MIGRATION_PHASE_STOPCOPY, Opened: true}
	m.TrackSource(func() []SourceDevice { return nil }, func() Live { return src })
	dest := map[string]string{"role": RoleDest}
	expect(t, reg, "ferry_migrations_active", dest, 0)
	expect(t, reg, "ferry_migrations_by_phase", map[string]string{"role": RoleDest, "phase": "prepared"}, 1)
	expect(t, reg, "ferry_migrations_by_phase", map[string]string{"role": RoleDest, "phase": "waiting"}, 0)
	expect(t, reg, "ferry_migrations_by_phase", map[string]string{"role": RoleSource, "phase": "stopcopy"}, 1)
	expect(t, reg, "ferry_migrations_active", map[string]string{"role": RoleSource}, 1)

	dst.Opened = true
	expect(t, reg, "ferry_migrations_active", dest, 1)
	expect(t, reg, "ferry_migrations_by_phase", map[string]string{"role": RoleDest, "phase": "prepared"}, 0)
	expect(t, reg, "ferry_migrations_by_phase", map[string]string{"role": RoleDest, "phase": "waiting"}, 1)
	dtr.End(Ended{Outcome: Succeeded})
	expect(t, reg, "ferry_migrations_active", dest, 0)
	expect(t, reg, "ferry_migrations_by_phase", map[string]string{"role": RoleDest, "phase": "waiting"}, 0)
}

// A running source device with a known total exports its total and
// remaining bytes; they go with the migration.
func TestTotalAndRemaining(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := New(reg, Options{Roles: []string{RoleSource}})
	live := SourceDevice{Device: "sim:size=1GiB,seed=2", Bytes: 1 << 28}
	tr := m.TrackSource(func() []SourceDevice { return []SourceDevice{live} }, nil)
	dev := map[string]string{"device": "sim:size=1GiB,seed=2"}
	if _, ok := value(t, reg, "ferry_source_device_remaining_bytes", dev); ok {
		t.Error("remaining bytes exported without a total")
	}
	live.TotalBytes = 1 << 30
	expect(t, reg, "ferry_source_device_total_bytes", dev, 1<<30)
	expect(t, reg, "ferry_source_device_remaining_bytes", dev, 3<<28)
	tr.End(Ended{Outcome: Succeeded})
	if _, ok := value(t, reg, "ferry_source_device_total_bytes", dev); ok {
		t.Error("total bytes of an ended migration are still exported")
	}
}

// A running source device exports its in-flight limit once its session
// opened and its shortest round trip once it measured one, without a
// known total; they go with the migration.
func TestInFlight(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := New(reg, Options{Roles: []string{RoleSource}})
	live := SourceDevice{Device: "sim:size=1GiB,seed=2"}
	tr := m.TrackSource(func() []SourceDevice { return []SourceDevice{live} }, nil)
	dev := map[string]string{"device": "sim:size=1GiB,seed=2"}
	if _, ok := value(t, reg, "ferry_source_in_flight_limit_bytes", dev); ok {
		t.Error("an in-flight limit exported before the session opened")
	}
	live.InFlightLimit = 16 << 20
	expect(t, reg, "ferry_source_in_flight_limit_bytes", dev, 16<<20)
	if _, ok := value(t, reg, "ferry_source_min_round_trip_seconds", dev); ok {
		t.Error("a round trip exported before one was measured")
	}
	live.MinRoundTrip = 250 * time.Microsecond
	expect(t, reg, "ferry_source_min_round_trip_seconds", dev, 250e-6)
	tr.End(Ended{Outcome: Succeeded})
	if _, ok := value(t, reg, "ferry_source_in_flight_limit_bytes", dev); ok {
		t.Error("the in-flight limit of an ended migration is still exported")
	}
}

// A single-role agent exports no series of the other role, not even at
// zero, and the build info.
func TestSingleRole(t *testing.T) {
	reg := prometheus.NewRegistry()
	New(reg, Options{Roles: []string{RoleDest}, Build: buildinfo.Info{Version: "v1.0.0", Revision: "abc", GoVersion: "go1.26.0"}})
	fams, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fams {
		if strings.HasPrefix(f.GetName(), "ferry_source_") || strings.HasPrefix(f.GetName(), "grpc_client_") {
			t.Errorf("a destination agent exports %s", f.GetName())
		}
		for _, mt := range f.GetMetric() {
			if hasLabels(mt, map[string]string{"role": RoleSource}) {
				t.Errorf("a destination agent exports %s with role=source", f.GetName())
			}
		}
	}
	expect(t, reg, "ferry_migrations_active", map[string]string{"role": RoleDest}, 0)
	expect(t, reg, "ferry_migrations_total", map[string]string{"role": RoleDest, "outcome": "succeeded"}, 0)
	expect(t, reg, "ferry_build_info", map[string]string{"version": "v1.0.0", "revision": "abc", "goversion": "go1.26.0"}, 1)
}

// A simulated device is labelled by its size and seed: its rate and
// write-rate variants count on one series.
func TestDeviceLabel(t *testing.T) {
	for spec, want := range map[string]string{
		"sim:size=1GiB,seed=7,rate=2GB/s":                                            "sim:size=1GiB,seed=7",
		"sim:seed=7,size=1GiB,wrate=100MB/s,precopy=1MiB,flags=stopcopy|p2p|precopy": "sim:size=1GiB,seed=7",
		"pci:0000:3b:00.2": "pci:0000:3b:00.2",
		"not a spec":       "not a spec",
	} {
		if got := DeviceLabel(spec); got != want {
			t.Errorf("DeviceLabel(%q) = %q, want %q", spec, got, want)
		}
	}
	reg := prometheus.NewRegistry()
	m := New(reg, Options{Roles: []string{RoleSource}})
	m.TrackSource(func() []SourceDevice { return []SourceDevice{{Device: "sim:size=1GiB,seed=7,rate=2GB/s", Bytes: 5}} }, nil).End(Ended{Outcome: Succeeded})
	m.TrackSource(func() []SourceDevice { return []SourceDevice{{Device: "sim:size=1GiB,seed=7,rate=1GB/s", Bytes: 6}} }, nil)
	expect(t, reg, "ferry_source_sent_bytes_total", map[string]string{"device": "sim:size=1GiB,seed=7"}, 11)
}

func TestNodeBandwidth(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := New(reg, bothRoles)
	limit, bytes, stalls := uint64(125_000_000), uint64(0), uint64(0)
	m.WatchNodeBandwidth(reg, NodeBandwidth{
		Limit:  func() uint64 { return limit },
		Bytes:  func() uint64 { return bytes },
		Stalls: func() uint64 { return stalls },
	})
	expect(t, reg, "ferry_source_node_max_bandwidth_bytes_per_second", nil, 125e6)
	bytes, stalls, limit = 3<<20, 4, 0
	expect(t, reg, "ferry_source_node_bandwidth_bytes_total", nil, 3<<20)
	expect(t, reg, "ferry_source_node_bandwidth_stalls_total", nil, 4)
	expect(t, reg, "ferry_source_node_max_bandwidth_bytes_per_second", nil, 0)
	var none *Metrics
	none.WatchNodeBandwidth(reg, NodeBandwidth{}) // no metrics: nothing registered
}
