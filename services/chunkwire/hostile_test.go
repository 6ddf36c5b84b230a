package chunkwire

import (
	"github.com/vfio-ferry/ferry/services/wire"
	"runtime"
	"testing"

	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
)

// HugeDeclaredChunk is a ChannelRequest whose data field declares n bytes
// but carries only the few that follow: what a hostile source sends to
// make a careless decoder allocate n bytes.
func hugeDeclaredChunk(n uint64) []byte {
	b, _ := proto.Marshal(&ferryv1.ChannelRequest{Seq: 1, Kind: ferryv1.ChunkKind_CHUNK_KIND_DATA, Crc32C: 7})
	b = protowire.AppendTag(b, dataField, protowire.BytesType)
	b = protowire.AppendVarint(b, n)
	return append(b, "only these bytes follow"...)
}

func frames(b []byte, n int) mem.BufferSlice {
	var s mem.BufferSlice
	for len(b) > 0 {
		k := min(n, len(b))
		s = append(s, mem.SliceBuffer(b[:k]))
		b = b[k:]
	}
	return s
}

func TestCodecRefusesHugeDeclaredLength(t *testing.T) {
	c := NewCodec(NewPool())
	for _, declared := range []uint64{1 << 40, 1<<63 - 1, 1<<64 - 1, wire.MaxRecvMsgSize + 1} {
		msg := hugeDeclaredChunk(declared)
		for _, frame := range []int{1, 7, 16 << 10} {
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			in := &InChunk{}
			err := c.Unmarshal(frames(msg, frame), in)
			runtime.ReadMemStats(&after)
			if err == nil {
				t.Fatalf("declared %d bytes, %d carried: decoded (%d payload bytes)", declared, len(msg), in.Data.Len())
			}
			if in.Data != nil {
				t.Fatalf("declared %d: a payload was kept with the error", declared)
			}
			// A few KiB for the error and scratch, never the declared size.
			if grew := after.TotalAlloc - before.TotalAlloc; grew > 1<<20 {
				t.Fatalf("declared %d bytes: decoding allocated %d bytes", declared, grew)
			}
		}
	}
}
