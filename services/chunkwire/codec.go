package chunkwire

import (
	"errors"
	"fmt"

	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
)

// dataField is ChannelRequest.data's field number; the codec writes it last.
const dataField protowire.Number = 15

// maxHeader bounds the header the fast decoder looks at: every field of a
// ChannelRequest but data fits in far less (the digest is 32 bytes, a
// zero-page map of the largest chunk 512).
const maxHeader = 1024

// OutChunk is a ChannelRequest to send: Header holds every field but data
// (Header.Data must be nil) and Payload holds the chunk bytes. The codec
// takes its own reference to Payload, which gRPC frees once the bytes are
// written; the sender keeps its reference until the destination has
// acknowledged the chunk.
type OutChunk struct {
	Header  *ferryv1.ChannelRequest
	Payload mem.Buffer
}

// InChunk receives a ChannelRequest: Msg gets every field but data, and
// Data the chunk bytes (nil when the chunk had none). The receiver owns
// Data and releases it once, with Data.Free, from any goroutine.
//
// Data is not a copy: it holds references to the very buffers gRPC read
// the HTTP/2 DATA frames into (16 KiB each, from the Pool given to the
// server and the client with experimental.BufferPool), so between the
// socket and the device write a chunk's bytes are touched only by the CRC.
// The copy into one contiguous buffer this replaces was a tenth of both
// agents' CPU (pprof of BenchmarkMigration; BenchmarkCodecUnmarshal shows
// the difference: copy vs ref). Memory is unchanged: the destination held
// a chunk-sized buffer per chunk in its window before, it holds the same
// bytes in 16 KiB pieces now, and gRPC replenishes its HTTP/2 windows
// when a message is read, not when its buffers are freed, so the Ferry
// window stays the only bound.
type InChunk struct {
	Msg  ferryv1.ChannelRequest
	Data *Payload
	// Err is set by a server's codec, instead of failing RecvMsg, when the
	// message does not decode (see ServerCodec); Msg and Data are then
	// empty.
	Err error
	// scratch holds the header when gRPC's first buffer does not.
	scratch [maxHeader]byte
}

// Codec is the gRPC codec both agents force on every call: OutChunk and
// InChunk take the fast path described in the package doc, every other
// message is plain protobuf. It names itself "proto", because what it puts
// on the wire is protobuf.
type Codec struct {
	pool  *Pool
	proto encoding.CodecV2
}

// NewCodec returns a codec that receives chunk payloads into pool.
func NewCodec(pool *Pool) *Codec {
	return &Codec{pool: pool, proto: encoding.GetCodecV2("proto")}
}

// Name implements encoding.CodecV2.
func (c *Codec) Name() string { return "proto" }

// Marshal implements encoding.CodecV2.
func (c *Codec) Marshal(v any) (mem.BufferSlice, error) {
	out, ok := v.(*OutChunk)
	if !ok {
		return c.proto.Marshal(v)
	}
	if out.Header == nil || out.Header.Data != nil {
		return nil, errors.New("wire: OutChunk header must be set and carry no data")
	}
	hdr := c.pool.Get(maxHeader)
	b, err := proto.MarshalOptions{}.MarshalAppend((*hdr)[:0], out.Header)
	if err != nil {
		c.pool.Put(hdr)
		return nil, fmt.Errorf("wire: marshal chunk header: %w", err)
	}
	n := 0
	if out.Payload != nil {
		n = out.Payload.Len()
	}
	if n > 0 {
		b = protowire.AppendTag(b, dataField, protowire.BytesType)
		b = protowire.AppendVarint(b, uint64(n))
	}
	*hdr = b
	// One allocation per chunk remains here, the slice itself: gRPC owns
	// it until its writer is done, and nothing tells Ferry when that is.
	slice := make(mem.BufferSlice, 1, 2)
	slice[0] = mem.NewBuffer(hdr, c.pool)
	if n > 0 {
		out.Payload.Ref()
		slice = append(slice, out.Payload)
	}
	return slice, nil
}

// Unmarshal implements encoding.CodecV2.
func (c *Codec) Unmarshal(data mem.BufferSlice, v any) error {
	in, ok := v.(*InChunk)
	if !ok {
		return c.proto.Unmarshal(data, v)
	}
	in.Data = nil
	total := data.Len()
	// The header is read where it lies, in gRPC's first buffer, when that
	// holds it (it always does but for tiny frames); else it is gathered.
	var p []byte
	if n := min(total, maxHeader); len(data) > 0 && len(data[0].ReadOnlyData()) >= n {
		p = data[0].ReadOnlyData()[:n]
	} else {
		p = in.scratch[:copyPrefix(in.scratch[:n], data)]
	}
	hdrEnd, dataLen, ok := findTrailingData(p, total)
	if !ok {
		return c.unmarshalSlow(data, in)
	}
	// protobuf copies what it keeps (the digest): nothing aliases data.
	if err := (proto.UnmarshalOptions{}).Unmarshal(p[:hdrEnd], &in.Msg); err != nil {
		return fmt.Errorf("wire: chunk header: %w", err)
	}
	if dataLen > 0 {
		in.Data = c.pool.refPayload(data, total-dataLen)
	}
	return nil
}

// unmarshalSlow decodes a ChannelRequest whose data field is not last (any
// protobuf encoder may write one); its data is protobuf's own copy.
func (c *Codec) unmarshalSlow(data mem.BufferSlice, in *InChunk) error {
	buf := data.MaterializeToBuffer(c.pool)
	defer buf.Free()
	if err := proto.Unmarshal(buf.ReadOnlyData(), &in.Msg); err != nil {
		return fmt.Errorf("wire: chunk: %w", err)
	}
	if len(in.Msg.Data) > 0 {
		in.Data = c.pool.refPayload(mem.BufferSlice{mem.SliceBuffer(in.Msg.Data)}, 0)
	}
	in.Msg.Data = nil
	return nil
}

// findTrailingData walks the protobuf fields in p, the first bytes of a
// message of total bytes, and reports where the data field starts when it
// is the message's last field and its payload runs to the end.
func findTrailingData(p []byte, total int) (hdrEnd, dataLen int, ok bool) {
	pos := 0
	for pos < len(p) {
		num, typ, n := protowire.ConsumeTag(p[pos:])
		if n < 0 {
			return 0, 0, false
		}
		if num == dataField && typ == protowire.BytesType {
			l, m := protowire.ConsumeVarint(p[pos+n:])
			if m < 0 {
				return 0, 0, false
			}
			start := pos + n + m
			if uint64(total-start) != l {
				return 0, 0, false
			}
			return pos, int(l), true
		}
		m := protowire.ConsumeFieldValue(num, typ, p[pos+n:])
		if m < 0 {
			return 0, 0, false
		}
		pos += n + m
	}
	// No data field within p: a chunk without data (END) is all header.
	if len(p) == total {
		return total, 0, true
	}
	return 0, 0, false
}

// copyPrefix copies the first len(dst) bytes of s into dst.
func copyPrefix(dst []byte, s mem.BufferSlice) int {
	n := 0
	for _, b := range s {
		if n == len(dst) {
			break
		}
		n += copy(dst[n:], b.ReadOnlyData())
	}
	return n
}
