package dest

import (
	"bytes"
	"context"
	"encoding/base64"
	"io"
	"net"
	"net/url"
	"runtime"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	spb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/services/chunkwire"
	"github.com/vfio-ferry/ferry/services/grpcserver"
	"github.com/vfio-ferry/ferry/services/peerauth"
	"github.com/vfio-ferry/ferry/services/peerauth/peerauthtest"
	"github.com/vfio-ferry/ferry/services/wire"
	"github.com/vfio-ferry/ferry/services/wire/wiretest"
)

// The tests in this file send a live destination agent what no honest
// source sends: messages that lie about their length, messages beyond the
// size limit, and calls on another source's session. Each is refused with
// its code and ErrorInfo reason, nothing is allocated for what a message
// only declares, and the agent goes on serving the honest session.

// serveAgent runs a destination agent on loopback with creds and access
// rules, as `ferry dest` wires it.
func serveAgent(t *testing.T, creds credentials.TransportCredentials, access []peerauth.AccessRule) (string, *Agent, *vfio.Registry) {
	t.Helper()
	reg := vfio.NewRegistry(vfio.RegistryOptions{AllowSim: true})
	pool := chunkwire.NewPool()
	agent, err := New(Config{Registry: reg, Pool: pool, MaxChunks: 8, MaxBytes: 128 << 10, MemoryBudget: 64 << 20})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { reg.Close() })
	srv := grpcserver.New(grpcserver.Config{Creds: creds, Pool: pool, Access: access})
	agent.Register(srv)
	srv.Ready()
	addr := wiretest.Serve(t, srv.GRPC)
	t.Cleanup(agent.Close)
	return addr, agent, reg
}

func dialAgent(t *testing.T, addr string, creds credentials.TransportCredentials) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpcserver.DialOptions(creds, nil)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// openOne prepares and opens a one-device session of the device
// spec(seed) with channels channels.
func openOne(t *testing.T, ctl ferryv1.DestAgentClient, tr ferryv1.TransferClient, id string, seed int, channels uint32) string {
	t.Helper()
	prep, err := ctl.PrepareIncoming(t.Context(), &ferryv1.PrepareIncomingRequest{MigrationId: id, Devices: []string{spec(seed)}})
	if err != nil {
		t.Fatalf("prepare %s: %v", id, err)
	}
	resp, err := tr.Open(t.Context(), &ferryv1.OpenRequest{MigrationId: id, Token: prep.GetToken(), Devices: []string{spec(seed)}, ChunkSize: testChunk, Channels: channels, Features: wire.Supported.List()})
	if err != nil {
		t.Fatalf("open %s: %v", id, err)
	}
	return resp.GetSessionId()
}

func channelCtx(ctx context.Context, session string, index int) context.Context {
	return metadata.AppendToOutgoingContext(ctx, wire.HeaderSession, session, wire.HeaderChannel, strconv.Itoa(index))
}

// completeHonestly sends the whole state of spec(seed) and its END on a
// fresh channel 0 of session and checks that incoming migration id
// succeeds. (It watches the migration rather than calling Finish, which
// may come after the session has been cleaned up; see the report.)
func completeHonestly(t *testing.T, ctl ferryv1.DestAgentClient, tr ferryv1.TransferClient, id, session string, seed int) {
	t.Helper()
	state := sourceState(t, seed)
	st, err := tr.Channel(channelCtx(t.Context(), session, 0))
	if err != nil {
		t.Fatal(err)
	}
	digest, _ := chunkwire.NewDigest(ferryv1.DigestAlgorithm_DIGEST_ALGORITHM_UNSPECIFIED)
	for i := range 4 {
		c := state[i*testChunk : (i+1)*testChunk]
		send(t, st, dataChunk(uint64(i), c), c)
		digest.Add(uint64(i*testChunk), c, chunkwire.CRC32C(c))
	}
	send(t, st, &ferryv1.ChannelRequest{Seq: 4, Offset: testSize, Kind: ferryv1.ChunkKind_CHUNK_KIND_END, TotalBytes: testSize, TotalChunks: 4, Digest: digest.Sum()}, nil)
	last := commitVerified(t, ctl, tr, id, session)
	if last.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED || !last.GetDevices()[0].GetVerified() {
		t.Fatalf("the honest session ended %v: %v", last.GetPhase(), last.GetError())
	}
}

// rawCodec sends a []byte as the message, unchanged: a hand-built
// protobuf.
type rawCodec struct{}

func (rawCodec) Name() string { return "proto" }
func (rawCodec) Marshal(v any) (mem.BufferSlice, error) {
	return mem.BufferSlice{mem.SliceBuffer(*v.(*[]byte))}, nil
}
func (rawCodec) Unmarshal(data mem.BufferSlice, v any) error {
	*v.(*[]byte) = data.Materialize()
	return nil
}

// recvStatus reads a stream until it fails and returns its status.
func recvStatus(t *testing.T, st grpc.ClientStream) error {
	t.Helper()
	for {
		var b []byte
		if err := st.RecvMsg(&b); err != nil {
			if err == io.EOF {
				t.Fatal("the stream ended without an error")
			}
			return err
		}
	}
}

func TestHostileMessages(t *testing.T) {
	addr, agent, _ := serveAgent(t, insecure.NewCredentials(), nil)
	conn := dialAgent(t, addr, insecure.NewCredentials())
	ctl, tr := ferryv1.NewDestAgentClient(conn), ferryv1.NewTransferClient(conn)
	// Every hostile stream takes a channel index of its own: when gRPC
	// refuses a message itself, its status reaches the client before the
	// handler has let go of the index.
	session := openOne(t, ctl, tr, "target", 1, 16)
	next := 0
	index := func() int { next++; return next }

	check := func(name string, err error, code codes.Code, reason string) {
		t.Helper()
		if wire.Code(err) != code || wire.Reason(err) != reason {
			t.Fatalf("%s: %v (reason %q), want %v %s", name, err, wire.Reason(err), code, reason)
		}
	}

	// A data field that declares 2^40 bytes and carries a few: refused as
	// malformed, with nothing allocated for the declared length.
	huge := func() []byte {
		b, _ := proto.Marshal(&ferryv1.ChannelRequest{Seq: 0, Kind: ferryv1.ChunkKind_CHUNK_KIND_DATA, Crc32C: 1})
		b = protowire.AppendTag(b, 15, protowire.BytesType)
		b = protowire.AppendVarint(b, 1<<40)
		return append(b, "a few bytes"...)
	}()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	raw, err := conn.NewStream(channelCtx(t.Context(), session, index()), &ferryv1.Transfer_ServiceDesc.Streams[0], ferryv1.Transfer_Channel_FullMethodName, grpc.ForceCodecV2(rawCodec{}))
	if err != nil {
		t.Fatal(err)
	}
	if err := raw.SendMsg(&huge); err != nil && err != io.EOF {
		t.Fatal(err)
	}
	check("2^40 bytes declared", recvStatus(t, raw), codes.InvalidArgument, wire.ReasonBadChunk)
	runtime.ReadMemStats(&after)
	if grew := after.TotalAlloc - before.TotalAlloc; grew > 64<<20 {
		t.Errorf("a message declaring 2^40 bytes cost %d bytes of allocation", grew)
	}

	// A message beyond MaxRecvMsgSize, really sent.
	big := make([]byte, wire.MaxRecvMsgSize)
	st, err := tr.Channel(channelCtx(t.Context(), session, index()), grpc.MaxCallSendMsgSize(2*wire.MaxRecvMsgSize))
	if err != nil {
		t.Fatal(err)
	}
	send(t, st, dataChunk(0, big), big)
	// The server's codec refuses it, with a reason (grpcserver/recverr.go).
	check("a message of MaxRecvMsgSize+header", streamError(t, st), codes.ResourceExhausted, wire.ReasonMessageTooLarge)

	// A gRPC frame whose length prefix declares 4 GiB, sent on a raw
	// HTTP/2 connection: refused by gRPC from the 5-byte prefix alone,
	// which writes its own status, without an ErrorInfo (a reason would
	// need the message read).
	runtime.ReadMemStats(&before)
	err = rawFrameStatus(t, addr, session, index(), []byte{0, 0xff, 0xff, 0xff, 0xff})
	runtime.ReadMemStats(&after)
	if wire.Code(err) != codes.ResourceExhausted || !strings.Contains(wire.Message(err), "larger than max") {
		t.Fatalf("a 4 GiB length prefix: %v, want RESOURCE_EXHAUSTED (larger than max)", err)
	}
	if grew := after.TotalAlloc - before.TotalAlloc; grew > 64<<20 {
		t.Errorf("a frame declaring 4 GiB cost %d bytes of allocation", grew)
	}
	// A frame that claims to be compressed when no compression was
	// negotiated: gRPC's framing layer refuses it (INTERNAL, its own
	// status, like the size limit).
	if err := rawFrameStatus(t, addr, session, index(), []byte{1, 0, 0, 0, 1, 0}); wire.Code(err) != codes.Internal || !strings.Contains(wire.Message(err), "compressed flag") {
		t.Fatalf("a compressed frame without an encoding: %v", err)
	}

	// Messages that are not protobuf, each on its own stream.
	// (A known field with the wrong wire type is not among them: protobuf
	// reads it as an unknown field, and the empty chunk that remains is
	// refused as such, failing the session.)
	for _, m := range []struct {
		name string
		msg  []byte
	}{
		{"truncated varint", []byte{0x10, 0xff}},
		{"digest longer than sent", []byte{0x42, 0x20, 0x01}},
		{"unterminated group", []byte{0x0b}},
		{"field number 0", []byte{0x00, 0x01}},
	} {
		name, msg := m.name, m.msg
		raw, err := conn.NewStream(channelCtx(t.Context(), session, index()), &ferryv1.Transfer_ServiceDesc.Streams[0], ferryv1.Transfer_Channel_FullMethodName, grpc.ForceCodecV2(rawCodec{}))
		if err != nil {
			t.Fatal(err)
		}
		if err := raw.SendMsg(&msg); err != nil && err != io.EOF {
			t.Fatal(err)
		}
		if err := recvStatus(t, raw); wire.Code(err) != codes.InvalidArgument || wire.Reason(err) != wire.ReasonBadChunk {
			t.Errorf("%s: %v (reason %q), want INVALID_ARGUMENT %s", name, err, wire.Reason(err), wire.ReasonBadChunk)
		}
	}

	// None of it harmed the session or the agent.
	completeHonestly(t, ctl, tr, "target", session, 1)
	if _, err := ctl.PrepareIncoming(t.Context(), &ferryv1.PrepareIncomingRequest{MigrationId: "next", Devices: []string{spec(2)}}); err != nil {
		t.Fatalf("the agent stopped serving: %v", err)
	}
	if _, err := ctl.CancelIncoming(t.Context(), &ferryv1.CancelIncomingRequest{MigrationId: "next"}); err != nil {
		t.Fatal(err)
	}
	if n := agent.BudgetInUse(); n != 0 {
		t.Errorf("budget in use at the end: %d", n)
	}
}

// rawFrameStatus opens a channel of session on a raw HTTP/2 connection,
// sends frame as the first DATA of the stream and returns the gRPC status
// the agent answers with.
func rawFrameStatus(t *testing.T, addr, session string, index int, frame []byte) error {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte(http2.ClientPreface)); err != nil {
		t.Fatal(err)
	}
	fr := http2.NewFramer(c, c)
	fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	if err := fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	var block bytes.Buffer
	enc := hpack.NewEncoder(&block)
	for _, f := range [][2]string{
		{":method", "POST"}, {":scheme", "http"}, {":path", ferryv1.Transfer_Channel_FullMethodName}, {":authority", addr},
		{"content-type", "application/grpc"}, {"te", "trailers"}, {wire.HeaderSession, session}, {wire.HeaderChannel, strconv.Itoa(index)},
	} {
		enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
	}
	if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block.Bytes(), EndHeaders: true}); err != nil {
		t.Fatal(err)
	}
	if err := fr.WriteData(1, false, frame); err != nil {
		t.Fatal(err)
	}
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			t.Fatalf("the agent closed the connection without a status: %v", err)
		}
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if !f.IsAck() {
				fr.WriteSettingsAck()
			}
		case *http2.PingFrame:
			if !f.IsAck() {
				fr.WritePing(true, f.Data)
			}
		case *http2.RSTStreamFrame:
			t.Fatalf("the agent reset the stream (%v) without a status", f.ErrCode)
		case *http2.GoAwayFrame:
			t.Fatalf("the agent sent GOAWAY (%v)", f.ErrCode)
		case *http2.MetaHeadersFrame:
			if !f.StreamEnded() {
				continue // the response headers; the status is in the trailers
			}
			code, msg, details := "", "", ""
			for _, h := range f.Fields {
				switch h.Name {
				case "grpc-status":
					code = h.Value
				case "grpc-message":
					msg, _ = url.PathUnescape(h.Value)
				case "grpc-status-details-bin":
					details = h.Value
				}
			}
			if details == "" {
				n, _ := strconv.Atoi(code)
				return status.Error(codes.Code(n), msg)
			}
			b, err := base64.RawStdEncoding.DecodeString(details)
			if err != nil {
				t.Fatal(err)
			}
			var sp spb.Status
			if err := proto.Unmarshal(b, &sp); err != nil {
				t.Fatal(err)
			}
			return status.FromProto(&sp).Err()
		}
	}
}

const (
	controlPlane = "spiffe://ferry.test/control-plane"
	sourceA      = "spiffe://ferry.test/node-a"
	sourceB      = "spiffe://ferry.test/node-b"
)

func TestSessionIsBoundToItsSourceIdentity(t *testing.T) {
	ca := peerauthtest.NewCA(t, "ferry test CA")
	screds, _, err := peerauth.AgentTLS(ca.Issue(t, "localhost", "127.0.0.1", "spiffe://ferry.test/node-dest"))
	if err != nil {
		t.Fatal(err)
	}
	addr, _, _ := serveAgent(t, screds, []peerauth.AccessRule{
		{Services: []string{ferryv1.DestAgent_ServiceDesc.ServiceName}, Allow: []string{controlPlane}, Flag: "--allow-client"},
		{Services: []string{ferryv1.Transfer_ServiceDesc.ServiceName}, Allow: []string{sourceA, sourceB}, Flag: "--allow-peer"},
	})
	as := func(sans ...string) *grpc.ClientConn {
		c, err := peerauth.ClientTLS(ca.Issue(t, sans...), "")
		if err != nil {
			t.Fatal(err)
		}
		return dialAgent(t, addr, credentials.NewTLS(c))
	}
	ctl := ferryv1.NewDestAgentClient(as(controlPlane))
	a := ferryv1.NewTransferClient(as(sourceA, "node-a.ferry.test"))
	b := ferryv1.NewTransferClient(as(sourceB))
	// Another certificate with A's names is A (a renewed certificate).
	aRenewed := ferryv1.NewTransferClient(as(sourceA, "node-a.ferry.test"))
	// A certificate with A's URI but not its DNS name is not A.
	aPartial := ferryv1.NewTransferClient(as(sourceA))

	session := openOne(t, ctl, a, "bound", 1, 1)
	// A repeated prepare answers with the migration's token.
	prep, err := ctl.PrepareIncoming(t.Context(), &ferryv1.PrepareIncomingRequest{MigrationId: "bound", Devices: []string{spec(1)}})
	if err != nil {
		t.Fatal(err)
	}
	token := prep.GetToken()
	check := func(name string, err error) {
		t.Helper()
		if wire.Code(err) != codes.PermissionDenied || wire.Reason(err) != wire.ReasonPeerMismatch {
			t.Errorf("%s: %v (reason %q), want PERMISSION_DENIED %s", name, err, wire.Reason(err), wire.ReasonPeerMismatch)
		}
	}
	for name, other := range map[string]ferryv1.TransferClient{"B": b, "A's URI alone": aPartial} {
		st, err := other.Channel(channelCtx(t.Context(), session, 0))
		if err == nil {
			_, err = st.Recv()
		}
		check(name+": Channel", err)
		_, err = other.SwitchoverStart(t.Context(), &ferryv1.SwitchoverStartRequest{SessionId: session})
		check(name+": SwitchoverStart", err)
		_, err = other.Finish(t.Context(), &ferryv1.FinishRequest{SessionId: session})
		check(name+": Finish", err)
		_, err = other.Commit(t.Context(), &ferryv1.CommitRequest{SessionId: session})
		check(name+": Commit", err)
		_, err = other.Abort(t.Context(), &ferryv1.AbortRequest{SessionId: session, Reason: "hijack"})
		check(name+": Abort", err)
		// Naming the session by its migration and token is no way round.
		_, err = other.Abort(t.Context(), &ferryv1.AbortRequest{MigrationId: "bound", Token: token, Reason: "hijack"})
		check(name+": Abort by token", err)
	}
	// The control plane may not use Transfer at all.
	_, err = ferryv1.NewTransferClient(as(controlPlane)).Finish(t.Context(), &ferryv1.FinishRequest{SessionId: session})
	if wire.Code(err) != codes.PermissionDenied || wire.Reason(err) != wire.ReasonClientNotAllowed {
		t.Errorf("control plane on Transfer: %v", err)
	}
	// Nor may a source drive the destination's control plane.
	_, err = ferryv1.NewDestAgentClient(as(sourceB)).CancelIncoming(t.Context(), &ferryv1.CancelIncomingRequest{MigrationId: "bound"})
	if wire.Code(err) != codes.PermissionDenied || wire.Reason(err) != wire.ReasonClientNotAllowed {
		t.Errorf("source on DestAgent: %v", err)
	}
	if t.Failed() {
		return
	}
	// The owner, under a renewed certificate, completes the migration.
	completeHonestly(t, ctl, aRenewed, "bound", session, 1)
}

// TestHostileChunkSequences extends TestMisbehavingSource: more orders of
// chunks and END that no honest source produces.
func TestHostileChunkSequences(t *testing.T) {
	h := newHarness(t)
	state := sourceState(t, 1)
	chunk := func(i int) []byte { return state[i*testChunk : (i+1)*testChunk] }
	end := func(seq uint64, digest []byte) *ferryv1.ChannelRequest {
		return &ferryv1.ChannelRequest{Seq: seq, Offset: seq * testChunk, Kind: ferryv1.ChunkKind_CHUNK_KIND_END, TotalBytes: seq * testChunk, TotalChunks: seq, Digest: digest}
	}
	cases := []struct {
		name   string
		play   func(st channel)
		code   codes.Code
		reason string
	}{
		{"END with a digest beyond the limit", func(st channel) {
			send(t, st, end(0, make([]byte, wire.MaxDigestLength+1)), nil)
		}, codes.InvalidArgument, wire.ReasonBadChunk},
		{"END whose totals disagree with its position", func(st channel) {
			c := end(1, []byte{1})
			c.TotalChunks = 7
			send(t, st, c, nil)
		}, codes.InvalidArgument, wire.ReasonBadChunk},
		{"END carrying data", func(st channel) {
			send(t, st, end(0, []byte{1}), chunk(0))
		}, codes.InvalidArgument, wire.ReasonBadChunk},
		{"DATA carrying END fields", func(st channel) {
			c := dataChunk(0, chunk(0))
			c.TotalBytes = 1
			send(t, st, c, chunk(0))
		}, codes.InvalidArgument, wire.ReasonBadChunk},
		{"DATA without bytes", func(st channel) {
			send(t, st, dataChunk(0, nil), nil)
		}, codes.InvalidArgument, wire.ReasonBadChunk},
		{"END before the data it ends", func(st channel) {
			// END at seq 2 claims two chunks, then data arrives past it.
			send(t, st, end(2, []byte{1}), nil)
			send(t, st, dataChunk(3, chunk(3)), chunk(3))
		}, codes.InvalidArgument, wire.ReasonBadChunk},
		{"a second END at another seq", func(st channel) {
			send(t, st, end(1, []byte{1}), nil)
			send(t, st, end(2, []byte{2}), nil)
		}, codes.InvalidArgument, wire.ReasonBadChunk},
		{"END, then a lie about the bytes before it", func(st channel) {
			// END at seq 1 is held until chunk 0 arrives; chunk 0 is then
			// written, and the stream ends with 1 chunk of the wrong
			// digest: the verdict is DATA_LOSS, never VERIFIED.
			send(t, st, end(1, []byte{1}), nil)
			send(t, st, dataChunk(0, chunk(0)), chunk(0))
		}, codes.DataLoss, wire.ReasonDigestMismatch},
		{"a chunk far beyond the window", func(st channel) {
			c := dataChunk(1<<62, chunk(0))
			send(t, st, c, chunk(0))
		}, codes.OutOfRange, wire.ReasonOutsideWindow},
		{"an offset that wraps around", func(st channel) {
			c := dataChunk(0, chunk(0))
			c.Offset = 1<<64 - 8
			send(t, st, c, chunk(0))
		}, codes.OutOfRange, ""},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			id := "sequence-" + strconv.Itoa(i)
			session := h.open(id, 600+i)
			st := h.channel(session, 0)
			tc.play(st)
			err := streamError(t, st)
			if wire.Code(err) != tc.code || wire.Reason(err) == "" || (tc.reason != "" && wire.Reason(err) != tc.reason) {
				t.Fatalf("got %v (reason %q), want %v %s", err, wire.Reason(err), tc.code, tc.reason)
			}
			h.waitReleased(id, spec(600+i))
			// The migration failed for the same reason.
			inc, err := h.dest.GetIncoming(t.Context(), &ferryv1.GetIncomingRequest{MigrationId: id})
			if e := inc.GetMigration().GetError(); err != nil || codes.Code(e.GetCode()) != tc.code || e.GetReason() == "" {
				t.Fatalf("incoming after the violation: %v, %v", e, err)
			}
		})
	}

	t.Run("channel without session headers", func(t *testing.T) {
		st, err := h.transfer.Channel(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		if err := streamError(t, st); wire.Code(err) != codes.InvalidArgument || wire.Reason(err) != wire.ReasonSessionNotFound {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("chunks for a prepared but unopened migration", func(t *testing.T) {
		if _, err := h.dest.PrepareIncoming(t.Context(), &ferryv1.PrepareIncomingRequest{MigrationId: "unopened", Devices: []string{spec(700)}}); err != nil {
			t.Fatal(err)
		}
		// The migration id is not a session id.
		err := streamError(t, h.channel("unopened", 0))
		if wire.Code(err) != codes.NotFound || wire.Reason(err) != wire.ReasonSessionNotFound {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("a second channel with the same index", func(t *testing.T) {
		session := h.open("twice", 701)
		first := h.channel(session, 0)
		if _, err := first.Recv(); err != nil { // channel 0 is up
			t.Fatal(err)
		}
		// A channel that connects again (its old connection broke without
		// a FIN) replaces the old stream, which ends with ABORTED.
		second := h.channel(session, 0)
		if _, err := second.Recv(); err != nil {
			t.Fatalf("the replacing stream: %v", err)
		}
		err := streamError(t, first)
		if wire.Code(err) != codes.Aborted || wire.Reason(err) != wire.ReasonSessionState {
			t.Fatalf("the replaced stream ended with %v", err)
		}
	})
}
