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
	"github.com/vfio-ferry/ferry/internal/buildinfo"
	"github.com/vfio-ferry/ferry/pkg/flow"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/services/chunkwire"
	"github.com/vfio-ferry/ferry/services/deviceapi"
	"github.com/vfio-ferry/ferry/services/grpcserver"
	"github.com/vfio-ferry/ferry/services/wire"
)

// run drives the migration to its end and applies the rollback rule.
func (m *migration) run() {
	defer close(m.done)
	m.watchStuck()
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
		} else if cause := context.Cause(m.ctx); errors.Is(cause, errWithdrawn) {
			err = wire.Errorf(codes.Aborted, wire.ReasonWithdrawn, "migration %s: %v; rolled back", m.id, cause)
		} else if errors.Is(err, errSwitchoverDeadline) || errors.Is(context.Cause(m.ctx), errSwitchoverDeadline) {
			err = wire.Errorf(codes.DeadlineExceeded, wire.ReasonSwitchoverDeadline,
				"no verdict within the switchover deadline (%s) after the devices stopped; rolled back", m.switchoverDeadline)
		} else if m.ctx.Err() != nil && wire.Code(err) == codes.Canceled {
			err = wire.Errorf(codes.Unavailable, wire.ReasonAborted, "source agent shutting down")
		}
		// The VM's devices come first; then the destination is told.
		phase = m.rollback(err, phase)
		m.abortPeer(err)
	}
	for _, d := range m.devs {
		d.logFlight(m.log)
		d.ack(^uint64(0))
		d.release()
	}
	m.unreserve()
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
	m.trace.End(phase, wire.Reason(err), wire.Message(err))
	m.cancel(nil)
}

// rollback returns every source device to RUNNING, resetting it if that
// arc fails. It returns the final phase.
//
// It keeps the order the uAPI gives for P2P: when the devices stopped
// through RUNNING_P2P, every one of them returns to RUNNING_P2P before any
// returns to RUNNING, so no device initiates peer-to-peer DMA into another
// that is still stopped.
func (m *migration) rollback(cause error, phase ferryv1.MigrationPhase) ferryv1.MigrationPhase {
	if phase == ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED {
		phase = ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED
	}
	for _, d := range m.devs {
		// A stuck device's reader may still hold its stream: the
		// registry ends it once the operation returns.
		if d.stream != nil && !d.isStuck() {
			d.stream.Close()
			d.stream = nil
		}
	}
	if m.allP2P() {
		for _, d := range m.devs {
			if d.isStuck() {
				continue
			}
			if st, err := d.dev.State(); err == nil && (st == vfio.StateRunning || st == vfio.StateRunningP2P) {
				continue
			}
			if _, err := d.dev.SetState(vfio.StateRunningP2P); err != nil {
				// The next step resets it.
				m.log.Warn("device did not return to RUNNING_P2P", "device", d.spec, "error", err)
			}
		}
	}
	for _, d := range m.devs {
		if m.leaveToGuard(d) {
			// Any operation now would fail at once: the device is left
			// to its driver, held by the agent until its operation
			// returns, and then rolled back by its guard.
			msg := "did not answer within the device timeout: held until its operation returns, then returned to RUNNING"
			d.errMsg.Store(&msg)
			m.log.Error("DEVICE STUCK: returned to RUNNING only once its operation returns", "device", d.spec)
			continue
		}
		if d.stream != nil {
			// It answered since the streams were closed above.
			d.stream.Close()
			d.stream = nil
		}
		if msg := m.toRunning(d.spec, d.dev); msg != "" {
			d.errMsg.Store(&msg)
		}
	}
	return phase
}

// toRunning returns dev to RUNNING, resetting it if that arc fails, and
// says what went wrong ("" for nothing).
func (m *migration) toRunning(spec string, dev vfio.Device) string {
	st, err := dev.State()
	if err == nil && st == vfio.StateRunning {
		return ""
	}
	if _, err := dev.SetState(vfio.StateRunning); err != nil {
		m.log.Error("device did not return to RUNNING; resetting it", "device", spec, "error", err)
		if rerr := dev.Reset(); rerr != nil {
			m.log.Error("DEVICE RESET FAILED: the device is in no usable state", "device", spec, "error", rerr)
			return fmt.Sprintf("returning to RUNNING failed (%v) and the reset failed too (%v)", err, rerr)
		}
		return fmt.Sprintf("returned to RUNNING by a device reset after: %v", err)
	}
	return ""
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
	err := m.retryUntil(ctx, func(ctx context.Context) error {
		_, err := m.peer.transfer.Abort(ctx, req)
		return err
	})
	if err != nil {
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
	dialOpts := append(grpcserver.DialOptions(a.cfg.PeerCreds, a.cfg.Pool), a.cfg.Metrics.DialOptions()...)
	dialOpts = append(dialOpts, a.cfg.DialOptions...)
	dialOpts = append(dialOpts, a.cfg.Tracing.DialOptions()...)
	serverName := m.req.GetDestTlsServerName()
	if serverName != "" {
		// The name the destination's certificate is verified for.
		dialOpts = append(dialOpts, grpc.WithAuthority(serverName))
	}
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
		// What this source wants; it uses what the destination grants.
		AgentVersion: buildinfo.Read().Version,
		Features:     m.wanted().List(),
	}
	// Chunks may travel on direct data connections (services/wire,
	// direct.go) when the destination's host is known here.
	destHost, destAuthority, hostOK := dataHost(m.req.GetDestAddress())
	if serverName != "" {
		destAuthority = serverName
	}
	open.DirectData = hostOK
	for _, d := range m.devs {
		open.Devices = append(open.Devices, d.peer)
		open.SourceDevices = append(open.SourceDevices, d.spec)
		open.SourceDescriptions = append(open.SourceDescriptions, deviceapi.DescriptionToProto(vfio.Describe(d.dev)))
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
	if err := m.negotiated(opened); err != nil {
		return err
	}
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

// stream runs the channels, the switchover, the readers, Finish and the
// commit.
func (m *migration) stream(ctx context.Context, transfer ferryv1.TransferClient, session string, opened *ferryv1.OpenResponse, dialOpts []grpc.DialOption) error {
	if err := m.reserve(opened.GetWindows()); err != nil {
		return err
	}
	queueCap := 0
	m.mu.Lock() // snapshot reads the gates
	for i, d := range m.devs {
		w := opened.GetWindows()[i]
		d.gate = flow.NewGate(d.clamp(flow.Window{LimitSeq: w.GetLimitSeq(), LimitOffset: w.GetLimitOffset()}))
		d.digest, _ = chunkwire.NewDigest(m.req.GetDigest())
		queueCap += int(min(d.capChunks, 1<<12))
	}
	m.mu.Unlock()
	if len(m.devs) == 1 && m.precopy == nil {
		m.pull = newPuller(m.devs[0])
	}
	// Every chunk in the queue is inside its device's window; a reader
	// that finds it full waits (as it would for credit), never past ctx.
	// The senders of a one-device migration read for themselves: no queue.
	var queue chan *outChunk
	if m.pull == nil {
		queue = make(chan *outChunk, queueCap)
		defer drain(queue)
	}
	// Resent chunks come first.
	resend := newResendQueue()
	defer resend.drain()

	chCtx, chCancel := context.WithCancel(ctx)
	defer chCancel()
	g, gctx := errgroup.WithContext(chCtx)
	// fail ends the channels and returns err, or the error a channel
	// failed the migration with first. A channel's CANCELED is the end
	// of the group, not a cause, unless the destination sent it with a
	// reason (a CancelIncoming there): then it is the cause, and err is
	// only what the readers saw of the group's end.
	// precopyRead is set while the pre-copy readers run (precopy.go):
	// fail waits for them, since rollback touches what they hold.
	var precopyRead chan error
	fail := func(err error) error {
		chCancel()
		if precopyRead != nil {
			<-precopyRead
			precopyRead = nil
		}
		if gerr := m.await(g.Wait); gerr != nil && (wire.Code(gerr) != codes.Canceled || wire.Reason(gerr) != "") {
			return gerr
		}
		return err
	}
	ready := make(chan struct{}, m.channels)
	for i := range int(m.channels) {
		dial := func() (*grpc.ClientConn, error) { return grpc.NewClient(m.req.GetDestAddress(), dialOpts...) }
		conn, err := dial()
		if err != nil {
			return fail(wire.Errorf(codes.InvalidArgument, wire.ReasonInvalidArgument, "dial channel %d: %v", i, err))
		}
		ch := &channel{m: m, index: int32(i), conn: conn, dial: dial, client: ferryv1.NewTransferClient(conn), session: session, queue: queue, resend: resend, ready: ready}
		g.Go(func() error {
			// The connection the channel ends on: run replaces ch.conn
			// when it re-dials.
			defer func() { ch.conn.Close() }()
			return ch.run(gctx)
		})
	}
	// Every channel is up, its data connection open (or fallen back to
	// Channel messages), before anything stops.
	for range int(m.channels) {
		select {
		case <-ready:
		case <-gctx.Done():
			return fail(gctx.Err())
		}
	}

	// Pre-copy: the devices stream while the VM runs, until the
	// supervisor switches over (precopy.go). The destination must accept
	// before any device stops.
	if p := m.precopy; p != nil {
		began := time.Now()
		if err := m.startPrecopy(); err != nil {
			return fail(err)
		}
		precopyRead = make(chan error, 1)
		go func() { precopyRead <- m.readAll(gctx, queue) }()
		m.setPhase(ferryv1.MigrationPhase_MIGRATION_PHASE_PRECOPY)
		for {
			force, ended, err := m.supervise(gctx, transfer, session, precopyRead, began)
			if ended {
				precopyRead = nil
			}
			if err != nil {
				return fail(err)
			}
			err = m.switchoverStart(gctx, transfer, session, force)
			if err != nil && !force && wire.Reason(err) == wire.ReasonInitialDataPending {
				// New initial data raced the switchover: pre-copy goes on.
				m.log.Info("the destination has not loaded the new initial data; pre-copy goes on")
				continue
			}
			if err != nil {
				return fail(peerError("switchover start", err))
			}
			break
		}
		m.markSwitchover()
	} else if err := m.switchoverStart(gctx, transfer, session, false); err != nil {
		return fail(peerError("switchover start", err))
	}
	// From the first device's stop to the verdict the VM waits: the
	// switchover deadline bounds it, whatever the destination does.
	stopped, stopCancel := context.WithTimeoutCause(gctx, m.switchoverDeadline, errSwitchoverDeadline)
	defer stopCancel()
	// A peer that saw the deadline (gRPC carries it, rounded) may answer
	// DEADLINE_EXCEEDED a moment before the local timer fires: that is
	// the switchover deadline too.
	stopBy, _ := stopped.Deadline()
	deadlineErr := func(err error) error {
		if errors.Is(context.Cause(stopped), errSwitchoverDeadline) ||
			wire.Code(err) == codes.DeadlineExceeded && time.Until(stopBy) < deadlineSlack {
			return errSwitchoverDeadline
		}
		return err
	}
	m.mu.Lock()
	m.switchoverTime = time.Now()
	m.mu.Unlock()
	if err := m.stopDevices(); err != nil {
		return fail(err)
	}
	m.setPhase(ferryv1.MigrationPhase_MIGRATION_PHASE_STOPCOPY)

	if p := m.precopy; p != nil {
		p.markStopped()
		select {
		case err := <-precopyRead:
			precopyRead = nil
			if err != nil {
				return fail(deadlineErr(err))
			}
		case <-stopped.Done():
			return fail(deadlineErr(stopped.Err()))
		}
	} else if p := m.pull; p != nil {
		// The senders may read now.
		p.turn <- struct{}{}
		select {
		case <-p.read:
			if p.err != nil {
				return fail(p.err)
			}
		case <-stopped.Done():
			return fail(deadlineErr(stopped.Err()))
		case <-m.stuck:
			return fail(m.stuckError())
		}
	} else if err := m.readAll(stopped, queue); err != nil {
		return fail(deadlineErr(err))
	}
	m.setPhase(ferryv1.MigrationPhase_MIGRATION_PHASE_FINISHING)
	var verdict *ferryv1.FinishResponse
	err := m.retry(stopped, func(ctx context.Context) error {
		var err error
		verdict, err = transfer.Finish(ctx, &ferryv1.FinishRequest{SessionId: session})
		return err
	})
	if err != nil {
		if deadlineErr(err) == errSwitchoverDeadline {
			return fail(errSwitchoverDeadline)
		}
		return fail(peerError("finish", err))
	}
	if !verdict.GetVerified() {
		return fail(wire.Errorf(codes.DataLoss, wire.ReasonVerifyFailed, "the destination did not verify the state"))
	}
	// The commit point: from here on the destination owns the devices
	// and nothing rolls back. A cancel that came first wins.
	if err := m.commit(); err != nil {
		return fail(err)
	}
	m.mu.Lock()
	m.peakBuffered, m.windowBytes = verdict.GetPeakBufferedBytes(), verdict.GetWindowBytes()
	m.mu.Unlock()
	chCancel()
	if m.features.Has(ferryv1.Feature_FEATURE_COMMIT) {
		if err := m.tellCommit(transfer, session); err != nil {
			return fail(err)
		}
	}
	// The downtime ends here: the destination owns the devices and its
	// VM may run. The channels wind down after it.
	m.mu.Lock()
	m.resumeTime = time.Now()
	m.mu.Unlock()
	m.await(g.Wait)
	return nil
}

// deadlineSlack is how much earlier than the source a peer may see the
// switchover deadline.
const deadlineSlack = 50 * time.Millisecond

// commit records that the source has the destination's verified verdict
// (the migration's commit point, docs/design.md): from now on the
// destination owns the devices, the migration cannot be cancelled and no
// failure rolls it back. It fails if the migration was cancelled (or the
// agent shut down, or the switchover deadline passed) first.
func (m *migration) commit() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.ctx.Err(); err != nil {
		return context.Cause(m.ctx)
	}
	m.committed = true
	m.committing = m.features.Has(ferryv1.Feature_FEATURE_COMMIT)
	return nil
}

// tellCommit tells the destination that the source committed, so it
// leaves VERIFIED for SUCCEEDED. It waits at most the progress timeout,
// retrying transport errors; until the answer the owner is in doubt here
// too.
//
// A destination that rolled back first (a CancelIncoming or an Abort
// reached it while VERIFIED) answers MIGRATION_ROLLED_BACK: its devices
// were reset, so the commit is undone and the error returned, and the
// migration rolls back here as well; no host is left without the
// devices. A destination that does not answer stays VERIFIED, and says
// the owner is in doubt, until the control plane, which reads SUCCEEDED
// here, commits it with CommitIncoming.
func (m *migration) tellCommit(transfer ferryv1.TransferClient, session string) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(m.ctx), min(rpcTimeout, m.a.cfg.ProgressTimeout))
	defer cancel()
	err := m.retryUntil(ctx, func(ctx context.Context) error {
		_, err := transfer.Commit(ctx, &ferryv1.CommitRequest{SessionId: session})
		return err
	})
	m.mu.Lock()
	defer m.mu.Unlock()
	m.committing = false
	switch {
	case err == nil:
		return nil
	case wire.Code(err) == codes.FailedPrecondition && wire.Reason(err) == wire.ReasonRolledBack:
		m.committed = false
		return wire.Errorf(codes.Aborted, wire.ReasonRolledBack, "the destination rolled back before the commit reached it: %s", wire.Message(err))
	}
	m.log.Warn("the destination did not acknowledge the commit; it reports VERIFIED until the control plane commits it (DestAgent.CommitIncoming)", "error", wire.Message(err))
	m.commitUnheard = true
	return nil
}

// sentChunks is how many chunks each device has sent so far, for the
// destination to check in SwitchoverStart that it wrote them all.
func (m *migration) sentChunks() []uint64 {
	out := make([]uint64, len(m.devs))
	for i, d := range m.devs {
		out[i] = d.chunks.Load()
	}
	return out
}

// allP2P reports whether every device supports P2P: the devices then stop
// and return through RUNNING_P2P, all of them at a time.
func (m *migration) allP2P() bool {
	for _, d := range m.devs {
		if d.dev.Flags()&vfio.FlagP2P == 0 {
			return false
		}
	}
	return true
}

// stopDevices moves every device to STOP_COPY, all through RUNNING_P2P
// first when every device supports P2P (no device stops while another
// may still send it peer-to-peer DMA).
//
// A device in PRE_COPY goes through PRE_COPY_P2P and keeps its data
// stream: STOP_COPY continues it.
func (m *migration) stopDevices() error {
	// The config state current now is the one that travels: the
	// registry refuses updates from here until the migration ends. A
	// destination that cannot take it is refused before any device
	// stops.
	for _, d := range m.devs {
		if cfg := m.a.cfg.Registry.TakeConfig(d.spec); len(cfg) > 0 {
			if !m.features.Has(ferryv1.Feature_FEATURE_CONFIG_STATE) {
				return wire.Errorf(codes.FailedPrecondition, wire.ReasonFeatureNotSupported,
					"device %s carries %d bytes of VMM config state, and the destination (%s) does not take config state", d.spec, len(cfg), m.peerVersion())
			}
			d.config.Store(&cfg)
		}
	}
	if m.allP2P() {
		for _, d := range m.devs {
			target := vfio.StateRunningP2P
			if d.precopyDev.Load() {
				target = vfio.StatePreCopyP2P
			}
			if _, err := d.dev.SetState(target); err != nil {
				return deviceapi.Error(d.spec, "enter "+target.String(), err)
			}
		}
	}
	for _, d := range m.devs {
		s, err := d.dev.SetState(vfio.StateStopCopy)
		if err != nil {
			return deviceapi.Error(d.spec, "enter STOP_COPY", err)
		}
		if d.precopyDev.Load() {
			d.inPrecopy.Store(false)
			continue
		}
		if s == nil {
			return wire.Errorf(codes.Internal, wire.ReasonDeviceState, "device %s: STOP_COPY opened no data stream", d.spec)
		}
		d.stream = s
	}
	return nil
}
