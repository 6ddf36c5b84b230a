package chunkwire

import (
	"bytes"
	"encoding/binary"
	"errors"
	"github.com/vfio-ferry/ferry/services/wire"
	"hash/crc32"
	"io"
	"math/rand/v2"
	"testing"
	"testing/iotest"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
)

func TestDirectFramesRoundTrip(t *testing.T) {
	var conn bytes.Buffer
	w := NewDirectWriter(&conn)
	payload := make([]byte, 300<<10)
	for i := range payload {
		payload[i] = byte(i * 7)
	}
	chunks := []struct {
		hdr  *ferryv1.ChannelRequest
		data []byte
	}{
		{&ferryv1.ChannelRequest{Device: 2, Seq: 0, Offset: 0, Kind: ferryv1.ChunkKind_CHUNK_KIND_DATA, Crc32C: CRC32C(payload)}, payload},
		{&ferryv1.ChannelRequest{Seq: 1, Offset: 1 << 20, Kind: ferryv1.ChunkKind_CHUNK_KIND_DATA, Crc32C: CRC32C(payload[:1])}, payload[:1]},
		{&ferryv1.ChannelRequest{Seq: 2, Offset: 1<<20 + 1, Kind: ferryv1.ChunkKind_CHUNK_KIND_END, TotalBytes: 1<<20 + 1, TotalChunks: 2, Digest: bytes.Repeat([]byte{9}, wire.MaxDigestLength)}, nil},
	}
	for _, c := range chunks {
		if err := w.Write(c.hdr, c.data); err != nil {
			t.Fatal(err)
		}
	}
	pool := NewPool()
	// The reader sees the bytes a few at a time, as a socket may give them.
	r := NewDirectReader(iotest.HalfReader(&conn), pool, len(payload))
	var in InChunk
	for i, c := range chunks {
		if err := r.Read(&in); err != nil {
			t.Fatalf("chunk %d: %v", i, err)
		}
		if !proto.Equal(&in.Msg, c.hdr) {
			t.Errorf("chunk %d: header %v, want %v", i, &in.Msg, c.hdr)
		}
		if got := in.Data.Materialize(); !bytes.Equal(got, c.data) {
			t.Errorf("chunk %d: %d bytes, want %d", i, len(got), len(c.data))
		}
		if c.data != nil && (!in.Data.crcKnown || in.Data.CRC32C() != CRC32C(c.data)) {
			t.Errorf("chunk %d: CRC %08x (computed %v), want %08x", i, in.Data.CRC32C(), in.Data.crcKnown, CRC32C(c.data))
		}
		in.Data.Free()
	}
	if err := r.Read(&in); !errors.Is(err, io.EOF) {
		t.Fatalf("after the last frame: %v, want EOF", err)
	}
}

func TestDirectWriterRefusesDataInTheHeader(t *testing.T) {
	w := NewDirectWriter(io.Discard)
	if err := w.Write(&ferryv1.ChannelRequest{Data: []byte{1}}, nil); err == nil {
		t.Fatal("a header carrying data was written")
	}
}

func TestDirectPreamble(t *testing.T) {
	key := bytes.Repeat([]byte{0xab}, DataKeyLen)
	var b bytes.Buffer
	if err := WriteDirectPreamble(&b, key); err != nil {
		t.Fatal(err)
	}
	got, err := ReadDirectPreamble(&b)
	if err != nil || !bytes.Equal(got[:], key) {
		t.Fatalf("preamble: %x, %v", got, err)
	}
	if err := WriteDirectPreamble(&b, key[:3]); err == nil {
		t.Error("a short key was written")
	}
	if _, err := ReadDirectPreamble(bytes.NewReader(append([]byte("HTTP/1.1"), key...))); err == nil {
		t.Error("another protocol's bytes were taken for a preamble")
	}
	if _, err := ReadDirectPreamble(bytes.NewReader([]byte(DirectMagic))); err == nil {
		t.Error("a preamble without its key was accepted")
	}
}

func TestDirectReaderRefusesBadFrames(t *testing.T) {
	frame := func(h, p uint32, rest ...byte) []byte {
		b := binary.BigEndian.AppendUint32(nil, h)
		return append(binary.BigEndian.AppendUint32(b, p), rest...)
	}
	withData, _ := proto.Marshal(&ferryv1.ChannelRequest{Seq: 1, Data: []byte{1, 2}})
	for _, tc := range []struct {
		name  string
		bytes []byte
		// reason is the ErrorInfo reason, or "" for a truncated frame
		// (io.ErrUnexpectedEOF).
		reason string
	}{
		{"a header of 2^32-1 bytes", frame(1<<32-1, 0), wire.ReasonBadChunk},
		{"a header over the limit", frame(MaxDirectHeader+1, 0), wire.ReasonBadChunk},
		{"a payload over the chunk size", frame(2, 4097, 0x10, 1), wire.ReasonBadChunk},
		{"a payload of 2^32-1 bytes", frame(2, 1<<32-1, 0x10, 1), wire.ReasonBadChunk},
		{"a header that does not decode", frame(2, 0, 0xff, 0xff), wire.ReasonBadChunk},
		{"data inside the header", frame(uint32(len(withData)), 0, withData...), wire.ReasonBadChunk},
		{"a truncated length", frame(2, 0)[:5], ""},
		{"a truncated header", frame(8, 0, 0x10), ""},
		{"a truncated payload", frame(2, 100, 0x10, 1, 0xaa), ""},
	} {
		var in InChunk
		err := NewDirectReader(bytes.NewReader(tc.bytes), NewPool(), 4096).Read(&in)
		switch {
		case tc.reason == "" && !errors.Is(err, io.ErrUnexpectedEOF):
			t.Errorf("%s: %v, want an unexpected EOF", tc.name, err)
		case tc.reason != "" && (wire.Code(err) != codes.InvalidArgument || wire.Reason(err) != tc.reason):
			t.Errorf("%s: %v (reason %q), want INVALID_ARGUMENT %s", tc.name, err, wire.Reason(err), tc.reason)
		}
		if in.Data != nil {
			t.Errorf("%s: data handed out with an error", tc.name)
		}
	}
}

func TestReadCRC32C(t *testing.T) {
	const piece = DevicePiece
	src := make([]byte, 3*piece+123)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range src {
		src[i] = byte(rng.Uint32())
	}
	readers := []struct {
		name string
		r    func([]byte) io.Reader
	}{
		{"whole reads", func(b []byte) io.Reader { return bytes.NewReader(b) }},
		{"one byte at a time", func(b []byte) io.Reader { return iotest.OneByteReader(bytes.NewReader(b)) }},
		{"EOF with the last bytes", func(b []byte) io.Reader { return iotest.DataErrReader(bytes.NewReader(b)) }},
	}
	for _, rd := range readers {
		for _, p := range []int{piece, 0} {
			for _, n := range []int{0, 1, piece - 1, piece, piece + 1, len(src)} {
				b := make([]byte, n)
				got, crc, err := ReadCRC32C(rd.r(src), b, p)
				if err != nil || got != n || !bytes.Equal(b, src[:n]) || crc != crc32.Checksum(src[:n], crc32.MakeTable(crc32.Castagnoli)) {
					t.Errorf("%s, piece %d, %d bytes: read %d, CRC %08x, %v", rd.name, p, n, got, crc, err)
				}
			}
			// Short sources end as io.ReadFull's do.
			b := make([]byte, 2*piece)
			if n, crc, err := ReadCRC32C(rd.r(src[:piece+5]), b, p); n != piece+5 || !errors.Is(err, io.ErrUnexpectedEOF) || crc != CRC32C(src[:piece+5]) {
				t.Errorf("%s, piece %d: short source: %d bytes, %v", rd.name, p, n, err)
			}
			if n, _, err := ReadCRC32C(rd.r(nil), b, p); n != 0 || !errors.Is(err, io.EOF) {
				t.Errorf("%s, piece %d: empty source: %d bytes, %v", rd.name, p, n, err)
			}
			if n, _, err := ReadCRC32C(rd.r(src[:piece]), b, p); n != piece || !errors.Is(err, io.ErrUnexpectedEOF) {
				t.Errorf("%s, piece %d: a source ending on a piece boundary: %d bytes, %v", rd.name, p, n, err)
			}
		}
	}
	// A read error is returned with what was read before it.
	errBroken := errors.New("connection reset")
	b := make([]byte, 2*piece)
	n, crc, err := ReadCRC32C(io.MultiReader(bytes.NewReader(src[:10]), iotest.ErrReader(errBroken)), b, 0)
	if n != 10 || !errors.Is(err, errBroken) || crc != CRC32C(src[:10]) {
		t.Errorf("broken source: %d bytes, %v", n, err)
	}
}

// FuzzDirectReader feeds arbitrary bytes to the destination's frame
// reader: it must never panic, never hand out more than the chunk size,
// and every frame it accepts must be what a writer would have written.
func FuzzDirectReader(f *testing.F) {
	var b bytes.Buffer
	w := NewDirectWriter(&b)
	w.Write(&ferryv1.ChannelRequest{Seq: 3, Offset: 99, Kind: ferryv1.ChunkKind_CHUNK_KIND_DATA, Crc32C: 7}, []byte("hello"))
	w.Write(&ferryv1.ChannelRequest{Seq: 4, Kind: ferryv1.ChunkKind_CHUNK_KIND_END, Digest: []byte{1, 2, 3}}, nil)
	f.Add(b.Bytes())
	f.Add([]byte{0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff, 0})
	f.Add([]byte{0, 0, 1, 0, 0, 0, 0, 0})
	const maxPayload = 64 << 10
	f.Fuzz(func(t *testing.T, data []byte) {
		r := NewDirectReader(bytes.NewReader(data), NewPool(), maxPayload)
		var in InChunk
		for range 64 {
			if err := r.Read(&in); err != nil {
				return
			}
			if in.Data.Len() > maxPayload || in.Msg.Data != nil {
				t.Fatalf("accepted %d bytes of data (header data %d)", in.Data.Len(), len(in.Msg.Data))
			}
			var again bytes.Buffer
			payload := in.Data.Materialize()
			if err := NewDirectWriter(&again).Write(&in.Msg, payload); err != nil {
				t.Fatalf("an accepted frame does not write back: %v", err)
			}
			var back InChunk
			if err := NewDirectReader(&again, NewPool(), maxPayload).Read(&back); err != nil || !proto.Equal(&back.Msg, &in.Msg) || !bytes.Equal(back.Data.Materialize(), payload) {
				t.Fatalf("an accepted frame does not read back: %v", err)
			}
			back.Data.Free()
			in.Data.Free()
		}
	})
}

// loopConn is an in-memory connection for benchmarks: what is written is
// read back, from one reused buffer.
type loopConn struct{ buf bytes.Buffer }

func (c *loopConn) Write(p []byte) (int, error) { return c.buf.Write(p) }
func (c *loopConn) Read(p []byte) (int, error)  { return c.buf.Read(p) }

// BenchmarkDirectFrames is a chunk's way over a direct data connection,
// both ends: the writer's header and gathered write, the reader's header
// decode, the read into a pooled buffer with the CRC computed as it
// arrives, and the release. The baseline, measured alongside, is the same
// bytes through the same in-memory connection with nothing else done (a
// copy in, a copy out): the ratio is what framing and checksumming cost.
// Neither end allocates per chunk.
func BenchmarkDirectFrames(b *testing.B) {
	payload := make([]byte, 1<<20)
	for i := range payload {
		payload[i] = byte(i * 31)
	}
	hdr := &ferryv1.ChannelRequest{Device: 1, Seq: 1234, Offset: 1234 << 20, Kind: ferryv1.ChunkKind_CHUNK_KIND_DATA, Crc32C: CRC32C(payload)}
	b.Run("baseline", func(b *testing.B) {
		conn := &loopConn{}
		conn.buf.Grow(2 << 20)
		out := make([]byte, len(payload))
		b.SetBytes(int64(len(payload)))
		b.ReportAllocs()
		for b.Loop() {
			conn.buf.Write(payload)
			io.ReadFull(&conn.buf, out)
		}
	})
	b.Run("framed", func(b *testing.B) {
		conn := &loopConn{}
		conn.buf.Grow(2 << 20)
		pool := NewPool()
		w := NewDirectWriter(conn)
		r := NewDirectReader(conn, pool, len(payload))
		var in InChunk
		b.SetBytes(int64(len(payload)))
		b.ReportAllocs()
		for b.Loop() {
			if err := w.Write(hdr, payload); err != nil {
				b.Fatal(err)
			}
			if err := r.Read(&in); err != nil || in.Data.CRC32C() != hdr.Crc32C {
				b.Fatalf("read: %v, CRC %08x", err, in.Data.CRC32C())
			}
			in.Data.Free()
		}
	})
}
