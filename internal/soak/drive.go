package soak

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/durationpb"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/services/wire"
	"github.com/vfio-ferry/ferry/test/tcpproxy"
)

// migrationTimeout bounds one migration, faults and checks included. A
// migration that has not ended by then is a violation: every fault the
// soak injects resolves within the agents' deadlines, a few seconds here.
const migrationTimeout = 3 * time.Minute

// callTimeout bounds one control-plane call; calls wait for an agent
// that restarts.
const callTimeout = 30 * time.Second

// wait is grpc's wait-for-ready: a call to an agent that is restarting
// waits for it instead of failing at once.
var wait = grpc.WaitForReady(true)

// outcome is how one migration ended, as the soak saw it.
type outcome struct {
	Phase       string `json:"phase"` // the source's final phase, or REFUSED / SOURCE_LOST
	Reason      string `json:"reason,omitempty"`
	Message     string `json:"message,omitempty"`
	DestPhase   string `json:"dest_phase,omitempty"`
	RivalWon    bool   `json:"rival_won,omitempty"` // a rival prepared a device after the migration ended with it
	collateral  bool   // an agent of the migration restarted while it ran
	source      *ferryv1.Migration
	dest        *ferryv1.Migration
	refusedCode codes.Code
	refusedAt   string // "prepare" or "start"
}

// Outcomes a migration can have beside the final phases.
const (
	// outcomeRefused: the prepare or the start was refused.
	outcomeRefused = "REFUSED"
	// outcomeSourceLost: the source restarted and no longer knows the
	// migration; the destination ended it by itself.
	outcomeSourceLost = "SOURCE_LOST"
)

// migrationRun is one migration in flight.
type migrationRun struct {
	s     *soak
	p     *migrationPlan
	src   *agent
	dst   *agent
	proxy *tcpproxy.Proxy // in front of the destination's gRPC port
	// data is in front of the destination's direct data listener, on the
	// proxy's address and the listener's port, for a direct lane: the
	// source dials the data port on the host it reached Transfer at. nil
	// on a gRPC lane.
	data *tcpproxy.Proxy
	rng  *rand.Rand // the migration's own, for choices made while it runs

	mu       sync.Mutex
	last     *ferryv1.Migration
	rivalWon bool
	notes    []string // what the faults saw, for a report
	extraIDs []string // the ids of the rivals and budget prepares it made
}

// extraID names the n-th migration a fault of m makes beside it (a rival,
// a budget prepare), and remembers it for the checks between rounds.
func (m *migrationRun) extraID(kind string) string {
	m.mu.Lock()
	defer m.mu.Unlock()
	id := fmt.Sprintf("%s-%s%d", m.p.ID, kind, len(m.extraIDs))
	m.extraIDs = append(m.extraIDs, id)
	return id
}

func (m *migrationRun) note(format string, args ...any) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.notes = append(m.notes, fmt.Sprintf(format, args...))
}

// run drives the migration to its end with its faults, and returns its
// outcome; an error is a violation found on the way.
func (m *migrationRun) run(ctx context.Context) (*outcome, error) {
	ctx, cancel := context.WithTimeout(ctx, migrationTimeout)
	defer cancel()
	p := m.p
	srcEpoch, dstEpoch := m.src.epoch(), m.dst.epoch()
	m.armProxy()
	dst, src := m.s.destClient(m.dst), m.s.sourceClient(m.src)

	prep := &ferryv1.PrepareIncomingRequest{MigrationId: p.ID, MaxChunks: p.MaxChunks, MaxBytes: p.MaxBytes}
	for _, d := range p.Devices {
		prep.Devices = append(prep.Devices, d.Dst)
	}
	cctx, ccancel := context.WithTimeout(ctx, callTimeout)
	prepared, err := dst.PrepareIncoming(cctx, prep, wait)
	ccancel()
	if err != nil {
		return m.refused(ctx, "prepare", err, srcEpoch, dstEpoch)
	}
	start := &ferryv1.StartMigrationRequest{
		MigrationId: p.ID, DestAddress: m.proxy.Addr(), Token: prepared.GetToken(),
		Channels: p.Channels, ChunkSize: p.ChunkSize, Mode: ferryv1.MigrationMode_MIGRATION_MODE_STOP_COPY,
	}
	if p.SHA256 {
		start.Digest = ferryv1.DigestAlgorithm_DIGEST_ALGORITHM_SHA256
	}
	if p.Precopy {
		start.Mode = ferryv1.MigrationMode_MIGRATION_MODE_PRECOPY
		start.PrecopyTimeout = durationpb.New(30 * time.Second)
		start.OnPrecopyTimeout = ferryv1.PrecopyTimeoutAction_PRECOPY_TIMEOUT_ACTION_SWITCHOVER
	}
	for _, d := range p.Devices {
		start.Devices = append(start.Devices, &ferryv1.DevicePair{SourceDevice: d.Src, DestDevice: d.Dst})
	}
	cctx, ccancel = context.WithTimeout(ctx, callTimeout)
	_, err = src.StartMigration(cctx, start, wait)
	ccancel()
	if err != nil {
		cctx, ccancel := context.WithTimeout(ctx, callTimeout)
		dst.CancelIncoming(cctx, &ferryv1.CancelIncomingRequest{MigrationId: p.ID}, wait)
		ccancel()
		return m.refused(ctx, "start", err, srcEpoch, dstEpoch)
	}

	// The moment faults and the switchover act on the watch's views.
	g, gctx := errgroup.WithContext(ctx)
	views := make(chan *ferryv1.Migration, 1)
	g.Go(func() error { return m.act(gctx, views) })
	final, lost, err := m.follow(ctx, views)
	close(views)
	if gerr := g.Wait(); gerr != nil {
		return nil, gerr
	}
	if err != nil {
		return nil, err
	}
	o := &outcome{source: final}
	if lost {
		o.Phase = outcomeSourceLost
	} else {
		o.Phase = phaseName(final.GetPhase())
		o.Reason, o.Message = final.GetError().GetReason(), final.GetError().GetMessage()
	}
	// The destination ends by itself: at once after the commit or the
	// abort, or after its source timeout when the source is gone.
	d, err := m.destFinal(ctx, o)
	if err != nil {
		return nil, err
	}
	o.dest = d
	if d != nil {
		o.DestPhase = phaseName(d.GetPhase())
	}
	m.mu.Lock()
	o.RivalWon = m.rivalWon
	m.mu.Unlock()
	o.collateral = m.src.epoch() != srcEpoch || m.dst.epoch() != dstEpoch
	return o, nil
}

// refused is the outcome of a prepare or a start that was refused, which
// only a fault may explain: a device that hangs as it is opened, or an
// agent restarting.
func (m *migrationRun) refused(ctx context.Context, what string, err error, srcEpoch, dstEpoch int) (*outcome, error) {
	o := &outcome{Phase: outcomeRefused, Reason: wire.Reason(err), Message: what + ": " + err.Error(), refusedCode: wire.Code(err), refusedAt: what}
	o.collateral = m.src.epoch() != srcEpoch || m.dst.epoch() != dstEpoch
	if ctx.Err() != nil {
		return nil, fmt.Errorf("%s of %s did not answer within %v: %w", what, m.p.ID, migrationTimeout, err)
	}
	return o, nil
}

// chunkProxy is the proxy the chunks go through and the indices of the
// first generation of its connections: the data proxy's 0 to channels-1
// on a direct lane; else the gRPC proxy's 1 to channels (connection 0
// carries Open; later ones are re-dials).
func (m *migrationRun) chunkProxy() (p *tcpproxy.Proxy, first, last int) {
	if m.data != nil {
		return m.data, 0, int(m.p.Channels) - 1
	}
	return m.proxy, 1, int(m.p.Channels)
}

// armProxy arms the proxy faults.
func (m *migrationRun) armProxy() {
	px, first, last := m.chunkProxy()
	var cutAll []int64
	for i := range m.p.Faults {
		f := &m.p.Faults[i]
		switch f.Class {
		case faultCutOne:
			px.CutFirstAfter(f.Bytes, first, last)
		case faultStall:
			px.StallFirstAfter(f.Bytes, first, last)
		case faultCorrupt:
			px.FlipFirstAt(f.Bytes, first, last)
		case faultCutAll:
			cutAll = append(cutAll, f.Bytes)
		}
	}
	if len(cutAll) > 0 {
		n := slices.Min(cutAll)
		px.OnNew(func(c *tcpproxy.Conn) {
			if c.Index >= first && c.Index <= last {
				c.CutAfter(n)
			}
		})
		if m.data != nil {
			// The channels' streams go too, once their data is cut.
			m.proxy.OnNew(func(c *tcpproxy.Conn) {
				if c.Index >= 1 && c.Index <= int(m.p.Channels) {
					c.CutAfter(1)
				}
			})
		}
	}
}

// proxyTriggered marks the proxy faults that happened: some connection
// in their range carried their byte count.
func (m *migrationRun) proxyTriggered() {
	px, first, last := m.chunkProxy()
	conns := px.Conns()
	for i := range m.p.Faults {
		f := &m.p.Faults[i]
		switch f.Class {
		case faultCutOne, faultStall, faultCorrupt, faultCutAll:
			for _, c := range conns {
				if c.Index >= first && c.Index <= last && c.Carried() >= f.Bytes {
					f.Triggered = true
				}
			}
		}
	}
}

// closeProxies stops the migration's proxies.
func (m *migrationRun) closeProxies() {
	m.proxy.Close()
	if m.data != nil {
		m.data.Close()
	}
}

// follow watches the migration on the source to its end, sending every
// view to views. A watch that breaks (the source restarted) is opened
// again; a source that no longer knows the migration lost it.
func (m *migrationRun) follow(ctx context.Context, views chan<- *ferryv1.Migration) (final *ferryv1.Migration, lost bool, err error) {
	src := m.s.sourceClient(m.src)
	open := watchOf(func() (grpc.ServerStreamingClient[ferryv1.WatchMigrationResponse], error) {
		return src.WatchMigration(ctx, &ferryv1.WatchMigrationRequest{MigrationId: m.p.ID}, wait)
	})
	final, lost, err = watchToEnd(ctx, open, func(v *ferryv1.Migration) error {
		m.mu.Lock()
		m.last = v
		m.mu.Unlock()
		select {
		case views <- v:
		default:
			// The actor is busy: it reads the newest view from m.last.
		}
		return nil
	})
	switch {
	case ctx.Err() != nil:
		return nil, false, fmt.Errorf("migration %s did not end within %v (last seen: %v)", m.p.ID, migrationTimeout, m.lastPhase())
	case err != nil:
		return nil, false, fmt.Errorf("watch of %s: %w", m.p.ID, err)
	}
	return final, lost, nil
}

// watchOf adapts start, which opens a watch (WatchMigration,
// WatchIncoming), to watchToEnd: each open starts one, whose reads give
// its views.
func watchOf[R any, PR interface {
	*R
	GetMigration() *ferryv1.Migration
}](start func() (grpc.ServerStreamingClient[R], error)) func() (func() (*ferryv1.Migration, error), error) {
	return func() (func() (*ferryv1.Migration, error), error) {
		stream, err := start()
		if err != nil {
			return nil, err
		}
		return func() (*ferryv1.Migration, error) {
			resp, err := stream.Recv()
			return PR(resp).GetMigration(), err
		}, nil
	}
}

// watchToEnd follows a watch that open starts, calling each with every
// view, until it ends after a final phase: it returns the last view (the
// answer: a view in a final phase may still show a device being reset,
// and the watch ends once the clean-up is done). A watch that breaks
// because its agent went away (a restart) is opened again; gone reports
// an agent that no longer knows the migration. It returns ctx's error
// when ctx ends, and each's or the watch's other errors as they are.
func watchToEnd(ctx context.Context, open func() (func() (*ferryv1.Migration, error), error), each func(*ferryv1.Migration) error) (last *ferryv1.Migration, gone bool, err error) {
	for {
		recv, err := open()
		if err == nil {
			last = nil
			for {
				v, rerr := recv()
				if errors.Is(rerr, io.EOF) && wire.Final(last.GetPhase()) {
					return last, false, nil
				}
				if rerr != nil {
					err = rerr
					break
				}
				last = v
				if err := each(v); err != nil {
					return nil, false, err
				}
			}
		}
		switch {
		case ctx.Err() != nil:
			return nil, false, ctx.Err()
		case wire.Code(err) == codes.NotFound:
			return nil, true, nil
		case errors.Is(err, io.EOF), wire.Code(err) == codes.Unavailable, wire.Code(err) == codes.Canceled:
			// The agent went away (a restart); watch again.
		default:
			return nil, false, err
		}
		t := time.NewTimer(50 * time.Millisecond)
		select {
		case <-ctx.Done():
		case <-t.C:
		}
		t.Stop()
	}
}

func (m *migrationRun) lastPhase() string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return phaseName(m.last.GetPhase())
}

// act fires the faults that act at a moment, and asks a pre-copy
// migration to switch over, as the views reach their moments. It
// returns once views is closed and every fault it fired has finished.
func (m *migrationRun) act(ctx context.Context, views <-chan *ferryv1.Migration) error {
	type pending struct {
		f     *fault
		fired bool
	}
	var todo []*pending
	for i := range m.p.Faults {
		if m.p.Faults[i].At != nil {
			todo = append(todo, &pending{f: &m.p.Faults[i]})
		}
	}
	switched := false
	var g errgroup.Group
	for range views {
		m.mu.Lock()
		v := m.last
		m.mu.Unlock()
		if wire.Final(v.GetPhase()) {
			continue
		}
		if m.p.Precopy && !switched && (v.GetPhase() == ferryv1.MigrationPhase_MIGRATION_PHASE_READY) {
			switched = true
			g.Go(func() error {
				cctx, cancel := context.WithTimeout(ctx, callTimeout)
				defer cancel()
				_, err := m.s.sourceClient(m.src).Switchover(cctx, &ferryv1.SwitchoverRequest{MigrationId: m.p.ID}, wait)
				if err != nil {
					m.note("switchover: %v", err)
				}
				return nil
			})
		}
		for _, t := range todo {
			if t.fired || !reached(t.f.At, v) {
				continue
			}
			t.fired, t.f.Triggered = true, true
			f := t.f
			g.Go(func() error { return m.fire(ctx, f) })
		}
	}
	return g.Wait()
}

// reached reports whether the view v is at or past the trigger's moment.
func reached(t *trigger, v *ferryv1.Migration) bool {
	if t.Phase == "" {
		return v.GetBytes() >= t.Bytes
	}
	return phaseName(v.GetPhase()) == t.Phase
}

// fire injects one fault that acts at a moment.
func (m *migrationRun) fire(ctx context.Context, f *fault) error {
	switch f.Class {
	case faultDestRe:
		return m.s.restart(ctx, m.dst)
	case faultSrcRe:
		return m.s.restart(ctx, m.src)
	case faultCancel:
		cctx, cancel := context.WithTimeout(ctx, callTimeout)
		defer cancel()
		var err error
		if f.Side == "dest" {
			// Blind, as a careless control plane's: a VERIFIED
			// destination is cancelled too, racing the source's Commit,
			// and whichever wins, both ends must agree.
			_, err = m.s.destClient(m.dst).CancelIncoming(cctx, &ferryv1.CancelIncomingRequest{MigrationId: m.p.ID}, wait)
		} else {
			_, err = m.s.sourceClient(m.src).CancelMigration(cctx, &ferryv1.CancelMigrationRequest{MigrationId: m.p.ID}, wait)
		}
		if err != nil {
			m.note("cancel at the %s: %v", f.Side, err)
		}
		return nil
	case faultBudget:
		return m.overBudget(ctx)
	case faultRival:
		return m.rival(ctx)
	}
	return nil
}

// budgetDevices is how many devices a prepare beyond the budget asks
// for: the most a prepare may name, whose windows exceed any budget the
// soak runs with.
const budgetDevices = 64

// overBudget asks the destination for more windows than its budget
// holds: it must refuse with RESOURCE_EXHAUSTED and hold nothing.
func (m *migrationRun) overBudget(ctx context.Context) error {
	id := m.extraID("budget")
	req := &ferryv1.PrepareIncomingRequest{MigrationId: id}
	for k := range budgetDevices {
		req.Devices = append(req.Devices, fmt.Sprintf("sim:size=1MiB,seed=%d", budgetSeedBase+k))
	}
	cctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	epoch := m.dst.epoch()
	_, err := m.s.destClient(m.dst).PrepareIncoming(cctx, req, wait)
	switch {
	case err == nil:
		m.s.destClient(m.dst).CancelIncoming(cctx, &ferryv1.CancelIncomingRequest{MigrationId: id}, wait)
		return violationf("a prepare of %d device windows beyond the destination's budget of %d bytes was admitted", budgetDevices, m.s.cfg.destBudget())
	case wire.Code(err) == codes.ResourceExhausted && wire.Reason(err) == wire.ReasonBudgetExhausted:
		m.s.stats.budgetRefused.Add(1)
		return nil
	case m.dst.epoch() != epoch || wire.Code(err) == codes.Unavailable:
		m.note("budget prepare during a restart: %v", err)
		return nil
	}
	return violationf("a prepare beyond the budget was refused with %v / %q, want RESOURCE_EXHAUSTED / %s: %v",
		wire.Code(err), wire.Reason(err), wire.ReasonBudgetExhausted, err)
}

// rival asks, while the migration holds its devices, for one of them
// again: at the source (a second StartMigration of its source device,
// to a spare destination device) or at the destination (a second
// prepare of its destination device). A device the migration holds must
// be refused; one it let go may be taken, and is given back at once.
func (m *migrationRun) rival(ctx context.Context) error {
	i := m.rng.IntN(len(m.p.Devices))
	d := m.p.Devices[i]
	id := m.extraID("rival")
	dst, src := m.s.destClient(m.dst), m.s.sourceClient(m.src)
	cctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	epoch := m.dst.epoch() + m.src.epoch()
	busy := func(err error) bool {
		switch wire.Reason(err) {
		case wire.ReasonDeviceBusy, wire.ReasonDeviceState, wire.ReasonDeviceStuck:
			return true
		}
		return false
	}
	if m.rng.IntN(2) == 0 {
		_, err := dst.PrepareIncoming(cctx, &ferryv1.PrepareIncomingRequest{MigrationId: id, Devices: []string{d.Dst}}, wait)
		switch {
		case err == nil:
			// The migration had let its device go: give it back.
			m.mu.Lock()
			done := m.last != nil && wire.Final(m.last.GetPhase())
			m.rivalWon = true
			m.mu.Unlock()
			dst.CancelIncoming(cctx, &ferryv1.CancelIncomingRequest{MigrationId: id}, wait)
			m.note("rival prepare of %s admitted (the migration had ended: %v)", d.Dst, done)
			m.s.stats.rivalWon.Add(1)
			return nil
		case busy(err):
			m.s.stats.rivalRefused.Add(1)
			return nil
		case m.dst.epoch()+m.src.epoch() != epoch || wire.Code(err) == codes.Unavailable:
			return nil
		}
		return violationf("a rival prepare of destination device %s was refused with %v / %q, want DEVICE_BUSY: %v", d.Dst, wire.Code(err), wire.Reason(err), err)
	}
	// At the source: the rival goes to a spare destination device (the
	// same content, another spec), in pre-copy mode, so that it waits for
	// a switchover nobody asks for and is cancelled before it moves the
	// device away.
	spare := canonicalSpec(m.s.planner.slots[d.Slot].base + ",rate=1GB/s")
	prepared, err := dst.PrepareIncoming(cctx, &ferryv1.PrepareIncomingRequest{MigrationId: id, Devices: []string{spare}}, wait)
	if err != nil {
		m.note("rival's spare prepare: %v", err)
		return nil
	}
	_, err = src.StartMigration(cctx, &ferryv1.StartMigrationRequest{
		MigrationId: id, DestAddress: m.dst.Addr(), Token: prepared.GetToken(), Mode: ferryv1.MigrationMode_MIGRATION_MODE_PRECOPY,
		Devices: []*ferryv1.DevicePair{{SourceDevice: d.Src, DestDevice: spare}},
	}, wait)
	defer dst.CancelIncoming(cctx, &ferryv1.CancelIncomingRequest{MigrationId: id}, wait)
	switch {
	case err == nil:
		src.CancelMigration(cctx, &ferryv1.CancelMigrationRequest{MigrationId: id}, wait)
		m.s.stats.rivalWon.Add(1)
		m.note("rival start of %s admitted (the migration had let it go)", d.Src)
		return nil
	case busy(err):
		m.s.stats.rivalRefused.Add(1)
		return nil
	case m.dst.epoch()+m.src.epoch() != epoch || wire.Code(err) == codes.Unavailable:
		return nil
	}
	return violationf("a rival start of source device %s was refused with %v / %q, want DEVICE_BUSY or DEVICE_STATE_ERROR: %v", d.Src, wire.Code(err), wire.Reason(err), err)
}

// destFinal watches the migration on the destination to its final
// phase; nil when the destination does not know it (it restarted). A
// destination left VERIFIED, its owner in doubt, once the source has
// ended, is resolved as the control plane does (the commit rule in
// docs/design.md): CommitIncoming when the source SUCCEEDED, else
// CancelIncoming. That is only right when a fault kept the source's
// Commit or Abort from arriving.
func (m *migrationRun) destFinal(ctx context.Context, o *outcome) (*ferryv1.Migration, error) {
	dst := m.s.destClient(m.dst)
	resolved := false
	open := watchOf(func() (grpc.ServerStreamingClient[ferryv1.WatchIncomingResponse], error) {
		return dst.WatchIncoming(ctx, &ferryv1.WatchIncomingRequest{MigrationId: m.p.ID}, wait)
	})
	var resolveErr error
	last, _, err := watchToEnd(ctx, open, func(v *ferryv1.Migration) error {
		if v.GetPhase() == ferryv1.MigrationPhase_MIGRATION_PHASE_VERIFIED && !resolved {
			resolved = true
			resolveErr = m.resolveInDoubt(ctx, o)
		}
		return resolveErr
	})
	switch {
	case resolveErr != nil:
		return nil, resolveErr
	case ctx.Err() != nil:
		return nil, fmt.Errorf("the destination's migration %s did not end within %v", m.p.ID, migrationTimeout)
	case err != nil:
		return nil, fmt.Errorf("watch of %s at the destination: %w", m.p.ID, err)
	}
	return last, nil
}

// resolveInDoubt commits or cancels a destination left VERIFIED after
// its source ended.
func (m *migrationRun) resolveInDoubt(ctx context.Context, o *outcome) error {
	explained := o.collateral || o.Phase == outcomeSourceLost
	for _, f := range m.p.Faults {
		switch f.Class {
		case faultCutOne, faultCutAll, faultStall, faultCorrupt, faultDestRe, faultSrcRe:
			explained = true
		}
	}
	if !explained {
		return violate(invInDoubt, "the source ended %s and the destination is still VERIFIED (owner in doubt) with no fault between them", o.Phase)
	}
	cctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	dst := m.s.destClient(m.dst)
	var err error
	if o.Phase == "SUCCEEDED" {
		_, err = dst.CommitIncoming(cctx, &ferryv1.CommitIncomingRequest{MigrationId: m.p.ID}, wait)
		m.note("the destination was in doubt after the source SUCCEEDED: committed it (%v)", err)
	} else {
		_, err = dst.CancelIncoming(cctx, &ferryv1.CancelIncomingRequest{MigrationId: m.p.ID}, wait)
		m.note("the destination was in doubt after the source ended %s: cancelled it (%v)", o.Phase, err)
	}
	m.s.stats.inDoubt.Add(1)
	if err != nil && wire.Code(err) != codes.Unavailable && wire.Code(err) != codes.NotFound {
		return violate(invInDoubt, "resolving the destination in doubt: %v", err)
	}
	return nil
}

// phaseName is a phase without its MIGRATION_PHASE_ prefix.
func phaseName(p ferryv1.MigrationPhase) string {
	return strings.TrimPrefix(p.String(), "MIGRATION_PHASE_")
}
