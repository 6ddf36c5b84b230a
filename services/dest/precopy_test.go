package dest

import (
	"testing"

	"google.golang.org/grpc/codes"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/services/wire"
)

// openPrecopy prepares and opens a one-device pre-copy session with one
// channel.
func (h *harness) openPrecopy(id string, seed int) (session string) {
	h.t.Helper()
	prep, err := h.dest.PrepareIncoming(h.t.Context(), &ferryv1.PrepareIncomingRequest{MigrationId: id, Devices: []string{spec(seed)}})
	if err != nil {
		h.t.Fatalf("prepare %s: %v", id, err)
	}
	resp, err := h.transfer.Open(h.t.Context(), &ferryv1.OpenRequest{MigrationId: id, Token: prep.GetToken(), Devices: []string{spec(seed)},
		ChunkSize: testChunk, Channels: 1, Mode: ferryv1.MigrationMode_MIGRATION_MODE_PRECOPY})
	if err != nil {
		h.t.Fatalf("open %s: %v", id, err)
	}
	return resp.GetSessionId()
}

// ack sends one device's initial-data report and returns the answer.
func (h *harness) ack(session string, gen uint32, complete bool, end uint64) *ferryv1.SwitchoverAckResponse {
	h.t.Helper()
	resp, err := h.transfer.SwitchoverAck(h.t.Context(), &ferryv1.SwitchoverAckRequest{SessionId: session,
		Devices: []*ferryv1.InitialData{{Device: 0, Generation: gen, Complete: complete, End: end}}})
	if err != nil {
		h.t.Fatalf("SwitchoverAck: %v", err)
	}
	return resp
}

// waitWritten watches the migration until its device has chunks written.
func (h *harness) waitWritten(id string, chunks uint64) {
	h.t.Helper()
	watch, err := h.dest.WatchIncoming(h.t.Context(), &ferryv1.WatchIncomingRequest{MigrationId: id})
	if err != nil {
		h.t.Fatal(err)
	}
	for {
		resp, err := watch.Recv()
		if err != nil {
			h.t.Fatal(err)
		}
		if resp.GetMigration().GetDevices()[0].GetChunks() >= chunks {
			return
		}
	}
}

// The destination acknowledges a device's initial data once the part of
// its stream the source announced is written; the migration is READY when
// every device's is, and an unforced SwitchoverStart passes only then. A
// REINIT (a higher generation) withdraws the acknowledgement.
func TestSwitchoverAckAndReady(t *testing.T) {
	h := newHarness(t)
	const id = "acked"
	session := h.openPrecopy(id, 1)
	if p := h.get(id).GetPhase(); p != ferryv1.MigrationPhase_MIGRATION_PHASE_PRECOPY {
		t.Fatalf("a pre-copy session opens in %v, want PRECOPY", p)
	}
	st := h.channel(session, 0)
	if _, err := st.Recv(); err != nil {
		t.Fatal(err)
	}
	// Nothing said yet: the initial data is pending.
	_, err := h.transfer.SwitchoverStart(t.Context(), &ferryv1.SwitchoverStartRequest{SessionId: session})
	if wire.Code(err) != codes.FailedPrecondition || wire.Reason(err) != wire.ReasonInitialDataPending {
		t.Fatalf("SwitchoverStart before READY: %v, want FAILED_PRECONDITION %s", err, wire.ReasonInitialDataPending)
	}
	state := sourceState(t, 1)
	send(t, st, dataChunk(0, state[:testChunk]), state[:testChunk])
	h.waitWritten(id, 1)
	// The initial data ends after two chunks: one is written.
	if resp := h.ack(session, 0, true, 2*testChunk); resp.GetReady() || resp.GetLoaded()[0] {
		t.Fatalf("half the initial data written: %v", resp)
	}
	send(t, st, dataChunk(1, state[testChunk:2*testChunk]), state[testChunk:2*testChunk])
	h.waitWritten(id, 2)
	if resp := h.ack(session, 0, true, 2*testChunk); !resp.GetReady() || !resp.GetLoaded()[0] {
		t.Fatalf("the initial data written: %v, want loaded and ready", resp)
	}
	m := h.get(id)
	if m.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_READY || !m.GetDevices()[0].GetInitialDataLoaded() {
		t.Fatalf("after the ack: %v, loaded %v; want READY", m.GetPhase(), m.GetDevices()[0].GetInitialDataLoaded())
	}
	// REINIT: new initial data, not yet read whole.
	if resp := h.ack(session, 1, false, 0); resp.GetReady() {
		t.Fatalf("after a REINIT: %v, want not ready", resp)
	}
	if p := h.get(id).GetPhase(); p != ferryv1.MigrationPhase_MIGRATION_PHASE_PRECOPY {
		t.Fatalf("a REINIT left the migration %v, want PRECOPY", p)
	}
	// A late report of the older generation does not bring it back.
	if resp := h.ack(session, 0, true, 2*testChunk); resp.GetReady() {
		t.Fatalf("an older generation's report made it ready: %v", resp)
	}
	_, err = h.transfer.SwitchoverStart(t.Context(), &ferryv1.SwitchoverStartRequest{SessionId: session, SentChunks: []uint64{2}})
	if wire.Reason(err) != wire.ReasonInitialDataPending {
		t.Fatalf("SwitchoverStart after a REINIT: %v, want %s", err, wire.ReasonInitialDataPending)
	}
	// Forced, it passes.
	if _, err := h.transfer.SwitchoverStart(t.Context(), &ferryv1.SwitchoverStartRequest{SessionId: session, SentChunks: []uint64{2}, Force: true}); err != nil {
		t.Fatalf("forced SwitchoverStart: %v", err)
	}
	if p := h.get(id).GetPhase(); p != ferryv1.MigrationPhase_MIGRATION_PHASE_STOPCOPY {
		t.Fatalf("after the forced SwitchoverStart: %v, want STOPCOPY", p)
	}
	// The acknowledgement no longer moves the phase.
	h.ack(session, 1, true, 2*testChunk)
	if p := h.get(id).GetPhase(); p != ferryv1.MigrationPhase_MIGRATION_PHASE_STOPCOPY {
		t.Fatalf("an ack after the switchover moved the phase to %v", p)
	}
}

// A report that names no device of the session, or comes on a stop-copy
// session, is refused and changes nothing.
func TestSwitchoverAckRefusals(t *testing.T) {
	h := newHarness(t)
	pre := h.openPrecopy("ack-bad", 2)
	plain := h.open("ack-plain", 3)
	for name, tc := range map[string]struct {
		req    *ferryv1.SwitchoverAckRequest
		code   codes.Code
		reason string
	}{
		"device out of range": {&ferryv1.SwitchoverAckRequest{SessionId: pre, Devices: []*ferryv1.InitialData{{Device: 1, Complete: true}}}, codes.InvalidArgument, wire.ReasonInvalidArgument},
		"too many devices":    {&ferryv1.SwitchoverAckRequest{SessionId: pre, Devices: []*ferryv1.InitialData{{Device: 0}, {Device: 0}}}, codes.InvalidArgument, wire.ReasonInvalidArgument},
		"stop-copy session":   {&ferryv1.SwitchoverAckRequest{SessionId: plain}, codes.FailedPrecondition, wire.ReasonSessionState},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := h.transfer.SwitchoverAck(t.Context(), tc.req)
			if wire.Code(err) != tc.code || wire.Reason(err) != tc.reason {
				t.Fatalf("%v, want %v %s", err, tc.code, tc.reason)
			}
		})
	}
	if p := h.get("ack-bad").GetPhase(); p != ferryv1.MigrationPhase_MIGRATION_PHASE_PRECOPY {
		t.Errorf("refused reports moved the migration to %v", p)
	}
	// A stop-copy session is never refused for initial data.
	if _, err := h.channel(plain, 0).Recv(); err != nil {
		t.Fatal(err)
	}
	if _, err := h.transfer.SwitchoverStart(t.Context(), &ferryv1.SwitchoverStartRequest{SessionId: plain}); err != nil {
		t.Errorf("SwitchoverStart on a stop-copy session: %v", err)
	}
}
