package dest

import (
	"errors"
	"io"
	"strconv"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/metadata"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/services/chunkwire"
	"github.com/vfio-ferry/ferry/services/deviceapi"
	"github.com/vfio-ferry/ferry/services/grpcserver"
	"github.com/vfio-ferry/ferry/services/wire"
	"github.com/vfio-ferry/ferry/services/wire/wiretest"
)

// The tests in this file play a misbehaving source against a live
// destination agent: every violation must end that session with the right
// code and ErrorInfo reason, reset its device and release its budget,
// while another session on the same agent carries on.

const (
	testChunk = 16 << 10
	testSize  = 4 * testChunk
)

type harness struct {
	t        *testing.T
	agent    *Agent
	reg      *vfio.Registry
	dest     ferryv1.DestAgentClient
	transfer ferryv1.TransferClient
}

func newHarness(t *testing.T) *harness {
	t.Helper()
	reg := vfio.NewRegistry(vfio.RegistryOptions{AllowSim: true})
	pool := chunkwire.NewPool()
	agent, err := New(Config{Registry: reg, Pool: pool, MaxChunks: 8, MaxBytes: 128 << 10, MemoryBudget: 64 << 20})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { reg.Close() })
	srv := grpcserver.New(grpcserver.Config{Creds: insecure.NewCredentials(), Pool: pool})
	agent.Register(srv)
	srv.Ready()
	addr := wiretest.Serve(t, srv.GRPC)
	conn, err := grpc.NewClient(addr, grpcserver.DialOptions(insecure.NewCredentials(), chunkwire.NewPool())...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		conn.Close()
		agent.Close()
	})
	return &harness{t: t, agent: agent, reg: reg, dest: ferryv1.NewDestAgentClient(conn), transfer: ferryv1.NewTransferClient(conn)}
}

func spec(seed int) string { return "sim:size=64KiB,seed=" + strconv.Itoa(seed) }

// open prepares and opens a one-device session with one channel.
func (h *harness) open(id string, seed int) (session string) {
	h.t.Helper()
	prep, err := h.dest.PrepareIncoming(h.t.Context(), &ferryv1.PrepareIncomingRequest{MigrationId: id, Devices: []string{spec(seed)}})
	if err != nil {
		h.t.Fatalf("prepare %s: %v", id, err)
	}
	resp, err := h.transfer.Open(h.t.Context(), &ferryv1.OpenRequest{MigrationId: id, Token: prep.GetToken(), Devices: []string{spec(seed)}, ChunkSize: testChunk, Channels: 1, Features: wire.Supported.List()})
	if err != nil {
		h.t.Fatalf("open %s: %v", id, err)
	}
	return resp.GetSessionId()
}

type channel = grpc.BidiStreamingClient[ferryv1.ChannelRequest, ferryv1.ChannelResponse]

func (h *harness) channel(session string, index int) channel {
	h.t.Helper()
	ctx := metadata.AppendToOutgoingContext(h.t.Context(), "ferry-session-id", session, "ferry-channel", strconv.Itoa(index))
	st, err := h.transfer.Channel(ctx)
	if err != nil {
		h.t.Fatal(err)
	}
	return st
}

// sourceState is spec(seed)'s state (see stateOf).
func sourceState(t *testing.T, seed int) []byte {
	t.Helper()
	return stateOf(t, spec(seed))
}

// stateOf reads a sim device's state, as a source agent would.
func stateOf(tb testing.TB, devSpec string) []byte {
	tb.Helper()
	s, _ := vfio.ParseSpec(devSpec)
	d, err := vfio.NewSim(s)
	if err != nil {
		tb.Fatal(err)
	}
	stream, err := d.SetState(vfio.StateStopCopy)
	if err != nil {
		tb.Fatal(err)
	}
	b, err := io.ReadAll(stream)
	if err != nil {
		tb.Fatal(err)
	}
	return b
}

func send(t *testing.T, st channel, hdr *ferryv1.ChannelRequest, data []byte) {
	t.Helper()
	out := &chunkwire.OutChunk{Header: hdr}
	if data != nil {
		out.Payload = mem.SliceBuffer(data)
	}
	if err := st.SendMsg(out); err != nil && !errors.Is(err, io.EOF) {
		t.Fatalf("send: %v", err)
	}
}

func dataChunk(seq uint64, b []byte) *ferryv1.ChannelRequest {
	return &ferryv1.ChannelRequest{Seq: seq, Offset: seq * testChunk, Kind: ferryv1.ChunkKind_CHUNK_KIND_DATA, Crc32C: chunkwire.CRC32C(b)}
}

// streamError reads window updates until the stream fails.
func streamError(t *testing.T, st channel) error {
	t.Helper()
	for {
		if _, err := st.Recv(); err != nil {
			if errors.Is(err, io.EOF) {
				t.Fatal("the stream ended without an error")
			}
			return err
		}
	}
}

func TestMisbehavingSource(t *testing.T) {
	h := newHarness(t)
	state := sourceState(t, 1)
	chunk := func(i int) []byte { return state[i*testChunk : (i+1)*testChunk] }

	// An honest session stays open across every violation below.
	honest := h.open("honest", 1)
	hc := h.channel(honest, 0)
	send(t, hc, dataChunk(0, chunk(0)), chunk(0))
	send(t, hc, dataChunk(1, chunk(1)), chunk(1))

	cases := []struct {
		name   string
		play   func(st channel)
		code   codes.Code
		reason string
	}{
		{"outside the window", func(st channel) {
			send(t, st, dataChunk(8, chunk(0)), chunk(0))
		}, codes.OutOfRange, wire.ReasonOutsideWindow},
		{"unknown device", func(st channel) {
			c := dataChunk(0, chunk(0))
			c.Device = 3
			send(t, st, c, chunk(0))
		}, codes.InvalidArgument, wire.ReasonBadChunk},
		{"gap closed by a duplicate", func(st channel) {
			send(t, st, dataChunk(0, chunk(0)), chunk(0))
			// Chunk 1 claims chunk 0's bytes, at chunk 0's offset.
			c := dataChunk(1, chunk(0))
			c.Offset = 0
			send(t, st, c, chunk(0))
		}, codes.OutOfRange, ""},
		{"bad CRC", func(st channel) {
			c := dataChunk(0, chunk(0))
			c.Crc32C++
			send(t, st, c, chunk(0))
		}, codes.DataLoss, wire.ReasonChunkCRC},
		{"longer than the chunk size", func(st channel) {
			b := state[:testChunk+1]
			send(t, st, dataChunk(0, b), b)
		}, codes.InvalidArgument, wire.ReasonBadChunk},
		{"no kind", func(st channel) {
			c := dataChunk(0, chunk(0))
			c.Kind = ferryv1.ChunkKind_CHUNK_KIND_UNSPECIFIED
			send(t, st, c, chunk(0))
		}, codes.InvalidArgument, wire.ReasonBadChunk},
		{"data after END", func(st channel) {
			// END at seq 1 is held (chunk 0 has not come), so the data
			// beyond it meets it in the reassembly. (An END at the
			// frontier would be verified, and fail, before the data came.)
			send(t, st, &ferryv1.ChannelRequest{Seq: 1, Offset: testChunk, Kind: ferryv1.ChunkKind_CHUNK_KIND_END, TotalBytes: testChunk, TotalChunks: 1, Digest: []byte{1}}, nil)
			send(t, st, dataChunk(2, chunk(2)), chunk(2))
		}, codes.InvalidArgument, wire.ReasonBadChunk},
		{"a different chunk under a held seq", func(st channel) {
			send(t, st, dataChunk(2, chunk(2)), chunk(2))
			c := dataChunk(2, chunk(3))
			send(t, st, c, chunk(3))
		}, codes.InvalidArgument, wire.ReasonBadChunk},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			id := "hostile-" + strconv.Itoa(i)
			session := h.open(id, 100+i)
			st := h.channel(session, 0)
			tc.play(st)
			err := streamError(t, st)
			if wire.Code(err) != tc.code || wire.Reason(err) == "" || (tc.reason != "" && wire.Reason(err) != tc.reason) {
				t.Fatalf("got %v (reason %q), want %v %s", err, wire.Reason(err), tc.code, tc.reason)
			}
			inc, gerr := h.dest.GetIncoming(t.Context(), &ferryv1.GetIncomingRequest{MigrationId: id})
			if gerr != nil || inc.GetMigration().GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED {
				t.Fatalf("incoming after the violation: %v %v", inc.GetMigration().GetPhase(), gerr)
			}
			h.waitReleased(id, spec(100+i))
		})
	}

	t.Run("channel without a session", func(t *testing.T) {
		err := streamError(t, h.channel("no-such-session", 0))
		if wire.Code(err) != codes.NotFound || wire.Reason(err) != wire.ReasonSessionNotFound {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("channel index out of range", func(t *testing.T) {
		session := h.open("bad-index", 200)
		err := streamError(t, h.channel(session, 5))
		if wire.Code(err) != codes.InvalidArgument {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("wrong and reused token", func(t *testing.T) {
		prep, err := h.dest.PrepareIncoming(t.Context(), &ferryv1.PrepareIncomingRequest{MigrationId: "token", Devices: []string{spec(300)}})
		if err != nil {
			t.Fatal(err)
		}
		open := &ferryv1.OpenRequest{MigrationId: "token", Token: "not-the-token", Devices: []string{spec(300)}, ChunkSize: testChunk, Channels: 1}
		if _, err := h.transfer.Open(t.Context(), open); wire.Code(err) != codes.PermissionDenied || wire.Reason(err) != wire.ReasonBadToken {
			t.Fatalf("wrong token: %v", err)
		}
		open.Token = prep.GetToken()
		if _, err := h.transfer.Open(t.Context(), open); err != nil {
			t.Fatalf("right token: %v", err)
		}
		if _, err := h.transfer.Open(t.Context(), open); wire.Code(err) != codes.FailedPrecondition || wire.Reason(err) != wire.ReasonSessionState {
			t.Fatalf("reused token: %v", err)
		}
	})
	t.Run("open with a chunk size beyond the window", func(t *testing.T) {
		prep, err := h.dest.PrepareIncoming(t.Context(), &ferryv1.PrepareIncomingRequest{MigrationId: "big-chunks", Devices: []string{spec(400)}})
		if err != nil {
			t.Fatal(err)
		}
		_, err = h.transfer.Open(t.Context(), &ferryv1.OpenRequest{MigrationId: "big-chunks", Token: prep.GetToken(), Devices: []string{spec(400)}, ChunkSize: 1 << 20, Channels: 1})
		if wire.Code(err) != codes.InvalidArgument {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("switchover before every channel is up", func(t *testing.T) {
		prep, err := h.dest.PrepareIncoming(t.Context(), &ferryv1.PrepareIncomingRequest{MigrationId: "early", Devices: []string{spec(500)}})
		if err != nil {
			t.Fatal(err)
		}
		resp, err := h.transfer.Open(t.Context(), &ferryv1.OpenRequest{MigrationId: "early", Token: prep.GetToken(), Devices: []string{spec(500)}, ChunkSize: testChunk, Channels: 2})
		if err != nil {
			t.Fatal(err)
		}
		st := h.channel(resp.GetSessionId(), 0)
		if _, err := st.Recv(); err != nil { // the first window: channel 0 is up
			t.Fatal(err)
		}
		_, err = h.transfer.SwitchoverStart(t.Context(), &ferryv1.SwitchoverStartRequest{SessionId: resp.GetSessionId()})
		if wire.Code(err) != codes.Unavailable || wire.Reason(err) != wire.ReasonNotReady {
			t.Fatalf("got %v, want UNAVAILABLE %s", err, wire.ReasonNotReady)
		}
	})

	// The honest session completes and verifies.
	send(t, hc, dataChunk(3, chunk(3)), chunk(3))
	send(t, hc, dataChunk(2, chunk(2)), chunk(2))
	send(t, hc, dataChunk(1, chunk(1)), chunk(1)) // a resend: dropped
	digest, _ := chunkwire.NewDigest(ferryv1.DigestAlgorithm_DIGEST_ALGORITHM_UNSPECIFIED)
	for i := range 4 {
		digest.Add(uint64(i*testChunk), chunk(i), chunkwire.CRC32C(chunk(i)))
	}
	send(t, hc, &ferryv1.ChannelRequest{Seq: 4, Offset: testSize, Kind: ferryv1.ChunkKind_CHUNK_KIND_END, TotalBytes: testSize, TotalChunks: 4, Digest: digest.Sum()}, nil)
	verdict, err := h.transfer.Finish(t.Context(), &ferryv1.FinishRequest{SessionId: honest})
	if err != nil || !verdict.GetVerified() {
		t.Fatalf("the honest session: %v, verified %v", err, verdict.GetVerified())
	}
	inc, _ := h.dest.GetIncoming(t.Context(), &ferryv1.GetIncomingRequest{MigrationId: "honest"})
	if m := inc.GetMigration(); m.GetDuplicateChunks() != 1 || m.GetDevices()[0].GetDuplicateChunks() != 1 || m.GetRetransmittedChunks() != 0 {
		t.Errorf("duplicates counted: %d (device %d), retransmitted %d; want 1, 1 and 0 (the destination sends nothing again)",
			m.GetDuplicateChunks(), m.GetDevices()[0].GetDuplicateChunks(), m.GetRetransmittedChunks())
	}
}

// waitReleased waits for a failed migration's clean-up and checks that its
// device was reset and released.
func (h *harness) waitReleased(id, devSpec string) {
	h.t.Helper()
	h.agent.mu.Lock()
	inc := h.agent.incoming[id]
	h.agent.mu.Unlock()
	<-inc.done
	canon, _ := deviceapi.CanonicalSpec(devSpec)
	for _, d := range h.reg.List() {
		if d.Spec == canon {
			if d.State != vfio.StateRunning || d.Owner != "" {
				h.t.Fatalf("device %s: state %v, owner %q after the failure; want RUNNING and free", canon, d.State, d.Owner)
			}
			return
		}
	}
	h.t.Fatalf("device %s not in the registry", canon)
}
