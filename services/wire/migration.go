package wire

import ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"

// Metadata headers of a Channel stream: the source sends them, the
// destination reads them to bind the stream to its session and channel.
const (
	HeaderSession = "ferry-session-id"
	HeaderChannel = "ferry-channel"
)

// Final reports whether a migration phase is one a migration ends in:
// SUCCEEDED, FAILED or CANCELLED. VERIFIED is not final: it waits for the
// source's Commit or Abort.
func Final(p ferryv1.MigrationPhase) bool {
	return p == ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED ||
		p == ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED ||
		p == ferryv1.MigrationPhase_MIGRATION_PHASE_CANCELLED
}

// PhaseOrder is where p stands in a migration's forward order: READY,
// numbered last, stands between PRECOPY and STOPCOPY.
func PhaseOrder(p ferryv1.MigrationPhase) float64 {
	if p == ferryv1.MigrationPhase_MIGRATION_PHASE_READY {
		return float64(ferryv1.MigrationPhase_MIGRATION_PHASE_PRECOPY) + 0.5
	}
	return float64(p)
}
