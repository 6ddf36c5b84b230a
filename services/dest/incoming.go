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
	"github.com/vfio-ferry/ferry/services/wire"
)

// payload is what a reassembly slot holds: the pooled buffer and the CRC32C
// already checked on arrival (the digest needs it again).
type payload struct {
	buf *[]byte
	crc uint32
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
	digest *wire.Digest

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

	// fb is the set of channel feedback senders to wake when a window moves.
	fbMu sync.Mutex
	fb   map[int]chan struct{}

	mu             sync.Mutex
	phase          ferryv1.MigrationPhase
	err            *ferryv1.MigrationError
	sessionID      string
	chunkSize      uint32
	channels       uint32
	sourceDevices  []string
	digestAlg      ferryv1.DigestAlgorithm
	startTime      time.Time
	switchoverTime time.Time
	endTime        time.Time
	pending        int // devices not yet verified
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
			d.reasm.Drain(func(p payload) {
				if p.buf != nil {
					inc.a.cfg.Pool.Put(p.buf)
				}
			})
		}
		d.mu.Unlock()
		d.release()
	}
	inc.a.unreserve(inc.reserved)
	inc.a.mu.Lock()
	delete(inc.a.sessions, inc.sessionID)
	inc.a.mu.Unlock()
	close(inc.done)
	inc.watch.Notify()
}

// wakeFeedback wakes every channel's feedback sender.
func (inc *incoming) wakeFeedback() {
	inc.fbMu.Lock()
	for _, ch := range inc.fb {
		select {
		case ch <- struct{}{}:
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

// load is a device's loader: it writes the chunk at the frontier into the
// device, in order, until END; then it checks the stream and moves the
// device RESUMING->STOP.
func (inc *incoming) load(d *devStream) {
	defer inc.loaders.Done()
	pool := inc.a.cfg.Pool
	for {
		d.mu.Lock()
		c, ok, err := d.reasm.Next()
		d.mu.Unlock()
		if err != nil {
			inc.terminate(wire.Errorf(codes.OutOfRange, wire.ReasonStreamGap, "device %d (%s): %v", d.index, d.spec, err), ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED)
			return
		}
		if !ok {
			select {
			case <-d.notify:
				continue
			case <-inc.ctx.Done():
				return
			}
		}
		if c.End {
			d.mu.Lock()
			d.reasm.Advance()
			end := d.end
			d.mu.Unlock()
			inc.wakeFeedback()
			inc.verify(d, c, end)
			return
		}
		data := (*c.Payload.buf)[:c.Len]
		if err := writeAll(d.stream, data); err != nil {
			pool.Put(c.Payload.buf)
			inc.terminate(wire.DeviceError(d.spec, fmt.Sprintf("write chunk %d at byte %d", c.Seq, c.Offset), err), ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED)
			return
		}
		d.digest.Add(c.Offset, data, c.Payload.crc)
		d.mu.Lock()
		d.reasm.Advance()
		d.mu.Unlock()
		pool.Put(c.Payload.buf)
		d.written.Add(uint64(c.Len))
		d.chunks.Add(1)
		inc.wakeFeedback()
	}
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
