package source

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"time"

	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/flow"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/services/wire"
)

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
