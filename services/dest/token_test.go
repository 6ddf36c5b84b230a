package dest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"google.golang.org/grpc/codes"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/services/deviceapi"
	"github.com/vfio-ferry/ferry/services/wire"
)

// The token PrepareIncoming returns is 256 random bits, admits one Open,
// and expires. The expiry tests run in a synctest bubble: its clock moves
// only when every goroutine in it waits, so "one nanosecond before the
// TTL" is exact and the test waits for no real time.

func TestTokenIsRandomAndLong(t *testing.T) {
	seen := make(map[string]bool)
	for range 64 {
		tok := newToken()
		b, err := hex.DecodeString(tok)
		if err != nil || len(b) < 16 {
			t.Fatalf("token %q: %d bytes (%v), want at least 128 bits", tok, len(b), err)
		}
		if seen[tok] {
			t.Fatalf("token %q repeated", tok)
		}
		seen[tok] = true
	}
	if len(newToken()) > wire.MaxTokenLength {
		t.Fatal("a token is longer than the API accepts")
	}
}

func TestTokenExpires(t *testing.T) {
	const ttl = time.Minute
	synctest.Test(t, func(t *testing.T) {
		reg := vfio.NewRegistry(vfio.RegistryOptions{AllowSim: true})
		defer reg.Close()
		a, err := New(Config{Registry: reg, MaxChunks: 8, MaxBytes: 128 << 10, MemoryBudget: 64 << 20, TokenTTL: ttl, SourceTimeout: 100 * ttl})
		if err != nil {
			t.Fatal(err)
		}
		defer a.Close()
		tr := &transferServer{a: a}
		prepare := func(id string, seed int) *ferryv1.OpenRequest {
			t.Helper()
			prep, err := a.prepare(t.Context(), &ferryv1.PrepareIncomingRequest{MigrationId: id, Devices: []string{spec(seed)}})
			if err != nil {
				t.Fatal(err)
			}
			if got := prep.GetTokenExpireTime().AsTime(); !got.Equal(time.Now().Add(ttl)) {
				t.Errorf("token_expire_time %v, want %v", got, time.Now().Add(ttl))
			}
			return &ferryv1.OpenRequest{MigrationId: id, Token: prep.GetToken(), Devices: []string{spec(seed)}, ChunkSize: testChunk, Channels: 1}
		}
		onTime := prepare("on-time", 1)
		late := prepare("late", 2)

		time.Sleep(ttl - time.Nanosecond)
		if _, err := tr.Open(context.Background(), onTime); err != nil {
			t.Fatalf("open a nanosecond before the TTL: %v", err)
		}
		time.Sleep(time.Nanosecond)
		synctest.Wait() // the expiry timer has fired and its clean-up ran
		_, err = tr.Open(context.Background(), late)
		if wire.Code(err) != codes.PermissionDenied || wire.Reason(err) != wire.ReasonBadToken || !strings.Contains(wire.Message(err), "expired") {
			t.Fatalf("open at the TTL: %v, want PERMISSION_DENIED %s (expired)", err, wire.ReasonBadToken)
		}
		inc, err := a.lookup("late")
		if err != nil {
			t.Fatal(err)
		}
		<-inc.done
		m, _, _ := inc.snapshot()
		if m.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED || m.GetError().GetReason() != wire.ReasonBadToken ||
			codes.Code(m.GetError().GetCode()) != codes.DeadlineExceeded {
			t.Fatalf("the expired migration: %v %v", m.GetPhase(), m.GetError())
		}
		// Its device is reset and free, its window's budget returned; the
		// opened one still holds its own.
		for _, d := range reg.List() {
			if d.Spec == canonical(t, spec(2)) && (d.Owner != "" || d.State != vfio.StateRunning) {
				t.Fatalf("the expired migration's device: owner %q, state %v", d.Owner, d.State)
			}
		}
		if got, want := a.BudgetInUse(), WindowCost(8, 128<<10); got != want || want <= 128<<10 {
			t.Fatalf("budget in use %d, want %d (the opened migration's window and its reassembly ring)", got, want)
		}
		// The opened migration outlives the TTL: its expiry timer is off.
		time.Sleep(10 * ttl) // within the source timeout: no channel is needed yet
		synctest.Wait()
		opened, _ := a.lookup("on-time")
		if m, _, _ := opened.snapshot(); m.GetPhase() == ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED {
			t.Fatalf("the opened migration expired: %v", m.GetError())
		}
		// A token is single-use even before it expires.
		if _, err := tr.Open(context.Background(), onTime); wire.Code(err) != codes.PermissionDenied && wire.Code(err) != codes.FailedPrecondition {
			t.Fatalf("reuse: %v", err)
		}
	})
}

func TestTokenCompare(t *testing.T) {
	tok := newToken()
	p := prepared{id: "m", token: tok, expires: time.Unix(1e9, 0), devices: []string{"sim:size=64KiB,seed=1"}, limits: testLimits}
	now := time.Unix(1e9-1, 0)
	ok := &ferryv1.OpenRequest{MigrationId: "m", Token: tok, Devices: []string{"sim:seed=1,size=64KiB"}, ChunkSize: testChunk}
	if _, err := validateOpen(ok, p, now); err != nil {
		t.Fatalf("the right token: %v", err)
	}
	flip := []byte(tok)
	flip[len(flip)-1] ^= 1
	random := make([]byte, 32)
	rand.Read(random)
	for name, bad := range map[string]string{
		"empty":               "",
		"one bit off":         string(flip),
		"a prefix":            tok[:len(tok)-1],
		"longer":              tok + "0",
		"upper case":          strings.ToUpper(tok),
		"another token":       hex.EncodeToString(random),
		"over the max length": strings.Repeat("a", wire.MaxTokenLength+1),
	} {
		req := ferryv1.OpenRequest{MigrationId: "m", Token: bad, Devices: ok.Devices, ChunkSize: testChunk}
		if _, err := validateOpen(&req, p, now); wire.Code(err) != codes.PermissionDenied || wire.Reason(err) != wire.ReasonBadToken {
			t.Errorf("%s: %v, want PERMISSION_DENIED %s", name, err, wire.ReasonBadToken)
		}
	}
	// A wrong token learns nothing else: not that the request is malformed
	// too.
	req := ferryv1.OpenRequest{MigrationId: "m", Token: "wrong", ChunkSize: 1}
	if _, err := validateOpen(&req, p, now); wire.Reason(err) != wire.ReasonBadToken {
		t.Errorf("a wrong token with a bad request: %v, want %s first", err, wire.ReasonBadToken)
	}
}

func canonical(t *testing.T, spec string) string {
	t.Helper()
	c, err := deviceapi.CanonicalSpec(spec)
	if err != nil {
		t.Fatal(err)
	}
	return c
}
