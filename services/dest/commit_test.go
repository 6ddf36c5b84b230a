package dest

import (
	"testing"
	"testing/synctest"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/mem"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/services/chunkwire"
	"github.com/vfio-ferry/ferry/services/deviceapi"
	"github.com/vfio-ferry/ferry/services/wire"
)

// The commit rule at the destination: a migration whose every device
// verified is VERIFIED, its devices held in STOP and its owner in doubt,
// until the source commits (SUCCEEDED: the destination owns the devices)
// or aborts (the devices are reset: the source owns them). Nothing else
// the destination sees resolves it.

// verified opens a one-device session, streams spec(seed)'s whole state
// and its END, and returns the session once the migration is VERIFIED.
func (h *harness) verified(id string, seed int) string {
	h.t.Helper()
	session := h.open(id, seed)
	streamState(h.t, h.channel(session, 0), seed)
	if m := waitSettled(h.t, h.dest, id); m.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_VERIFIED {
		h.t.Fatalf("%s: %v %v, want VERIFIED", id, m.GetPhase(), m.GetError())
	}
	return session
}

// streamState sends spec(seed)'s state in order, then its END.
func streamState(t *testing.T, st channel, seed int) {
	t.Helper()
	state := sourceState(t, seed)
	digest, _ := chunkwire.NewDigest(ferryv1.DigestAlgorithm_DIGEST_ALGORITHM_UNSPECIFIED)
	for i := range testSize / testChunk {
		c := state[i*testChunk : (i+1)*testChunk]
		send(t, st, dataChunk(uint64(i), c), c)
		digest.Add(uint64(i*testChunk), c, chunkwire.CRC32C(c))
	}
	send(t, st, &ferryv1.ChannelRequest{Seq: testSize / testChunk, Offset: testSize, Kind: ferryv1.ChunkKind_CHUNK_KIND_END,
		TotalBytes: testSize, TotalChunks: testSize / testChunk, Digest: digest.Sum()}, nil)
}

func (h *harness) get(id string) *ferryv1.Migration {
	h.t.Helper()
	resp, err := h.dest.GetIncoming(h.t.Context(), &ferryv1.GetIncomingRequest{MigrationId: id})
	if err != nil {
		h.t.Fatal(err)
	}
	return resp.GetMigration()
}

// device is the registry's view of spec(seed).
func (h *harness) device(seed int) vfio.DeviceInfo {
	h.t.Helper()
	canon, _ := deviceapi.CanonicalSpec(spec(seed))
	for _, d := range h.reg.List() {
		if d.Spec == canon {
			return d
		}
	}
	h.t.Fatalf("device %s not in the registry", canon)
	return vfio.DeviceInfo{}
}

func TestVerifiedWaitsForTheCommit(t *testing.T) {
	h := newHarness(t)
	ctx := t.Context()
	session := h.verified("commit", 1)

	// VERIFIED: the device rests in STOP, still held; the buffers and the
	// budget are released; the owner is in doubt.
	m := h.get("commit")
	if m.GetOwner() != ferryv1.DeviceOwner_DEVICE_OWNER_IN_DOUBT || !m.GetDevices()[0].GetVerified() {
		t.Fatalf("VERIFIED: owner %v, verified %v", m.GetOwner(), m.GetDevices()[0].GetVerified())
	}
	if d := h.device(1); d.State != vfio.StateStop || d.Owner != "commit" {
		t.Fatalf("VERIFIED: device %v owned by %q, want STOP and held", d.State, d.Owner)
	}
	if n := h.agent.BudgetInUse(); n != 0 {
		t.Fatalf("VERIFIED: %d bytes of budget in use, want 0", n)
	}
	// Finish answers the verdict, and the same again.
	for range 2 {
		v, err := h.transfer.Finish(ctx, &ferryv1.FinishRequest{SessionId: session})
		if err != nil || !v.GetVerified() || len(v.GetDevices()) != 1 || v.GetDevices()[0].GetBytes() != testSize {
			t.Fatalf("Finish in VERIFIED: %v %v", v, err)
		}
	}
	if m := h.get("commit"); m.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_VERIFIED {
		t.Fatalf("Finish moved the migration to %v", m.GetPhase())
	}

	// Commit: SUCCEEDED, the destination owns the device, which stays in
	// STOP for the VMM and is free for it.
	if _, err := h.transfer.Commit(ctx, &ferryv1.CommitRequest{SessionId: session}); err != nil {
		t.Fatal(err)
	}
	m = h.get("commit")
	if m.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED || m.GetOwner() != ferryv1.DeviceOwner_DEVICE_OWNER_DESTINATION || m.GetEndTime() == nil {
		t.Fatalf("committed: %v owner %v", m.GetPhase(), m.GetOwner())
	}
	if d := h.device(1); d.State != vfio.StateStop || d.Owner != "" {
		t.Fatalf("committed: device %v owned by %q, want STOP and free", d.State, d.Owner)
	}
	// Idempotent; Finish still answers the verdict.
	if _, err := h.transfer.Commit(ctx, &ferryv1.CommitRequest{SessionId: session}); err != nil {
		t.Fatalf("a second Commit: %v", err)
	}
	if v, err := h.transfer.Finish(ctx, &ferryv1.FinishRequest{SessionId: session}); err != nil || !v.GetVerified() {
		t.Fatalf("Finish once committed: %v %v", v, err)
	}
	// A committed migration is rolled back by nobody.
	_, err := h.transfer.Abort(ctx, &ferryv1.AbortRequest{SessionId: session, Reason: "too late"})
	if wire.Code(err) != codes.FailedPrecondition || wire.Reason(err) != wire.ReasonCommitted {
		t.Fatalf("Abort once committed: %v, want FAILED_PRECONDITION %s", err, wire.ReasonCommitted)
	}
	_, err = h.dest.CancelIncoming(ctx, &ferryv1.CancelIncomingRequest{MigrationId: "commit"})
	if wire.Code(err) != codes.FailedPrecondition || wire.Reason(err) != wire.ReasonCommitted {
		t.Fatalf("CancelIncoming once committed: %v, want FAILED_PRECONDITION %s", err, wire.ReasonCommitted)
	}
	if resp, err := h.dest.CommitIncoming(ctx, &ferryv1.CommitIncomingRequest{MigrationId: "commit"}); err != nil ||
		resp.GetMigration().GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED {
		t.Fatalf("CommitIncoming once committed: %v %v", resp.GetMigration().GetPhase(), err)
	}
	if m := h.get("commit"); m.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED {
		t.Fatalf("after the refused rollbacks: %v", m.GetPhase())
	}
}

// The split brain the rule closes: the source's Finish failed after the
// destination verified (a partition, a cancel during FINISHING), so the
// source took its devices back and aborts. The destination must let go.
func TestAbortAfterVerified(t *testing.T) {
	h := newHarness(t)
	ctx := t.Context()

	session := h.verified("by-session", 1)
	if _, err := h.transfer.Abort(ctx, &ferryv1.AbortRequest{SessionId: session, Reason: "finish failed"}); err != nil {
		t.Fatal(err)
	}
	m := h.get("by-session")
	if m.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED || m.GetError().GetReason() != wire.ReasonAborted || m.GetOwner() != ferryv1.DeviceOwner_DEVICE_OWNER_SOURCE {
		t.Fatalf("aborted after VERIFIED: %v %v owner %v", m.GetPhase(), m.GetError(), m.GetOwner())
	}
	h.waitReleased("by-session", spec(1))
	if _, err := h.transfer.Finish(ctx, &ferryv1.FinishRequest{SessionId: session}); wire.Reason(err) != wire.ReasonAborted {
		t.Fatalf("Finish after the abort: %v, want %s", err, wire.ReasonAborted)
	}
	if _, err := h.transfer.Commit(ctx, &ferryv1.CommitRequest{SessionId: session}); wire.Code(err) != codes.FailedPrecondition || wire.Reason(err) != wire.ReasonRolledBack {
		t.Fatalf("Commit after the abort: %v, want FAILED_PRECONDITION %s", err, wire.ReasonRolledBack)
	}

	// By migration id and token (the source never heard its Open's answer
	// and so has no session id).
	prep, err := h.dest.PrepareIncoming(ctx, &ferryv1.PrepareIncomingRequest{MigrationId: "by-token", Devices: []string{spec(2)}})
	if err != nil {
		t.Fatal(err)
	}
	open, err := h.transfer.Open(ctx, &ferryv1.OpenRequest{MigrationId: "by-token", Token: prep.GetToken(), Devices: []string{spec(2)}, ChunkSize: testChunk, Channels: 1, Features: wire.Supported.List()})
	if err != nil {
		t.Fatal(err)
	}
	streamState(t, h.channel(open.GetSessionId(), 0), 2)
	if m := waitSettled(t, h.dest, "by-token"); m.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_VERIFIED {
		t.Fatalf("by-token: %v", m.GetPhase())
	}
	if _, err := h.transfer.Abort(ctx, &ferryv1.AbortRequest{MigrationId: "by-token", Token: prep.GetToken()}); err != nil {
		t.Fatal(err)
	}
	if m := h.get("by-token"); m.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED || m.GetError().GetReason() != wire.ReasonAborted {
		t.Fatalf("aborted by token after VERIFIED: %v %v", m.GetPhase(), m.GetError())
	}
	h.waitReleased("by-token", spec(2))
}

// The control plane resolves a VERIFIED migration whose source could not
// say: CommitIncoming when the source reads SUCCEEDED, CancelIncoming
// when it does not.
func TestControlPlaneResolvesVerified(t *testing.T) {
	h := newHarness(t)
	ctx := t.Context()

	h.verified("commit-incoming", 1)
	resp, err := h.dest.CommitIncoming(ctx, &ferryv1.CommitIncomingRequest{MigrationId: "commit-incoming"})
	if err != nil {
		t.Fatal(err)
	}
	if m := resp.GetMigration(); m.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED || m.GetOwner() != ferryv1.DeviceOwner_DEVICE_OWNER_DESTINATION {
		t.Fatalf("CommitIncoming: %v owner %v", m.GetPhase(), m.GetOwner())
	}
	if d := h.device(1); d.State != vfio.StateStop || d.Owner != "" {
		t.Fatalf("committed by the control plane: device %v owned by %q", d.State, d.Owner)
	}

	h.verified("cancel-incoming", 2)
	cresp, err := h.dest.CancelIncoming(ctx, &ferryv1.CancelIncomingRequest{MigrationId: "cancel-incoming"})
	if err != nil {
		t.Fatal(err)
	}
	if m := cresp.GetMigration(); m.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_CANCELLED || m.GetOwner() != ferryv1.DeviceOwner_DEVICE_OWNER_SOURCE {
		t.Fatalf("CancelIncoming of VERIFIED: %v owner %v", m.GetPhase(), m.GetOwner())
	}
	h.waitReleased("cancel-incoming", spec(2))

	// Nothing to commit before the verdict, nor after a rollback.
	session := h.open("early", 3)
	for _, id := range []string{"early", "cancel-incoming"} {
		_, err = h.dest.CommitIncoming(ctx, &ferryv1.CommitIncomingRequest{MigrationId: id})
		if wire.Code(err) != codes.FailedPrecondition {
			t.Errorf("CommitIncoming of %s: %v, want FAILED_PRECONDITION", id, err)
		}
	}
	_, err = h.transfer.Commit(ctx, &ferryv1.CommitRequest{SessionId: session})
	if wire.Code(err) != codes.FailedPrecondition || wire.Reason(err) != wire.ReasonSessionState {
		t.Fatalf("Commit before the verdict: %v, want FAILED_PRECONDITION %s", err, wire.ReasonSessionState)
	}
	if m := h.get("early"); m.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_WAITING || m.GetOwner() != ferryv1.DeviceOwner_DEVICE_OWNER_SOURCE {
		t.Fatalf("before the verdict: %v owner %v", m.GetPhase(), m.GetOwner())
	}
}

// In VERIFIED the destination never resolves the migration by itself:
// not when the source stays away past the source timeout and the token's
// lifetime, not for a chunk that breaks the protocol, not when the agent
// stops (the devices are left in STOP, held).
func TestVerifiedIsNeverResolvedByTheDestination(t *testing.T) {
	const timeout = time.Minute
	synctest.Test(t, func(t *testing.T) {
		reg := vfio.NewRegistry(vfio.RegistryOptions{AllowSim: true})
		defer reg.Close()
		a, err := New(Config{Registry: reg, MaxChunks: 8, MaxBytes: 128 << 10, SourceTimeout: timeout, TokenTTL: 2 * timeout})
		if err != nil {
			t.Fatal(err)
		}
		inc := openSession(t, a, "alone", spec(1), testChunk, 1)
		state := sourceState(t, 1)
		digest, _ := chunkwire.NewDigest(ferryv1.DigestAlgorithm_DIGEST_ALGORITHM_UNSPECIFIED)
		for i := range testSize / testChunk {
			c := state[i*testChunk : (i+1)*testChunk]
			digest.Add(uint64(i*testChunk), c, chunkwire.CRC32C(c))
			if err := inc.accept(inChunk(t, dataChunk(uint64(i), c), c)); err != nil {
				t.Fatal(err)
			}
		}
		end := &chunkwire.InChunk{}
		end.Msg = ferryv1.ChannelRequest{Seq: 4, Offset: testSize, Kind: ferryv1.ChunkKind_CHUNK_KIND_END, TotalBytes: testSize, TotalChunks: 4, Digest: digest.Sum()}
		if err := inc.accept(end); err != nil {
			t.Fatal(err)
		}
		<-inc.verifiedCh

		// No channel ever connected: the source timeout (armed at Open) and
		// the token's lifetime both pass.
		time.Sleep(10 * timeout)
		synctest.Wait()
		phase := func() ferryv1.MigrationPhase {
			m, _, _ := inc.snapshot()
			return m.GetPhase()
		}
		if p := phase(); p != ferryv1.MigrationPhase_MIGRATION_PHASE_VERIFIED {
			t.Fatalf("after the source timeout: %v, want VERIFIED", p)
		}
		// A resend of a written chunk is a duplicate; a chunk that breaks
		// the protocol now changes nothing either.
		c := state[:testChunk]
		if err := inc.accept(inChunk(t, dataChunk(0, c), c)); err != nil {
			t.Fatalf("a resend once VERIFIED: %v", err)
		}
		if n := inc.devs[0].duplicates.Load(); n != 1 {
			t.Errorf("%d duplicates counted, want 1", n)
		}
		inc.fail(wire.Errorf(codes.DataLoss, wire.ReasonChunkCRC, "a bad chunk"), ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED, failFound)
		if p := phase(); p != ferryv1.MigrationPhase_MIGRATION_PHASE_VERIFIED {
			t.Fatalf("after a failure the destination found: %v, want VERIFIED", p)
		}

		// The agent stops: the device is left as it is, in STOP and held.
		a.Close()
		if p := phase(); p != ferryv1.MigrationPhase_MIGRATION_PHASE_VERIFIED {
			t.Fatalf("after Close: %v, want VERIFIED", p)
		}
		for _, d := range reg.List() {
			if d.State != vfio.StateStop || d.Owner != "alone" {
				t.Fatalf("after Close: device %v owned by %q, want STOP and held", d.State, d.Owner)
			}
		}
	})
}

// inChunk is hdr and data as the codec decodes them.
func inChunk(t *testing.T, hdr *ferryv1.ChannelRequest, data []byte) *chunkwire.InChunk {
	t.Helper()
	codec := chunkwire.NewCodec(chunkwire.NewPool())
	out, err := codec.Marshal(&chunkwire.OutChunk{Header: hdr, Payload: mem.SliceBuffer(data)})
	if err != nil {
		t.Fatal(err)
	}
	in := &chunkwire.InChunk{}
	if err := codec.Unmarshal(out, in); err != nil {
		t.Fatal(err)
	}
	out.Free()
	return in
}
