package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/types/known/durationpb"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/internal/tracing"
	"github.com/vfio-ferry/ferry/services/chunkwire"
	"github.com/vfio-ferry/ferry/services/grpcserver"
	"github.com/vfio-ferry/ferry/services/wire"
)

// plan is one migration as a control plane asks for it.
type plan struct {
	id         string
	sourceAddr string // the source agent's SourceAgent address
	destAddr   string // the destination agent's DestAgent address
	transfer   string // the destination's Transfer address as the source reaches it
	// destServerName, when set, is the name the source verifies the
	// destination's certificate for instead of transfer's host.
	destServerName string
	pairs          []*ferryv1.DevicePair
	channels       uint32
	chunkSize      uint32
	maxChunks      uint32
	maxBytes       uint64
	// switchoverDeadline bounds the time the source devices may stay
	// stopped without a verdict; 0 leaves the source's default.
	switchoverDeadline time.Duration
	// precopy asks for a pre-copy migration, which waits for a
	// Switchover (ferry switchover) or, with downtimeLimit, switches over
	// by itself once the predicted downtime meets it; precopyTimeout and
	// onTimeout bound it (0 and UNSPECIFIED: the source's defaults).
	precopy        bool
	downtimeLimit  time.Duration
	precopyTimeout time.Duration
	onTimeout      ferryv1.PrecopyTimeoutAction
	// switchoverWhenReady asks the source for the switchover once the
	// migration is READY, as `ferry switchover` would.
	switchoverWhenReady bool
	// compress asks for zstd chunks (where the destination takes them).
	compress bool
	// preflight makes the destination's compatibility check a
	// requirement (StartMigrationRequest.preflight).
	preflight bool
	// maxBandwidth is the migration's bandwidth limit, bytes per second
	// (StartMigrationRequest.max_bandwidth; 0: none).
	maxBandwidth uint64
	creds        credentials.TransportCredentials
	// dialOptions are added to the options of the connections to both
	// agents (the bench reaches agents in other network namespaces).
	dialOptions []grpc.DialOption
	// tracing, when set, traces the migration (one span for it, the
	// calls to both agents beneath it); traceID then hears the trace's
	// id before the first call.
	tracing *tracing.Tracing
	traceID func(string)
	// lost, when set, hears of every broken watch that is opened again.
	lost func(error)
}

// result is what `ferry migrate --json` and `ferry demo --json` print.
type result struct {
	MigrationID string `json:"migration_id"`
	// TraceID is the migration's trace when tracing is on (OTEL_*).
	TraceID  string `json:"trace_id,omitempty"`
	Verified bool   `json:"verified"`
	Phase    string `json:"phase"`
	// Owner is which host holds the runnable copy of the devices, as the
	// source (which owns the commit) reports it: SOURCE, DESTINATION, or
	// UNKNOWN when the source could not say.
	Owner string `json:"owner"`
	Bytes uint64 `json:"bytes"`
	// WireBytes are the chunks' bytes as they travelled: fewer than Bytes
	// where zero pages stayed home or compression shrank them.
	WireBytes uint64 `json:"wire_bytes"`
	Devices   int    `json:"devices"`
	Channels  uint32 `json:"channels"`
	// ChunkSize in bytes.
	ChunkSize uint32 `json:"chunk_size"`
	// DurationSeconds is the whole migration: from the source accepting
	// it to the verdict. It contains the downtime.
	DurationSeconds float64 `json:"duration_seconds"`
	// TransferSeconds is from the first chunk read to the verdict: the
	// interval of the throughput.
	TransferSeconds          float64 `json:"transfer_seconds"`
	ThroughputBytesPerSecond float64 `json:"throughput_bytes_per_second"`
	// DowntimeSeconds is from the accepted switchover start (the devices
	// stop right after it) to the destination's acknowledgement of the
	// commit.
	DowntimeSeconds       float64 `json:"downtime_seconds"`
	DestPeakBufferedBytes uint64  `json:"dest_peak_buffered_bytes"`
	WindowBytes           uint64  `json:"window_bytes"`
	RetransmittedChunks   uint64  `json:"retransmitted_chunks"`
	DirectData            bool    `json:"direct_data"`
	// MaxBandwidth is the migration's bandwidth limit at its end, bytes
	// per second (0: none), NodeMaxBandwidth the source agent's
	// node-wide one; BandwidthLimitedBytes went through the limits,
	// BandwidthStalls times a chunk waited on one.
	MaxBandwidth          uint64 `json:"max_bandwidth"`
	NodeMaxBandwidth      uint64 `json:"node_max_bandwidth"`
	BandwidthLimitedBytes uint64 `json:"bandwidth_limited_bytes"`
	BandwidthStalls       uint64 `json:"bandwidth_stalls"`
	// Precopy is set for a pre-copy migration.
	Precopy       *precopyResult `json:"precopy,omitempty"`
	Error         *resultError   `json:"error,omitempty"`
	DeviceResults []deviceResult `json:"device_results"`
	// Next says what to do now, when there is something to do.
	Next string `json:"next,omitempty"`
}

// precopyResult is how a pre-copy migration went; its measured downtime
// is the result's DowntimeSeconds.
type precopyResult struct {
	// PrecopyBytes were read while the VM ran, StopcopyBytes after the
	// devices stopped.
	PrecopyBytes  uint64 `json:"precopy_bytes"`
	StopcopyBytes uint64 `json:"stopcopy_bytes"`
	// PredictedDowntimeSeconds is the source's last prediction before the
	// switchover; absent when it could make none (PredictionNote says why).
	PredictedDowntimeSeconds *float64 `json:"predicted_downtime_seconds,omitempty"`
	PredictionNote           string   `json:"prediction_note,omitempty"`
	// SwitchoverTrigger is what switched the migration over: requested,
	// forced, downtime_limit or precopy_timeout; empty when it never did.
	SwitchoverTrigger string `json:"switchover_trigger,omitempty"`
}

type resultError struct {
	Code    string `json:"code"`
	Reason  string `json:"reason,omitempty"`
	Message string `json:"message"`
}

type deviceResult struct {
	Source      string `json:"source"`
	Dest        string `json:"dest"`
	Bytes       uint64 `json:"bytes"`
	Verified    bool   `json:"verified"`
	SourceState string `json:"source_state"`
	DestState   string `json:"dest_state"`
	Error       string `json:"error,omitempty"`
	// InFlightLimitBytes is what the source kept in flight at most, the
	// window or less; MinRoundTripSeconds the shortest acknowledgement
	// round trip it measured (0: none).
	InFlightLimitBytes  uint64  `json:"in_flight_limit_bytes"`
	MinRoundTripSeconds float64 `json:"min_round_trip_seconds"`
}

func newMigrationID() string {
	var b [6]byte
	rand.Read(b[:])
	return "mig-" + hex.EncodeToString(b[:])
}

// migrate drives one migration: PrepareIncoming on the destination,
// StartMigration on the source, then it watches the source to the end,
// calling progress with every state. A watch that breaks is opened again;
// the migration is cancelled on both sides only when ctx ends first (the
// user interrupted, or the caller's deadline passed). The error is only
// for failures of the control plane itself; a migration that ran and
// failed is a result with Verified false.
func migrate(ctx context.Context, p plan, progress func(*ferryv1.Migration)) (*result, error) {
	ctx, end := p.tracing.StartMigrate(ctx, p.id)
	defer end()
	if id := tracing.TraceID(ctx); id != "" && p.traceID != nil {
		p.traceID(id)
	}
	opts := append(grpcserver.DialOptions(p.creds, chunkwire.NewPool()), p.tracing.DialOptions()...)
	opts = append(opts, p.dialOptions...)
	dconn, err := grpc.NewClient(p.destAddr, opts...)
	if err != nil {
		return nil, fmt.Errorf("destination %s: %w", p.destAddr, err)
	}
	defer dconn.Close()
	sconn, err := grpc.NewClient(p.sourceAddr, opts...)
	if err != nil {
		return nil, fmt.Errorf("source %s: %w", p.sourceAddr, err)
	}
	defer sconn.Close()
	r, err := drive(ctx, p, ferryv1.NewDestAgentClient(dconn), ferryv1.NewSourceAgentClient(sconn), progress)
	if r != nil {
		r.TraceID = tracing.TraceID(ctx)
	}
	return r, err
}

// drive is migrate over clients of the two agents.
func drive(ctx context.Context, p plan, dst ferryv1.DestAgentClient, src ferryv1.SourceAgentClient, progress func(*ferryv1.Migration)) (*result, error) {
	prep := &ferryv1.PrepareIncomingRequest{MigrationId: p.id, MaxChunks: p.maxChunks, MaxBytes: p.maxBytes}
	for _, pair := range p.pairs {
		prep.Devices = append(prep.Devices, pair.GetDestDevice())
	}
	cctx, cancel := context.WithTimeout(ctx, time.Minute)
	prepared, err := dst.PrepareIncoming(cctx, prep)
	cancel()
	if err != nil {
		return nil, newCallError("prepare the destination "+p.destAddr, err, p.creds)
	}
	cancelIncoming := func() {
		c, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		dst.CancelIncoming(c, &ferryv1.CancelIncomingRequest{MigrationId: p.id})
	}
	start := &ferryv1.StartMigrationRequest{
		MigrationId:       p.id,
		DestAddress:       p.transfer,
		Token:             prepared.GetToken(),
		Devices:           p.pairs,
		Channels:          p.channels,
		ChunkSize:         p.chunkSize,
		Mode:              ferryv1.MigrationMode_MIGRATION_MODE_STOP_COPY,
		Preflight:         p.preflight,
		Compression:       compression(p.compress),
		DestTlsServerName: p.destServerName,
		MaxBandwidth:      p.maxBandwidth,
	}
	if p.precopy {
		start.Mode = ferryv1.MigrationMode_MIGRATION_MODE_PRECOPY
		start.OnPrecopyTimeout = p.onTimeout
		if p.downtimeLimit > 0 {
			start.DowntimeLimit = durationpb.New(p.downtimeLimit)
		}
		if p.precopyTimeout > 0 {
			start.PrecopyTimeout = durationpb.New(p.precopyTimeout)
		}
	}
	if p.switchoverDeadline > 0 {
		start.SwitchoverDeadline = durationpb.New(p.switchoverDeadline)
	}
	cctx, cancel = context.WithTimeout(ctx, time.Minute)
	_, err = src.StartMigration(cctx, start)
	cancel()
	if err != nil {
		cancelIncoming()
		return nil, newCallError("start the migration at the source "+p.sourceAddr, err, p.creds)
	}

	if p.switchoverWhenReady {
		progress = switchoverWhenReady(ctx, src, p.id, progress)
	}
	final, err := follow(ctx, src, p.id, progress, p.lost)
	if err != nil {
		if ctx.Err() == nil {
			// The source cannot tell this migration's end (it does not
			// know the id any more, or refuses this client): nothing to
			// cancel, and nothing is cancelled on a guess.
			return nil, newCallError("watch the migration at the source "+p.sourceAddr, err, p.creds)
		}
		// Asked to stop (an interrupt, or the caller's deadline): cancel.
		c, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		resp, cerr := src.CancelMigration(c, &ferryv1.CancelMigrationRequest{MigrationId: p.id})
		cancel()
		cancelIncoming()
		if cerr != nil {
			return nil, newCallError("cancel the migration at the source "+p.sourceAddr, cerr, p.creds)
		}
		final = resp.GetMigration()
	}
	c, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	var incoming *ferryv1.Migration
	if resp, err := dst.GetIncoming(c, &ferryv1.GetIncomingRequest{MigrationId: p.id}); err == nil {
		incoming = resp.GetMigration()
	}
	if final.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED &&
		(incoming == nil || !wire.Final(incoming.GetPhase())) {
		cancelIncoming()
		if resp, err := dst.GetIncoming(c, &ferryv1.GetIncomingRequest{MigrationId: p.id}); err == nil {
			incoming = resp.GetMigration()
		}
	}
	return summarize(final, incoming), nil
}

// switchoverWhenReady wraps progress: the first state in READY asks the
// source for the switchover (not forced). A Switchover that fails is asked
// again at the next state, as long as the migration is READY.
func switchoverWhenReady(ctx context.Context, src ferryv1.SourceAgentClient, id string, progress func(*ferryv1.Migration)) func(*ferryv1.Migration) {
	asked := false
	return func(m *ferryv1.Migration) {
		if progress != nil {
			progress(m)
		}
		if asked || m.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_READY {
			return
		}
		cctx, cancel := context.WithTimeout(ctx, time.Minute)
		defer cancel()
		_, err := src.Switchover(cctx, &ferryv1.SwitchoverRequest{MigrationId: id})
		asked = err == nil
	}
}

// The backoff between attempts to watch a migration again.
const (
	rewatchFirst = 100 * time.Millisecond
	rewatchMax   = 5 * time.Second
)

// follow follows a migration on the source to its final phase. A watch
// that breaks (a lost connection, an agent that restarts its server) is
// opened again with backoff; between attempts GetMigration reports the
// state, and a migration that ended meanwhile is its answer. It gives up
// only when ctx ends, or when the source answers that it cannot tell
// (the id unknown, the client refused). lost, when set, hears of each
// break.
func follow(ctx context.Context, src ferryv1.SourceAgentClient, id string, progress func(*ferryv1.Migration), lost func(error)) (*ferryv1.Migration, error) {
	wait := rewatchFirst
	for {
		last, err := watch(ctx, src, id, progress)
		if err == nil {
			return last, nil
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if permanent(err) {
			return nil, err
		}
		if last != nil {
			// The watch delivered states before it broke: the connection
			// was good, so the next break starts the backoff afresh.
			wait = rewatchFirst
		}
		if lost != nil {
			lost(err)
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, ctx.Err()
		case <-t.C:
		}
		wait = min(2*wait, rewatchMax)
		cctx, cancel := context.WithTimeout(ctx, rewatchMax)
		resp, gerr := src.GetMigration(cctx, &ferryv1.GetMigrationRequest{MigrationId: id})
		cancel()
		switch {
		case gerr == nil && wire.Final(resp.GetMigration().GetPhase()):
			if progress != nil {
				progress(resp.GetMigration())
			}
			return resp.GetMigration(), nil
		case gerr == nil && progress != nil:
			progress(resp.GetMigration())
		case gerr != nil && permanent(gerr):
			return nil, gerr
		}
	}
}

// permanent reports whether a watch's error means watching again cannot
// help: the source does not know the migration, or will not serve this
// client.
func permanent(err error) bool {
	switch wire.Code(err) {
	case codes.NotFound, codes.InvalidArgument, codes.PermissionDenied, codes.Unauthenticated, codes.Unimplemented:
		return true
	}
	return false
}

// watch follows a migration on the source with one WatchMigration
// stream, to its final phase or until the stream breaks. It returns the
// last state seen either way.
func watch(ctx context.Context, src ferryv1.SourceAgentClient, id string, progress func(*ferryv1.Migration)) (*ferryv1.Migration, error) {
	stream, err := src.WatchMigration(ctx, &ferryv1.WatchMigrationRequest{MigrationId: id})
	if err != nil {
		return nil, err
	}
	var last *ferryv1.Migration
	for {
		resp, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			if last == nil || !wire.Final(last.GetPhase()) {
				return last, wire.Errorf(codes.Unavailable, "", "the watch ended before the migration did")
			}
			return last, nil
		}
		if err != nil {
			return last, err
		}
		last = resp.GetMigration()
		if progress != nil {
			progress(last)
		}
		if wire.Final(last.GetPhase()) {
			return last, nil
		}
	}
}

// summarize builds the result from the source's and the destination's
// final views.
func summarize(m, incoming *ferryv1.Migration) *result {
	r := &result{
		MigrationID:              m.GetId(),
		Phase:                    phaseName(m.GetPhase()),
		Verified:                 m.GetPhase() == ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED,
		Owner:                    ownerName(m.GetOwner()),
		Bytes:                    m.GetBytes(),
		WireBytes:                m.GetWireBytes(),
		Devices:                  len(m.GetDevices()),
		Channels:                 m.GetChannels(),
		ChunkSize:                m.GetChunkSize(),
		ThroughputBytesPerSecond: m.GetThroughputBytesPerSecond(),
		DowntimeSeconds:          m.GetDowntime().AsDuration().Seconds(),
		DestPeakBufferedBytes:    m.GetPeakBufferedBytes(),
		WindowBytes:              m.GetWindowBytes(),
		RetransmittedChunks:      m.GetRetransmittedChunks(),
		MaxBandwidth:             m.GetMaxBandwidth(),
		NodeMaxBandwidth:         m.GetNodeMaxBandwidth(),
		BandwidthLimitedBytes:    m.GetBandwidthLimitedBytes(),
		BandwidthStalls:          m.GetBandwidthStalls(),
		DirectData:               m.GetDirectData(),
	}
	end := m.GetEndTime()
	if m.GetCreateTime() != nil && end != nil {
		r.DurationSeconds = max(0, end.AsTime().Sub(m.GetCreateTime().AsTime()).Seconds())
	}
	if m.GetStartTime() != nil && end != nil {
		r.TransferSeconds = max(0, end.AsTime().Sub(m.GetStartTime().AsTime()).Seconds())
	}
	// The downtime is measured on the source's monotonic clock, the
	// timestamps on its wall clock: only a step of the wall clock could
	// make the interval that contains the downtime look shorter than it.
	r.DurationSeconds = max(r.DurationSeconds, r.DowntimeSeconds)
	if incoming != nil {
		r.DestPeakBufferedBytes = incoming.GetPeakBufferedBytes()
		r.WindowBytes = incoming.GetWindowBytes()
		r.Verified = r.Verified && incoming.GetPhase() == ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED
	}
	if m.GetPrecopyTimeout() != nil {
		// The source reports its pre-copy limits for pre-copy
		// migrations only.
		pre := &precopyResult{
			PrecopyBytes:      m.GetPrecopyBytes(),
			StopcopyBytes:     m.GetStopcopyBytes(),
			PredictionNote:    m.GetPredictionNote(),
			SwitchoverTrigger: m.GetSwitchoverTrigger(),
		}
		if d := m.GetPredictedDowntime(); d != nil {
			s := d.AsDuration().Seconds()
			pre.PredictedDowntimeSeconds = &s
		}
		r.Precopy = pre
	}
	if e := m.GetError(); e != nil {
		r.Error = &resultError{Code: codeName(codes.Code(e.GetCode())), Reason: e.GetReason(), Message: e.GetMessage()}
	}
	for i, d := range m.GetDevices() {
		dr := deviceResult{Source: d.GetDevice(), Dest: d.GetPeerDevice(), Bytes: d.GetBytes(), SourceState: stateName(d.GetState()), Error: d.GetError(),
			InFlightLimitBytes: d.GetInFlightLimitBytes(), MinRoundTripSeconds: d.GetMinRoundTrip().AsDuration().Seconds()}
		if incoming != nil && i < len(incoming.GetDevices()) {
			in := incoming.GetDevices()[i]
			dr.Verified = in.GetVerified()
			dr.DestState = stateName(in.GetState())
			if dr.Error == "" {
				dr.Error = in.GetError()
			}
		}
		r.DeviceResults = append(r.DeviceResults, dr)
	}
	r.Next = nextStep(m, incoming, r.Verified)
	return r
}

// ownerName is how the summary names the owner of the devices.
func ownerName(o ferryv1.DeviceOwner) string {
	if o == ferryv1.DeviceOwner_DEVICE_OWNER_UNSPECIFIED {
		return "UNKNOWN"
	}
	return strings.TrimPrefix(o.String(), "DEVICE_OWNER_")
}

// nextStep says what the operator should do after the migration m (the
// source's view) and incoming (the destination's, nil when it could not
// be read).
func nextStep(m, incoming *ferryv1.Migration, verified bool) string {
	phase := m.GetPhase()
	switch {
	case verified:
		return "start the VM on the destination host: it owns the devices now. The source devices rest in STOP; " +
			"give one to a new VM on the source host with 'ferry release --source ADDR DEVICE'"
	case phase == ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED:
		// The source committed but the destination did not confirm.
		return "the source committed the migration, so the destination owns the devices, but the destination did not report them verified " +
			"(ask it: DestAgent.GetIncoming " + m.GetId() + "); do not run the VM on the source"
	case !wire.Final(phase):
		return "the migration's end is unknown: ask the source (SourceAgent.GetMigration " + m.GetId() + "), which owns the commit. " +
			"Run the VM on the destination only once the source reports SUCCEEDED"
	case m.GetOwner() == ferryv1.DeviceOwner_DEVICE_OWNER_DESTINATION:
		return "the source reports the destination as the owner: run the VM on the destination host"
	default:
		why := "fix the cause in the error above"
		if phase == ferryv1.MigrationPhase_MIGRATION_PHASE_CANCELLED {
			why = "run it again when wanted"
		}
		next := "the VM keeps its devices on the source host (back in RUNNING); " + why + ", with a new --id"
		if incoming != nil && !wire.Final(incoming.GetPhase()) {
			next += "; the destination still reports " + phaseName(incoming.GetPhase()) + ": cancel it with DestAgent.CancelIncoming " + m.GetId()
		}
		return next
	}
}

// compression is the request's chunk compression for --compress.
func compression(on bool) ferryv1.ChunkCompression {
	if on {
		return ferryv1.ChunkCompression_CHUNK_COMPRESSION_ZSTD
	}
	return ferryv1.ChunkCompression_CHUNK_COMPRESSION_UNSPECIFIED
}
