package chunkwire

import (
	"bytes"
	"math/rand/v2"
	"testing"

	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/proto"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/services/wire"
)

// inChunk makes a received chunk of data (possibly in two pieces) with
// header m.
func inChunk(p *Pool, m *ferryv1.ChannelRequest, data []byte, split bool) *InChunk {
	in := &InChunk{}
	proto.Merge(&in.Msg, m)
	if len(data) > 0 {
		var bufs mem.BufferSlice
		cut := len(data)
		if split {
			cut = len(data) / 2
		}
		bufs = append(bufs, mem.SliceBuffer(bytes.Clone(data[:cut])))
		if cut < len(data) {
			bufs = append(bufs, mem.SliceBuffer(bytes.Clone(data[cut:])))
		}
		in.Data = p.refPayload(bufs, 0)
	}
	return in
}

// chunkWithZeroPages is n bytes of noise with the pages zeroed that
// zero says.
func chunkWithZeroPages(n int, zero func(page int) bool) []byte {
	b := make([]byte, n)
	r := rand.New(rand.NewPCG(1, 2))
	for i := range b {
		b[i] = byte(r.Uint32() | 1)
	}
	for i := 0; i*PageSize < n; i++ {
		if zero(i) {
			clear(b[i*PageSize : min((i+1)*PageSize, n)])
		}
	}
	return b
}

const all = wire.Supported

func TestZeroPagesRoundTrip(t *testing.T) {
	p := NewPool()
	for _, tc := range []struct {
		name string
		n    int
		zero func(int) bool
	}{
		{"every other page", 64 << 10, func(i int) bool { return i%2 == 0 }},
		{"short last page zero", 64<<10 + 100, func(i int) bool { return i == 16 }},
		{"short last page data", 64<<10 + 100, func(i int) bool { return i < 16 }},
		{"one page", 4096, func(int) bool { return false }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := chunkWithZeroPages(tc.n, tc.zero)
			pageMap, zeros := ZeroPages(b)
			packed := PackPages(nil, b, pageMap)
			if c := bytes.Clone(b); !bytes.Equal(PackPages(c[:0], c, pageMap), packed) {
				t.Fatal("packing in place differs")
			}
			if zeros == 0 {
				if pageMap != nil {
					t.Fatal("a page map without zero pages")
				}
				return
			}
			if len(packed) >= tc.n {
				t.Fatalf("packed %d of %d bytes", len(packed), tc.n)
			}
			m := &ferryv1.ChannelRequest{Kind: ferryv1.ChunkKind_CHUNK_KIND_DATA, Encoding: ferryv1.ChunkEncoding_CHUNK_ENCODING_ZERO_PAGES, Length: uint32(tc.n), ZeroPages: pageMap}
			for _, split := range []bool{false, true} {
				in := inChunk(p, m, packed, split)
				if err := p.Decode(in, 1<<20, all, nil); err != nil {
					t.Fatal(err)
				}
				if got := in.Data.Materialize(); !bytes.Equal(got, b) || in.Data.CRC32C() != CRC32C(b) {
					t.Fatalf("decoded %d bytes, not the chunk", len(got))
				}
				in.Data.Free()
			}
		})
	}
	if pm, z := ZeroPages(make([]byte, 8192)); z != 2 || pm[0] != 3 {
		t.Fatalf("all-zero chunk: %v %d", pm, z)
	}
}

func TestDecodeZeroAndZstd(t *testing.T) {
	p := NewPool()
	dec, err := NewDecompressor(1 << 20)
	if err != nil {
		t.Fatal(err)
	}
	defer dec.Close()
	comp, err := NewCompressor()
	if err != nil {
		t.Fatal(err)
	}

	in := inChunk(p, &ferryv1.ChannelRequest{Kind: ferryv1.ChunkKind_CHUNK_KIND_DATA, Encoding: ferryv1.ChunkEncoding_CHUNK_ENCODING_ZERO, Length: 5000}, nil, false)
	if err := p.Decode(in, 1<<20, all, dec); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(in.Data.Materialize(), make([]byte, 5000)) {
		t.Fatal("a zero chunk did not decode to zeros")
	}
	in.Data.Free()

	plain := bytes.Repeat([]byte("ferry moves device state "), 4000)
	frame := comp.Compress(nil, plain)
	in = inChunk(p, &ferryv1.ChannelRequest{Kind: ferryv1.ChunkKind_CHUNK_KIND_DATA, Encoding: ferryv1.ChunkEncoding_CHUNK_ENCODING_ZSTD, Length: uint32(len(plain))}, frame, true)
	if err := p.Decode(in, 1<<20, all, dec); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(in.Data.Materialize(), plain) {
		t.Fatal("zstd round trip differs")
	}
	in.Data.Free()
}

func TestDecodeRefusesWhatItCannotTrust(t *testing.T) {
	p := NewPool()
	dec, err := NewDecompressor(1 << 20)
	if err != nil {
		t.Fatal(err)
	}
	defer dec.Close()
	comp, _ := NewCompressor()
	big := make([]byte, 4<<20) // compresses to almost nothing: a bomb for a 1 MiB chunk
	bomb := comp.Compress(nil, big)
	small := bytes.Repeat([]byte{7}, 10000)
	frame := comp.Compress(nil, small)
	zstd, zero, pages := ferryv1.ChunkEncoding_CHUNK_ENCODING_ZSTD, ferryv1.ChunkEncoding_CHUNK_ENCODING_ZERO, ferryv1.ChunkEncoding_CHUNK_ENCODING_ZERO_PAGES
	for _, tc := range []struct {
		name    string
		m       *ferryv1.ChannelRequest
		data    []byte
		allowed wire.Features
		reason  string
	}{
		{"length beyond the chunk size", &ferryv1.ChannelRequest{Encoding: zero, Length: 1<<20 + 1}, nil, all, wire.ReasonBadChunk},
		{"no length", &ferryv1.ChannelRequest{Encoding: zero}, nil, all, wire.ReasonBadChunk},
		{"zero chunk with bytes", &ferryv1.ChannelRequest{Encoding: zero, Length: 10}, []byte{0}, all, wire.ReasonBadChunk},
		{"zero chunks not granted", &ferryv1.ChannelRequest{Encoding: zero, Length: 10}, nil, 0, wire.ReasonBadChunk},
		{"a length without an encoding", &ferryv1.ChannelRequest{Length: 10}, []byte{1}, all, wire.ReasonBadChunk},
		{"a bomb", &ferryv1.ChannelRequest{Encoding: zstd, Length: 1 << 20}, bomb, all, ReasonBadEncoding},
		{"a frame of another length", &ferryv1.ChannelRequest{Encoding: zstd, Length: 20000}, frame, all, ReasonBadEncoding},
		{"garbage", &ferryv1.ChannelRequest{Encoding: zstd, Length: 20000}, []byte("not a zstd frame"), all, ReasonBadEncoding},
		{"compression not granted", &ferryv1.ChannelRequest{Encoding: zstd, Length: 10000}, frame, 0, wire.ReasonBadChunk},
		{"page map too short", &ferryv1.ChannelRequest{Encoding: pages, Length: 16384, ZeroPages: nil}, make([]byte, 4096), all, ReasonBadEncoding},
		{"pages missing", &ferryv1.ChannelRequest{Encoding: pages, Length: 16384, ZeroPages: []byte{1}}, make([]byte, 4096), all, ReasonBadEncoding},
		{"page map without the encoding", &ferryv1.ChannelRequest{Length: 0, ZeroPages: []byte{1}}, []byte{1}, all, wire.ReasonBadChunk},
		{"unknown encoding", &ferryv1.ChannelRequest{Encoding: 9, Length: 10}, nil, all, wire.ReasonBadChunk},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.m.Kind = ferryv1.ChunkKind_CHUNK_KIND_DATA
			in := inChunk(p, tc.m, tc.data, false)
			err := p.Decode(in, 1<<20, tc.allowed, dec)
			if wire.Reason(err) != tc.reason {
				t.Fatalf("Decode: %v, want reason %s", err, tc.reason)
			}
			in.Data.Free()
		})
	}
}

func FuzzDecode(f *testing.F) {
	comp, _ := NewCompressor()
	f.Add(uint8(2), uint32(10000), comp.Compress(nil, bytes.Repeat([]byte{1}, 10000)), []byte(nil))
	f.Add(uint8(3), uint32(8192), make([]byte, 4096), []byte{1})
	f.Add(uint8(1), uint32(100), []byte(nil), []byte(nil))
	p := NewPool()
	dec, err := NewDecompressor(64 << 10)
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, enc uint8, length uint32, data, pageMap []byte) {
		m := &ferryv1.ChannelRequest{Kind: ferryv1.ChunkKind_CHUNK_KIND_DATA, Encoding: ferryv1.ChunkEncoding(enc % 5), Length: length, ZeroPages: pageMap}
		in := inChunk(p, m, data, len(data) > 1)
		if err := p.Decode(in, 64<<10, all, dec); err == nil && m.GetEncoding() != 0 {
			if got := in.Data.Len(); got != int(length) || in.Data.CRC32C() != CRC32C(in.Data.Materialize()) {
				t.Fatalf("decoded %d bytes for a declared %d", got, length)
			}
		}
		in.Data.Free()
	})
}
