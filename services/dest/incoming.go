package dest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/internal/tracing"
	"github.com/vfio-ferry/ferry/pkg/flow"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/pkg/vmm"
	"github.com/vfio-ferry/ferry/services/chunkwire"
	"github.com/vfio-ferry/ferry/services/deviceapi"
	"github.com/vfio-ferry/ferry/services/telemetry"
	"github.com/vfio-ferry/ferry/services/wire"
)

// payload is what a reassembly slot holds: the chunk's bytes (references
// to gRPC's receive buffers, see chunkwire.InChunk) and the CRC32C already
// checked on arrival (the digest needs it again).
type payload struct {
	data   *chunkwire.Payload
	crc    uint32
	config bool // a CONFIG chunk: kept, not written into the device
}

// endInfo is what an END chunk declared.
type endInfo struct {
	totalBytes  uint64
	totalChunks uint64
	configBytes uint64
	digest      []byte
}

// devStream is one destination device and its incoming stream.
type devStream struct {
	index   int
	spec    string
	dev     vfio.Device
	release func()
	stream  vfio.DataStream // write-only, RESUMING

	// mu guards the fields below it; the writers hold it only around Next
	// and Advance, never across a device write.
	mu    sync.Mutex
	reasm *flow.Reassembly[payload] // nil once released
	end   *endInfo
	// released: the reassembly was drained and dropped (releaseBuffers);
	// a chunk that arrives after it is freed, never held. frontSeq,
	// frontOff and peak are what it reported then.
	released           bool
	frontSeq, frontOff uint64
	peak               uint64
	// writing is the payload of the chunk being written into the device:
	// Drain leaves it to the writer, who frees it when the write returns.
	writing *chunkwire.Payload
	// orphaned: the clean-up found the device stuck in an operation and
	// left it to whoever holds the write turn (see putTurn); reset is
	// whether it must then be reset. lingers: the holder is counted as
	// lingering in the agent's crew until it gives the turn back;
	// finished: the device was finished, with the turn kept for good.
	orphaned, reset, lingers, finished bool

	// notify wakes the loader when a chunk arrived (1-buffered).
	notify chan struct{}
	// freed is signalled when the write turn is given back (1-buffered;
	// see takeTurn).
	freed chan struct{}

	// turn is the device's write turn (a token in a 1-buffered channel,
	// so the clean-up can wait for it or for the device to be declared
	// stuck). Whoever holds it writes the chunks at the frontier into the
	// device, in order: the loader, or the channel receiver whose chunk
	// just completed the frontier (see writeReady). The clean-up takes it
	// and never gives it back: nobody writes again. The fields below are
	// the turn holder's.
	//
	// Only the clean-up waits for the turn by sending into turn. A
	// blocked sender is handed the token by the holder's release, before
	// it runs: a loader waiting so would hold the turn while it waits for
	// a core, and the receivers behind it would leave their chunks, with
	// their buffers, in the reassembly until it ran. The loader waits for
	// freed instead and takes the turn itself (see takeTurn).
	turn   chan struct{}
	digest *chunkwire.Digest
	// advSeq and advOff are the frontier when the feedback senders were
	// last woken, at advTime; fbChunks and fbBytes how far it moves
	// before they are woken again (see feedbackEvery).
	advSeq, advOff    uint64
	advTime           time.Time
	fbChunks, fbBytes uint64

	// initial is what the source said of the device's initial pre-copy
	// data (precopy.go), guarded by mu; resumeTook is how long the
	// device took to enter RESUMING, set before the session opens.
	initial    initialData
	resumeTook time.Duration

	// config is the config state received in CONFIG chunks, in order;
	// the turn holder's until the device verified, then read-only.
	config []byte

	written    atomic.Uint64
	wireBytes  atomic.Uint64 // as received, before decoding
	chunks     atomic.Uint64
	duplicates atomic.Uint64
	verified   atomic.Bool
	stuck      atomic.Bool // the clean-up found it stuck (see closeDevice)
	errMsg     atomic.Pointer[string]
}

// tryTurn takes the write turn if it is free.
func (d *devStream) tryTurn() bool {
	select {
	case d.turn <- struct{}{}:
		return true
	default:
		return false
	}
}

// takeTurn takes the write turn for the loader once it is free: it
// waits for a release and tries again, so the turn is never handed to it
// before it runs (see turn). It reports false if ctx ended first.
func (d *devStream) takeTurn(ctx context.Context) bool {
	for {
		select {
		case <-d.freed: // a release before this try: the try sees it
		default:
		}
		if d.tryTurn() {
			return true
		}
		select {
		case <-d.freed:
		case <-ctx.Done():
			return false
		}
	}
}

// frontierLocked is the device's frontier, also once the reassembly is
// released. The caller holds d.mu.
func (d *devStream) frontierLocked() (seq, off uint64) {
	if d.reasm == nil {
		return d.frontSeq, d.frontOff
	}
	return d.reasm.Frontier()
}

// incoming is one incoming migration.
type incoming struct {
	a          *Agent
	id         string
	req        *ferryv1.PrepareIncomingRequest
	token      string
	tokenTTL   time.Time
	limits     flow.Limits
	reserved   uint64
	createTime time.Time
	devs       []*devStream
	log        *slog.Logger
	watch      wire.Broadcast

	// ctx ends when the migration reaches a final phase; loaders and
	// channel handlers follow it. (A VERIFIED migration keeps it: its
	// channels stay up until the source commits or aborts.)
	ctx    context.Context
	cancel context.CancelFunc
	// verifiedCh is closed when every device verified (VERIFIED); done
	// once the final phase is set and clean-up finished.
	verifiedCh chan struct{}
	done       chan struct{}
	// freeOnce releases the reassembly buffers and the budget once: at
	// VERIFIED or at the clean-up, whichever comes first.
	freeOnce sync.Once
	// expiry fails the migration when the source never opens it.
	expiry *time.Timer
	// lastPeer is when the source last sent anything (a chunk, a
	// message), in Unix nanoseconds; 0 before.
	lastPeer atomic.Int64

	// fb is the set of connected channels, by index: their feedback
	// senders are woken when a window moves. lost, armed while no channel
	// is connected, fails the migration when the source stays away.
	fbMu sync.Mutex
	fb   map[int]*chanReg
	lost *time.Timer

	mu            sync.Mutex
	phase         ferryv1.MigrationPhase
	err           *ferryv1.MigrationError
	sessionID     string
	peer          string // the source identity that opened the session (binding.go)
	direct        bool   // chunks come on direct data connections (direct.go)
	chunkSize     uint32
	channels      uint32
	sourceDevices []string
	digestAlg     ferryv1.DigestAlgorithm
	mode          ferryv1.MigrationMode
	// features are what Open granted; sourceVersion the source agent's
	// version ("" from 0.1.0). Set before the session is published.
	features       wire.Features
	sourceVersion  string
	startTime      time.Time
	switchoverTime time.Time
	verdictTime    time.Time // every device verified
	endTime        time.Time
	pending        int // devices not yet verified

	track *telemetry.Tracker // set before the migration is registered
	trace *tracing.Migration // set before the migration is registered
}

// setPhase moves the migration forward to p, one of the phases before
// the verdict; it never moves back, nor out of VERIFIED or a final phase.
func (inc *incoming) setPhase(p ferryv1.MigrationPhase) {
	inc.moveIf(p, func(cur ferryv1.MigrationPhase) bool {
		return wire.PhaseOrder(p) > wire.PhaseOrder(cur) && !settled(cur)
	})
}

// moveIf moves the migration to p if ok holds of its phase, and tells
// the log and the watchers.
func (inc *incoming) moveIf(p ferryv1.MigrationPhase, ok func(cur ferryv1.MigrationPhase) bool) {
	inc.mu.Lock()
	changed := ok(inc.phase)
	if changed {
		inc.phase = p
	}
	inc.mu.Unlock()
	if changed {
		inc.trace.Phase(p)
		inc.log.Info("phase", "phase", p.String())
		inc.watch.Notify()
	}
}

// settled reports whether the verdict is in: VERIFIED or final.
func settled(p ferryv1.MigrationPhase) bool {
	return p == ferryv1.MigrationPhase_MIGRATION_PHASE_VERIFIED || wire.Final(p)
}

// owner is which host holds the runnable copy of the devices in phase p
// (the commit rule): the source until every device verified, nobody can
// tell while VERIFIED waits for the source's commit, the destination once
// committed, and the source again after a rollback.
func owner(p ferryv1.MigrationPhase) ferryv1.DeviceOwner {
	switch p {
	case ferryv1.MigrationPhase_MIGRATION_PHASE_VERIFIED:
		return ferryv1.DeviceOwner_DEVICE_OWNER_IN_DOUBT
	case ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED:
		return ferryv1.DeviceOwner_DEVICE_OWNER_DESTINATION
	}
	return ferryv1.DeviceOwner_DEVICE_OWNER_SOURCE
}

// failKind says who ends a migration with a failure, which decides
// whether a VERIFIED migration may be rolled back.
type failKind int

const (
	// failFound: the destination found the failure itself (a device, the
	// peer's protocol, a deadline, shutdown). It does not end a VERIFIED
	// migration: the source may already have committed, so only the
	// source or the control plane decides from there.
	failFound failKind = iota
	// failAsked: the source's Abort or the control plane's
	// CancelIncoming. It rolls back a VERIFIED migration too.
	failAsked
)

// fail ends the migration with err in phase (FAILED or CANCELLED): the
// devices are reset and everything released, on the agent's wait group;
// done is closed after. It does nothing to a migration that has already
// ended, nor, for failFound, to a VERIFIED one. It returns the phase the
// migration is in after the call: phase when this call ended it.
func (inc *incoming) fail(err error, phase ferryv1.MigrationPhase, kind failKind) ferryv1.MigrationPhase {
	inc.mu.Lock()
	cur := inc.phase
	if wire.Final(cur) || (cur == ferryv1.MigrationPhase_MIGRATION_PHASE_VERIFIED && kind == failFound) {
		inc.mu.Unlock()
		if !wire.Final(cur) {
			inc.log.Warn("failure ignored: the migration is verified and waits for the source's commit or abort", "error", wire.Message(err), "reason", wire.Reason(err))
		}
		return cur
	}
	inc.err = &ferryv1.MigrationError{Code: int32(wire.Code(err)), Reason: wire.Reason(err), Message: wire.Message(err)}
	inc.phase = phase
	inc.endTime = time.Now()
	inc.mu.Unlock()
	inc.log.Warn("migration ended", "phase", phase.String(), "was", cur.String(), "error", wire.Message(err), "reason", wire.Reason(err))
	inc.finished(true)
	return phase
}

// commit moves a VERIFIED migration to SUCCEEDED: the destination owns
// its devices from now on. Committing a SUCCEEDED migration does
// nothing; any other phase is FAILED_PRECONDITION, SESSION_STATE.
func (inc *incoming) commit() error {
	inc.mu.Lock()
	switch cur := inc.phase; cur {
	case ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED:
		inc.mu.Unlock()
		return nil
	case ferryv1.MigrationPhase_MIGRATION_PHASE_VERIFIED:
	case ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED, ferryv1.MigrationPhase_MIGRATION_PHASE_CANCELLED:
		// The rollback came first; the source must roll back too, so
		// the answer says so in a reason of its own.
		inc.mu.Unlock()
		return wire.Errorf(codes.FailedPrecondition, wire.ReasonRolledBack, "incoming migration %s was %s before the commit: its devices were reset", inc.id, cur)
	default:
		inc.mu.Unlock()
		return wire.Errorf(codes.FailedPrecondition, wire.ReasonSessionState, "incoming migration %s is %s, not VERIFIED: there is nothing to commit", inc.id, cur)
	}
	inc.phase = ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED
	inc.endTime = time.Now()
	inc.mu.Unlock()
	inc.log.Info("migration ended", "phase", ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED.String(), "owner", "destination")
	inc.finished(false)
	return nil
}

// finished follows the final phase just set: the timers stop, the
// migration's goroutines end and the clean-up starts.
func (inc *incoming) finished(failed bool) {
	if inc.expiry != nil {
		inc.expiry.Stop()
	}
	inc.cancel()
	inc.watch.Notify()
	inc.a.crew.Go(func() { inc.cleanup(failed) })
}

// verifiedAll moves the migration to VERIFIED once its last device
// verified: the devices stay held in STOP and nothing resolves the
// migration but the source's Commit or Abort, or the control plane's
// CommitIncoming or CancelIncoming. No more chunks can come, so the
// reassembly buffers and the budget are released now.
func (inc *incoming) verifiedAll() {
	inc.mu.Lock()
	if settled(inc.phase) {
		// A rollback came first.
		inc.mu.Unlock()
		return
	}
	inc.phase = ferryv1.MigrationPhase_MIGRATION_PHASE_VERIFIED
	inc.verdictTime = time.Now()
	inc.mu.Unlock()
	if inc.expiry != nil {
		inc.expiry.Stop()
	}
	inc.fbMu.Lock()
	if inc.lost != nil {
		inc.lost.Stop()
		inc.lost = nil
	}
	inc.fbMu.Unlock()
	inc.releaseBuffers()
	close(inc.verifiedCh)
	inc.trace.Phase(ferryv1.MigrationPhase_MIGRATION_PHASE_VERIFIED)
	inc.log.Info("phase", "phase", ferryv1.MigrationPhase_MIGRATION_PHASE_VERIFIED.String(), "owner", "in doubt until the source commits")
	inc.watch.Notify()
	if !inc.features.Has(ferryv1.Feature_FEATURE_COMMIT) {
		// A 0.1.0 source sends no Commit: its verified verdict is the
		// commit, as 0.1.0's destination had it.
		inc.commit()
	}
}

// releaseBuffers drops every device's reassembly, freeing what it holds
// (but the chunk a writer is writing, which the writer frees), and
// returns the migration's budget, once. It waits for no writer.
func (inc *incoming) releaseBuffers() {
	inc.freeOnce.Do(func() {
		for _, d := range inc.devs {
			d.mu.Lock()
			d.released = true
			if d.reasm != nil {
				d.frontSeq, d.frontOff = d.reasm.Frontier()
				d.peak = d.reasm.PeakBytes()
				writing := d.writing
				d.reasm.Drain(func(p payload) {
					if p.data != writing {
						p.data.Free()
					}
				})
				d.reasm = nil
			}
			d.mu.Unlock()
		}
		inc.a.unreserve(inc.reserved)
	})
}

// cleanup runs once the final phase is set. It waits for no goroutine
// blocked in a device: buffers and budget go first, then each device is
// closed on its own (see closeDevice), healthy ones reset after a
// failure, and done is closed once every device is closed or reported
// stuck.
func (inc *incoming) cleanup(failed bool) {
	inc.releaseBuffers()
	inc.fbMu.Lock()
	if inc.lost != nil {
		inc.lost.Stop()
	}
	inc.fbMu.Unlock()
	var wg sync.WaitGroup
	for _, d := range inc.devs {
		wg.Go(func() { inc.closeDevice(d, failed) })
	}
	wg.Wait()
	inc.track.End(inc.ended())
	inc.endTrace()
	close(inc.done)
	inc.watch.Notify()
}

// closeDevice takes d's write turn for good, so nobody writes into it
// again, then closes it (see finishDevice). A writer blocked in the
// device holds the turn: the clean-up waits for it to return, or for the
// device's guard to declare it stuck. A stuck device is left to whoever
// holds the turn, who finishes it when the operation returns (putTurn);
// until then it stays held and the migration reports it stuck.
func (inc *incoming) closeDevice(d *devStream, reset bool) {
	select {
	case d.turn <- struct{}{}:
	case <-stuckSignal(d.dev):
		d.stuck.Store(true)
		d.mu.Lock()
		d.orphaned, d.reset = true, reset
		d.mu.Unlock()
		inc.log.Error("device stuck in an operation: left to its driver, held until the operation returns", "device", d.spec)
		if !d.tryTurn() {
			// The holder finishes it, once its operation returns;
			// until then the agent's Close does not wait for it.
			d.mu.Lock()
			if !d.finished {
				d.lingers = true
				inc.a.crew.linger(1)
			}
			d.mu.Unlock()
			return
		}
	}
	inc.finishDevice(d, reset)
}

// putTurn gives d's write turn back. If the clean-up left the device to
// the turn's holder meanwhile (closeDevice), the holder finishes it.
func (inc *incoming) putTurn(d *devStream) {
	<-d.turn
	select {
	case d.freed <- struct{}{}:
	default:
	}
	d.mu.Lock()
	orphaned, reset := d.orphaned, d.reset
	d.mu.Unlock()
	if orphaned && d.tryTurn() {
		inc.finishDevice(d, reset)
	}
	d.mu.Lock()
	if d.lingers {
		d.lingers = false
		inc.a.crew.linger(-1)
	}
	d.mu.Unlock()
}

// finishDevice closes d's data stream, resets the device after a failure
// and releases it, with d's write turn held for good. A device its guard
// declared stuck is not touched: it is released to the registry, whose
// guard holds it until its operation returns.
func (inc *incoming) finishDevice(d *devStream, reset bool) {
	defer func() {
		d.mu.Lock()
		d.finished = true
		d.mu.Unlock()
	}()
	if g, ok := d.dev.(answerer); ok && g.WhenAnswered(func(dev vfio.Device) {
		if d.stream != nil {
			d.stream.Close()
		}
		if !reset {
			return
		}
		if err := dev.Reset(); err != nil {
			inc.log.Error("stuck device answered at last, and its reset failed", "device", d.spec, "error", err)
			return
		}
		inc.log.Warn("stuck device answered at last: reset", "device", d.spec)
	}) {
		d.stuck.Store(true)
		inc.log.Error("device stuck: released to its guard, which resets it once its operation returns", "device", d.spec)
		d.release()
		return
	}
	if d.stream != nil {
		d.stream.Close()
	}
	if reset {
		if err := d.dev.Reset(); err != nil {
			inc.log.Error("device reset failed: the device has no owner now", "device", d.spec, "error", err)
		}
	}
	d.release()
}

// chanReg is one connected channel stream.
type chanReg struct {
	wake   chan struct{} // 1-buffered: the window moved
	cancel context.CancelFunc
}

// armLostLocked starts the countdown that fails the migration when no
// channel connects within the source timeout: the source died or can no
// longer reach this agent. The caller holds fbMu.
//
// A VERIFIED migration is never failed for it: the source may have
// committed.
func (inc *incoming) armLostLocked() {
	if inc.lost != nil || inc.ctx.Err() != nil || isClosed(inc.verifiedCh) {
		return
	}
	timeout := inc.a.cfg.SourceTimeout
	inc.lost = time.AfterFunc(timeout, func() {
		inc.fail(wire.Errorf(codes.Unavailable, wire.ReasonPeerUnavailable,
			"the source has had no channel connected for %s: it stopped or cannot reach this agent", timeout), ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED, failFound)
	})
}

// load is a device's loader: it writes the chunks at the frontier into
// the device, in order, whenever a receiver left them (see writeReady),
// until END; then it checks the stream and moves the device
// RESUMING->STOP. It looks only when woken: a receiver that accepts a
// chunk either writes it or wakes the loader.
func (inc *incoming) load(d *devStream) {
	for {
		select {
		case <-d.notify:
		case <-inc.ctx.Done():
			return
		}
		if !d.takeTurn(inc.ctx) {
			return
		}
		end, atEnd, err := inc.writeReadyLocked(d)
		if err != nil {
			inc.putTurn(d)
			inc.fail(err, ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED, failFound)
			return
		}
		if atEnd {
			d.mu.Lock()
			if d.released {
				d.mu.Unlock()
				inc.putTurn(d)
				return
			}
			d.reasm.Advance()
			info := d.end
			d.mu.Unlock()
			inc.wakeFeedback()
			inc.verify(d, end, info)
			inc.putTurn(d)
			return
		}
		inc.putTurn(d)
	}
}

// writeReady writes the chunks at the device's frontier into the device,
// if no one else is: a channel's receiver calls it for the chunk it just
// accepted. It reports whether the loader must look: the turn was taken
// (its holder may have looked before this chunk arrived), or END is at
// the frontier. Otherwise the loader sleeps on, rather than waking on
// the other core for every chunk to find nothing to do.
//
// So the bytes go from the socket into the device on one thread, while
// they are in its core's cache, as a plain TCP receiver writes what it
// reads. Handing every chunk to the loader's goroutine instead made the
// kernel's copy into the chunk buffer and the device's write cost two to
// three times as much per byte on a 2-core host, where the two goroutines
// run on different cores (docs/performance.md). The loader still writes
// what becomes ready while the turn is taken, and END.
func (inc *incoming) writeReady(d *devStream) (wakeLoader bool, err error) {
	if !d.tryTurn() {
		return true, nil
	}
	defer inc.putTurn(d)
	_, atEnd, err := inc.writeReadyLocked(d)
	return atEnd, err
}

// writeReadyLocked writes the DATA chunks at the frontier into the device
// until the frontier is missing or END, which it returns (atEnd; not
// advanced past) for the loader. The caller holds d.turn. An error is the device's
// or the stream's: the migration fails with it.
func (inc *incoming) writeReadyLocked(d *devStream) (end flow.Chunk[payload], atEnd bool, err error) {
	for {
		d.mu.Lock()
		if d.released {
			d.mu.Unlock()
			return end, false, nil
		}
		c, ok, err := d.reasm.Next()
		if ok && !c.End {
			d.writing = c.Payload.data
		}
		d.mu.Unlock()
		if err != nil {
			return end, false, wire.Errorf(codes.OutOfRange, wire.ReasonStreamGap, "device %d (%s): %v", d.index, d.spec, err)
		}
		if !ok {
			return end, false, nil
		}
		if c.End {
			return c, true, nil
		}
		// The chunk goes into the device piece by piece, as it was
		// received: no copy into one buffer first. Config state is kept.
		var werr error
		if c.Payload.config {
			werr = d.keepConfig(c.Payload.data)
		} else if d.config != nil {
			werr = wire.Errorf(codes.InvalidArgument, wire.ReasonBadChunk, "device %d (%s) chunk %d: DATA after CONFIG", d.index, d.spec, c.Seq)
		} else {
			werr = writePayload(d.stream, c.Payload.data)
		}
		if werr == nil {
			d.digest.AddPayload(c.Offset, c.Payload.data, c.Payload.crc)
		}
		d.mu.Lock()
		d.writing = nil
		released := d.released
		var seq, off uint64
		if !released && werr == nil {
			d.reasm.Advance()
			seq, off = d.reasm.Frontier()
		}
		d.mu.Unlock()
		if released {
			// The clean-up dropped the reassembly during the write and
			// left this chunk to its writer.
			c.Payload.data.Free()
			return end, false, nil
		}
		if werr != nil {
			// The chunk stays held: the clean-up's Drain frees it.
			if wire.Reason(werr) == wire.ReasonBadChunk {
				return end, false, werr
			}
			return end, false, deviceapi.Error(d.spec, fmt.Sprintf("write chunk %d at byte %d", c.Seq, c.Offset), werr)
		}
		c.Payload.data.Free()
		if !c.Payload.config {
			d.written.Add(uint64(c.Len))
		}
		d.chunks.Add(1)
		if now := time.Now(); seq-d.advSeq >= d.fbChunks || off-d.advOff >= d.fbBytes || now.Sub(d.advTime) >= feedbackMaxDelay {
			d.advSeq, d.advOff, d.advTime = seq, off, now
			inc.wakeFeedback()
		}
	}
}

// keepConfig appends a CONFIG chunk's bytes to the device's config
// state, which may hold at most vmm.MaxConfigState bytes.
func (d *devStream) keepConfig(p *chunkwire.Payload) error {
	if len(d.config)+p.Len() > vmm.MaxConfigState {
		return wire.Errorf(codes.InvalidArgument, wire.ReasonBadChunk, "device %d (%s): config state beyond %d bytes", d.index, d.spec, vmm.MaxConfigState)
	}
	if d.config == nil {
		d.config = make([]byte, 0, p.Len())
	}
	for _, b := range p.Buffers() {
		d.config = append(d.config, b.ReadOnlyData()...)
	}
	return nil
}

// satAdd is a + b, or the largest uint64 when that overflows.
func satAdd(a, b uint64) uint64 {
	if s := a + b; s >= a {
		return s
	}
	return ^uint64(0)
}

func writePayload(w vfio.DataStream, p *chunkwire.Payload) error {
	for _, b := range p.Buffers() {
		if err := writeAll(w, b.ReadOnlyData()); err != nil {
			return err
		}
	}
	return nil
}

func writeAll(w vfio.DataStream, b []byte) error {
	for len(b) > 0 {
		n, err := w.Write(b)
		if err != nil {
			return err
		}
		if n == 0 {
			return errors.New("device accepted no bytes")
		}
		b = b[n:]
	}
	return nil
}

// verify checks a finished stream against what END declared and lets the
// device validate its state.
func (inc *incoming) verify(d *devStream, c flow.Chunk[payload], end *endInfo) {
	fail := func(err error) {
		msg := wire.Message(err)
		d.errMsg.Store(&msg)
		inc.fail(err, ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED, failFound)
	}
	written := d.written.Load()
	configBytes := uint64(len(d.config))
	switch {
	case end == nil:
		fail(wire.Errorf(codes.Internal, wire.ReasonInternal, "device %d (%s): END without its totals", d.index, d.spec))
		return
	case end.totalBytes != written+configBytes || end.totalChunks != c.Seq || end.configBytes != configBytes:
		fail(wire.Errorf(codes.DataLoss, wire.ReasonStreamLength, "device %d (%s): the source declared %d bytes (%d of config state) in %d chunks, %d bytes and %d of config state in %d chunks were received",
			d.index, d.spec, end.totalBytes, end.configBytes, end.totalChunks, written, configBytes, c.Seq))
		return
	case !bytes.Equal(end.digest, d.digest.Sum()):
		fail(wire.Errorf(codes.DataLoss, wire.ReasonDigestMismatch, "device %d (%s): stream digest mismatch: the bytes written are not the bytes the source read", d.index, d.spec))
		return
	}
	d.stream.Close()
	if _, err := d.dev.SetState(vfio.StateStop); err != nil {
		fail(wire.Errorf(codes.DataLoss, wire.ReasonVerifyFailed, "device %d (%s) rejected its new state at RESUMING->STOP: %v", d.index, d.spec, err))
		return
	}
	d.verified.Store(true)
	inc.log.Info("device verified", "device", d.spec, "bytes", written, "config_bytes", configBytes)
	if d.config != nil {
		// A lent device's VMM receives its config state now (a device
		// the agent opened keeps it in the migration's result).
		inc.a.cfg.Registry.SetReceivedConfig(d.spec, d.config)
	}
	inc.mu.Lock()
	inc.pending--
	last := inc.pending == 0
	inc.mu.Unlock()
	if last {
		inc.verifiedAll()
	}
}

// snapshot renders the migration for the API.
func (inc *incoming) snapshot() (*ferryv1.Migration, bool, uint64) {
	inc.mu.Lock()
	m := &ferryv1.Migration{
		Id:         inc.id,
		Phase:      inc.phase,
		Owner:      owner(inc.phase),
		Error:      proto.CloneOf(inc.err),
		Channels:   inc.channels,
		ChunkSize:  inc.chunkSize,
		CreateTime: timestamppb.New(inc.createTime),
		DirectData: inc.direct,
	}
	start, sw, verdict, end := inc.startTime, inc.switchoverTime, inc.verdictTime, inc.endTime
	srcDevs := inc.sourceDevices
	inc.mu.Unlock()
	if verdict.IsZero() {
		verdict = end
	}
	if !start.IsZero() {
		m.StartTime = timestamppb.New(start)
	}
	if !end.IsZero() {
		m.EndTime = timestamppb.New(end)
	}
	inc.fbMu.Lock()
	m.ConnectedChannels = uint32(len(inc.fb))
	inc.fbMu.Unlock()
	if t := inc.lastPeer.Load(); t != 0 {
		m.LastPeerActivityTime = timestamppb.New(time.Unix(0, t))
	}
	var total, peak uint64
	for i, d := range inc.devs {
		p := &ferryv1.DeviceProgress{
			Device:    d.spec,
			WireBytes: d.wireBytes.Load(),
			Bytes:     d.written.Load(),
			Chunks:    d.chunks.Load(),
			Verified:  d.verified.Load(),
			Stuck:     d.stuck.Load() || isStuck(d.dev),
		}
		p.InitialDataLoaded = d.initialLoaded()
		if p.Verified {
			p.ConfigStateBytes = uint64(len(d.config)) // complete once verified
		}
		if i < len(srcDevs) {
			p.PeerDevice = srcDevs[i]
		}
		if s, err := d.dev.State(); err == nil {
			p.State = deviceapi.StateToProto(s)
		}
		if e := d.errMsg.Load(); e != nil {
			p.Error = *e
		}
		d.mu.Lock()
		p.PeakBufferedBytes = d.peak
		if d.reasm != nil {
			p.PeakBufferedBytes = d.reasm.PeakBytes()
		}
		if d.end != nil {
			p.TotalBytes = d.end.totalBytes
		}
		d.mu.Unlock()
		p.DuplicateChunks = d.duplicates.Load()
		m.DuplicateChunks += p.DuplicateChunks
		peak += p.PeakBufferedBytes
		total += p.Bytes
		m.WireBytes += p.WireBytes
		m.Devices = append(m.Devices, p)
	}
	m.Bytes = total
	// The peak of the sum is at most the sum of the peaks; the sum of the
	// per-device peaks is what is reported (an upper bound).
	m.PeakBufferedBytes = peak
	m.WindowBytes = inc.limits.MaxBytes * uint64(len(inc.devs))
	if !start.IsZero() && !verdict.IsZero() && verdict.After(start) {
		m.ThroughputBytesPerSecond = float64(total) / verdict.Sub(start).Seconds()
	}
	if !sw.IsZero() && !verdict.IsZero() {
		m.Downtime = durationpb.New(verdict.Sub(sw))
	}
	return m, wire.Final(m.Phase) && isClosed(inc.done), total
}

// touch records that the source sent something now.
func (inc *incoming) touch() { inc.lastPeer.Store(time.Now().UnixNano()) }

func isClosed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}
