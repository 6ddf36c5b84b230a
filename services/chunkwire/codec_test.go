package chunkwire

import (
	"bytes"
	"testing"

	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/proto"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
)

func header() *ferryv1.ChannelRequest {
	return &ferryv1.ChannelRequest{Device: 3, Seq: 77, Offset: 77 << 20, Kind: ferryv1.ChunkKind_CHUNK_KIND_DATA, Crc32C: 0xdeadbeef}
}

// split cuts b into buffers of n bytes, as gRPC hands a message over in
// 16 KiB frames.
func split(b []byte, n int) mem.BufferSlice {
	var s mem.BufferSlice
	for len(b) > 0 {
		k := min(n, len(b))
		s = append(s, mem.SliceBuffer(b[:k]))
		b = b[k:]
	}
	return s
}

func TestCodecWireIsPlainProtobuf(t *testing.T) {
	c := NewCodec(NewPool())
	payload := bytes.Repeat([]byte("ferry"), 50000)
	out, err := c.Marshal(&OutChunk{Header: header(), Payload: mem.SliceBuffer(payload)})
	if err != nil {
		t.Fatal(err)
	}
	wireBytes := out.Materialize()
	out.Free()
	var got ferryv1.ChannelRequest
	if err := proto.Unmarshal(wireBytes, &got); err != nil {
		t.Fatalf("a protobuf decoder cannot read the fast encoding: %v", err)
	}
	want := header()
	want.Data = payload
	if !proto.Equal(&got, want) {
		t.Fatalf("decoded %v, want the header and payload back", got.String()[:80])
	}
}

func TestCodecRoundTrip(t *testing.T) {
	c := NewCodec(NewPool())
	payload := make([]byte, 1<<20+13)
	for i := range payload {
		payload[i] = byte(i * 7)
	}
	end := &ferryv1.ChannelRequest{Device: 1, Seq: 9, Offset: 900, Kind: ferryv1.ChunkKind_CHUNK_KIND_END, TotalBytes: 900, TotalChunks: 9, Digest: bytes.Repeat([]byte{1}, 32)}
	cases := []struct {
		name    string
		hdr     *ferryv1.ChannelRequest
		payload []byte
		frame   int
	}{
		{"data-16KiB-frames", header(), payload, 16 << 10},
		{"data-one-buffer", header(), payload, len(payload) + 64},
		{"data-1-byte-frames", header(), payload[:300], 1},
		{"end-no-data", end, nil, 16 << 10},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var p mem.Buffer
			if tc.payload != nil {
				p = mem.SliceBuffer(tc.payload)
			}
			out, err := c.Marshal(&OutChunk{Header: tc.hdr, Payload: p})
			if err != nil {
				t.Fatal(err)
			}
			in := &InChunk{}
			if err := c.Unmarshal(split(out.Materialize(), tc.frame), in); err != nil {
				t.Fatal(err)
			}
			out.Free()
			if !proto.Equal(&in.Msg, tc.hdr) {
				t.Errorf("header = %v, want %v", &in.Msg, tc.hdr)
			}
			if !bytes.Equal(in.Data.Materialize(), tc.payload) {
				t.Errorf("payload of %d bytes differs from the %d sent", in.Data.Len(), len(tc.payload))
			}
			if tc.payload == nil && in.Data != nil {
				t.Error("a chunk without data came with a payload")
			}
			in.Data.Free()
		})
	}
}

func TestCodecDecodesAnyFieldOrder(t *testing.T) {
	// A generic encoder may put data anywhere; the slow path still works.
	c := NewCodec(NewPool())
	msg := header()
	msg.Data = []byte("out of order")
	b, err := proto.Marshal(msg)
	if err != nil {
		t.Fatal(err)
	}
	// Move the data field (written last by proto.Marshal for field 15)
	// to the front.
	hdr := header()
	hb, _ := proto.Marshal(hdr)
	reordered := append(append([]byte{}, b[len(hb):]...), hb...)
	in := &InChunk{}
	if err := c.Unmarshal(split(reordered, 5), in); err != nil {
		t.Fatal(err)
	}
	if string(in.Data.Materialize()) != "out of order" || !proto.Equal(&in.Msg, hdr) {
		t.Fatalf("got %v / %q", &in.Msg, in.Data.Materialize())
	}
}

func TestCodecOtherMessagesAreProtobuf(t *testing.T) {
	c := NewCodec(NewPool())
	msg := &ferryv1.ChannelResponse{Windows: []*ferryv1.WindowUpdate{{Device: 1, LimitSeq: 5, LimitOffset: 6}}}
	out, err := c.Marshal(msg)
	if err != nil {
		t.Fatal(err)
	}
	var got ferryv1.ChannelResponse
	if err := c.Unmarshal(out, &got); err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(&got, msg) {
		t.Fatalf("got %v", &got)
	}
}

func TestCodecRefusesHeaderWithData(t *testing.T) {
	h := header()
	h.Data = []byte{1}
	if _, err := NewCodec(NewPool()).Marshal(&OutChunk{Header: h}); err == nil {
		t.Fatal("Marshal accepted a header that carries data")
	}
}

func FuzzCodecUnmarshal(f *testing.F) {
	c := NewCodec(NewPool())
	out, _ := c.Marshal(&OutChunk{Header: header(), Payload: mem.SliceBuffer([]byte("seed payload"))})
	f.Add(out.Materialize(), 3)
	f.Add([]byte{0x7a, 0x05, 'a'}, 1)
	f.Add([]byte{0x7a, 0xff, 0xff, 0xff, 0xff, 0x0f}, 2)
	f.Add([]byte{}, 1)
	f.Fuzz(func(t *testing.T, b []byte, frame int) {
		if frame < 1 {
			frame = 1
		}
		in := &InChunk{}
		err := c.Unmarshal(split(b, frame), in)
		if err != nil {
			return
		}
		if in.Data.Len() > len(b) {
			t.Fatalf("decoded %d payload bytes from a %d-byte message", in.Data.Len(), len(b))
		}
		// Whatever decodes fast must decode the same with protobuf.
		var ref ferryv1.ChannelRequest
		if err := proto.Unmarshal(b, &ref); err != nil {
			t.Fatalf("fast path accepted what protobuf refuses: %v", err)
		}
		if !bytes.Equal(ref.GetData(), in.Data.Materialize()) {
			t.Fatalf("payload differs from protobuf's reading")
		}
		ref.Data = nil
		if !proto.Equal(&ref, &in.Msg) {
			t.Fatalf("header differs from protobuf's reading")
		}
		in.Data.Free()
	})
}
