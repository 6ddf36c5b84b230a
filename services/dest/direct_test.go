package dest

import (
	"crypto/tls"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"strconv"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/services/chunkwire"
	"github.com/vfio-ferry/ferry/services/peerauth"
	"github.com/vfio-ferry/ferry/services/peerauth/peerauthtest"
	"github.com/vfio-ferry/ferry/services/wire"
	"github.com/vfio-ferry/ferry/services/wire/wiretest"
)

// The tests in this file attach direct data connections to Channel
// streams: only the stream's key, once, and only from the session's own
// source identity; a connection that breaks the framing ends its stream
// with the reason; an honest one carries a whole migration.

// serveData runs the agent's direct data listener and returns its address.
func serveData(t *testing.T, agent *Agent, creds credentials.TransportCredentials) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- agent.ServeData(lis, creds) }()
	t.Cleanup(func() {
		lis.Close()
		if err := <-done; err != nil {
			t.Errorf("ServeData: %v", err)
		}
	})
	return lis.Addr().String()
}

// openDirect prepares and opens a one-device session of spec(seed) that
// asks for direct data, and opens its channel 0: it returns the stream
// and the data key of its first response.
func openDirect(t *testing.T, ctl ferryv1.DestAgentClient, tr ferryv1.TransferClient, id string, seed int) (channel, []byte) {
	t.Helper()
	prep, err := ctl.PrepareIncoming(t.Context(), &ferryv1.PrepareIncomingRequest{MigrationId: id, Devices: []string{spec(seed)}})
	if err != nil {
		t.Fatalf("prepare %s: %v", id, err)
	}
	resp, err := tr.Open(t.Context(), &ferryv1.OpenRequest{MigrationId: id, Token: prep.GetToken(), Devices: []string{spec(seed)}, ChunkSize: testChunk, Channels: 1, DirectData: true})
	if err != nil {
		t.Fatalf("open %s: %v", id, err)
	}
	if resp.GetDataPort() == 0 {
		t.Fatalf("open %s: no data port offered", id)
	}
	st, err := tr.Channel(channelCtx(t.Context(), resp.GetSessionId(), 0))
	if err != nil {
		t.Fatal(err)
	}
	first, err := st.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if len(first.GetDataKey()) != chunkwire.DataKeyLen {
		t.Fatalf("first response: a data key of %d bytes", len(first.GetDataKey()))
	}
	return st, first.GetDataKey()
}

// dataConn connects to the data listener and writes the preamble.
func dataConn(t *testing.T, addr string, tlsCfg *tls.Config, magic string, key []byte) net.Conn {
	t.Helper()
	var conn net.Conn
	var err error
	if tlsCfg != nil {
		conn, err = tls.Dial("tcp", addr, tlsCfg)
	} else {
		conn, err = net.Dial("tcp", addr)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	if _, err := conn.Write(append([]byte(magic), key...)); err != nil {
		t.Fatal(err)
	}
	return conn
}

// closedByPeer reports whether the agent closed conn (it never writes).
func closedByPeer(conn net.Conn) bool {
	var b [1]byte
	_, err := conn.Read(b[:])
	return err != nil
}

// sendState sends spec(seed)'s whole state and END on w.
func sendState(t *testing.T, w *chunkwire.DirectWriter, seed int) {
	t.Helper()
	state := sourceState(t, seed)
	digest, _ := chunkwire.NewDigest(ferryv1.DigestAlgorithm_DIGEST_ALGORITHM_UNSPECIFIED)
	for i := range testSize / testChunk {
		c := state[i*testChunk : (i+1)*testChunk]
		if err := w.Write(dataChunk(uint64(i), c), c); err != nil {
			t.Fatal(err)
		}
		digest.Add(uint64(i*testChunk), c, chunkwire.CRC32C(c))
	}
	n := uint64(testSize / testChunk)
	if err := w.Write(&ferryv1.ChannelRequest{Seq: n, Offset: testSize, Kind: ferryv1.ChunkKind_CHUNK_KIND_END, TotalBytes: testSize, TotalChunks: n, Digest: digest.Sum()}, nil); err != nil {
		t.Fatal(err)
	}
}

// waitSettled watches an incoming migration until its verdict is in:
// VERIFIED or a final phase.
func waitSettled(t *testing.T, ctl ferryv1.DestAgentClient, id string) *ferryv1.Migration {
	t.Helper()
	watch, err := ctl.WatchIncoming(t.Context(), &ferryv1.WatchIncomingRequest{MigrationId: id})
	if err != nil {
		t.Fatal(err)
	}
	for {
		resp, err := watch.Recv()
		if err != nil {
			t.Fatalf("watch %s: %v", id, err)
		}
		if m := resp.GetMigration(); settled(m.GetPhase()) {
			return m
		}
	}
}

// commitVerified waits for incoming migration id's verdict and, when it
// is VERIFIED (its devices held, the owner in doubt), commits session as
// the source does; it returns the migration at its end.
func commitVerified(t *testing.T, ctl ferryv1.DestAgentClient, tr ferryv1.TransferClient, id, session string) *ferryv1.Migration {
	t.Helper()
	m := waitSettled(t, ctl, id)
	if m.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_VERIFIED {
		return m
	}
	if m.GetOwner() != ferryv1.DeviceOwner_DEVICE_OWNER_IN_DOUBT {
		t.Fatalf("a verified migration reports owner %v, want IN_DOUBT", m.GetOwner())
	}
	if _, err := tr.Commit(t.Context(), &ferryv1.CommitRequest{SessionId: session}); err != nil {
		t.Fatalf("commit %s: %v", id, err)
	}
	m = waitPhase(t, ctl, id)
	if m.GetPhase() == ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED && m.GetOwner() != ferryv1.DeviceOwner_DEVICE_OWNER_DESTINATION {
		t.Fatalf("a committed migration reports owner %v, want DESTINATION", m.GetOwner())
	}
	return m
}

// waitPhase watches an incoming migration to its end.
func waitPhase(t *testing.T, ctl ferryv1.DestAgentClient, id string) *ferryv1.Migration {
	t.Helper()
	watch, err := ctl.WatchIncoming(t.Context(), &ferryv1.WatchIncomingRequest{MigrationId: id})
	if err != nil {
		t.Fatal(err)
	}
	last, _ := wiretest.LastMigration(watch.Recv)
	return last
}

func TestDirectData(t *testing.T) {
	creds := insecure.NewCredentials()
	addr, agent, _ := serveAgent(t, creds, nil)
	conn := dialAgent(t, addr, creds)
	ctl, tr := ferryv1.NewDestAgentClient(conn), ferryv1.NewTransferClient(conn)

	// Without a data listener nothing is offered, whatever the source asks.
	prep, err := ctl.PrepareIncoming(t.Context(), &ferryv1.PrepareIncomingRequest{MigrationId: "no-listener", Devices: []string{spec(9)}})
	if err != nil {
		t.Fatal(err)
	}
	resp, err := tr.Open(t.Context(), &ferryv1.OpenRequest{MigrationId: "no-listener", Token: prep.GetToken(), Devices: []string{spec(9)}, ChunkSize: testChunk, Channels: 1, DirectData: true})
	if err != nil || resp.GetDataPort() != 0 {
		t.Fatalf("open without a data listener: port %d, %v", resp.GetDataPort(), err)
	}

	daddr := serveData(t, agent, creds)
	_, key := openDirect(t, ctl, tr, "honest", 1)

	if c := dataConn(t, daddr, nil, "NOTFERRY", key); !closedByPeer(c) {
		t.Error("a connection with another magic stays open")
	}
	other := make([]byte, chunkwire.DataKeyLen)
	if c := dataConn(t, daddr, nil, chunkwire.DirectMagic, other); !closedByPeer(c) {
		t.Error("a connection with an unknown key stays open")
	}
	// The right key (still unspent: the refused connections did not spend
	// it) carries the whole migration.
	sendState(t, chunkwire.NewDirectWriter(dataConn(t, daddr, nil, chunkwire.DirectMagic, key)), 1)
	if m := commitVerified(t, ctl, tr, "honest", sessionOf(t, agent, "honest")); m.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED || !m.GetDevices()[0].GetVerified() {
		t.Fatalf("the honest session ended %v: %v", m.GetPhase(), m.GetError())
	}
	if c := dataConn(t, daddr, nil, chunkwire.DirectMagic, key); !closedByPeer(c) {
		t.Error("a spent key attaches a second connection")
	}

	// A frame that breaks the framing ends the stream with its reason.
	frame := func(h, p uint32, rest ...byte) []byte {
		b := binary.BigEndian.AppendUint32(nil, h)
		return append(binary.BigEndian.AppendUint32(b, p), rest...)
	}
	for i, tc := range []struct {
		name   string
		frame  []byte
		code   codes.Code
		reason string
	}{
		{"a header beyond MaxDirectHeader", frame(chunkwire.MaxDirectHeader+1, 0), codes.InvalidArgument, wire.ReasonBadChunk},
		{"more data than a chunk", frame(4, testChunk+1), codes.InvalidArgument, wire.ReasonBadChunk},
		{"a header that does not decode", frame(2, 0, 0xff, 0xff), codes.InvalidArgument, wire.ReasonBadChunk},
	} {
		id := "bad-frame-" + strconv.Itoa(i)
		st, key := openDirect(t, ctl, tr, id, 10+i)
		c := dataConn(t, daddr, nil, chunkwire.DirectMagic, key)
		if _, err := c.Write(tc.frame); err != nil {
			t.Fatal(err)
		}
		if err := streamError(t, st); wire.Code(err) != tc.code || wire.Reason(err) != tc.reason {
			t.Errorf("%s: %v (reason %q), want %v %s", tc.name, err, wire.Reason(err), tc.code, tc.reason)
		}
	}

	// A chunk whose bytes do not match its CRC fails the migration.
	st, key := openDirect(t, ctl, tr, "bad-crc", 20)
	w := chunkwire.NewDirectWriter(dataConn(t, daddr, nil, chunkwire.DirectMagic, key))
	state := sourceState(t, 20)[:testChunk]
	hdr := dataChunk(0, state)
	hdr.Crc32C++
	if err := w.Write(hdr, state); err != nil {
		t.Fatal(err)
	}
	if err := streamError(t, st); wire.Code(err) != codes.DataLoss || wire.Reason(err) != wire.ReasonChunkCRC {
		t.Errorf("bad CRC: %v (reason %q)", err, wire.Reason(err))
	}
	if m := waitPhase(t, ctl, "bad-crc"); m.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED {
		t.Errorf("bad CRC: the migration ended %v", m.GetPhase())
	}
}

func TestDirectDataIsBoundToTheSourceIdentity(t *testing.T) {
	ca := peerauthtest.NewCA(t, "ferry test CA")
	screds, _, err := peerauth.AgentTLS(ca.Issue(t, "localhost", "127.0.0.1", "spiffe://ferry.test/node-dest"))
	if err != nil {
		t.Fatal(err)
	}
	addr, agent, _ := serveAgent(t, screds, nil)
	daddr := serveData(t, agent, screds)
	tlsAs := func(sans ...string) *tls.Config {
		c, err := peerauth.ClientTLS(ca.Issue(t, sans...), "127.0.0.1")
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	a := tlsAs(sourceA)
	conn := dialAgent(t, addr, credentials.NewTLS(a))
	ctl, tr := ferryv1.NewDestAgentClient(conn), ferryv1.NewTransferClient(conn)

	st, key := openDirect(t, ctl, tr, "bound", 1)
	// Another identity with the stream's key is refused (and spends it).
	if c := dataConn(t, daddr, tlsAs(sourceB), chunkwire.DirectMagic, key); !closedByPeer(c) {
		t.Error("another identity's data connection stays open")
	}
	// Plaintext is no way in either.
	if c := dataConn(t, daddr, nil, chunkwire.DirectMagic, key); !closedByPeer(c) {
		t.Error("a plaintext data connection stays open on a TLS agent")
	}
	// The source itself, on a new stream of the session (its own key),
	// completes the migration.
	st.CloseSend()
	session := sessionOf(t, agent, "bound")
	st2, err := tr.Channel(channelCtx(t.Context(), session, 0))
	if err != nil {
		t.Fatal(err)
	}
	first, err := st2.Recv()
	if err != nil {
		t.Fatal(err)
	}
	sendState(t, chunkwire.NewDirectWriter(dataConn(t, daddr, a, chunkwire.DirectMagic, first.GetDataKey())), 1)
	if m := commitVerified(t, ctl, tr, "bound", session); m.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED {
		t.Fatalf("the source's own connection: the migration ended %v: %v", m.GetPhase(), m.GetError())
	}
}

func sessionOf(t *testing.T, a *Agent, id string) string {
	t.Helper()
	inc, err := a.lookup(id)
	if err != nil {
		t.Fatal(err)
	}
	inc.mu.Lock()
	defer inc.mu.Unlock()
	return inc.sessionID
}

// A connection that spent its key just as its stream ended is closed, not
// left in a hand-off nobody reads, whichever of the two came first.
func TestDataConnectionAfterItsStreamEnded(t *testing.T) {
	_, agent, _ := serveAgent(t, insecure.NewCredentials(), nil)
	inc := &incoming{}
	// closed reports whether the far end of a pipe is closed, without
	// waiting for a reader.
	closed := func(c net.Conn) bool {
		c.SetWriteDeadline(time.Now())
		_, err := c.Write([]byte{0})
		return errors.Is(err, io.ErrClosedPipe)
	}
	// The key is spent, then the stream ends, then the hand-off.
	at := agent.newDataKey(inc)
	if agent.takeDataKey(at.key) != at {
		t.Fatal("the key does not attach its stream")
	}
	agent.dropDataKey(at)
	ours, theirs := net.Pipe()
	defer theirs.Close()
	if agent.handData(at, ours) {
		t.Error("a connection was handed to a stream that had ended")
	}
	if !closed(theirs) {
		t.Error("the late connection was left open")
	}
	// The hand-off, then the stream ends before it takes the connection.
	at = agent.newDataKey(inc)
	agent.takeDataKey(at.key)
	ours, theirs = net.Pipe()
	defer theirs.Close()
	if !agent.handData(at, ours) {
		t.Fatal("a connection was refused by a live stream")
	}
	agent.dropDataKey(at)
	if !closed(theirs) {
		t.Error("a connection its stream never took was left open")
	}
	// An unspent key is forgotten.
	at = agent.newDataKey(inc)
	agent.dropDataKey(at)
	if agent.takeDataKey(at.key) != nil {
		t.Error("a dropped key still attaches")
	}
}

// A data listener stops with the agent.
func TestServeDataStopsWithTheAgent(t *testing.T) {
	_, agent, _ := serveAgent(t, insecure.NewCredentials(), nil)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- agent.ServeData(lis, insecure.NewCredentials()) }()
	agent.Close()
	if err := <-done; err != nil {
		t.Fatalf("ServeData after Close: %v", err)
	}
	if _, err := net.Dial("tcp", lis.Addr().String()); err == nil {
		t.Error("the data listener still accepts after Close")
	}
}

// A destination device that refuses a write (here: more state than it
// holds) fails the migration with a device error, resets the device and
// frees every buffer once.
func TestDeviceWriteFailure(t *testing.T) {
	h := newHarness(t)
	small := "sim:size=32KiB,seed=1"
	prep, err := h.dest.PrepareIncoming(t.Context(), &ferryv1.PrepareIncomingRequest{MigrationId: "too-long", Devices: []string{small}})
	if err != nil {
		t.Fatal(err)
	}
	resp, err := h.transfer.Open(t.Context(), &ferryv1.OpenRequest{MigrationId: "too-long", Token: prep.GetToken(), Devices: []string{small}, ChunkSize: testChunk, Channels: 1})
	if err != nil {
		t.Fatal(err)
	}
	st := h.channel(resp.GetSessionId(), 0)
	state := sourceState(t, 1) // 64 KiB: twice what the device holds
	for i := range testSize / testChunk {
		c := state[i*testChunk : (i+1)*testChunk]
		send(t, st, dataChunk(uint64(i), c), c)
	}
	m := waitPhase(t, h.dest, "too-long")
	if e := m.GetError(); m.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED || e.GetReason() != wire.ReasonDeviceState {
		t.Fatalf("the migration ended %v: %v, want FAILED with %s", m.GetPhase(), e, wire.ReasonDeviceState)
	}
	h.waitReleased("too-long", small)
}
