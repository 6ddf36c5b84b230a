package source

import (
	"time"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/services/deviceapi"
	"github.com/vfio-ferry/ferry/services/telemetry"
)

// deviceCounters reads the devices' counters for the metrics; a scrape
// calls it while the migration runs.
func (m *migration) deviceCounters() []telemetry.SourceDevice {
	m.mu.Lock()
	gates := make([]func() (uint64, time.Duration), len(m.devs))
	for i, d := range m.devs {
		if d.gate != nil {
			gates[i] = d.gate.Stalls
		}
	}
	m.mu.Unlock()
	out := make([]telemetry.SourceDevice, len(m.devs))
	for i, d := range m.devs {
		out[i] = telemetry.SourceDevice{
			Device:        d.spec,
			Bytes:         d.read.Load(),
			WireBytes:     d.wireBytes.Load(),
			Chunks:        d.chunks.Load(),
			Retransmitted: d.retrans.Load(),
			PrecopyBytes:  d.precopyRead(),
			TotalBytes:    d.total.Load(),

			BandwidthStalls:    d.bwStalls.Load(),
			BandwidthStallTime: time.Duration(d.bwStallNanos.Load()),
		}
		if d.flightLimit.Load() != 0 {
			out[i].InFlightLimit, out[i].MinRoundTrip, _ = d.path()
		}
		if gates[i] != nil {
			out[i].Stalls, out[i].StallTime = gates[i]()
		}
	}
	return out
}

// ended is what the metrics record when the migration reaches phase.
func (m *migration) ended(phase ferryv1.MigrationPhase) telemetry.Ended {
	m.mu.Lock()
	defer m.mu.Unlock()
	e := telemetry.Ended{Outcome: outcome(phase), Duration: m.endTime.Sub(m.createTime)}
	if m.err != nil {
		e.Reason = m.err.GetReason()
	}
	if !m.switchoverTime.IsZero() {
		e.Downtime, e.SwitchedOver = m.downtimeEnd().Sub(m.switchoverTime), true
	}
	if p := m.precopy; p != nil {
		p.mu.Lock()
		e.Predicted, e.HasPrediction = p.pred.downtime, p.hasPred && p.pred.ok
		p.mu.Unlock()
	}
	return e
}

// liveState is the phase the metrics show while the migration runs.
func (m *migration) liveState() telemetry.Live {
	m.mu.Lock()
	defer m.mu.Unlock()
	return telemetry.Live{Phase: m.phase, Opened: true}
}

// precopyReading is the prediction the metrics show while pre-copy runs.
func (m *migration) precopyReading() telemetry.Precopy {
	p := m.precopy
	p.mu.Lock()
	defer p.mu.Unlock()
	return telemetry.Precopy{
		Migration: m.id, PredictedDowntime: p.pred.downtime, HasPrediction: p.hasPred && p.pred.ok && p.trigger == "",
		DirtyRate: p.dirtyRate, HasDirtyRate: p.dirtyOK && p.trigger == "",
	}
}

func outcome(p ferryv1.MigrationPhase) telemetry.Outcome {
	switch p {
	case ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED:
		return telemetry.Succeeded
	case ferryv1.MigrationPhase_MIGRATION_PHASE_CANCELLED:
		return telemetry.Cancelled
	}
	return telemetry.Failed
}

// sourceSpecs are the source devices a request names, for the
// migration's log lines.
func sourceSpecs(req *ferryv1.StartMigrationRequest) []string {
	specs := make([]string, len(req.GetDevices()))
	for i, p := range req.GetDevices() {
		specs[i], _ = deviceapi.CanonicalSpec(p.GetSourceDevice())
	}
	return specs
}
