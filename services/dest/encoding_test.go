package dest

import (
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/services/chunkwire"
	"github.com/vfio-ferry/ferry/services/wire"
)

// TestHostileEncodedChunks: a chunk that declares more bytes than a
// chunk holds, or whose zstd frame does not decode, fails its session
// with the reason, and the agent goes on serving.
func TestHostileEncodedChunks(t *testing.T) {
	addr, _, _ := serveAgent(t, insecure.NewCredentials(), nil)
	conn := dialAgent(t, addr, insecure.NewCredentials())
	ctl, tr := ferryv1.NewDestAgentClient(conn), ferryv1.NewTransferClient(conn)
	for i, tc := range []struct {
		name   string
		hdr    *ferryv1.ChannelRequest
		data   []byte
		code   codes.Code
		reason string
	}{
		{"a zero chunk beyond the chunk size", &ferryv1.ChannelRequest{Kind: ferryv1.ChunkKind_CHUNK_KIND_DATA, Encoding: ferryv1.ChunkEncoding_CHUNK_ENCODING_ZERO, Length: testChunk + 1},
			nil, codes.InvalidArgument, wire.ReasonBadChunk},
		{"a zstd frame declaring 1 GiB", &ferryv1.ChannelRequest{Kind: ferryv1.ChunkKind_CHUNK_KIND_DATA, Encoding: ferryv1.ChunkEncoding_CHUNK_ENCODING_ZSTD, Length: 1 << 30},
			[]byte("tiny"), codes.InvalidArgument, wire.ReasonBadChunk},
		{"a frame that does not decompress", &ferryv1.ChannelRequest{Kind: ferryv1.ChunkKind_CHUNK_KIND_DATA, Encoding: ferryv1.ChunkEncoding_CHUNK_ENCODING_ZSTD, Length: testChunk},
			[]byte("not a zstd frame at all"), codes.DataLoss, chunkwire.ReasonBadEncoding},
	} {
		t.Run(tc.name, func(t *testing.T) {
			session := openOne(t, ctl, tr, "encoded-"+string(rune('a'+i)), 30+i, 1)
			st, err := tr.Channel(channelCtx(t.Context(), session, 0))
			if err != nil {
				t.Fatal(err)
			}
			send(t, st, tc.hdr, tc.data)
			if err := streamError(t, st); wire.Code(err) != tc.code || wire.Reason(err) != tc.reason {
				t.Fatalf("%v (reason %q), want %v %s", err, wire.Reason(err), tc.code, tc.reason)
			}
		})
	}
	// Still serving: an honest session opens.
	openOne(t, ctl, tr, "after", 40, 1)
}
