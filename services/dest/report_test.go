package dest

import (
	"runtime"
	"strings"
	"testing"
	"unicode/utf8"

	"google.golang.org/grpc/codes"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/flow"
	"github.com/vfio-ferry/ferry/services/wire"
)

// An Abort's reason is cut on a rune boundary and made valid UTF-8, so
// the migration it ends can still be read: GetIncoming marshals it.
func TestAbortReasonStaysValidUTF8(t *testing.T) {
	h := newHarness(t)
	for name, reason := range map[string]string{
		// "é" is 2 bytes: one at byte 1023 is cut in two at 1024.
		"a rune across the cut": strings.Repeat("a", maxAbortReason-1) + "é" + "tail",
		"invalid UTF-8":         "bad \xff\xfe bytes",
	} {
		t.Run(name, func(t *testing.T) {
			id := "reason-" + strings.ReplaceAll(name, " ", "-")
			session := h.open(id, len(id))
			// A client's protobuf library refuses to send invalid UTF-8; a
			// hostile one sends it anyway, as the handler gets it here.
			tr := &transferServer{a: h.agent}
			if _, err := tr.Abort(t.Context(), &ferryv1.AbortRequest{SessionId: session, Reason: reason}); err != nil {
				t.Fatal(err)
			}
			resp, err := h.dest.GetIncoming(t.Context(), &ferryv1.GetIncomingRequest{MigrationId: id})
			if err != nil {
				t.Fatalf("GetIncoming after the abort: %v", err)
			}
			msg := resp.GetMigration().GetError().GetMessage()
			if !utf8.ValidString(msg) || resp.GetMigration().GetError().GetReason() != wire.ReasonAborted {
				t.Fatalf("the error: %q", msg)
			}
		})
	}
	for _, s := range []string{strings.Repeat("é", 1000), strings.Repeat("x", 2000), "\xff" + strings.Repeat("€", 400), "short"} {
		got := cutReason(s)
		if len(got) > maxAbortReason || !utf8.ValidString(got) || !strings.HasPrefix(strings.ToValidUTF8(s, "\uFFFD"), got) {
			t.Errorf("cutReason of %d bytes: %d bytes, valid %v", len(s), len(got), utf8.ValidString(got))
		}
	}
}

// SwitchoverStart holds the devices running until everything the source
// says it sent before switchover is written (pre-copy).
func TestSwitchoverStartWaitsForTheSentChunks(t *testing.T) {
	h := newHarness(t)
	session := h.open("precopied", 1)
	st := h.channel(session, 0)
	if _, err := st.Recv(); err != nil { // channel 0 is up
		t.Fatal(err)
	}
	state := sourceState(t, 1)
	send(t, st, dataChunk(0, state[:testChunk]), state[:testChunk])
	// Chunk 1 is sent but not yet here.
	_, err := h.transfer.SwitchoverStart(t.Context(), &ferryv1.SwitchoverStartRequest{SessionId: session, SentChunks: []uint64{2}})
	if wire.Code(err) != codes.FailedPrecondition || wire.Reason(err) != wire.ReasonNotReady || !strings.Contains(wire.Message(err), "of 2 chunks") {
		t.Fatalf("2 chunks sent, at most 1 written: %v, want FAILED_PRECONDITION %s", err, wire.ReasonNotReady)
	}
	if m := h.get("precopied"); m.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_WAITING {
		t.Fatalf("a refused SwitchoverStart moved the migration to %v", m.GetPhase())
	}
	watch, err := h.dest.WatchIncoming(t.Context(), &ferryv1.WatchIncomingRequest{MigrationId: "precopied"})
	if err != nil {
		t.Fatal(err)
	}
	send(t, st, dataChunk(1, state[testChunk:2*testChunk]), state[testChunk:2*testChunk])
	for {
		// The watch sends every change of the bytes written.
		resp, err := watch.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if resp.GetMigration().GetDevices()[0].GetChunks() >= 2 {
			break
		}
	}
	if _, err := h.transfer.SwitchoverStart(t.Context(), &ferryv1.SwitchoverStartRequest{SessionId: session, SentChunks: []uint64{2}}); err != nil {
		t.Fatalf("2 chunks sent and written: %v", err)
	}
	if m := h.get("precopied"); m.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_STOPCOPY {
		t.Fatalf("after SwitchoverStart: %v", m.GetPhase())
	}
}

// GetIncoming shows how many channels are up and when the source was
// last heard, so a dead source is visible at once; the destination counts
// the chunks it received twice as duplicates (it retransmits nothing).
func TestIncomingShowsTheSource(t *testing.T) {
	h := newHarness(t)
	prep, err := h.dest.PrepareIncoming(t.Context(), &ferryv1.PrepareIncomingRequest{MigrationId: "seen", Devices: []string{spec(1)}})
	if err != nil {
		t.Fatal(err)
	}
	if m := prep.GetMigration(); m.GetConnectedChannels() != 0 || m.GetLastPeerActivityTime() != nil {
		t.Fatalf("before Open: %d channels, last activity %v", m.GetConnectedChannels(), m.GetLastPeerActivityTime())
	}
	open, err := h.transfer.Open(t.Context(), &ferryv1.OpenRequest{MigrationId: "seen", Token: prep.GetToken(), Devices: []string{spec(1)}, ChunkSize: testChunk, Channels: 2})
	if err != nil {
		t.Fatal(err)
	}
	opened := h.get("seen").GetLastPeerActivityTime()
	if opened == nil {
		t.Fatal("no last activity after Open")
	}
	st := h.channel(open.GetSessionId(), 0)
	if _, err := st.Recv(); err != nil {
		t.Fatal(err)
	}
	watch, err := h.dest.WatchIncoming(t.Context(), &ferryv1.WatchIncomingRequest{MigrationId: "seen"})
	if err != nil {
		t.Fatal(err)
	}
	state := sourceState(t, 1)
	send(t, st, dataChunk(0, state[:testChunk]), state[:testChunk])
	send(t, st, dataChunk(0, state[:testChunk]), state[:testChunk]) // again
	send(t, st, dataChunk(1, state[testChunk:2*testChunk]), state[testChunk:2*testChunk])
	for {
		// Chunk 1 came after the duplicate on the same stream.
		resp, err := watch.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if resp.GetMigration().GetDevices()[0].GetChunks() >= 2 {
			break
		}
	}
	m := h.get("seen")
	if m.GetConnectedChannels() != 1 || m.GetLastPeerActivityTime().AsTime().Before(opened.AsTime()) {
		t.Fatalf("one channel up: %d channels, last activity %v (Open at %v)", m.GetConnectedChannels(), m.GetLastPeerActivityTime().AsTime(), opened.AsTime())
	}
	if d := m.GetDevices()[0]; d.GetDuplicateChunks() != 1 || d.GetRetransmittedChunks() != 0 || m.GetRetransmittedChunks() != 0 {
		t.Fatalf("duplicates %d, retransmitted %d/%d; want 1, 0 and 0", d.GetDuplicateChunks(), d.GetRetransmittedChunks(), m.GetRetransmittedChunks())
	}
	st.CloseSend()
	for {
		if _, err := st.Recv(); err != nil {
			break
		}
	}
	// The stream's status came after its handler deregistered it.
	if n := h.get("seen").GetConnectedChannels(); n != 0 {
		t.Fatalf("%d channels connected after the only one ended", n)
	}
}

// WindowCost covers what a session's reassembly ring allocates per
// device, beside the window's bytes.
func TestWindowCostCoversTheRing(t *testing.T) {
	const chunks = 1 << 16
	l := flow.Limits{MaxChunks: chunks, MaxBytes: 1 << 30}
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	r := flow.NewReassembly[payload](l, testChunk)
	runtime.ReadMemStats(&after)
	runtime.KeepAlive(r)
	allocated := after.TotalAlloc - before.TotalAlloc
	ring := WindowCost(chunks, l.MaxBytes) - l.MaxBytes
	if ring < allocated-allocated/64 || ring < 40*chunks {
		t.Fatalf("WindowCost counts %d bytes for a ring of %d chunks, which allocated %d", ring, chunks, allocated)
	}
}
