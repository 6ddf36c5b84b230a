package soak

import (
	"fmt"
	"math/rand/v2"
	"strings"
)

// faultClass is one kind of fault the soak injects, as the fault tests
// (test/e2e/faults_test.go, services/*/stuck*) know them one at a time.
type faultClass string

// The fault classes.
const (
	// Between the agents, on the connections that carry the chunks (a TCP
	// proxy of the soak's own in front of the destination's gRPC port, and
	// one in front of its direct data port on a direct lane).
	faultCutOne  faultClass = "channel-cut"  // one channel connection cut once it carried N bytes
	faultCutAll  faultClass = "all-cut"      // every first-generation channel connection cut at N bytes
	faultStall   faultClass = "stall"        // one channel connection stalls (no bytes, no FIN) at N bytes
	faultCorrupt faultClass = "corrupt"      // one bit flipped at byte N of a channel connection
	faultDestRe  faultClass = "dest-restart" // the destination process killed and restarted at a phase or byte count
	faultSrcRe   faultClass = "source-restart"
	// In a device (keys of the sim: spec).
	faultSlowDest faultClass = "slow-dest"    // the destination device writes at a capped rate (wrate=)
	faultSrcDev   faultClass = "source-fault" // a source device's read fails at an offset, or an arc into a state fails
	faultHang     faultClass = "hang"         // a device's read, write or state change never returns
	// From the control plane.
	faultCancel faultClass = "cancel" // CancelMigration (source) or CancelIncoming (destination) at a phase or byte count
	faultBudget faultClass = "budget" // a prepare beyond the node's memory budget, while the migration runs
	faultRival  faultClass = "rival"  // another migration asks for one of the migration's devices while it runs
)

// faultClasses are every class, in the order reports list them.
var faultClasses = [...]faultClass{faultCutOne, faultCutAll, faultStall, faultCorrupt, faultDestRe, faultSrcRe,
	faultSlowDest, faultSrcDev, faultHang, faultCancel, faultBudget, faultRival}

// trigger is when a fault that acts at a moment acts: once the source
// reports the migration in Phase, or once it has moved Bytes bytes.
type trigger struct {
	Phase string `json:"phase,omitempty"` // a MigrationPhase name without its prefix
	Bytes uint64 `json:"bytes,omitempty"`
}

func (t trigger) String() string {
	if t.Phase != "" {
		return "at " + t.Phase
	}
	return fmt.Sprintf("at %d bytes", t.Bytes)
}

// fault is one fault of a migration.
type fault struct {
	Class faultClass `json:"class"`
	// Bytes: the connection byte count of a proxy fault.
	Bytes int64 `json:"bytes,omitempty"`
	// At: the moment of a restart, a cancel, a budget prepare or a rival.
	At *trigger `json:"at,omitempty"`
	// Device is the index of the device a device fault changed, and Key
	// the sim: key it added ("hang=read@4096").
	Device int    `json:"device,omitempty"`
	Key    string `json:"key,omitempty"`
	Side   string `json:"side,omitempty"` // "source" or "dest": the device's side, or the agent cancelled
	// Triggered says the fault happened; a fault armed past the
	// migration's end never does.
	Triggered bool `json:"triggered"`
}

func (f fault) String() string {
	var b strings.Builder
	b.WriteString(string(f.Class))
	switch {
	case f.Key != "":
		fmt.Fprintf(&b, " %s device %d: %s", f.Side, f.Device, f.Key)
	case f.At != nil && f.Side != "":
		fmt.Fprintf(&b, " %s %v", f.Side, f.At)
	case f.At != nil:
		fmt.Fprintf(&b, " %v", f.At)
	default:
		fmt.Fprintf(&b, " at %d bytes", f.Bytes)
	}
	if !f.Triggered {
		b.WriteString(" (not triggered)")
	}
	return b.String()
}

// stuckFault reports whether a triggered fault of this plan leaves a
// device that never answers: the agent holding it is restarted after
// the round.
func (f fault) hangs() bool { return f.Class == faultHang }

// phasesFor are the phases a trigger may name for a migration.
func phasesFor(precopy bool) []string {
	if precopy {
		return []string{"WAITING", "PRECOPY", "READY", "STOPCOPY", "FINISHING"}
	}
	return []string{"WAITING", "STOPCOPY", "FINISHING"}
}

// drawTrigger draws a moment of p: a phase, or a byte count below its
// total.
func drawTrigger(rng *rand.Rand, p *migrationPlan) *trigger {
	if rng.IntN(2) == 0 {
		ph := phasesFor(p.Precopy)
		return &trigger{Phase: ph[rng.IntN(len(ph))]}
	}
	return &trigger{Bytes: 1 + rng.Uint64N(max(p.totalBytes(), 2)-1)}
}

// eighth is a page-aligned k/8 of n, 1 <= k <= 7: offsets drawn from a
// few values, so faulted devices repeat and the agents' registries stay
// small.
func eighth(rng *rand.Rand, n uint64) uint64 {
	return (n * uint64(1+rng.IntN(7)) / 8) &^ 4095
}

// drawFault draws one fault for p, changing its device specs for the
// device classes.
func (pl *planner) drawFault(p *migrationPlan) fault {
	rng := pl.rng
	c := faultClasses[rng.IntN(len(faultClasses))]
	f := fault{Class: c}
	perConn := int64(p.totalBytes()/uint64(p.Channels)) + 1
	switch c {
	case faultCutOne, faultCutAll, faultStall, faultCorrupt:
		f.Bytes = 1 + rng.Int64N(perConn)
	case faultDestRe, faultSrcRe, faultBudget, faultRival:
		f.At = drawTrigger(rng, p)
	case faultCancel:
		f.At = drawTrigger(rng, p)
		f.Side = []string{"source", "dest"}[rng.IntN(2)]
	case faultSlowDest:
		f.Device, f.Side = rng.IntN(len(p.Devices)), "dest"
		f.Key = fmt.Sprintf("wrate=%dMB/s", 8<<rng.IntN(3))
	case faultSrcDev:
		f.Device, f.Side = rng.IntN(len(p.Devices)), "source"
		d := p.Devices[f.Device]
		switch rng.IntN(3) {
		case 0:
			f.Key = "fail=state:STOP_COPY"
		case 1:
			if pl.slots[d.Slot].pre && p.Precopy {
				f.Key = "fail=state:PRE_COPY"
				break
			}
			fallthrough
		default:
			f.Key = fmt.Sprintf("fault=%d", eighth(rng, d.Size))
		}
	case faultHang:
		f.Device = rng.IntN(len(p.Devices))
		d := p.Devices[f.Device]
		switch rng.IntN(4) {
		case 0:
			f.Side, f.Key = "source", fmt.Sprintf("hang=read@%d", eighth(rng, d.Size))
		case 1:
			f.Side, f.Key = "source", "hang=state:STOP_COPY"
		case 2:
			f.Side, f.Key = "dest", fmt.Sprintf("hang=write@%d", eighth(rng, d.Size))
		default:
			f.Side, f.Key = "dest", "hang=state:STOP"
		}
	}
	if f.Key != "" {
		d := &p.Devices[f.Device]
		spec := &d.Src
		if f.Side == "dest" {
			spec = &d.Dst
		}
		if strings.Contains(*spec, strings.SplitN(f.Key, "=", 2)[0]+"=") {
			// The device has a fault of this key already: draw again.
			return pl.drawFault(p)
		}
		*spec += "," + f.Key
	}
	return f
}
