package dest

import (
	"fmt"
	"testing"
	"testing/synctest"

	"google.golang.org/grpc/mem"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/services/chunkwire"
	"github.com/vfio-ferry/ferry/services/wire"
)

// The receiver whose chunk completes the frontier writes it into the
// device before accept returns; a chunk that arrives while another holds
// the device's write turn is written by the loader once the turn is free;
// END is the loader's, and the device is verified.
func TestReceiverWritesTheFrontier(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const (
			chunk   = 64 << 10
			nChunks = 4
			size    = nChunks * chunk
		)
		spec := fmt.Sprintf("sim:size=%d,seed=21", size)
		pool := chunkwire.NewPool()
		a := simAgent(t, pool, nChunks, size)
		inc := openSession(t, a, "write", spec, chunk, 2)
		d := inc.devs[0]

		// The source's side: the device's state, chunk by chunk, as the
		// codec decodes it.
		state := stateOf(t, spec)
		codec := chunkwire.NewCodec(pool)
		digest, _ := chunkwire.NewDigest(ferryv1.DigestAlgorithm_DIGEST_ALGORITHM_UNSPECIFIED)
		next := func(seq uint64) *chunkwire.InChunk {
			t.Helper()
			b := state[seq*chunk : (seq+1)*chunk]
			crc := chunkwire.CRC32C(b)
			digest.Add(seq*chunk, b, crc)
			out, err := codec.Marshal(&chunkwire.OutChunk{
				Header:  &ferryv1.ChannelRequest{Seq: seq, Offset: seq * chunk, Kind: ferryv1.ChunkKind_CHUNK_KIND_DATA, Crc32C: crc},
				Payload: mem.SliceBuffer(b),
			})
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
		accept := func(in *chunkwire.InChunk) {
			t.Helper()
			if err := inc.accept(in); err != nil {
				t.Fatal(err)
			}
		}

		accept(next(0))
		if n := d.chunks.Load(); n != 1 {
			t.Fatalf("%d chunks written when accept of the frontier returned, want 1", n)
		}

		// Another holds the write turn: the chunk waits for it, and so
		// does the loader, woken.
		if !d.tryTurn() {
			t.Fatal("the write turn is taken")
		}
		accept(next(1))
		synctest.Wait()
		if n := d.chunks.Load(); n != 1 {
			t.Fatalf("%d chunks written while the turn was held, want 1", n)
		}
		inc.putTurn(d)
		synctest.Wait()
		if n := d.chunks.Load(); n != 2 {
			t.Fatalf("%d chunks written once the turn was free, want 2 (the loader's)", n)
		}

		// Out of order: the receiver of chunk 3 finds the frontier missing
		// and leaves the chunk held; the receiver of chunk 2 writes both.
		in2, in3 := next(2), next(3)
		accept(in3)
		synctest.Wait()
		if n := d.chunks.Load(); n != 2 {
			t.Fatalf("%d chunks written with the frontier missing, want 2", n)
		}
		accept(in2)
		if n := d.chunks.Load(); n != 4 {
			t.Fatalf("%d chunks written once the frontier arrived, want 4", n)
		}

		end := &chunkwire.InChunk{}
		end.Msg = ferryv1.ChannelRequest{Seq: nChunks, Offset: size, Kind: ferryv1.ChunkKind_CHUNK_KIND_END, TotalBytes: size, TotalChunks: nChunks, Digest: digest.Sum()}
		if err := inc.accept(end); err != nil {
			t.Fatal(err)
		}
		<-inc.verifiedCh
		if !d.verified.Load() {
			t.Error("device not verified")
		}
		if err := inc.commit(); err != nil {
			t.Fatal(err)
		}
		<-inc.done
		if err := inc.finalStatus(); err != nil {
			t.Fatalf("verdict: %v", err)
		}
		// The migration is over: the clean-up holds the write turn for
		// good, so nobody writes into the device again.
		if d.tryTurn() {
			t.Error("device still open to writers after the clean-up")
		}
	})
}

// simAgent is a destination agent on pool that takes simulated devices,
// with windows of at most maxChunks chunks and maxBytes bytes, closed
// when tb ends.
func simAgent(tb testing.TB, pool *chunkwire.Pool, maxChunks uint32, maxBytes uint64) *Agent {
	tb.Helper()
	reg := vfio.NewRegistry(vfio.RegistryOptions{AllowSim: true})
	tb.Cleanup(func() { reg.Close() })
	a, err := New(Config{Registry: reg, Pool: pool, MaxChunks: maxChunks, MaxBytes: maxBytes})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(a.Close)
	return a
}

// openSession prepares migration id of one device, spec, on a and opens
// its session as a source would, with chunk-byte chunks over channels.
func openSession(tb testing.TB, a *Agent, id, spec string, chunk, channels uint32) *incoming {
	tb.Helper()
	prep, err := a.prepare(tb.Context(), &ferryv1.PrepareIncomingRequest{MigrationId: id, Devices: []string{spec}})
	if err != nil {
		tb.Fatal(err)
	}
	ts := &transferServer{a: a}
	resp, err := ts.Open(tb.Context(), &ferryv1.OpenRequest{MigrationId: id, Token: prep.GetToken(), Devices: []string{spec}, ChunkSize: chunk, Channels: channels, Features: wire.Supported.List()})
	if err != nil {
		tb.Fatal(err)
	}
	inc, err := a.session(resp.GetSessionId())
	if err != nil {
		tb.Fatal(err)
	}
	return inc
}
