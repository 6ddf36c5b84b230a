package soak

import (
	"context"
	"fmt"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc/codes"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/services/wire"
)

// The invariants, by the names reports count them under.
const (
	invEnded        = "migration-ended"        // SUCCEEDED, FAILED or CANCELLED (or refused), never left running
	invReason       = "failure-has-reason"     // FAILED / CANCELLED / refused carry an ErrorInfo reason
	invVerified     = "succeeded-verified"     // SUCCEEDED: every destination device verified, in STOP, and the source's in STOP
	invRolledBack   = "failed-rolled-back"     // FAILED / CANCELLED: every source device RUNNING, every destination device reset (RUNNING)
	invDevicesIdle  = "devices-idle"           // no device in STOP_COPY, RESUMING, PRE_COPY or ERROR, none owned, none stuck (but a hung one)
	invStuckHang    = "stuck-only-when-hung"   // a device reported stuck had a hang fault
	invNoneRunning  = "no-migration-running"   // neither agent has a migration that has not ended
	invBudget       = "budget-released"        // the destination's budget in use is back to zero
	invGoroutines   = "goroutines-bounded"     // back within a small bound of the agent's level before the soak
	invFDs          = "fds-bounded"            // likewise, open file descriptors
	invRSS          = "rss-bounded"            // RSS within the baseline plus the windows in flight
	invNoRace       = "no-data-race"           // a race-built agent reported no data race
	invRefusedFault = "refusal-has-a-fault"    // a prepare or start is refused only under a fault that explains it
	invRelease      = "source-device-released" // a source device left in STOP by a success goes back to RUNNING on ReleaseDevice
	invCoded        = "errors-have-codes"      // no call ends UNKNOWN (an error that left a handler without a gRPC status), no handler panics
	invInDoubt      = "in-doubt-resolved"      // a destination left VERIFIED after its source ended is one a fault cut off, and resolves as the control plane asks
	invNoDeadline   = "no-deadline-wait"       // no migration waits out its switchover deadline: every fault ends it, or is recovered from, well within it
)

// checks counts the invariant checks run, by invariant.
type checks struct {
	mu sync.Mutex
	n  map[string]int
}

func (c *checks) count(inv string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.n == nil {
		c.n = make(map[string]int)
	}
	c.n[inv]++
}

func (c *checks) snapshot() map[string]int {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make(map[string]int, len(c.n))
	for k, v := range c.n {
		out[k] = v
	}
	return out
}

// violation is an invariant that did not hold. The soak stops at the
// first, and reports it with the seed, the migration, its faults and the
// agents' logs.
type violation struct {
	Invariant string `json:"invariant"`
	Detail    string `json:"detail"`
}

func (v *violation) Error() string { return v.Invariant + ": " + v.Detail }

func violate(inv, format string, args ...any) *violation {
	return &violation{Invariant: inv, Detail: fmt.Sprintf(format, args...)}
}

// violationf is a violation found while a fault acted.
func violationf(format string, args ...any) *violation {
	return violate("fault-answer", format, args...)
}

// deviceView is one device as an agent lists it.
type deviceView = ferryv1.Device

// listDevices reads an agent's devices by spec.
// A call that an agent's restart (another migration's fault) cuts off
// is asked again.
func (s *soak) listDevices(ctx context.Context, a *agent) (map[string]*deviceView, error) {
	ctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	var resp *ferryv1.ListDevicesResponse
	var err error
	for {
		if a.role == "dest" {
			resp, err = s.destClient(a).ListDevices(ctx, &ferryv1.ListDevicesRequest{}, wait)
		} else {
			resp, err = s.sourceClient(a).ListDevices(ctx, &ferryv1.ListDevicesRequest{}, wait)
		}
		if err == nil || wire.Code(err) != codes.Unavailable || ctx.Err() != nil {
			break
		}
	}
	if err != nil {
		return nil, fmt.Errorf("ListDevices of %s: %w", a.name, err)
	}
	out := make(map[string]*deviceView, len(resp.GetDevices()))
	for _, d := range resp.GetDevices() {
		out[d.GetSpec()] = d
	}
	return out, nil
}

// hungSpecs are the specs of the plan's devices with a hang fault, per
// side.
func hungSpecs(p *migrationPlan) (src, dst map[string]bool) {
	src, dst = map[string]bool{}, map[string]bool{}
	for _, f := range p.Faults {
		if f.Class != faultHang {
			continue
		}
		if f.Side == "dest" {
			dst[p.Devices[f.Device].Dst] = true
		} else {
			src[p.Devices[f.Device].Src] = true
		}
	}
	return src, dst
}

// explainsRefusal reports whether a fault of p may make its prepare or
// start fail: a device that hangs or fails as it is opened or moved to
// RESUMING, an agent restart, a rival or a budget prepare racing it.
func explainsRefusal(p *migrationPlan, o *outcome) bool {
	if o.collateral {
		return true
	}
	for _, f := range p.Faults {
		switch f.Class {
		case faultHang, faultSrcDev, faultDestRe, faultSrcRe:
			return true
		}
	}
	return false
}

// checkMigration checks the invariants of one migration that ended,
// against both agents' views. Devices of a migration an agent restart
// cut short are checked only in the agents' new lives.
func (s *soak) checkMigration(ctx context.Context, m *migrationRun, o *outcome) error {
	p := m.p
	s.checks.count(invEnded)
	switch o.Phase {
	case "SUCCEEDED", "FAILED", "CANCELLED", outcomeRefused, outcomeSourceLost:
	default:
		return violate(invEnded, "the source ended in %s", o.Phase)
	}
	if o.dest != nil && !wire.Final(o.dest.GetPhase()) {
		return violate(invEnded, "the destination ended in %s", o.DestPhase)
	}
	if o.Phase == outcomeRefused {
		s.checks.count(invRefusedFault)
		if !explainsRefusal(p, o) {
			return violate(invRefusedFault, "refused without a fault that explains it: %s (%v, %q)", o.Message, o.refusedCode, o.Reason)
		}
	}
	// A stalled channel is re-dialled within the progress timeout, a
	// hung device declared stuck within the device timeout, a lost agent
	// found within the reconnect timeout: all seconds, against a minute's
	// deadline. A migration that waited it out was wedged, its VM paused
	// for the minute: two bugs the soak found (a destination's stuck
	// write, a chunk stuck in a stalled data connection) looked so.
	s.checks.count(invNoDeadline)
	if o.Reason == wire.ReasonSwitchoverDeadline {
		return violate(invNoDeadline, "the migration waited out its switchover deadline: %s", o.Message)
	}
	if o.Phase == "FAILED" || o.Phase == "CANCELLED" || o.Phase == outcomeRefused {
		s.checks.count(invReason)
		if o.Reason == "" && !o.collateral {
			return violate(invReason, "%s without an ErrorInfo reason: %s", o.Phase, o.Message)
		}
	}
	srcDevs, err := s.listDevices(ctx, m.src)
	if err != nil {
		return err
	}
	dstDevs, err := s.listDevices(ctx, m.dst)
	if err != nil {
		return err
	}
	hungSrc, hungDst := hungSpecs(p)
	markDeviceFaults(p, o, srcDevs, dstDevs)
	if o.Reason == wire.ReasonRolledBack {
		// A CancelIncoming reached the VERIFIED destination just before
		// the source's Commit: the destination refused the Commit and
		// the source rolled back, which the checks below hold it to.
		s.stats.commitRace.Add(1)
		m.note("commit race: the destination's CancelIncoming won over the source's Commit, and both rolled back")
	}
	if o.Phase == "SUCCEEDED" {
		s.checks.count(invVerified)
		if o.dest != nil && o.dest.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED {
			return violate(invVerified, "the source SUCCEEDED, the destination %s", o.DestPhase)
		}
		for i, d := range o.dest.GetDevices() {
			if !d.GetVerified() {
				return violate(invVerified, "SUCCEEDED with destination device %d (%s) not verified", i, d.GetDevice())
			}
		}
		for _, d := range p.Devices {
			if v := dstDevs[d.Dst]; v != nil && !o.RivalWon && !o.collateral && v.GetState() != ferryv1.DeviceState_DEVICE_STATE_STOP {
				return violate(invVerified, "SUCCEEDED with destination device %s in %v, want STOP (loaded)", d.Dst, v.GetState())
			}
			if v := srcDevs[d.Src]; v != nil && !o.collateral && v.GetState() != ferryv1.DeviceState_DEVICE_STATE_STOP {
				return violate(invVerified, "SUCCEEDED with source device %s in %v, want STOP (its state moved away)", d.Src, v.GetState())
			}
		}
	}
	failed := o.Phase != "SUCCEEDED"
	for _, d := range p.Devices {
		for _, side := range []struct {
			name string
			spec string
			devs map[string]*deviceView
			hung map[string]bool
		}{{"source", d.Src, srcDevs, hungSrc}, {"destination", d.Dst, dstDevs, hungDst}} {
			v := side.devs[side.spec]
			if v == nil {
				continue // never opened, or the agent restarted
			}
			s.checks.count(invStuckHang)
			if v.GetStuck() || v.GetOwner() == "(stuck)" {
				if !side.hung[side.spec] {
					return violate(invStuckHang, "%s device %s is stuck without a hang fault: %s", side.name, side.spec, v.GetError())
				}
				continue // held until its operation answers: restarted after the round
			}
			s.checks.count(invDevicesIdle)
			if err := idle(v); err != "" {
				if o.collateral && v.GetOwner() == "" {
					continue // the agent restarted under it; the round's end checks the new process
				}
				return violate(invDevicesIdle, "%s device %s: %s", side.name, side.spec, err)
			}
			// A refused prepare resets the devices it took and leaves the
			// rest as they were (a destination device in STOP, loaded by an
			// earlier migration, stays so).
			if failed && (side.name == "source" || o.refusedAt != "prepare") {
				s.checks.count(invRolledBack)
				if v.GetState() != ferryv1.DeviceState_DEVICE_STATE_RUNNING && !o.collateral {
					return violate(invRolledBack, "%s with %s device %s in %v, want RUNNING", o.Phase, side.name, side.spec, v.GetState())
				}
			}
		}
	}
	return nil
}

// idle says what is wrong with a device no migration should hold: "" for
// nothing.
func idle(v *deviceView) string {
	switch v.GetState() {
	case ferryv1.DeviceState_DEVICE_STATE_RUNNING, ferryv1.DeviceState_DEVICE_STATE_STOP:
	default:
		return fmt.Sprintf("left in %v", v.GetState())
	}
	if v.GetOwner() != "" {
		return fmt.Sprintf("still held by %q", v.GetOwner())
	}
	if v.GetStuck() {
		return "stuck: " + v.GetError()
	}
	return ""
}

// bounds are how far an idle agent may be above its baseline.
type bounds struct {
	goroutines int
	fds        int
	rss        uint64
}

// settleTimeout is how long the soak waits for an agent's goroutines,
// fds and RSS to come back within their bounds after a round: goroutines
// of ended streams finish, connections close, the scavenger returns
// memory. Far longer than they take; a level that never comes back is a
// leak.
const settleTimeout = 30 * time.Second

// checkAgent checks an agent at the end of a round, when no migration of
// the soak runs: no migration of its own running, its devices idle, the
// budget free, goroutines, fds and RSS back within bounds.
func (s *soak) checkAgent(ctx context.Context, a *agent, ids []string) error {
	s.checks.count(invNoRace)
	if r := a.raceReports(); len(r) > 0 {
		return violate(invNoRace, "%s reported a data race:\n%s", a.name, r[0])
	}
	s.checks.count(invCoded)
	if unknown, panics := a.untranslatedCalls(); len(panics) > 0 {
		return violate(invCoded, "%s: a handler panicked: %s", a.name, panics[0])
	} else if len(unknown) > 0 {
		return violate(invCoded, "%s: %d call(s) ended UNKNOWN, an error without a gRPC status; the first: %s", a.name, len(unknown), unknown[0])
	}
	cctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	s.checks.count(invNoneRunning)
	if a.role == "source" {
		resp, err := s.sourceClient(a).ListMigrations(cctx, &ferryv1.ListMigrationsRequest{}, wait)
		if err != nil {
			return fmt.Errorf("ListMigrations of %s: %w", a.name, err)
		}
		for _, m := range resp.GetMigrations() {
			if !wire.Final(m.GetPhase()) {
				return violate(invNoneRunning, "%s: migration %s is %s with no migration of the soak running", a.name, m.GetId(), phaseName(m.GetPhase()))
			}
		}
	} else {
		for _, id := range ids {
			resp, err := s.destClient(a).GetIncoming(cctx, &ferryv1.GetIncomingRequest{MigrationId: id}, wait)
			if err != nil {
				continue // forgotten, or never prepared here
			}
			if m := resp.GetMigration(); !wire.Final(m.GetPhase()) {
				return violate(invNoneRunning, "%s: incoming migration %s is %s with no migration of the soak running", a.name, id, phaseName(m.GetPhase()))
			}
		}
	}
	devs, err := s.listDevices(ctx, a)
	if err != nil {
		return err
	}
	specs := make([]string, 0, len(devs))
	for spec := range devs {
		specs = append(specs, spec)
	}
	sort.Strings(specs)
	for _, spec := range specs {
		s.checks.count(invDevicesIdle)
		if err := idle(devs[spec]); err != "" {
			return violate(invDevicesIdle, "%s, between rounds: device %s %s", a.name, spec, err)
		}
	}
	return s.checkUsage(ctx, a)
}

// checkUsage waits, up to settleTimeout, for the agent's usage to come
// back within its bounds of the baseline.
func (s *soak) checkUsage(ctx context.Context, a *agent) error {
	base, ok := s.baseline(a)
	if !ok {
		return nil
	}
	b := s.cfg.bounds()
	deadline := time.Now().Add(settleTimeout)
	for {
		u, err := s.usage(ctx, a)
		if err != nil {
			return err
		}
		// One watchdog goroutine per device opened since the baseline.
		goroutines := base.Goroutines + b.goroutines + max(u.Devices-base.Devices, 0)
		s.noteUsage(a, u)
		var bad []string
		if a.role == "dest" && u.BudgetInUse != 0 {
			bad = append(bad, fmt.Sprintf("%s: %v bytes of the budget in use", invBudget, u.BudgetInUse))
		}
		if u.Goroutines > goroutines {
			bad = append(bad, fmt.Sprintf("%s: %d goroutines, baseline %d + %d + %d for the devices opened since (%d to %d)",
				invGoroutines, u.Goroutines, base.Goroutines, b.goroutines, u.Devices-base.Devices, base.Devices, u.Devices))
		}
		if u.FDs > base.FDs+b.fds {
			bad = append(bad, fmt.Sprintf("%s: %d open fds, baseline %d + %d", invFDs, u.FDs, base.FDs, b.fds))
		}
		if u.RSS > base.RSS+b.rss {
			bad = append(bad, fmt.Sprintf("%s: RSS %d MiB, baseline %d MiB + %d MiB", invRSS, u.RSS>>20, base.RSS>>20, b.rss>>20))
		}
		if len(bad) == 0 {
			for _, inv := range []string{invBudget, invGoroutines, invFDs, invRSS} {
				if inv != invBudget || a.role == "dest" {
					s.checks.count(inv)
				}
			}
			return nil
		}
		if time.Now().After(deadline) {
			inv := strings.SplitN(bad[0], ":", 2)[0]
			for _, i := range []string{invBudget, invGoroutines, invFDs, invRSS} {
				s.checks.count(i)
			}
			v := violate(inv, "%s, %v after the round: %s", a.name, settleTimeout, strings.Join(bad, "; "))
			if inv == invGoroutines || inv == invFDs {
				v.Detail += "\n" + summarizeStacks(a.dumpGoroutines())
			}
			return v
		}
		t := time.NewTimer(100 * time.Millisecond)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
		}
	}
}

// stuckDevices lists the agent's stuck devices.
func stuckDevices(devs map[string]*deviceView) []string {
	var out []string
	for spec, d := range devs {
		if d.GetStuck() || d.GetOwner() == "(stuck)" {
			out = append(out, spec)
		}
	}
	slices.Sort(out)
	return out
}

// markDeviceFaults marks the device faults that happened: a hung device
// reported stuck (or the migration failing with DEVICE_STUCK), a source
// device's injected failure in the migration's error, a slow destination
// device written to.
func markDeviceFaults(p *migrationPlan, o *outcome, srcDevs, dstDevs map[string]*deviceView) {
	for i := range p.Faults {
		f := &p.Faults[i]
		d := p.Devices[f.Device]
		v := srcDevs[d.Src]
		if f.Side == "dest" {
			v = dstDevs[d.Dst]
		}
		switch f.Class {
		case faultHang:
			f.Triggered = v.GetStuck() || v.GetOwner() == "(stuck)" || o.Reason == wire.ReasonDeviceStuck
		case faultSrcDev:
			f.Triggered = strings.Contains(o.Message, "injected") || strings.Contains(v.GetError(), "injected")
		case faultSlowDest:
			for _, dp := range o.dest.GetDevices() {
				if dp.GetDevice() == d.Dst && dp.GetBytes() > 0 {
					f.Triggered = true
				}
			}
		}
	}
}

// summarizeStacks counts a goroutine dump's goroutines by their
// innermost frames in the ferry code (or their first frame), most first:
// what a leak left running.
func summarizeStacks(dump string) string {
	counts := map[string]int{}
	for g := range strings.SplitSeq(dump, "\n\n") {
		lines := strings.Split(strings.TrimSpace(g), "\n")
		if len(lines) < 2 || !strings.HasPrefix(lines[0], "goroutine ") {
			continue
		}
		state, _, _ := strings.Cut(lines[0][strings.Index(lines[0], "[")+1:], ",")
		state = "[" + strings.TrimSuffix(state, "]:") + "]"
		key := strings.TrimSpace(lines[1])
		for i := 1; i < len(lines); i += 2 {
			if strings.Contains(lines[i], "vfio-ferry/ferry/") {
				key = strings.TrimSpace(lines[i])
				break
			}
		}
		if i := strings.LastIndex(key, "("); i > 0 {
			key = key[:i] // the arguments' addresses
		}
		counts[state+" "+key]++
	}
	keys := make([]string, 0, len(counts))
	for k := range counts {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool {
		return counts[keys[i]] > counts[keys[j]] || counts[keys[i]] == counts[keys[j]] && keys[i] < keys[j]
	})
	var b strings.Builder
	b.WriteString("goroutines by where they wait (the whole dump is in the agent's log):\n")
	for _, k := range keys {
		fmt.Fprintf(&b, "  %3d %s\n", counts[k], k)
	}
	return b.String()
}
