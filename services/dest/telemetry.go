package dest

import (
	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/services/telemetry"
)

// deviceCounters reads the devices' counters for the metrics; a scrape
// calls it while the migration runs.
func (inc *incoming) deviceCounters() []telemetry.DestDevice {
	out := make([]telemetry.DestDevice, len(inc.devs))
	for i, d := range inc.devs {
		out[i] = telemetry.DestDevice{
			Device:     d.spec,
			Bytes:      d.written.Load(),
			Chunks:     d.chunks.Load(),
			Duplicates: d.duplicates.Load(),
			Window:     inc.limits.MaxBytes,
		}
		d.mu.Lock()
		if d.reasm != nil {
			_, out[i].Buffered = d.reasm.Buffered()
		}
		d.mu.Unlock()
	}
	return out
}

// ended is what the metrics record once the migration has ended.
func (inc *incoming) ended() telemetry.Ended {
	inc.mu.Lock()
	defer inc.mu.Unlock()
	e := telemetry.Ended{Outcome: telemetry.Failed, Duration: inc.endTime.Sub(inc.createTime)}
	if inc.err != nil {
		e.Reason = inc.err.GetReason()
	}
	switch inc.phase {
	case ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED:
		e.Outcome = telemetry.Succeeded
	case ferryv1.MigrationPhase_MIGRATION_PHASE_CANCELLED:
		e.Outcome = telemetry.Cancelled
	}
	if !inc.switchoverTime.IsZero() {
		verdict := inc.verdictTime
		if verdict.IsZero() {
			verdict = inc.endTime
		}
		e.Downtime, e.SwitchedOver = verdict.Sub(inc.switchoverTime), true
	}
	return e
}

// liveState is the phase the metrics show while the migration runs: a
// prepared migration counts as running only once its source opened the
// session.
func (inc *incoming) liveState() telemetry.Live {
	inc.mu.Lock()
	defer inc.mu.Unlock()
	return telemetry.Live{Phase: inc.phase, Opened: inc.sessionID != ""}
}

// endTrace ends the migration's spans with its final phase and error.
func (inc *incoming) endTrace() {
	inc.mu.Lock()
	phase, e := inc.phase, inc.err
	inc.mu.Unlock()
	inc.trace.End(phase, e.GetReason(), e.GetMessage())
}
