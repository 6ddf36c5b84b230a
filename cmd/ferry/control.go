package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/services/wire"
)

// plan is one migration as a control plane asks for it.
type plan struct {
	id         string
	sourceAddr string // the source agent's SourceAgent address
	destAddr   string // the destination agent's DestAgent address
	transfer   string // the destination's Transfer address as the source reaches it
	pairs      []*ferryv1.DevicePair
	channels   uint32
	chunkSize  uint32
	maxChunks  uint32
	maxBytes   uint64
	creds      credentials.TransportCredentials
}

// result is what `ferry migrate --json` and `ferry demo --json` print.
type result struct {
	MigrationID              string         `json:"migration_id"`
	Verified                 bool           `json:"verified"`
	Phase                    string         `json:"phase"`
	Bytes                    uint64         `json:"bytes"`
	Devices                  int            `json:"devices"`
	Channels                 uint32         `json:"channels"`
	ChunkSize                uint32         `json:"chunk_size"`
	DurationSeconds          float64        `json:"duration_seconds"`
	ThroughputBytesPerSecond float64        `json:"throughput_bytes_per_second"`
	DowntimeSeconds          float64        `json:"downtime_seconds"`
	DestPeakBufferedBytes    uint64         `json:"dest_peak_buffered_bytes"`
	WindowBytes              uint64         `json:"window_bytes"`
	RetransmittedChunks      uint64         `json:"retransmitted_chunks"`
	DirectData               bool           `json:"direct_data"`
	Error                    *resultError   `json:"error,omitempty"`
	DeviceResults            []deviceResult `json:"device_results"`
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
}

func newMigrationID() string {
	var b [6]byte
	rand.Read(b[:])
	return "mig-" + hex.EncodeToString(b[:])
}

// migrate drives one migration: PrepareIncoming on the destination,
// StartMigration on the source, then it watches the source to the end,
// calling progress with every state. It cancels both sides when ctx ends
// first. The error is only for failures of the control plane itself; a
// migration that ran and failed is a result with Verified false.
func migrate(ctx context.Context, p plan, progress func(*ferryv1.Migration)) (*result, error) {
	opts := wire.DialOptions(p.creds, wire.NewPool())
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
	dst := ferryv1.NewDestAgentClient(dconn)
	src := ferryv1.NewSourceAgentClient(sconn)

	prep := &ferryv1.PrepareIncomingRequest{MigrationId: p.id, MaxChunks: p.maxChunks, MaxBytes: p.maxBytes}
	for _, pair := range p.pairs {
		prep.Devices = append(prep.Devices, pair.GetDestDevice())
	}
	cctx, cancel := context.WithTimeout(ctx, time.Minute)
	prepared, err := dst.PrepareIncoming(cctx, prep)
	cancel()
	if err != nil {
		return nil, fmt.Errorf("prepare the destination: %s", describe(err))
	}
	cancelIncoming := func() {
		c, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		dst.CancelIncoming(c, &ferryv1.CancelIncomingRequest{MigrationId: p.id})
	}
	cctx, cancel = context.WithTimeout(ctx, time.Minute)
	_, err = src.StartMigration(cctx, &ferryv1.StartMigrationRequest{
		MigrationId: p.id,
		DestAddress: p.transfer,
		Token:       prepared.GetToken(),
		Devices:     p.pairs,
		Channels:    p.channels,
		ChunkSize:   p.chunkSize,
		Mode:        ferryv1.MigrationMode_MIGRATION_MODE_STOP_COPY,
	})
	cancel()
	if err != nil {
		cancelIncoming()
		return nil, fmt.Errorf("start the migration at the source: %s", describe(err))
	}

	final, err := watch(ctx, src, p.id, progress)
	if err != nil {
		c, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		resp, cerr := src.CancelMigration(c, &ferryv1.CancelMigrationRequest{MigrationId: p.id})
		cancel()
		cancelIncoming()
		if cerr != nil || ctx.Err() == nil {
			return nil, fmt.Errorf("watch the migration: %s", describe(err))
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
		(incoming == nil || !isFinal(incoming.GetPhase())) {
		cancelIncoming()
		if resp, err := dst.GetIncoming(c, &ferryv1.GetIncomingRequest{MigrationId: p.id}); err == nil {
			incoming = resp.GetMigration()
		}
	}
	return summarize(final, incoming), nil
}

// watch follows a migration on the source to its final phase.
func watch(ctx context.Context, src ferryv1.SourceAgentClient, id string, progress func(*ferryv1.Migration)) (*ferryv1.Migration, error) {
	stream, err := src.WatchMigration(ctx, &ferryv1.WatchMigrationRequest{MigrationId: id})
	if err != nil {
		return nil, err
	}
	var last *ferryv1.Migration
	for {
		resp, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			if last == nil || !isFinal(last.GetPhase()) {
				return nil, errors.New("the watch ended before the migration did")
			}
			return last, nil
		}
		if err != nil {
			return nil, err
		}
		last = resp.GetMigration()
		if progress != nil {
			progress(last)
		}
	}
}

func isFinal(p ferryv1.MigrationPhase) bool {
	return p == ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED ||
		p == ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED ||
		p == ferryv1.MigrationPhase_MIGRATION_PHASE_CANCELLED
}

// describe renders a gRPC error with its code and reason.
func describe(err error) string {
	if r := wire.Reason(err); r != "" {
		return fmt.Sprintf("%s (%s, %s)", wire.Message(err), wire.Code(err), r)
	}
	return fmt.Sprintf("%s (%s)", wire.Message(err), wire.Code(err))
}

// summarize builds the result from the source's and the destination's
// final views.
func summarize(m, incoming *ferryv1.Migration) *result {
	r := &result{
		MigrationID:              m.GetId(),
		Phase:                    phaseName(m.GetPhase()),
		Verified:                 m.GetPhase() == ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED,
		Bytes:                    m.GetBytes(),
		Devices:                  len(m.GetDevices()),
		Channels:                 m.GetChannels(),
		ChunkSize:                m.GetChunkSize(),
		ThroughputBytesPerSecond: m.GetThroughputBytesPerSecond(),
		DowntimeSeconds:          m.GetDowntime().AsDuration().Seconds(),
		DestPeakBufferedBytes:    m.GetPeakBufferedBytes(),
		WindowBytes:              m.GetWindowBytes(),
		RetransmittedChunks:      m.GetRetransmittedChunks(),
		DirectData:               m.GetDirectData(),
	}
	if m.GetStartTime() != nil && m.GetEndTime() != nil {
		r.DurationSeconds = m.GetEndTime().AsTime().Sub(m.GetStartTime().AsTime()).Seconds()
	}
	if incoming != nil {
		r.DestPeakBufferedBytes = incoming.GetPeakBufferedBytes()
		r.WindowBytes = incoming.GetWindowBytes()
		r.Verified = r.Verified && incoming.GetPhase() == ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED
	}
	if e := m.GetError(); e != nil {
		r.Error = &resultError{Code: codeName(e.GetCode()), Reason: e.GetReason(), Message: e.GetMessage()}
	}
	for i, d := range m.GetDevices() {
		dr := deviceResult{Source: d.GetDevice(), Dest: d.GetPeerDevice(), Bytes: d.GetBytes(), SourceState: stateName(d.GetState()), Error: d.GetError()}
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
	return r
}
