package source

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/flow"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/services/telemetry"
	"github.com/vfio-ferry/ferry/services/wire"
)

// Channel metadata headers, as the destination reads them.
const (
	headerSession = "ferry-session-id"
	headerChannel = "ferry-channel"
)

// errCancelled is the cancel cause of a migration cancelled by the control
// plane.
var errCancelled = errors.New("cancelled by the control plane")

// srcDevice is one source device and its outgoing stream.
type srcDevice struct {
	index   int
	spec    string
	peer    string
	dev     vfio.Device
	release func()
	stream  vfio.DataStream
	gate    *flow.Gate

	read    atomic.Uint64
	chunks  atomic.Uint64
	retrans atomic.Uint64
	total   atomic.Uint64 // estimate, then the final size
	errMsg  atomic.Pointer[string]

	// unacked holds the chunks sent but not yet written at the
	// destination, in sequence order; each holds one reference to its
	// payload. A broken channel's chunks can be sent again from here.
	mu      sync.Mutex
	unacked []*outChunk
	// sent is the frontier of the chunks kept in unacked so far.
	sent wire.Frontier
	// free holds acknowledged chunks for the reader to reuse, so a chunk
	// costs no allocation in steady state (at most a window of them).
	free []*outChunk

	// The reading side, the device's reader's alone (see readNext):
	// digest covers what was read; atEnd is set once a read reached the
	// end of the state, so END comes next; finished once END is made.
	digest          *wire.Digest
	atEnd, finished bool
}

// outChunk is a chunk on its way: its header and its payload.
//
// A chunk is referenced by the device's unacked list until the destination
// acknowledges it, and by each queue entry until a sender has passed it to
// gRPC (which takes its own reference to the payload). When the last
// reference goes the payload returns to the pool and the struct to the
// device's free list, so a chunk costs no allocation in steady state and is
// never reused while a resend of it may still be queued.
type outChunk struct {
	hdr     ferryv1.ChannelRequest
	payload mem.Buffer // nil for END
	dev     *srcDevice
	refs    atomic.Int32
	acked   atomic.Bool
	// channel is the channel that last sent the chunk, -1 when none: a
	// lost channel's unacknowledged chunks are sent again.
	channel atomic.Int32
}

// release drops one reference.
func (c *outChunk) release() {
	if c.refs.Add(-1) != 0 {
		return
	}
	d := c.dev
	d.mu.Lock()
	d.recycleLocked(c)
	d.mu.Unlock()
}

func (d *srcDevice) recycleLocked(c *outChunk) {
	if c.payload != nil {
		c.payload.Free()
	}
	c.hdr = ferryv1.ChannelRequest{}
	c.payload = nil
	c.acked.Store(false)
	c.channel.Store(-1)
	d.free = append(d.free, c)
}

// ack drops the chunks below seq from the unacked list.
func (d *srcDevice) ack(seq uint64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	n := 0
	for n < len(d.unacked) && d.unacked[n].hdr.Seq < seq {
		c := d.unacked[n]
		c.acked.Store(true)
		if c.refs.Add(-1) == 0 {
			d.recycleLocked(c)
		}
		n++
	}
	// Move what is left to the front (a window's worth of pointers at
	// most) rather than reslice, so keep's append reuses the array
	// instead of allocating a new one every so many chunks.
	left := copy(d.unacked, d.unacked[n:])
	clear(d.unacked[left:])
	d.unacked = d.unacked[:left]
}

// chunk returns an empty outChunk holding two references (the unacked
// list's and the send queue's), a recycled one when there is one.
func (d *srcDevice) chunk() *outChunk {
	d.mu.Lock()
	defer d.mu.Unlock()
	var c *outChunk
	if n := len(d.free); n > 0 {
		c = d.free[n-1]
		d.free[n-1] = nil
		d.free = d.free[:n-1]
	} else {
		c = &outChunk{dev: d}
	}
	c.channel.Store(-1)
	c.refs.Store(2)
	return c
}

// unsent collects the unacknowledged chunks last sent on channel, taking a
// queue reference to each, for a resend.
func (d *srcDevice) unsent(channel int32, dst []*outChunk) []*outChunk {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, c := range d.unacked {
		if c.channel.Load() == channel && !c.acked.Load() {
			c.channel.Store(-1)
			c.refs.Add(1)
			dst = append(dst, c)
		}
	}
	return dst
}

func (d *srcDevice) keep(c *outChunk) {
	d.mu.Lock()
	d.unacked = append(d.unacked, c)
	var n uint64
	if c.payload != nil {
		n = uint64(c.payload.Len())
	}
	d.sent = wire.Frontier{Seq: c.hdr.Seq + 1, Offset: c.hdr.Offset + n}
	d.mu.Unlock()
}

// sentFrontier is the frontier of what device i has handed to its
// channels, which an acknowledgement may not pass.
func (m *migration) sentFrontier(i int) wire.Frontier {
	d := m.devs[i]
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.sent
}

// migration is one outgoing migration.
type migration struct {
	a          *Agent
	id         string
	req        *ferryv1.StartMigrationRequest
	channels   uint32
	chunkSize  uint32
	createTime time.Time
	log        *slog.Logger
	watch      wire.Broadcast
	devs       []*srcDevice
	// dataAddr is the destination's direct data listener, when the session
	// uses one, and dataAuthority the destination's host:port, for the TLS
	// handshake: both set under mu before the channels start, which read
	// them without.
	dataAddr      string
	dataAuthority string
	// fallbacks counts streams that could not open their data connection
	// and sent in Channel messages.
	fallbacks atomic.Uint64

	ctx    context.Context
	cancel context.CancelCauseFunc
	done   chan struct{}

	mu             sync.Mutex
	phase          ferryv1.MigrationPhase
	err            *ferryv1.MigrationError
	startTime      time.Time
	switchoverTime time.Time
	endTime        time.Time
	peakBuffered   uint64
	windowBytes    uint64

	track *telemetry.Tracker // set before run starts

	// pull is set when the channels' senders read the device themselves
	// (a one-device migration; see puller), before the channels start.
	pull *puller

	// peer is the destination's control connection and what to abort
	// there; only run's goroutine uses it.
	peer destPeer
}

// destPeer is the source's control connection to the destination agent.
type destPeer struct {
	conn     *grpc.ClientConn
	transfer ferryv1.TransferClient
	// abort names what the destination holds for this migration once Open
	// may have been served: the session, or, when Open went unanswered,
	// the incoming migration by id and token. nil: nothing is held.
	abort *ferryv1.AbortRequest
}

func (a *Agent) newMigration(req *ferryv1.StartMigrationRequest) *migration {
	channels, _ := wire.Channels(req.GetChannels())
	chunkSize, _ := wire.ChunkSize(req.GetChunkSize())
	ctx, cancel := context.WithCancelCause(a.ctx)
	return &migration{
		a:          a,
		id:         req.GetMigrationId(),
		req:        proto.CloneOf(req),
		channels:   channels,
		chunkSize:  chunkSize,
		createTime: time.Now(),
		log:        a.cfg.Logger.With("migration", req.GetMigrationId(), "role", "source", "devices", sourceSpecs(req)),
		ctx:        ctx,
		cancel:     cancel,
		done:       make(chan struct{}),
		phase:      ferryv1.MigrationPhase_MIGRATION_PHASE_PREPARING,
	}
}

func (m *migration) cancelByUser() { m.cancel(errCancelled) }

// acquire takes the source devices from the registry.
func (m *migration) acquire() error {
	for i, p := range m.req.GetDevices() {
		spec, _ := wire.CanonicalSpec(p.GetSourceDevice())
		peer, _ := wire.CanonicalSpec(p.GetDestDevice())
		dev, release, err := m.a.cfg.Registry.Acquire(spec, m.id)
		if err != nil {
			m.releaseAll()
			return wire.DeviceError(spec, "open", err)
		}
		d := &srcDevice{index: i, spec: spec, peer: peer, dev: dev, release: release}
		m.devs = append(m.devs, d)
		if dev.Flags()&vfio.FlagStopCopy == 0 {
			m.releaseAll()
			return wire.Errorf(codes.FailedPrecondition, wire.ReasonDeviceUnsupported, "device %s does not support STOP_COPY migration (flags %s)", spec, dev.Flags())
		}
		if st, err := dev.State(); err != nil || st != vfio.StateRunning {
			m.releaseAll()
			return wire.Errorf(codes.FailedPrecondition, wire.ReasonDeviceState, "device %s is in %v, not RUNNING (%v)", spec, st, err)
		}
		if n, err := dev.DataSize(); err == nil {
			d.total.Store(n)
		}
	}
	return nil
}

func (m *migration) releaseAll() {
	for _, d := range m.devs {
		d.release()
	}
}

func (m *migration) setPhase(p ferryv1.MigrationPhase) {
	m.mu.Lock()
	changed := m.phase != p
	m.phase = p
	m.mu.Unlock()
	if changed {
		m.log.Info("phase", "phase", p.String())
		m.watch.Notify()
	}
}

// run drives the migration to its end and applies the rollback rule.
func (m *migration) run() {
	defer close(m.done)
	err := m.execute()
	defer func() {
		if m.peer.conn != nil {
			m.peer.conn.Close()
		}
	}()
	phase := ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED
	if err != nil {
		if errors.Is(context.Cause(m.ctx), errCancelled) {
			phase = ferryv1.MigrationPhase_MIGRATION_PHASE_CANCELLED
			err = wire.Errorf(codes.Canceled, wire.ReasonCancelled, "migration %s cancelled by the control plane", m.id)
		} else if m.ctx.Err() != nil && wire.Code(err) == codes.Canceled {
			err = wire.Errorf(codes.Unavailable, wire.ReasonAborted, "source agent shutting down")
		}
		// The VM's devices come first; then the destination is told.
		phase = m.rollback(err, phase)
		m.abortPeer(err)
	}
	for _, d := range m.devs {
		d.ack(^uint64(0))
		d.release()
	}
	m.mu.Lock()
	m.endTime = time.Now()
	if err != nil {
		m.err = &ferryv1.MigrationError{Code: int32(wire.Code(err)), Reason: wire.Reason(err), Message: wire.Message(err)}
	}
	m.mu.Unlock()
	if err != nil {
		m.log.Warn("migration ended", "phase", phase.String(), "error", wire.Message(err), "reason", wire.Reason(err))
	} else {
		m.log.Info("migration ended", "phase", phase.String())
	}
	m.track.End(m.ended(phase))
	m.setPhase(phase)
	m.cancel(nil)
}

// rollback returns every source device to RUNNING, resetting it if that
// arc fails. It returns the final phase.
func (m *migration) rollback(cause error, phase ferryv1.MigrationPhase) ferryv1.MigrationPhase {
	if phase == ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED {
		phase = ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED
	}
	for _, d := range m.devs {
		if d.stream != nil {
			d.stream.Close()
			d.stream = nil
		}
		st, err := d.dev.State()
		if err == nil && st == vfio.StateRunning {
			continue
		}
		if _, err := d.dev.SetState(vfio.StateRunning); err != nil {
			m.log.Error("device did not return to RUNNING; resetting it", "device", d.spec, "error", err)
			if rerr := d.dev.Reset(); rerr != nil {
				m.log.Error("DEVICE RESET FAILED: the device is in no usable state", "device", d.spec, "error", rerr)
				msg := fmt.Sprintf("returning to RUNNING failed (%v) and the reset failed too (%v)", err, rerr)
				d.errMsg.Store(&msg)
				continue
			}
			msg := fmt.Sprintf("returned to RUNNING by a device reset after: %v", err)
			d.errMsg.Store(&msg)
		}
	}
	return phase
}

// abortPeer tells the destination to end what it holds for the migration
// and reset its devices, if it may hold anything. It waits at most the
// progress timeout: a destination that does not answer within it is
// stalled, and ends the migration itself when its source timeout passes.
func (m *migration) abortPeer(cause error) {
	req := m.peer.abort
	if req == nil {
		return
	}
	req.Reason = wire.Message(cause)
	ctx, cancel := context.WithTimeout(context.WithoutCancel(m.ctx), min(rpcTimeout, m.a.cfg.ProgressTimeout))
	defer cancel()
	if _, err := m.peer.transfer.Abort(ctx, req); err != nil {
		m.log.Warn("abort at the destination failed", "error", err, "unanswered_open", req.GetSessionId() == "")
	}
}

// openUnanswered reports whether Open's error leaves its outcome unknown:
// it carries no reason, so the destination's handler did not send it (the
// call was cancelled, timed out, or lost its connection), and the
// destination may have opened the session all the same.
func openUnanswered(err error) bool { return wire.Reason(err) == "" }

// execute is the migration proper; any error it returns is rolled back by
// run, which then aborts what m.peer says the destination holds.
func (m *migration) execute() error {
	ctx := m.ctx
	a := m.a
	m.setPhase(ferryv1.MigrationPhase_MIGRATION_PHASE_WAITING)
	dialOpts := append(wire.DialOptions(a.cfg.PeerCreds, a.cfg.Pool), a.cfg.Metrics.DialOptions()...)
	ctrlConn, err := grpc.NewClient(m.req.GetDestAddress(), dialOpts...)
	if err != nil {
		return wire.Errorf(codes.InvalidArgument, wire.ReasonInvalidArgument, "dest_address %q: %v", m.req.GetDestAddress(), err)
	}
	transfer := ferryv1.NewTransferClient(ctrlConn)
	m.peer.conn, m.peer.transfer = ctrlConn, transfer

	open := &ferryv1.OpenRequest{
		MigrationId: m.id,
		Token:       m.req.GetToken(),
		ChunkSize:   m.chunkSize,
		Channels:    m.channels,
		Digest:      m.req.GetDigest(),
		Mode:        m.req.GetMode(),
	}
	// Chunks may travel on direct data connections (services/wire,
	// direct.go) when the destination's host is known here.
	destHost, destAuthority, hostOK := dataHost(m.req.GetDestAddress())
	open.DirectData = hostOK
	for _, d := range m.devs {
		open.Devices = append(open.Devices, d.peer)
		open.SourceDevices = append(open.SourceDevices, d.spec)
	}
	octx, ocancel := context.WithTimeout(ctx, rpcTimeout)
	opened, err := transfer.Open(octx, open)
	ocancel()
	if err != nil {
		if openUnanswered(err) {
			m.peer.abort = &ferryv1.AbortRequest{MigrationId: m.id, Token: m.req.GetToken()}
		}
		return peerError("open the session", err)
	}
	// From here on the destination holds a session: abort it on failure.
	m.peer.abort = &ferryv1.AbortRequest{SessionId: opened.GetSessionId()}
	if err := wire.CheckOpenWindows(opened.GetWindows(), len(m.devs), m.chunkSize); err != nil {
		return err
	}
	session := opened.GetSessionId()
	if p := opened.GetDataPort(); p != 0 && hostOK {
		m.mu.Lock()
		m.dataAddr, m.dataAuthority = net.JoinHostPort(destHost, strconv.Itoa(int(p))), destAuthority
		m.mu.Unlock()
		m.log.Info("chunks go on direct data connections", "address", m.dataAddr)
	}
	return m.stream(ctx, transfer, session, opened, dialOpts)
}

// peerError wraps an error from the destination, keeping its code and
// reason.
func peerError(op string, err error) error {
	code, reason := wire.Code(err), wire.Reason(err)
	if reason == "" {
		reason = wire.ReasonPeerUnavailable
	}
	return wire.Errorf(code, reason, "destination: %s: %s", op, wire.Message(err))
}

// stream runs the channels, the switchover, the readers and Finish.
func (m *migration) stream(ctx context.Context, transfer ferryv1.TransferClient, session string, opened *ferryv1.OpenResponse, dialOpts []grpc.DialOption) error {
	queueCap := 0
	m.mu.Lock() // snapshot reads the gates
	for i, d := range m.devs {
		w := opened.GetWindows()[i]
		d.gate = flow.NewGate(flow.Window{LimitSeq: w.GetLimitSeq(), LimitOffset: w.GetLimitOffset()})
		d.digest, _ = wire.NewDigest(m.req.GetDigest())
		queueCap += int(min(w.GetLimitSeq(), 1<<16)) + 1
	}
	m.mu.Unlock()
	if len(m.devs) == 1 {
		m.pull = newPuller(m.devs[0])
	}
	// Every chunk in the queue is inside its device's window, so the queue
	// never holds more than the windows do and a reader never blocks on it.
	// The senders of a one-device migration read for themselves: no queue.
	var queue chan *outChunk
	if m.pull == nil {
		queue = make(chan *outChunk, queueCap)
	}

	// Resent chunks come first; like queue, resend never holds more than
	// the windows (a chunk is queued for a resend only while no queue
	// holds it for that).
	resend := make(chan *outChunk, queueCap)
	defer drain(queue, resend)

	chCtx, chCancel := context.WithCancel(ctx)
	defer chCancel()
	g, gctx := errgroup.WithContext(chCtx)
	ready := make(chan struct{}, m.channels)
	for i := range int(m.channels) {
		dial := func() (*grpc.ClientConn, error) { return grpc.NewClient(m.req.GetDestAddress(), dialOpts...) }
		conn, err := dial()
		if err != nil {
			return wire.Errorf(codes.InvalidArgument, wire.ReasonInvalidArgument, "dial channel %d: %v", i, err)
		}
		ch := &channel{m: m, index: int32(i), conn: conn, dial: dial, client: ferryv1.NewTransferClient(conn), session: session, queue: queue, resend: resend, ready: ready}
		g.Go(func() error {
			// The connection the channel ends on: run replaces ch.conn
			// when it re-dials.
			defer func() { ch.conn.Close() }()
			return ch.run(gctx)
		})
	}
	fail := func(err error) error {
		chCancel()
		if gerr := g.Wait(); gerr != nil && wire.Code(gerr) != codes.Canceled {
			return gerr
		}
		return err
	}
	for range int(m.channels) {
		select {
		case <-ready:
		case <-gctx.Done():
			return fail(gctx.Err())
		}
	}

	// Switchover: the destination must accept before any device stops.
	err := m.retry(gctx, func(ctx context.Context) error {
		ctx, cancel := context.WithTimeout(ctx, rpcTimeout)
		defer cancel()
		_, err := transfer.SwitchoverStart(ctx, &ferryv1.SwitchoverStartRequest{SessionId: session, SentChunks: make([]uint64, len(m.devs))})
		return err
	})
	if err != nil {
		return fail(peerError("switchover start", err))
	}
	m.mu.Lock()
	m.switchoverTime = time.Now()
	m.mu.Unlock()
	if err := m.stopDevices(); err != nil {
		return fail(err)
	}
	m.setPhase(ferryv1.MigrationPhase_MIGRATION_PHASE_STOPCOPY)

	if p := m.pull; p != nil {
		// The senders may read now.
		p.turn <- struct{}{}
		select {
		case <-p.read:
			if p.err != nil {
				return fail(p.err)
			}
		case <-gctx.Done():
			return fail(gctx.Err())
		}
	} else {
		readers, rctx := errgroup.WithContext(gctx)
		for _, d := range m.devs {
			readers.Go(func() error { return m.readDevice(rctx, d, queue) })
		}
		if err := readers.Wait(); err != nil {
			return fail(err)
		}
	}
	m.setPhase(ferryv1.MigrationPhase_MIGRATION_PHASE_FINISHING)
	var verdict *ferryv1.FinishResponse
	err = m.retry(gctx, func(ctx context.Context) error {
		var err error
		verdict, err = transfer.Finish(ctx, &ferryv1.FinishRequest{SessionId: session})
		return err
	})
	if err != nil {
		return fail(peerError("finish", err))
	}
	if !verdict.GetVerified() {
		return fail(wire.Errorf(codes.DataLoss, wire.ReasonVerifyFailed, "the destination did not verify the state"))
	}
	m.mu.Lock()
	m.peakBuffered, m.windowBytes = verdict.GetPeakBufferedBytes(), verdict.GetWindowBytes()
	m.mu.Unlock()
	chCancel()
	g.Wait()
	return nil
}

// stopDevices moves every device to STOP_COPY, all through RUNNING_P2P
// first when every device supports P2P (no device stops while another
// may still send it peer-to-peer DMA).
func (m *migration) stopDevices() error {
	allP2P := true
	for _, d := range m.devs {
		allP2P = allP2P && d.dev.Flags()&vfio.FlagP2P != 0
	}
	if allP2P {
		for _, d := range m.devs {
			if _, err := d.dev.SetState(vfio.StateRunningP2P); err != nil {
				return wire.DeviceError(d.spec, "enter RUNNING_P2P", err)
			}
		}
	}
	for _, d := range m.devs {
		s, err := d.dev.SetState(vfio.StateStopCopy)
		if err != nil {
			return wire.DeviceError(d.spec, "enter STOP_COPY", err)
		}
		if s == nil {
			return wire.Errorf(codes.Internal, wire.ReasonDeviceState, "device %s: STOP_COPY opened no data stream", d.spec)
		}
		d.stream = s
	}
	return nil
}

// readDevice reads one device's state to its end on a goroutine of its
// own, chunk by chunk, each under window credit, and queues the chunks and
// END for the channels. A migration of several devices reads each so,
// whatever the number of channels: slow devices are read in parallel.
func (m *migration) readDevice(ctx context.Context, d *srcDevice, queue chan<- *outChunk) error {
	for !d.finished {
		seq, off, err := d.gate.Wait(ctx, d.want(m.chunkSize))
		if err != nil {
			return err
		}
		c, err := m.readNext(d, seq, off)
		if err != nil {
			return err
		}
		queue <- c
	}
	return m.leaveStopCopy(d)
}

// want is how many bytes the device's next chunk may hold: the chunk
// size, or 0 for END.
func (d *srcDevice) want(chunkSize uint32) uint64 {
	if d.atEnd {
		return 0
	}
	return uint64(chunkSize)
}

// readNext reads what comes next in the device's state, which the gate
// admitted at seq and offset for d.want bytes: a DATA chunk, or, at the
// end of the state, END (then d.finished is set, and the caller leaves
// STOP_COPY once END is on its way). The chunk is kept for a resend and
// counted as sent with the gate. Only the device's reader calls it.
func (m *migration) readNext(d *srcDevice, seq, off uint64) (*outChunk, error) {
	if !d.atEnd {
		pool := m.a.cfg.Pool
		bp := pool.Get(int(m.chunkSize))
		// The CRC is computed as the device is read, while the bytes
		// are in cache.
		n, crc, rerr := wire.ReadCRC32C(d.stream, *bp, wire.DevicePiece)
		eof := errors.Is(rerr, io.EOF) || errors.Is(rerr, io.ErrUnexpectedEOF)
		if rerr != nil && !eof {
			pool.Put(bp)
			return nil, wire.DeviceError(d.spec, fmt.Sprintf("read the state at byte %d", off), rerr)
		}
		if n > 0 {
			m.markStart()
			*bp = (*bp)[:n]
			d.digest.Add(off, *bp, crc)
			c := d.chunk()
			c.payload = mem.NewBuffer(bp, pool)
			c.hdr = ferryv1.ChannelRequest{Device: uint32(d.index), Seq: seq, Offset: off, Kind: ferryv1.ChunkKind_CHUNK_KIND_DATA, Crc32C: crc}
			d.keep(c)
			d.gate.Sent(uint64(n))
			d.read.Add(uint64(n))
			d.chunks.Add(1)
			// END follows, under credit of its own.
			d.atEnd = eof
			return c, nil
		}
		// The state ended exactly at a chunk boundary: END takes this
		// chunk's place.
		pool.Put(bp)
	}
	end := d.chunk()
	end.hdr = ferryv1.ChannelRequest{Device: uint32(d.index), Seq: seq, Offset: off, Kind: ferryv1.ChunkKind_CHUNK_KIND_END,
		TotalBytes: off, TotalChunks: seq, Digest: d.digest.Sum()}
	d.keep(end)
	d.gate.Sent(0)
	d.total.Store(off)
	d.finished = true
	return end, nil
}

// leaveStopCopy ends a device's STOP_COPY once its whole state is read:
// the data stream closes and the device moves to STOP.
func (m *migration) leaveStopCopy(d *srcDevice) error {
	d.stream.Close()
	d.stream = nil
	if _, err := d.dev.SetState(vfio.StateStop); err != nil {
		return wire.DeviceError(d.spec, "leave STOP_COPY", err)
	}
	return nil
}

func (m *migration) markStart() {
	m.mu.Lock()
	if m.startTime.IsZero() {
		m.startTime = time.Now()
	}
	m.mu.Unlock()
}

// snapshot renders the migration for the API.
func (m *migration) snapshot() (*ferryv1.Migration, bool, uint64) {
	m.mu.Lock()
	s := &ferryv1.Migration{
		Id:                m.id,
		Phase:             m.phase,
		Error:             proto.CloneOf(m.err),
		Channels:          m.channels,
		ChunkSize:         m.chunkSize,
		CreateTime:        timestamppb.New(m.createTime),
		PeakBufferedBytes: m.peakBuffered,
		WindowBytes:       m.windowBytes,
		DirectData:        m.dataAddr != "" && m.fallbacks.Load() == 0,
	}
	start, sw, end := m.startTime, m.switchoverTime, m.endTime
	gates := make([]*flow.Gate, len(m.devs))
	for i, d := range m.devs {
		gates[i] = d.gate
	}
	m.mu.Unlock()
	if !start.IsZero() {
		s.StartTime = timestamppb.New(start)
	}
	if !end.IsZero() {
		s.EndTime = timestamppb.New(end)
	}
	var total uint64
	for _, d := range m.devs {
		p := &ferryv1.DeviceProgress{
			Device:              d.spec,
			PeerDevice:          d.peer,
			Bytes:               d.read.Load(),
			Chunks:              d.chunks.Load(),
			TotalBytes:          d.total.Load(),
			RetransmittedChunks: d.retrans.Load(),
			Verified:            s.Phase == ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED,
		}
		if st, err := d.dev.State(); err == nil {
			p.State = wire.DeviceStateToProto(st)
		}
		if g := gates[d.index]; g != nil {
			n, dur := g.Stalls()
			p.WindowStalls, p.WindowStallTime = n, durationpb.New(dur)
		}
		if e := d.errMsg.Load(); e != nil {
			p.Error = *e
		}
		total += p.Bytes
		s.RetransmittedChunks += p.RetransmittedChunks
		s.Devices = append(s.Devices, p)
	}
	s.Bytes = total
	if !start.IsZero() && !end.IsZero() && end.After(start) && s.Phase == ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED {
		s.ThroughputBytesPerSecond = float64(total) / end.Sub(start).Seconds()
	}
	if !sw.IsZero() && !end.IsZero() {
		s.Downtime = durationpb.New(end.Sub(sw))
	}
	fin := final(s.Phase)
	return s, fin, total
}

func final(p ferryv1.MigrationPhase) bool {
	return p == ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED ||
		p == ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED ||
		p == ferryv1.MigrationPhase_MIGRATION_PHASE_CANCELLED
}

// dataHost takes the destination's host (to dial its direct data port on)
// and its host:port (the TLS authority, as gRPC uses it) from a gRPC
// target: host:port, or dns:/// or passthrough:/// before it. ok is false
// for anything else (a unix socket, a name resolver Ferry cannot see
// through): chunks then travel on the Channel streams.
func dataHost(target string) (host, authority string, ok bool) {
	for _, scheme := range []string{"dns:///", "passthrough:///"} {
		target = strings.TrimPrefix(target, scheme)
	}
	host, _, err := net.SplitHostPort(target)
	if err != nil || host == "" || strings.Contains(target, "/") {
		return "", "", false
	}
	return host, target, true
}
