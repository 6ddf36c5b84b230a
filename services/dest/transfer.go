package dest

import (
	"context"
	"errors"
	"io"
	"net"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/internal/buildinfo"
	"github.com/vfio-ferry/ferry/pkg/flow"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/pkg/vmm"
	"github.com/vfio-ferry/ferry/services/chunkwire"
	"github.com/vfio-ferry/ferry/services/peerauth"
	"github.com/vfio-ferry/ferry/services/wire"
)

// transferServer is the Transfer service.
type transferServer struct {
	ferryv1.UnimplementedTransferServer
	a *Agent
}

func (s *transferServer) Open(ctx context.Context, req *ferryv1.OpenRequest) (*ferryv1.OpenResponse, error) {
	a := s.a
	inc, err := a.lookup(req.GetMigrationId())
	if err != nil {
		return nil, err
	}
	params, err := validateOpen(req, inc.prepared(), time.Now())
	if err != nil {
		return nil, err
	}
	granted := wire.FeaturesOf(req.GetFeatures()) // all this build knows of what was asked
	if err := inc.checkOpen(req, granted); err != nil {
		// The source stops nothing after this answer: the devices
		// prepared here are reset now, not at the token's expiry.
		inc.fail(err, ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED, failFound)
		return nil, err
	}
	chunkSize, channels := params.chunkSize, params.channels
	digests := make([]*chunkwire.Digest, len(inc.devs))
	for i := range digests {
		digests[i], _ = chunkwire.NewDigest(req.GetDigest()) // validated
	}

	inc.mu.Lock()
	if inc.sessionID != "" || wire.Final(inc.phase) {
		inc.mu.Unlock()
		return nil, wire.Errorf(codes.FailedPrecondition, wire.ReasonSessionState, "incoming migration %s was already opened (the token is single-use)", inc.id)
	}
	inc.sessionID = randomID()
	inc.peer = peerauth.PeerIdentity(ctx).String()
	inc.chunkSize, inc.channels, inc.digestAlg, inc.mode = chunkSize, channels, req.GetDigest(), req.GetMode()
	inc.features, inc.sourceVersion = granted, req.GetAgentVersion()
	inc.sourceDevices = slices.Clone(req.GetSourceDevices())
	var dataPort uint32
	if req.GetDirectData() {
		dataPort = a.dataPort.Load()
		inc.direct = dataPort != 0
	}
	for i, d := range inc.devs {
		d.mu.Lock()
		d.reasm = flow.NewReassembly[payload](inc.limits, chunkSize)
		d.mu.Unlock()
		d.fbChunks, d.fbBytes = feedbackEvery(inc.limits, chunkSize, granted)
		d.digest = digests[i]
	}
	sessionID := inc.sessionID
	inc.mu.Unlock()
	if inc.expiry != nil {
		inc.expiry.Stop()
	}
	inc.touch()

	a.mu.Lock()
	a.sessions[sessionID] = inc
	a.mu.Unlock()
	inc.fbMu.Lock()
	inc.armLostLocked() // until the first channel connects
	inc.fbMu.Unlock()
	// Nothing waits for the loaders but the agent: a migration that ends
	// meanwhile (its clean-up holds every write turn) ends them at once.
	for _, d := range inc.devs {
		a.crew.Go(func() { inc.load(d) })
	}
	inc.log.Info("session opened", "channels", channels, "chunk_size", chunkSize, "mode", req.GetMode().String(),
		"source_version", req.GetAgentVersion(), "features", granted.String())
	if req.GetMode() == ferryv1.MigrationMode_MIGRATION_MODE_PRECOPY {
		inc.setPhase(ferryv1.MigrationPhase_MIGRATION_PHASE_PRECOPY)
	}

	resp := &ferryv1.OpenResponse{SessionId: sessionID, DataPort: dataPort, Windows: make([]*ferryv1.WindowUpdate, len(inc.devs)),
		AgentVersion: buildinfo.Read().Version, GrantedFeatures: granted.List()}
	for i := range resp.Windows {
		resp.Windows[i] = new(ferryv1.WindowUpdate)
	}
	inc.fillWindows(resp.Windows)
	return resp, nil
}

// Channel receives chunks on one channel and sends window updates back.
func (s *transferServer) Channel(stream grpc.BidiStreamingServer[ferryv1.ChannelRequest, ferryv1.ChannelResponse]) error {
	a := s.a
	md, _ := metadata.FromIncomingContext(stream.Context())
	inc, err := a.boundSession(stream.Context(), first(md.Get(wire.HeaderSession)))
	if err != nil {
		return err
	}
	index, err := strconv.Atoi(first(md.Get(wire.HeaderChannel)))
	inc.mu.Lock()
	channels := int(inc.channels)
	inc.mu.Unlock()
	if err != nil || index < 0 || index >= channels {
		return wire.Errorf(codes.InvalidArgument, wire.ReasonInvalidArgument, "header %s must be a channel index below %d", wire.HeaderChannel, channels)
	}
	// A channel that connects again replaces its old stream, which may
	// still look alive here (a connection that broke without a FIN).
	hctx, hcancel := context.WithCancel(stream.Context())
	defer hcancel()
	reg := &chanReg{wake: make(chan struct{}, 1), cancel: hcancel}
	inc.fbMu.Lock()
	if old, ok := inc.fb[index]; ok {
		old.cancel()
	}
	inc.fb[index] = reg
	if inc.lost != nil {
		inc.lost.Stop()
		inc.lost = nil
	}
	inc.fbMu.Unlock()
	defer func() {
		inc.fbMu.Lock()
		if inc.fb[index] == reg {
			delete(inc.fb, index)
		}
		if len(inc.fb) == 0 {
			inc.armLostLocked()
		}
		inc.fbMu.Unlock()
	}()
	wake := reg.wake
	wake <- struct{}{} // the first window update says the channel is up

	// With direct data the first response carries the key that attaches
	// the channel's data connection (direct.go); its chunks come there.
	inc.mu.Lock()
	direct := inc.direct
	inc.mu.Unlock()
	var (
		dataKey  []byte
		attached <-chan net.Conn
		dataConn net.Conn
		dataErr  = make(chan error, 1)
	)
	if direct {
		at := a.newDataKey(inc)
		dataKey, attached = at.key[:], at.conn
		defer func() {
			a.dropDataKey(at)
			if dataConn != nil {
				dataConn.Close()
			}
		}()
	}

	// The receiver runs on its own goroutine, owned by the agent: a
	// blocked RecvMsg only returns once this handler has returned.
	recvErr := make(chan error, 1)
	a.crew.Go(func() { recvErr <- inc.receive(stream) })

	resp := &ferryv1.ChannelResponse{Windows: make([]*ferryv1.WindowUpdate, len(inc.devs))}
	for i := range resp.Windows {
		resp.Windows[i] = new(ferryv1.WindowUpdate)
	}
	for {
		select {
		case err := <-recvErr:
			return err
		case <-inc.ctx.Done():
			return inc.finalStatus()
		case <-hctx.Done():
			if stream.Context().Err() == nil {
				return wire.Errorf(codes.Aborted, wire.ReasonSessionState, "channel %d was connected again; this stream is replaced", index)
			}
			// As gRPC sends it: the interceptors around this handler
			// (access log, metrics) read a bare context error as UNKNOWN.
			return status.FromContextError(stream.Context().Err()).Err()
		case conn := <-attached:
			attached, dataConn = nil, conn
			a.crew.Go(func() { dataErr <- inc.receiveDirect(conn, a.cfg.Pool) })
		case err := <-dataErr:
			// The data connection ended: cleanly, and the stream goes on
			// until the session ends, or with the error the stream ends with.
			if err != nil {
				return err
			}
		case <-wake:
			inc.fillWindows(resp.Windows)
			resp.DataKey, dataKey = dataKey, nil
			err := stream.Send(resp)
			resp.DataKey = nil
			if err != nil {
				return err
			}
		}
	}
}

func first(v []string) string {
	if len(v) == 0 {
		return ""
	}
	return v[0]
}

// finalStatus is what a channel answers once the migration has ended.
func (inc *incoming) finalStatus() error {
	inc.mu.Lock()
	defer inc.mu.Unlock()
	if inc.err == nil {
		return nil
	}
	return wire.Errorf(codes.Code(inc.err.Code), inc.err.Reason, "%s", inc.err.Message)
}

// receive reads chunks from a Channel stream until the source closes its
// side or a chunk breaks the protocol (see receiveChunks).
func (inc *incoming) receive(stream grpc.BidiStreamingServer[ferryv1.ChannelRequest, ferryv1.ChannelResponse]) error {
	return inc.receiveChunks(func(in *chunkwire.InChunk) error {
		if err := stream.RecvMsg(in); err != nil {
			return err
		}
		return in.Err // a message that does not decode, refused with its reason
	})
}

// receiveChunks accepts the chunks next reads, from a stream or a data
// connection, until next returns io.EOF (the source's clean end: nil) or
// another error (returned). A chunk the session refuses fails the whole
// migration.
func (inc *incoming) receiveChunks(next func(*chunkwire.InChunk) error) error {
	var in chunkwire.InChunk
	for {
		if err := next(&in); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		inc.touch()
		if err := inc.accept(&in); err != nil {
			inc.fail(err, ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED, failFound)
			return err
		}
	}
}

// accept validates one chunk and hands it to its device's reassembly. It
// owns in.Data: kept, or freed.
func (inc *incoming) accept(in *chunkwire.InChunk) (err error) {
	kept := false
	defer func() {
		if !kept {
			in.Data.Free()
		}
		in.Data = nil
	}()
	m := &in.Msg
	if int(m.GetDevice()) >= len(inc.devs) {
		return wire.Errorf(codes.InvalidArgument, wire.ReasonBadChunk, "chunk for device %d: the session has %d devices", m.GetDevice(), len(inc.devs))
	}
	d := inc.devs[m.GetDevice()]
	d.wireBytes.Add(uint64(in.Data.Len()))
	if m.GetKind() == ferryv1.ChunkKind_CHUNK_KIND_DATA {
		// A zero or compressed chunk becomes the bytes the device made.
		if err := inc.a.cfg.Pool.Decode(in, int(inc.chunkSize), inc.features, inc.a.zstd); err != nil {
			return err
		}
	}
	n := in.Data.Len()
	c := flow.Chunk[payload]{Seq: m.GetSeq(), Offset: m.GetOffset(), Len: uint32(n)}
	var end *endInfo
	switch kind := m.GetKind(); kind {
	case ferryv1.ChunkKind_CHUNK_KIND_DATA, ferryv1.ChunkKind_CHUNK_KIND_CONFIG:
		if n == 0 || n > int(inc.chunkSize) {
			return wire.Errorf(codes.InvalidArgument, wire.ReasonBadChunk, "device %d chunk %d: %d bytes, a %s chunk has 1 to %d", m.GetDevice(), m.GetSeq(), n, kindName(kind), inc.chunkSize)
		}
		if m.GetTotalBytes() != 0 || m.GetTotalChunks() != 0 || len(m.GetDigest()) != 0 || m.GetConfigBytes() != 0 ||
			kind == ferryv1.ChunkKind_CHUNK_KIND_CONFIG && (m.GetEncoding() != 0 || m.GetLength() != 0) {
			return wire.Errorf(codes.InvalidArgument, wire.ReasonBadChunk, "device %d chunk %d: a %s chunk carries no END fields", m.GetDevice(), m.GetSeq(), kindName(kind))
		}
		if kind == ferryv1.ChunkKind_CHUNK_KIND_CONFIG && !inc.features.Has(ferryv1.Feature_FEATURE_CONFIG_STATE) {
			return wire.Errorf(codes.InvalidArgument, wire.ReasonBadChunk, "device %d chunk %d: config state was not negotiated in Open", m.GetDevice(), m.GetSeq())
		}
		crc := in.Data.CRC32C()
		if crc != m.GetCrc32C() {
			return wire.Errorf(codes.DataLoss, wire.ReasonChunkCRC, "device %d chunk %d at byte %d: CRC32C %08x, the source sent %08x", m.GetDevice(), m.GetSeq(), m.GetOffset(), crc, m.GetCrc32C())
		}
		c.Payload = payload{data: in.Data, crc: crc, config: kind == ferryv1.ChunkKind_CHUNK_KIND_CONFIG}
	case ferryv1.ChunkKind_CHUNK_KIND_END:
		if n != 0 || m.GetEncoding() != 0 || m.GetLength() != 0 || len(m.GetDigest()) == 0 || len(m.GetDigest()) > wire.MaxDigestLength {
			return wire.Errorf(codes.InvalidArgument, wire.ReasonBadChunk, "device %d END: no data and a digest of 1 to %d bytes expected", m.GetDevice(), wire.MaxDigestLength)
		}
		if m.GetSeq() != m.GetTotalChunks() || m.GetOffset() != m.GetTotalBytes() {
			return wire.Errorf(codes.InvalidArgument, wire.ReasonBadChunk, "device %d END: seq %d and offset %d must equal total_chunks %d and total_bytes %d", m.GetDevice(), m.GetSeq(), m.GetOffset(), m.GetTotalChunks(), m.GetTotalBytes())
		}
		if m.GetConfigBytes() > vmm.MaxConfigState || m.GetConfigBytes() > m.GetTotalBytes() {
			return wire.Errorf(codes.InvalidArgument, wire.ReasonBadChunk, "device %d END: %d bytes of config state (at most %d, and of %d in all)", m.GetDevice(), m.GetConfigBytes(), vmm.MaxConfigState, m.GetTotalBytes())
		}
		c.End = true
		end = &endInfo{totalBytes: m.GetTotalBytes(), totalChunks: m.GetTotalChunks(), configBytes: m.GetConfigBytes(), digest: slices.Clone(m.GetDigest())}
	default:
		return wire.Errorf(codes.InvalidArgument, wire.ReasonBadChunk, "device %d chunk %d: kind %v", m.GetDevice(), m.GetSeq(), m.GetKind())
	}

	d.mu.Lock()
	if d.released {
		// The stream's buffers were released (the devices verified, or
		// the migration ended): nothing is held any more. A resend of a
		// chunk of a verified stream counts as a duplicate.
		done := d.verified.Load() && c.Seq < d.frontSeq && c.Offset+uint64(c.Len) <= d.frontOff
		d.mu.Unlock()
		if done {
			d.duplicates.Add(1)
		}
		return nil
	}
	if held, ok := d.reasm.Held(c.Seq); ok && !c.End && held.Payload.crc != c.Payload.crc {
		d.mu.Unlock()
		return wire.Errorf(codes.InvalidArgument, wire.ReasonBadChunk, "device %d (%s) chunk %d: resent with other bytes (CRC32C %08x, held %08x)", m.GetDevice(), d.spec, c.Seq, c.Payload.crc, held.Payload.crc)
	}
	dup, err := d.reasm.Accept(c)
	if err == nil && !dup && end != nil {
		d.end = end
	}
	d.mu.Unlock()
	if err != nil {
		code, reason := codes.InvalidArgument, wire.ReasonBadChunk
		switch {
		case errors.Is(err, flow.ErrOutsideWindow):
			code, reason = codes.OutOfRange, wire.ReasonOutsideWindow
		case errors.Is(err, flow.ErrGap):
			code, reason = codes.OutOfRange, wire.ReasonStreamGap
		}
		return wire.Errorf(code, reason, "device %d (%s): %v", m.GetDevice(), d.spec, err)
	}
	if dup {
		d.duplicates.Add(1)
		return nil
	}
	kept = c.Payload.data != nil
	inc.mu.Lock()
	if inc.startTime.IsZero() {
		inc.startTime = time.Now()
	}
	inc.mu.Unlock()
	wake, err := inc.writeReady(d)
	if err != nil {
		return err
	}
	if wake {
		select {
		case d.notify <- struct{}{}:
		default:
		}
	}
	return nil
}

// kindName names a chunk kind in errors: DATA, CONFIG, END.
func kindName(k ferryv1.ChunkKind) string {
	return strings.TrimPrefix(k.String(), "CHUNK_KIND_")
}

func (s *transferServer) SwitchoverStart(ctx context.Context, req *ferryv1.SwitchoverStartRequest) (*ferryv1.SwitchoverStartResponse, error) {
	inc, err := s.a.boundSession(ctx, req.GetSessionId())
	if err != nil {
		return nil, err
	}
	if len(req.GetSentChunks()) > len(inc.devs) {
		return nil, wire.Errorf(codes.InvalidArgument, wire.ReasonInvalidArgument, "sent_chunks names %d devices, the session has %d", len(req.GetSentChunks()), len(inc.devs))
	}
	inc.mu.Lock()
	phase, channels := inc.phase, int(inc.channels)
	inc.mu.Unlock()
	switch {
	case phase == ferryv1.MigrationPhase_MIGRATION_PHASE_STOPCOPY || phase == ferryv1.MigrationPhase_MIGRATION_PHASE_FINISHING ||
		phase == ferryv1.MigrationPhase_MIGRATION_PHASE_VERIFIED:
		return &ferryv1.SwitchoverStartResponse{}, nil
	case wire.Final(phase):
		return nil, inc.finalStatusOr(codes.FailedPrecondition)
	}
	inc.fbMu.Lock()
	up := len(inc.fb)
	inc.fbMu.Unlock()
	if up < channels {
		return nil, wire.Errorf(codes.Unavailable, wire.ReasonNotReady, "%d of %d channels are connected", up, channels)
	}
	if dev := inc.initialPending(); dev != "" && !req.GetForce() {
		return nil, wire.Errorf(codes.FailedPrecondition, wire.ReasonInitialDataPending, "device %s has not loaded its initial pre-copy data: the migration is not READY", dev)
	}
	for i, d := range inc.devs {
		st, err := d.dev.State()
		if err != nil || st != vfio.StateResuming {
			return nil, wire.Errorf(codes.FailedPrecondition, wire.ReasonNotReady, "device %s is in %v, not RESUMING (%v)", d.spec, st, err)
		}
		if i < len(req.GetSentChunks()) {
			d.mu.Lock()
			seq, _ := d.frontierLocked()
			d.mu.Unlock()
			if seq < req.GetSentChunks()[i] {
				return nil, wire.Errorf(codes.FailedPrecondition, wire.ReasonNotReady, "device %s: %d of %d chunks sent before switchover are written", d.spec, seq, req.GetSentChunks()[i])
			}
		}
	}
	inc.mu.Lock()
	inc.switchoverTime = time.Now()
	inc.mu.Unlock()
	inc.setPhase(ferryv1.MigrationPhase_MIGRATION_PHASE_STOPCOPY)
	return &ferryv1.SwitchoverStartResponse{}, nil
}

// finalStatusOr is the migration's failure, or a status with code when it
// succeeded.
func (inc *incoming) finalStatusOr(code codes.Code) error {
	if err := inc.finalStatus(); err != nil {
		return err
	}
	return wire.Errorf(code, wire.ReasonSessionState, "incoming migration %s has already ended", inc.id)
}

// Finish waits for the verdict. A verified migration is VERIFIED, not
// committed: Finish answers the same verdict for as long as it is VERIFIED
// or SUCCEEDED; a failure (an Abort after VERIFIED included) is answered
// with its status once the devices are reset.
func (s *transferServer) Finish(ctx context.Context, req *ferryv1.FinishRequest) (*ferryv1.FinishResponse, error) {
	inc, err := s.a.boundSession(ctx, req.GetSessionId())
	if err != nil {
		return nil, err
	}
	inc.setPhase(ferryv1.MigrationPhase_MIGRATION_PHASE_FINISHING)
	select {
	case <-inc.verifiedCh:
	case <-inc.done:
	case <-ctx.Done():
		return nil, wire.Errorf(wire.Code(ctx.Err()), wire.ReasonSessionState, "waiting for the verdict: %v", ctx.Err())
	}
	m, _, _ := inc.snapshot()
	switch m.GetPhase() {
	case ferryv1.MigrationPhase_MIGRATION_PHASE_VERIFIED, ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED:
	default:
		select {
		case <-inc.done:
		case <-ctx.Done():
			return nil, wire.Errorf(wire.Code(ctx.Err()), wire.ReasonSessionState, "waiting for the verdict: %v", ctx.Err())
		}
		return nil, inc.finalStatusOr(codes.Internal)
	}
	resp := &ferryv1.FinishResponse{Verified: true, PeakBufferedBytes: m.GetPeakBufferedBytes(), WindowBytes: m.GetWindowBytes()}
	for i, p := range m.GetDevices() {
		resp.Devices = append(resp.Devices, &ferryv1.DeviceVerdict{
			Device: uint32(i), DeviceSpec: p.GetDevice(), Verified: p.GetVerified(), Bytes: p.GetBytes(),
			Error: p.GetError(), PeakBufferedBytes: p.GetPeakBufferedBytes(),
		})
		resp.Verified = resp.Verified && p.GetVerified()
	}
	return resp, nil
}

// Commit is the source's word that it has the verified verdict and will
// not roll back: VERIFIED becomes SUCCEEDED, and the destination owns the
// devices (the commit rule). It answers once the devices are handed over.
func (s *transferServer) Commit(ctx context.Context, req *ferryv1.CommitRequest) (*ferryv1.CommitResponse, error) {
	inc, err := s.a.boundSession(ctx, req.GetSessionId())
	if err != nil {
		return nil, err
	}
	if err := inc.commitAndWait(ctx); err != nil {
		return nil, err
	}
	return &ferryv1.CommitResponse{}, nil
}

// maxAbortReason bounds the reason an Abort carries into the
// destination's records, in bytes.
const maxAbortReason = 1024

// cutReason makes reason valid UTF-8 and cuts it to at most
// maxAbortReason bytes on a rune boundary, so the migration's error always
// marshals.
func cutReason(reason string) string {
	reason = strings.ToValidUTF8(reason, "\uFFFD")
	if len(reason) > maxAbortReason {
		cut := maxAbortReason
		for cut > 0 && !utf8.RuneStart(reason[cut]) {
			cut--
		}
		reason = reason[:cut]
	}
	return reason
}

// Abort ends a session, or, named by migration id and token, an incoming
// migration whose Open the source saw go unanswered (see AbortRequest).
// A VERIFIED migration is rolled back too (the source has not committed);
// a committed one is not: FAILED_PRECONDITION, MIGRATION_COMMITTED. It
// returns once the devices are reset.
func (s *transferServer) Abort(ctx context.Context, req *ferryv1.AbortRequest) (*ferryv1.AbortResponse, error) {
	var inc *incoming
	var err error
	if req.GetSessionId() == "" && req.GetMigrationId() != "" {
		inc, err = s.a.tokenIncoming(ctx, req.GetMigrationId(), req.GetToken())
	} else {
		inc, err = s.a.boundSession(ctx, req.GetSessionId())
	}
	if err != nil {
		// A session or migration that already ended and was cleaned
		// up is aborted.
		if wire.Code(err) == codes.NotFound {
			return &ferryv1.AbortResponse{}, nil
		}
		return nil, err
	}
	inc.touch()
	phase := inc.fail(wire.Errorf(codes.Aborted, wire.ReasonAborted, "aborted by the source: %s", cutReason(req.GetReason())), ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED, failAsked)
	if phase == ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED {
		return nil, errCommitted(inc.id)
	}
	select {
	case <-inc.done:
	case <-ctx.Done():
		return nil, status.FromContextError(ctx.Err()).Err()
	}
	return &ferryv1.AbortResponse{}, nil
}

// errCommitted refuses to roll back a committed migration.
func errCommitted(id string) error {
	return wire.Errorf(codes.FailedPrecondition, wire.ReasonCommitted, "incoming migration %s was committed: the destination owns its devices", id)
}
