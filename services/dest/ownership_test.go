package dest

import (
	"sync"
	"sync/atomic"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/mem"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/services/chunkwire"
	"github.com/vfio-ferry/ferry/services/wire"
)

// countingPool is a mem.BufferPool that counts the buffers given back.
type countingPool struct{ puts atomic.Int32 }

func (*countingPool) Get(n int) *[]byte { b := make([]byte, n); return &b }
func (p *countingPool) Put(*[]byte)     { p.puts.Add(1) }

// A chunk that arrives after the clean-up drained the reassembly is
// freed, not held where nobody will free it.
func TestChunkAfterTheCleanupIsFreed(t *testing.T) {
	pool := chunkwire.NewPool()
	a := simAgent(t, pool, 8, 128<<10)
	inc := openSession(t, a, "late-chunk", spec(1), testChunk, 1)
	inc.fail(wire.Errorf(codes.Canceled, wire.ReasonCancelled, "cancelled"), ferryv1.MigrationPhase_MIGRATION_PHASE_CANCELLED, failAsked)
	<-inc.done

	// Chunk 1 (not the frontier, so nobody would write it), in a buffer
	// that counts its return, as gRPC hands it over.
	state := sourceState(t, 1)
	b := state[testChunk : 2*testChunk]
	codec := chunkwire.NewCodec(pool)
	out, err := codec.Marshal(&chunkwire.OutChunk{Header: dataChunk(1, b), Payload: mem.SliceBuffer(b)})
	if err != nil {
		t.Fatal(err)
	}
	msg := out.Materialize()
	out.Free()
	var counting countingPool
	slice := mem.BufferSlice{mem.NewBuffer(&msg, &counting)}
	in := &chunkwire.InChunk{}
	if err := codec.Unmarshal(slice, in); err != nil {
		t.Fatal(err)
	}
	slice.Free() // gRPC's own reference
	if err := inc.accept(in); err != nil {
		t.Fatalf("a chunk after the end: %v", err)
	}
	if n := counting.puts.Load(); n != 1 {
		t.Fatalf("the late chunk's buffer was returned %d times, want 1: it is held", n)
	}
}

// An Open that races the migration's end (a cancel, an abort by token)
// never starts a loader the clean-up could miss, and never leaves the
// devices held. Under the race detector a loader counted after the
// clean-up's wait began was reported.
func TestOpenRacingTheEnd(t *testing.T) {
	a := simAgent(t, chunkwire.NewPool(), 8, 128<<10)
	tr := &transferServer{a: a}
	for i := range 200 {
		id := "race-" + string(rune('A'+i%26)) + string(rune('a'+i/26))
		prep, err := a.prepare(t.Context(), &ferryv1.PrepareIncomingRequest{MigrationId: id, Devices: []string{spec(i)}})
		if err != nil {
			t.Fatal(err)
		}
		inc, _ := a.lookup(id)
		var wg sync.WaitGroup
		wg.Go(func() {
			tr.Open(t.Context(), &ferryv1.OpenRequest{MigrationId: id, Token: prep.GetToken(), Devices: []string{spec(i)}, ChunkSize: testChunk, Channels: 1})
		})
		wg.Go(func() {
			inc.fail(wire.Errorf(codes.Canceled, wire.ReasonCancelled, "cancelled"), ferryv1.MigrationPhase_MIGRATION_PHASE_CANCELLED, failAsked)
		})
		wg.Wait()
		<-inc.done
		for _, d := range a.cfg.Registry.List() {
			if d.Owner == id {
				t.Fatalf("%s: device %s still held", id, d.Spec)
			}
		}
	}
	if n := a.BudgetInUse(); n != 0 {
		t.Fatalf("budget in use %d, want 0", n)
	}
}
