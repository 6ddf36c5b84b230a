package dest

import (
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"google.golang.org/grpc/codes"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/services/chunkwire"
	"github.com/vfio-ferry/ferry/services/wire"
)

// Retries of the same PrepareIncoming that arrive together, while the
// first is still opening the devices, all get the first's answer: the
// same migration and token, not DEVICE_BUSY.
func TestConcurrentIdenticalPrepares(t *testing.T) {
	a := simAgent(t, chunkwire.NewPool(), 8, 128<<10)
	const retries = 8
	for round := range 4 {
		id := "concurrent-" + string(rune('a'+round))
		req := &ferryv1.PrepareIncomingRequest{MigrationId: id, Devices: []string{spec(10 + round), spec(20 + round)}}
		var wg sync.WaitGroup
		tokens := make([]string, retries)
		errs := make([]error, retries)
		start := make(chan struct{})
		for i := range retries {
			wg.Go(func() {
				<-start
				resp, err := a.prepare(t.Context(), req)
				tokens[i], errs[i] = resp.GetToken(), err
			})
		}
		close(start)
		wg.Wait()
		for i := range retries {
			if errs[i] != nil {
				t.Fatalf("%s: prepare %d of %d: %v", id, i, retries, errs[i])
			}
			if tokens[i] != tokens[0] {
				t.Fatalf("%s: prepare %d answered another token", id, i)
			}
		}
	}
	if n := len(a.incoming); n != 4 {
		t.Fatalf("%d migrations registered, want 4", n)
	}
}

// Another request under an id in use is refused, naming what differs,
// and the migration under that id is left alone; a spelling of the same
// specs is the same request.
func TestPrepareWithAnotherRequest(t *testing.T) {
	h := newHarness(t)
	ctx := t.Context()
	session := h.open("running", 1)
	st := h.channel(session, 0)
	if _, err := st.Recv(); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		req   *ferryv1.PrepareIncomingRequest
		field string
	}{
		{&ferryv1.PrepareIncomingRequest{MigrationId: "running", Devices: []string{spec(2)}}, "devices"},
		{&ferryv1.PrepareIncomingRequest{MigrationId: "running", Devices: []string{spec(1), spec(2)}}, "devices"},
		{&ferryv1.PrepareIncomingRequest{MigrationId: "running", Devices: []string{spec(1)}, MaxChunks: 4}, "max_chunks"},
		{&ferryv1.PrepareIncomingRequest{MigrationId: "running", Devices: []string{spec(1)}, MaxBytes: 64 << 10}, "max_bytes"},
	} {
		_, err := h.dest.PrepareIncoming(ctx, tc.req)
		if wire.Code(err) != codes.AlreadyExists || wire.Reason(err) != wire.ReasonSpecMismatch || !strings.Contains(wire.Message(err), tc.field) {
			t.Errorf("%v: %v, want ALREADY_EXISTS %s naming %s", tc.req, err, wire.ReasonSpecMismatch, tc.field)
		}
	}
	if m := h.get("running"); m.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_WAITING || m.GetConnectedChannels() != 1 {
		t.Fatalf("the running migration: %v %v, %d channels", m.GetPhase(), m.GetError(), m.GetConnectedChannels())
	}
	// The same devices spelled another way are the same request.
	if _, err := h.dest.PrepareIncoming(ctx, &ferryv1.PrepareIncomingRequest{MigrationId: "running", Devices: []string{"sim:seed=1,size=64KiB"}}); err != nil {
		t.Fatalf("the same request spelled otherwise: %v", err)
	}
	// The migration still completes.
	streamState(t, st, 1)
	if m := commitVerified(t, h.dest, h.transfer, "running", session); m.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED {
		t.Fatalf("the running migration ended %v: %v", m.GetPhase(), m.GetError())
	}
}

// A migration that failed or was cancelled does not burn its id: a
// prepare under it starts anew, with a fresh token that opens.
func TestPrepareAgainAfterARollback(t *testing.T) {
	h := newHarness(t)
	ctx := t.Context()
	req := &ferryv1.PrepareIncomingRequest{MigrationId: "again", Devices: []string{spec(1)}}
	first, err := h.dest.PrepareIncoming(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.dest.CancelIncoming(ctx, &ferryv1.CancelIncomingRequest{MigrationId: "again"}); err != nil {
		t.Fatal(err)
	}
	second, err := h.dest.PrepareIncoming(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if second.GetToken() == first.GetToken() || second.GetMigration().GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_WAITING {
		t.Fatalf("prepared again: %v, a new token %v", second.GetMigration().GetPhase(), second.GetToken() != first.GetToken())
	}
	// A mistyped token is refused and burns nothing; the right one opens.
	open := &ferryv1.OpenRequest{MigrationId: "again", Token: first.GetToken(), Devices: []string{spec(1)}, ChunkSize: testChunk, Channels: 1}
	if _, err := h.transfer.Open(ctx, open); wire.Reason(err) != wire.ReasonBadToken {
		t.Fatalf("the old token: %v, want %s", err, wire.ReasonBadToken)
	}
	open.Token = second.GetToken()
	if _, err := h.transfer.Open(ctx, open); err != nil {
		t.Fatalf("the new token: %v", err)
	}
}

// A prepared migration no source opens (its StartMigration failed, its
// Open was refused) is released after the source timeout, not after the
// token's ten minutes.
func TestUnopenedMigrationIsReleasedAfterTheSourceTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		reg := vfio.NewRegistry(vfio.RegistryOptions{AllowSim: true})
		defer reg.Close()
		a, err := New(Config{Registry: reg, MaxChunks: 8, MaxBytes: 128 << 10})
		if err != nil {
			t.Fatal(err)
		}
		defer a.Close()
		prep, err := a.prepare(t.Context(), &ferryv1.PrepareIncomingRequest{MigrationId: "never-opened", Devices: []string{spec(1)}})
		if err != nil {
			t.Fatal(err)
		}
		if got, want := prep.GetTokenExpireTime().AsTime(), time.Now().Add(DefaultSourceTimeout); !got.Equal(want) {
			t.Errorf("token_expire_time %v, want %v (the source timeout)", got, want)
		}
		// An Open refused for a bad token leaves it retryable, and the
		// countdown runs on.
		tr := &transferServer{a: a}
		if _, err := tr.Open(t.Context(), &ferryv1.OpenRequest{MigrationId: "never-opened", Token: "mistyped", Devices: []string{spec(1)}, ChunkSize: testChunk, Channels: 1}); wire.Reason(err) != wire.ReasonBadToken {
			t.Fatalf("a mistyped token: %v", err)
		}
		time.Sleep(DefaultSourceTimeout)
		synctest.Wait()
		inc, err := a.lookup("never-opened")
		if err != nil {
			t.Fatal(err)
		}
		if !isClosed(inc.done) {
			t.Fatal("the unopened migration is still held after the source timeout")
		}
		if m, _, _ := inc.snapshot(); m.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED || m.GetOwner() != ferryv1.DeviceOwner_DEVICE_OWNER_SOURCE {
			t.Fatalf("the unopened migration: %v owner %v", m.GetPhase(), m.GetOwner())
		}
		if n := a.BudgetInUse(); n != 0 {
			t.Fatalf("budget in use %d, want 0", n)
		}
		for _, d := range reg.List() {
			if d.Owner != "" || d.State != vfio.StateRunning {
				t.Fatalf("device %s: owner %q, state %v; want free and RUNNING", d.Spec, d.Owner, d.State)
			}
		}
	})
}
