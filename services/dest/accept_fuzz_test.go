package dest

import (
	"context"
	"fmt"
	"testing"
	"testing/synctest"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/services/chunkwire"
	"github.com/vfio-ferry/ferry/services/wire"
)

// FuzzAccept plays a source that sends arbitrary Channel messages (chunk
// headers, DATA, END, in any order, for any device) into a real session
// of a destination agent, through the chunk codec, the chunk validation,
// the reassembly, the device loaders and END's verification. Nothing
// panics; every refusal has a code and an ErrorInfo reason; no device ever
// holds more than its window; a stream verifies only if its bytes are the
// destination device's own; and when the session ends its devices,
// buffers and budget are released.
//
// The input is a sequence of records, each one Channel message:
//
//	sel  1 byte   where the payload comes from (see payloadOf); 0xff: the
//	              header bytes are the whole message, as sent (malformed)
//	n    1 byte   the header's length
//	hdr  n bytes  a ChannelRequest without data, protobuf; a zero crc32c
//	              is filled in with the payload's
//
// Payloads are pieces of real device states rather than fuzzed bytes, so
// the fuzzer spends its time on headers, orders and END, which is where
// the protocol can be broken, and its inputs stay small.

const (
	fuzzChunk    = wire.MinChunkSize
	fuzzDevSize  = 3*fuzzChunk + 123 // 4 chunks, the last one short
	fuzzChunks   = 4
	fuzzDevices  = 2
	fuzzMaxBytes = 4 * fuzzChunk // a device's whole state fits its window
	foreignSeed  = 99
)

func fuzzSpec(i int) string { return simSpec(40 + i) }

func simSpec(seed int) string { return fmt.Sprintf("sim:size=%d,seed=%d", fuzzDevSize, seed) }

// simState is the stop-copy state of simSpec(seed).
func simState(tb testing.TB, seed int) []byte { return stateOf(tb, simSpec(seed)) }

// fuzzStates are the payload sources: the destination devices' own
// states (0 and 1) and another device's (2).
type fuzzStates [3][]byte

func newFuzzStates(tb testing.TB) *fuzzStates {
	return &fuzzStates{simState(tb, 40), simState(tb, 41), simState(tb, foreignSeed)}
}

// payloadOf is the payload sel selects: bit 7 set, the foreign state,
// else the state of device bit 4; bits 0-3, the chunk index (an index
// past the state: no payload).
func (s *fuzzStates) payloadOf(sel byte) []byte {
	state := s[(sel>>4)&1]
	if sel&0x80 != 0 {
		state = s[2]
	}
	k := int(sel & 0x0f)
	if k*fuzzChunk >= len(state) {
		return nil
	}
	return state[k*fuzzChunk : min((k+1)*fuzzChunk, len(state))]
}

// record encodes one record.
func record(sel byte, hdr *ferryv1.ChannelRequest) []byte {
	b, err := proto.Marshal(hdr)
	if err != nil || len(b) > 255 {
		panic(fmt.Sprint("record header: ", err, len(b)))
	}
	return append([]byte{sel, byte(len(b))}, b...)
}

// streamRecords are the records a source sends for a device whose state
// is payload source src (0, 1, or 2 for the foreign one), as device dev.
func (s *fuzzStates) streamRecords(src, dev int) [][]byte {
	sel := byte(dev << 4)
	if src == 2 {
		sel = 0x80
	}
	digest, _ := chunkwire.NewDigest(ferryv1.DigestAlgorithm_DIGEST_ALGORITHM_UNSPECIFIED)
	var recs [][]byte
	for k := range fuzzChunks {
		c := s.payloadOf(sel | byte(k))
		digest.Add(uint64(k*fuzzChunk), c, chunkwire.CRC32C(c))
		recs = append(recs, record(sel|byte(k), &ferryv1.ChannelRequest{Device: uint32(dev), Seq: uint64(k), Offset: uint64(k * fuzzChunk), Kind: ferryv1.ChunkKind_CHUNK_KIND_DATA}))
	}
	return append(recs, record(0x0f, &ferryv1.ChannelRequest{Device: uint32(dev), Seq: fuzzChunks, Offset: fuzzDevSize, Kind: ferryv1.ChunkKind_CHUNK_KIND_END,
		TotalBytes: fuzzDevSize, TotalChunks: fuzzChunks, Digest: digest.Sum()}))
}

func join(recs ...[]byte) []byte {
	var b []byte
	for _, r := range recs {
		b = append(b, r...)
	}
	return b
}

// fuzzAcceptSeeds are the seed inputs: an honest session, and the ways a
// source can break it.
func fuzzAcceptSeeds(s *fuzzStates) map[string][]byte {
	a, c := s.streamRecords(0, 0), s.streamRecords(1, 1)
	huge := proto.Clone(&ferryv1.ChannelRequest{Seq: 1, Kind: ferryv1.ChunkKind_CHUNK_KIND_DATA, Crc32C: 1}).(*ferryv1.ChannelRequest)
	hb, _ := proto.Marshal(huge)
	hb = protowire.AppendVarint(protowire.AppendTag(hb, 15, protowire.BytesType), 1<<40)
	raw := func(b []byte) []byte { return append([]byte{0xff, byte(len(b))}, b...) }
	return map[string][]byte{
		"honest":             join(a[0], c[0], a[1], c[1], a[2], c[2], a[3], c[3], a[4], c[4]),
		"reversed":           join(a[4], a[3], a[2], a[1], a[0], c[4], c[3], c[2], c[1], c[0]),
		"resent":             join(a[0], a[0], a[1], a[0], a[2], a[1], a[3], a[4], a[4]),
		"gap-then-end":       join(a[0], a[2], a[4]),
		"data-after-end":     join(a[0], a[1], a[2], a[3], a[4], a[3]),
		"device-1-as-0":      join(c[0], c[1], c[2], c[3], c[4]),
		"foreign-state":      join(join(s.streamRecords(2, 0)...), join(c...)),
		"end-for-the-other":  join(a[4], c[0]),
		"huge-declared":      join(a[0], raw(append(hb, "few"...))),
		"malformed":          join(a[0], raw([]byte{0x10, 0xff})),
		"outside-the-window": join(record(0x00, &ferryv1.ChannelRequest{Seq: 8, Offset: 8 * fuzzChunk, Kind: ferryv1.ChunkKind_CHUNK_KIND_DATA})),
		"wrong-crc":          join(record(0x00, &ferryv1.ChannelRequest{Kind: ferryv1.ChunkKind_CHUNK_KIND_DATA, Crc32C: 7})),
		"empty":              {},
	}
}

func FuzzAccept(f *testing.F) {
	s := newFuzzStates(f)
	for _, seed := range fuzzAcceptSeeds(s) {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, b []byte) { playRecords(t, s, b, false) })
}

func TestAcceptRecords(t *testing.T) {
	s := newFuzzStates(t)
	seeds := fuzzAcceptSeeds(s)
	m := playRecords(t, s, seeds["honest"], true)
	if m.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED {
		t.Fatalf("the honest records: %v %v", m.GetPhase(), m.GetError())
	}
	if m := playRecords(t, s, seeds["reversed"], true); m.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED {
		t.Fatalf("the honest records in reverse: %v %v", m.GetPhase(), m.GetError())
	}
	// Another device's state, with its own correct CRCs and digest: only
	// the destination device can tell, and it does.
	m = playRecords(t, s, seeds["foreign-state"], true)
	if e := m.GetError(); m.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED || e.GetReason() != wire.ReasonVerifyFailed {
		t.Fatalf("another device's state: %v %v", m.GetPhase(), e)
	}
	m = playRecords(t, s, seeds["huge-declared"], true)
	if e := m.GetError(); m.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED || e.GetReason() != wire.ReasonBadChunk {
		t.Fatalf("a declared 2^40 bytes: %v %v", m.GetPhase(), e)
	}
}

// playRecords feeds the records in b to a fresh session and returns the
// migration once it ended: when the input ends, it is cancelled, unless
// wait is set (then the input must end it).
//
// It runs in a synctest bubble and lets the device loaders run to a
// standstill after every record, so one input always plays out the same
// way (the fuzzer's coverage is then a function of the input).
func playRecords(t *testing.T, s *fuzzStates, b []byte, wait bool) (m *ferryv1.Migration) {
	synctest.Test(t, func(t *testing.T) { m = play(t, s, b, wait) })
	return m
}

func play(t *testing.T, s *fuzzStates, b []byte, wait bool) *ferryv1.Migration {
	reg := vfio.NewRegistry(vfio.RegistryOptions{AllowSim: true})
	defer reg.Close()
	a, err := New(Config{Registry: reg, MaxChunks: 8, MaxBytes: fuzzMaxBytes, MemoryBudget: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	specs := []string{fuzzSpec(0), fuzzSpec(1)}
	prep, err := a.prepare(context.Background(), &ferryv1.PrepareIncomingRequest{MigrationId: "fuzz", Devices: specs})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := (&transferServer{a: a}).Open(context.Background(), &ferryv1.OpenRequest{MigrationId: "fuzz", Token: prep.GetToken(), Devices: specs, ChunkSize: fuzzChunk, Channels: 1}); err != nil {
		t.Fatal(err)
	}
	inc, _ := a.lookup("fuzz")
	codec := chunkwire.NewCodec(chunkwire.NewPool())
	for len(b) >= 2 {
		sel, n := b[0], int(b[1])
		b = b[2:]
		n = min(n, len(b))
		hdrBytes := b[:n]
		b = b[n:]

		// The message as it arrives on the wire.
		var msg []byte
		var hdr ferryv1.ChannelRequest
		if sel == 0xff || proto.Unmarshal(hdrBytes, &hdr) != nil || hdr.Data != nil {
			msg = hdrBytes
		} else {
			payload := s.payloadOf(sel)
			if hdr.Crc32C == 0 && payload != nil {
				hdr.Crc32C = chunkwire.CRC32C(payload)
			}
			out := &chunkwire.OutChunk{Header: &hdr}
			if payload != nil {
				out.Payload = mem.SliceBuffer(payload)
			}
			enc, err := codec.Marshal(out)
			if err != nil {
				t.Fatal(err)
			}
			msg = enc.Materialize()
			enc.Free()
		}
		var in chunkwire.InChunk
		err := codec.Unmarshal(mem.BufferSlice{mem.SliceBuffer(msg)}, &in)
		if err != nil {
			// The agents' server codec refuses it so (wire.serverCodec).
			err = wire.Errorf(codes.InvalidArgument, wire.ReasonBadChunk, "malformed: %v", err)
		} else {
			err = inc.accept(&in)
		}
		synctest.Wait() // the loaders wrote what they could
		for i, d := range inc.devs {
			d.mu.Lock()
			var held, peak uint64
			if d.reasm != nil { // nil once released
				_, held = d.reasm.Buffered()
				peak = d.reasm.PeakBytes()
			}
			d.mu.Unlock()
			if held > fuzzMaxBytes || peak > fuzzMaxBytes {
				t.Fatalf("device %d holds %d bytes (peak %d), window %d", i, held, peak, fuzzMaxBytes)
			}
		}
		if err != nil {
			if c := wire.Code(err); c == codes.OK || c == codes.Unknown || wire.Reason(err) == "" {
				t.Fatalf("refusal without a code and reason: %v", err)
			}
			inc.fail(err, ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED, failFound)
			break
		}
	}
	if !wait {
		// A cancel rolls back a VERIFIED migration too.
		inc.fail(wire.Errorf(codes.Canceled, wire.ReasonCancelled, "the fuzz input ended"), ferryv1.MigrationPhase_MIGRATION_PHASE_CANCELLED, failAsked)
	}
	select {
	case <-inc.verifiedCh:
		// The budget is released once every device verified.
		if n := a.BudgetInUse(); n != 0 {
			t.Fatalf("budget in use once verified: %d", n)
		}
		if wait {
			if err := inc.commit(); err != nil {
				t.Fatal(err)
			}
		}
	case <-inc.done:
	}
	<-inc.done
	m, _, _ := inc.snapshot()
	for i, p := range m.GetDevices() {
		// Only a device's own bytes verify.
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
