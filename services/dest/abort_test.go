package dest

import (
	"testing"

	"google.golang.org/grpc/codes"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/services/wire"
)

// TestAbortByToken: a source whose Open went unanswered names the incoming
// migration by id and token. The destination ends it whether or not the
// Open was served, resets its devices at once, and refuses the token
// afterwards; a wrong token ends nothing.
func TestAbortByToken(t *testing.T) {
	h := newHarness(t)
	ctx := t.Context()
	prepare := func(id string, seed int) string {
		t.Helper()
		prep, err := h.dest.PrepareIncoming(ctx, &ferryv1.PrepareIncomingRequest{MigrationId: id, Devices: []string{spec(seed)}})
		if err != nil {
			t.Fatal(err)
		}
		return prep.GetToken()
	}
	open := func(id, tok string, seed int) error {
		_, err := h.transfer.Open(ctx, &ferryv1.OpenRequest{MigrationId: id, Token: tok, Devices: []string{spec(seed)}, ChunkSize: testChunk, Channels: 1, Features: wire.Supported.List()})
		return err
	}
	phase := func(id string) *ferryv1.Migration {
		t.Helper()
		resp, err := h.dest.GetIncoming(ctx, &ferryv1.GetIncomingRequest{MigrationId: id})
		if err != nil {
			t.Fatal(err)
		}
		return resp.GetMigration()
	}
	aborted := func(id string, seed int) {
		t.Helper()
		// Abort answers once the clean-up ran: no waiting here.
		if m := phase(id); m.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED || m.GetError().GetReason() != wire.ReasonAborted {
			t.Fatalf("%s: %v %v, want FAILED %s", id, m.GetPhase(), m.GetError(), wire.ReasonAborted)
		}
		h.waitReleased(id, spec(seed))
	}

	// Open never reached the destination.
	tok := prepare("unopened", 1)
	if _, err := h.transfer.Abort(ctx, &ferryv1.AbortRequest{MigrationId: "unopened", Token: tok, Reason: "open cut off"}); err != nil {
		t.Fatalf("abort an unopened migration: %v", err)
	}
	aborted("unopened", 1)
	if err := open("unopened", tok, 1); wire.Code(err) != codes.FailedPrecondition {
		t.Errorf("Open after the abort: %v, want FAILED_PRECONDITION", err)
	}

	// Open was served, but its answer was lost on the way back.
	tok = prepare("opened", 2)
	if err := open("opened", tok, 2); err != nil {
		t.Fatal(err)
	}
	if _, err := h.transfer.Abort(ctx, &ferryv1.AbortRequest{MigrationId: "opened", Token: tok}); err != nil {
		t.Fatalf("abort an opened migration by its token: %v", err)
	}
	aborted("opened", 2)

	// A wrong token ends nothing.
	tok = prepare("kept", 3)
	wrong := []byte(tok)
	wrong[0] ^= 1
	for name, bad := range map[string]string{"wrong": string(wrong), "empty": "", "too long": tok + tok} {
		_, err := h.transfer.Abort(ctx, &ferryv1.AbortRequest{MigrationId: "kept", Token: bad})
		if wire.Code(err) != codes.PermissionDenied || wire.Reason(err) != wire.ReasonBadToken {
			t.Errorf("%s token: %v, want PERMISSION_DENIED %s", name, err, wire.ReasonBadToken)
		}
	}
	if m := phase("kept"); m.GetPhase() == ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED {
		t.Fatalf("a wrong token ended the migration: %v", m.GetError())
	}
	if err := open("kept", tok, 3); err != nil {
		t.Errorf("Open after wrong-token aborts: %v", err)
	}

	// A migration the destination no longer has is aborted; a malformed
	// id is refused.
	if _, err := h.transfer.Abort(ctx, &ferryv1.AbortRequest{MigrationId: "never-prepared", Token: tok}); err != nil {
		t.Errorf("abort an unknown migration: %v", err)
	}
	if _, err := h.transfer.Abort(ctx, &ferryv1.AbortRequest{MigrationId: "bad id\n", Token: tok}); wire.Code(err) != codes.InvalidArgument {
		t.Errorf("abort a malformed id: %v, want INVALID_ARGUMENT", err)
	}
	if _, err := h.transfer.Abort(ctx, &ferryv1.AbortRequest{}); wire.Code(err) != codes.InvalidArgument {
		t.Errorf("abort naming nothing: %v, want INVALID_ARGUMENT", err)
	}
}
