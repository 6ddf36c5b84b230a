package dest

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"testing"
	"testing/synctest"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/services/wire"
)

// FuzzAccept plays a source that sends arbitrary Channel messages (chunk
// headers, DATA, END, in any order, for any device) into a real session
// of a destination agent, through the server's codec and the chunk
// validation, reassembly, loaders and END verification. Nothing panics;
// every refusal has a code and an ErrorInfo reason; no device ever holds
// more than its window; a stream verifies only if its bytes are the
// source device's; and when the session ends its devices, buffers and
// budget are released.
//
// The input is a sequence of records: a 2-byte big-endian length, then
// that many bytes of a ChannelRequest as it arrives on the wire.

const (
	fuzzChunk    = wire.MinChunkSize
	fuzzDevSize  = 3*fuzzChunk + 123
	fuzzDevices  = 2
	fuzzMaxBytes = 4 * fuzzChunk // a device's whole state
)

func fuzzSpec(i int) string { return simSpec(40 + i) }

func simSpec(seed int) string { return fmt.Sprintf("sim:size=%d,seed=%d", fuzzDevSize, seed) }

// honestRecords is what a source agent sends for fuzzSpec(0) and (1).
func honestRecords(tb testing.TB) [][]byte { return sourceRecords(tb, 40, 41) }

// sourceRecords is what a source agent sends when its devices 0 and 1
// are simSpec(seeds[0]) and simSpec(seeds[1]).
func sourceRecords(tb testing.TB, seeds ...int) [][]byte {
	var recs [][]byte
	codec := wire.NewCodec(wire.NewPool())
	add := func(hdr *ferryv1.ChannelRequest, data []byte) {
		out := &wire.OutChunk{Header: hdr}
		if data != nil {
			out.Payload = mem.SliceBuffer(data)
		}
		s, err := codec.Marshal(out)
		if err != nil {
			tb.Fatal(err)
		}
		recs = append(recs, s.Materialize())
	}
	for dev := range fuzzDevices {
		s, _ := vfio.ParseSpec(simSpec(seeds[dev]))
		d, err := vfio.NewSim(s)
		if err != nil {
			tb.Fatal(err)
		}
		st, err := d.SetState(vfio.StateStopCopy)
		if err != nil {
			tb.Fatal(err)
		}
		state := make([]byte, fuzzDevSize)
		if _, err := io.ReadFull(st, state); err != nil {
			tb.Fatal(err)
		}
		digest, _ := wire.NewDigest(ferryv1.DigestAlgorithm_DIGEST_ALGORITHM_UNSPECIFIED)
		seq := uint64(0)
		for off := 0; off < len(state); off += fuzzChunk {
			c := state[off:min(off+fuzzChunk, len(state))]
			crc := wire.CRC32C(c)
			digest.Add(uint64(off), c, crc)
			add(&ferryv1.ChannelRequest{Device: uint32(dev), Seq: seq, Offset: uint64(off), Kind: ferryv1.ChunkKind_CHUNK_KIND_DATA, Crc32C: crc}, c)
			seq++
		}
		add(&ferryv1.ChannelRequest{Device: uint32(dev), Seq: seq, Offset: fuzzDevSize, Kind: ferryv1.ChunkKind_CHUNK_KIND_END,
			TotalBytes: fuzzDevSize, TotalChunks: seq, Digest: digest.Sum()}, nil)
	}
	return recs
}

func joinRecords(recs ...[]byte) []byte {
	var b []byte
	for _, r := range recs {
		b = binary.BigEndian.AppendUint16(b, uint16(len(r)))
		b = append(b, r...)
	}
	return b
}

func FuzzAccept(f *testing.F) {
	h := honestRecords(f)
	// Device 0's records are h[0:5] (4 DATA + END), device 1's h[5:10];
	// a device's whole stream fits its window.
	f.Add(joinRecords(h...))                                                       // the honest migration
	f.Add(joinRecords(h[4], h[3], h[2], h[1], h[0], h[9], h[8], h[7], h[6], h[5])) // reversed
	f.Add(joinRecords(h[0], h[0], h[1], h[1], h[2], h[3], h[4]))                   // duplicates
	f.Add(joinRecords(h[0], h[2], h[3], h[4], h[1]))                               // a gap closed late
	f.Add(joinRecords(h[4], h[0], h[1]))                                           // END first
	f.Add(joinRecords(h[0], h[1], h[2], h[3], h[4], h[0], h[4]))                   // after END
	f.Add(joinRecords(h[5], h[0], h[6]))                                           // devices interleaved
	huge := append([]byte(nil), h[0][:len(h[0])-fuzzChunk]...)                     // the header and data tag...
	huge = huge[:len(huge)-2]                                                      // ...without the 2-byte length of 4096
	huge = protowire.AppendVarint(huge, 1<<40)                                     // a declared 2^40 bytes
	f.Add(joinRecords(append(huge, "few"...)))
	bad, _ := proto.Marshal(&ferryv1.ChannelRequest{Device: 1, Seq: 1 << 40, Kind: ferryv1.ChunkKind_CHUNK_KIND_END, Digest: []byte{1}})
	f.Add(joinRecords(bad))
	f.Add([]byte{0, 3, 0x10, 0xff, 0xff})

	f.Fuzz(func(t *testing.T, b []byte) { playRecords(t, b, false) })
}

func TestAcceptHonestRecords(t *testing.T) {
	m := playRecords(t, joinRecords(honestRecords(t)...), true)
	if m.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED {
		t.Fatalf("the honest records: %v %v", m.GetPhase(), m.GetError())
	}
	// Device 1's stream is another device's state, with its own correct
	// CRCs and digest: only the destination device can tell, and it does.
	m = playRecords(t, joinRecords(sourceRecords(t, 40, 99)...), true)
	if e := m.GetError(); m.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED || e.GetReason() != wire.ReasonVerifyFailed {
		t.Fatalf("another device's state: %v %v", m.GetPhase(), e)
	}
}

// playRecords feeds the records in b to a fresh session and returns the
// migration once it ended: when the input ends, it is cancelled, unless
// wait is set (then the input must end it).
//
// It runs in a synctest bubble and lets the device loaders run to a
// standstill after every record, so one input always plays out the same
// way (the fuzzer's coverage is then a function of the input).
func playRecords(t *testing.T, b []byte, wait bool) (m *ferryv1.Migration) {
	synctest.Test(t, func(t *testing.T) { m = play(t, b, wait) })
	return m
}

func play(t *testing.T, b []byte, wait bool) *ferryv1.Migration {
	{
		reg := vfio.NewRegistry(vfio.RegistryOptions{AllowSim: true})
		defer reg.Close()
		a, err := New(Config{Registry: reg, MaxChunks: 8, MaxBytes: fuzzMaxBytes, MemoryBudget: 1 << 20})
		if err != nil {
			t.Fatal(err)
		}
		defer a.Close()
		specs := []string{fuzzSpec(0), fuzzSpec(1)}
		prep, err := a.prepare(&ferryv1.PrepareIncomingRequest{MigrationId: "fuzz", Devices: specs})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := (&transferServer{a: a}).Open(context.Background(), &ferryv1.OpenRequest{MigrationId: "fuzz", Token: prep.GetToken(), Devices: specs, ChunkSize: fuzzChunk, Channels: 1}); err != nil {
			t.Fatal(err)
		}
		inc, _ := a.lookup("fuzz")
		codec := wire.NewCodec(wire.NewPool())
		for len(b) >= 2 {
			n := int(binary.BigEndian.Uint16(b))
			b = b[2:]
			if n > len(b) {
				n = len(b)
			}
			rec := b[:n]
			b = b[n:]
			var in wire.InChunk
			err := codec.Unmarshal(mem.BufferSlice{mem.SliceBuffer(rec)}, &in)
			if err != nil {
				// The agents' server codec refuses it so (wire.serverCodec).
				err = wire.Errorf(codes.InvalidArgument, wire.ReasonBadChunk, "malformed: %v", err)
			} else {
				err = inc.accept(&in)
			}
			synctest.Wait() // the loaders wrote what they could
			for i, d := range inc.devs {
				d.mu.Lock()
				_, held := d.reasm.Buffered()
				peak := d.reasm.PeakBytes()
				d.mu.Unlock()
				if held > fuzzMaxBytes || peak > fuzzMaxBytes {
					t.Fatalf("device %d holds %d bytes (peak %d), window %d", i, held, peak, fuzzMaxBytes)
				}
			}
			if err != nil {
				if c := wire.Code(err); c == codes.OK || c == codes.Unknown || wire.Reason(err) == "" {
					t.Fatalf("refusal without a code and reason: %v", err)
				}
				inc.terminate(err, ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED)
				break
			}
		}
		if !wait {
			inc.terminate(wire.Errorf(codes.Canceled, wire.ReasonCancelled, "the fuzz input ended"), ferryv1.MigrationPhase_MIGRATION_PHASE_CANCELLED)
		}
		<-inc.done
		m, _, _ := inc.snapshot()
		for i, p := range m.GetDevices() {
			// Only the source's own bytes verify (the honest records
			// carry them; a fuzzed stream of other bytes cannot).
			if p.GetVerified() && p.GetBytes() != fuzzDevSize {
				t.Fatalf("device %d verified with %d bytes", i, p.GetBytes())
			}
		}
		if n := a.BudgetInUse(); n != 0 {
			t.Fatalf("budget in use after the session: %d", n)
		}
		for _, d := range reg.List() {
			if d.Owner != "" {
				t.Fatalf("device %s still owned by %q", d.Spec, d.Owner)
			}
		}
		return m
	}
}
