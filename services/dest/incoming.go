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
	"github.com/vfio-ferry/ferry/pkg/flow"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/services/telemetry"
	"github.com/vfio-ferry/ferry/services/wire"
)

// payload is what a reassembly slot holds: the chunk's bytes (references
// to gRPC's receive buffers, see wire.InChunk) and the CRC32C already
// checked on arrival (the digest needs it again).
type payload struct {
	data *wire.Payload
	crc  uint32
}

// endInfo is what an END chunk declared.
type endInfo struct {
	totalBytes  uint64
	totalChunks uint64
	digest      []byte
}

// devStream is one destination device and its incoming stream.
type devStream struct {
	index   int
	spec    string
	dev     vfio.Device
	release func()
	stream  vfio.DataStream // write-only, RESUMING

	// mu guards reasm and end; the loader holds it only around Next and
	// Advance, never across a device write.
	mu    sync.Mutex
	reasm *flow.Reassembly[payload]
	end   *endInfo

	// notify wakes the loader when a chunk arrived (1-buffered).
	notify chan struct{}

	// wmu is the device's write turn. Whoever holds it writes the chunks
	// at the frontier into the device, in order: the loader, or the
	// channel receiver whose chunk just completed the frontier (see
	// writeReady). closed, set under it by the clean-up, means nobody
	// writes again. The fields below are the turn holder's.
	wmu    sync.Mutex
	closed bool
	digest *wire.Digest
	// advSeq and advOff are the frontier when the feedback senders were
	// last woken, at advTime; fbChunks and fbBytes how far it moves
	// before they are woken again (see feedbackEvery).
	advSeq, advOff    uint64
	advTime           time.Time
	fbChunks, fbBytes uint64

	written    atomic.Uint64
	chunks     atomic.Uint64
	duplicates atomic.Uint64
	verified   atomic.Bool
	errMsg     atomic.Pointer[string]
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
	// channel handlers follow it.
	ctx    context.Context
	cancel context.CancelFunc
	// loaders counts running loader goroutines; clean-up waits for them.
	loaders sync.WaitGroup
	// done is closed once the final phase is set and clean-up finished.
	done chan struct{}
	once sync.Once
	// expiry fails the migration when the source never opens it.
	expiry *time.Timer

	// fb is the set of connected channels, by index: their feedback
	// senders are woken when a window moves. lost, armed while no channel
	// is connected, fails the migration when the source stays away.
	fbMu sync.Mutex
	fb   map[int]*chanReg
	lost *time.Timer

	mu             sync.Mutex
	phase          ferryv1.MigrationPhase
	err            *ferryv1.MigrationError
	sessionID      string
	peer           string // the source identity that opened the session (binding.go)
	direct         bool   // chunks come on direct data connections (direct.go)
	chunkSize      uint32
	channels       uint32
	sourceDevices  []string
	digestAlg      ferryv1.DigestAlgorithm
	startTime      time.Time
	switchoverTime time.Time
	endTime        time.Time
	pending        int // devices not yet verified

	track *telemetry.Tracker // set before the migration is registered
}

func (inc *incoming) setPhase(p ferryv1.MigrationPhase) {
	inc.mu.Lock()
	changed := inc.phase != p && !final(inc.phase)
	if changed {
		inc.phase = p
	}
	inc.mu.Unlock()
	if changed {
		inc.log.Info("phase", "phase", p.String())
		inc.watch.Notify()
	}
}

func final(p ferryv1.MigrationPhase) bool {
	return p == ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED ||
		p == ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED ||
		p == ferryv1.MigrationPhase_MIGRATION_PHASE_CANCELLED
}

// terminate ends the migration once: with err == nil it succeeded; else it
// failed (or was cancelled) and the devices are reset. Clean-up (waiting
// for the loaders, resetting, releasing devices, buffers and budget) runs
// on the agent's wait group; done is closed after it.
func (inc *incoming) terminate(err error, phase ferryv1.MigrationPhase) {
	inc.once.Do(func() {
		inc.mu.Lock()
		if err != nil {
			inc.err = &ferryv1.MigrationError{Code: int32(wire.Code(err)), Reason: wire.Reason(err), Message: wire.Message(err)}
		} else {
			phase = ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED
		}
		inc.phase = phase
		inc.endTime = time.Now()
		inc.mu.Unlock()
		if inc.expiry != nil {
			inc.expiry.Stop()
		}
		inc.cancel()
		if err != nil {
			inc.log.Warn("migration ended", "phase", phase.String(), "error", wire.Message(err), "reason", wire.Reason(err))
		} else {
			inc.log.Info("migration ended", "phase", phase.String())
		}
		inc.a.wg.Go(func() { inc.cleanup(err != nil) })
	})
}

func (inc *incoming) cleanup(failed bool) {
	inc.loaders.Wait()
	for _, d := range inc.devs {
		// A receiver writing into the device finishes its chunk first.
		d.wmu.Lock()
		d.closed = true
		d.wmu.Unlock()
		if d.stream != nil {
			d.stream.Close()
		}
		if failed {
			if err := d.dev.Reset(); err != nil {
				inc.log.Error("device reset failed: the device has no owner now", "device", d.spec, "error", err)
			}
		}
		d.mu.Lock()
		if d.reasm != nil {
			d.reasm.Drain(func(p payload) { p.data.Free() })
		}
		d.mu.Unlock()
		d.release()
	}
	inc.a.unreserve(inc.reserved)
	inc.fbMu.Lock()
	if inc.lost != nil {
		inc.lost.Stop()
	}
	inc.fbMu.Unlock()
	inc.track.End(inc.ended())
	close(inc.done)
	inc.watch.Notify()
}

// chanReg is one connected channel stream.
type chanReg struct {
	wake   chan struct{} // 1-buffered: the window moved
	cancel context.CancelFunc
}

// armLostLocked starts the countdown that fails the migration when no
// channel connects within the source timeout: the source died or can no
// longer reach this agent. The caller holds fbMu.
func (inc *incoming) armLostLocked() {
	if inc.lost != nil || inc.ctx.Err() != nil {
		return
	}
	timeout := inc.a.cfg.SourceTimeout
	inc.lost = time.AfterFunc(timeout, func() {
		inc.terminate(wire.Errorf(codes.Unavailable, wire.ReasonPeerUnavailable,
			"the source has had no channel connected for %s: it stopped or cannot reach this agent", timeout), ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED)
	})
}

// wakeFeedback wakes every channel's feedback sender.
func (inc *incoming) wakeFeedback() {
	inc.fbMu.Lock()
	for _, r := range inc.fb {
		select {
		case r.wake <- struct{}{}:
		default:
		}
	}
	inc.fbMu.Unlock()
}

// fillWindows writes the current window of every device into dst, which
// holds one WindowUpdate per device.
func (inc *incoming) fillWindows(dst []*ferryv1.WindowUpdate) {
	for i, d := range inc.devs {
		d.mu.Lock()
		w := d.reasm.Window()
		seq, off := d.reasm.Frontier()
		d.mu.Unlock()
		u := dst[i]
		u.Device, u.LimitSeq, u.LimitOffset, u.AckedSeq, u.AckedOffset = uint32(i), w.LimitSeq, w.LimitOffset, seq, off
	}
}

// load is a device's loader: it writes the chunks at the frontier into
// the device, in order, whenever a receiver left them (see writeReady),
// until END; then it checks the stream and moves the device
// RESUMING->STOP.
func (inc *incoming) load(d *devStream) {
	defer inc.loaders.Done()
	for {
		d.wmu.Lock()
		end, atEnd, err := inc.writeReadyLocked(d)
		if err != nil {
			d.wmu.Unlock()
			inc.terminate(err, ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED)
			return
		}
		if atEnd {
			d.mu.Lock()
			d.reasm.Advance()
			info := d.end
			d.mu.Unlock()
			inc.wakeFeedback()
			inc.verify(d, end, info)
			d.wmu.Unlock()
			return
		}
		d.wmu.Unlock()
		select {
		case <-d.notify:
		case <-inc.ctx.Done():
			return
		}
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
	if !d.wmu.TryLock() {
		return true, nil
	}
	defer d.wmu.Unlock()
	if d.closed {
		return false, nil
	}
	_, atEnd, err := inc.writeReadyLocked(d)
	return atEnd, err
}

// writeReadyLocked writes the DATA chunks at the frontier into the device
// until the frontier is missing or END, which it returns (atEnd; not
// advanced past) for the loader. The caller holds d.wmu. An error is the device's
// or the stream's: the migration fails with it.
func (inc *incoming) writeReadyLocked(d *devStream) (end flow.Chunk[payload], atEnd bool, err error) {
	for {
		d.mu.Lock()
		c, ok, err := d.reasm.Next()
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
		// received: no copy into one buffer first.
		if err := writePayload(d.stream, c.Payload.data); err != nil {
			// The chunk stays held: the clean-up's Drain frees it.
			return end, false, wire.DeviceError(d.spec, fmt.Sprintf("write chunk %d at byte %d", c.Seq, c.Offset), err)
		}
		d.digest.AddPayload(c.Offset, c.Payload.data, c.Payload.crc)
		d.mu.Lock()
		d.reasm.Advance()
		seq, off := d.reasm.Frontier()
		d.mu.Unlock()
		c.Payload.data.Free()
		d.written.Add(uint64(c.Len))
		d.chunks.Add(1)
		if now := time.Now(); seq-d.advSeq >= d.fbChunks || off-d.advOff >= d.fbBytes || now.Sub(d.advTime) >= feedbackMaxDelay {
			d.advSeq, d.advOff, d.advTime = seq, off, now
			inc.wakeFeedback()
		}
	}
}

// feedbackMaxDelay bounds the batching of feedbackEvery in time: a slow
// device writes a quarter window slowly, so the loader also wakes the
// senders when the frontier moved and this long has passed. The source
// hears of progress (and frees its buffers) at least that often, and its
// stall watchdog never takes a slow device for a dead channel.
const feedbackMaxDelay = 100 * time.Millisecond

// feedbackEvery is how far a device's frontier moves before its loader
// wakes the channels' feedback senders, in chunks or in bytes, whichever
// comes first. Each wake-up sends a window update on every channel; one
// per chunk written was N messages per chunk to marshal, write, read,
// unmarshal and apply, with a goroutine wake-up each side (and the garbage
// of a ChannelResponse at the source). A quarter window at a time cuts
// that by MaxChunks/4 and costs no throughput while the window covers the
// round trip, as application credits returned every K/4 messages did in
// reference/baseline-throughput.md.
//
// It cannot stall the stream. A source that waits for credit has sent
// everything the last advertised window allowed, and the destination
// writes all of it: when the wait is for the count, the frontier moves
// MaxChunks chunks (at least everyChunks); when it is for bytes (the source
// waits for room for a whole chunk), it moves more than
// MaxBytes - chunkSize bytes (at least everyBytes). END is waited for like
// any chunk; after END the verdict, not a window, is what the source waits
// for, and the loader wakes the senders then anyway.
func feedbackEvery(l flow.Limits, chunkSize uint32) (chunks, bytes uint64) {
	chunks = max(uint64(l.MaxChunks)/4, 1)
	bytes = max(min(l.MaxBytes/4, l.MaxBytes-uint64(chunkSize)+1), 1)
	return chunks, bytes
}

func writePayload(w vfio.DataStream, p *wire.Payload) error {
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
		inc.terminate(err, ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED)
	}
	written := d.written.Load()
	switch {
	case end == nil:
		fail(wire.Errorf(codes.Internal, wire.ReasonInternal, "device %d (%s): END without its totals", d.index, d.spec))
		return
	case end.totalBytes != written || end.totalChunks != c.Seq:
		fail(wire.Errorf(codes.DataLoss, wire.ReasonStreamLength, "device %d (%s): the source declared %d bytes in %d chunks, %d bytes in %d chunks were written", d.index, d.spec, end.totalBytes, end.totalChunks, written, c.Seq))
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
	inc.log.Info("device verified", "device", d.spec, "bytes", written)
	inc.mu.Lock()
	inc.pending--
	last := inc.pending == 0
	inc.mu.Unlock()
	if last {
		inc.terminate(nil, ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED)
	}
}

// snapshot renders the migration for the API.
func (inc *incoming) snapshot() (*ferryv1.Migration, bool, uint64) {
	inc.mu.Lock()
	m := &ferryv1.Migration{
		Id:         inc.id,
		Phase:      inc.phase,
		Error:      proto.CloneOf(inc.err),
		Channels:   inc.channels,
		ChunkSize:  inc.chunkSize,
		CreateTime: timestamppb.New(inc.createTime),
		DirectData: inc.direct,
	}
	start, sw, end := inc.startTime, inc.switchoverTime, inc.endTime
	srcDevs := inc.sourceDevices
	inc.mu.Unlock()
	if !start.IsZero() {
		m.StartTime = timestamppb.New(start)
	}
	if !end.IsZero() {
		m.EndTime = timestamppb.New(end)
	}
	var total, peak uint64
	for i, d := range inc.devs {
		p := &ferryv1.DeviceProgress{
			Device:   d.spec,
			Bytes:    d.written.Load(),
			Chunks:   d.chunks.Load(),
			Verified: d.verified.Load(),
		}
		if i < len(srcDevs) {
			p.PeerDevice = srcDevs[i]
		}
		if s, err := d.dev.State(); err == nil {
			p.State = wire.DeviceStateToProto(s)
		}
		if e := d.errMsg.Load(); e != nil {
			p.Error = *e
		}
		d.mu.Lock()
		if d.reasm != nil {
			p.PeakBufferedBytes = d.reasm.PeakBytes()
		}
		if d.end != nil {
			p.TotalBytes = d.end.totalBytes
		}
		d.mu.Unlock()
		p.RetransmittedChunks = d.duplicates.Load()
		m.RetransmittedChunks += p.RetransmittedChunks
		peak += p.PeakBufferedBytes
		total += p.Bytes
		m.Devices = append(m.Devices, p)
	}
	m.Bytes = total
	// The peak of the sum is at most the sum of the peaks; the sum of the
	// per-device peaks is what is reported (an upper bound).
	m.PeakBufferedBytes = peak
	m.WindowBytes = inc.limits.MaxBytes * uint64(len(inc.devs))
	if !start.IsZero() && !end.IsZero() && end.After(start) {
		m.ThroughputBytesPerSecond = float64(total) / end.Sub(start).Seconds()
	}
	if !sw.IsZero() && !end.IsZero() {
		m.Downtime = durationpb.New(end.Sub(sw))
	}
	return m, final(m.Phase) && isClosed(inc.done), total
}

func isClosed(ch chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}
