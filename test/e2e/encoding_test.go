package e2e

import (
	"context"
	"fmt"
	"net"
	"slices"
	"testing"

	"google.golang.org/grpc"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/internal/loopback"
	"github.com/vfio-ferry/ferry/services/dest"
)

// noZeroChunks makes a destination that does not grant zero chunks, so
// compression alone has the zero pages to shrink.
func noZeroChunks(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	if open, ok := req.(*ferryv1.OpenRequest); ok {
		open.Features = slices.DeleteFunc(open.Features, func(f ferryv1.Feature) bool { return f == ferryv1.Feature_FEATURE_ZERO_CHUNKS })
	}
	return h(ctx, req)
}

// TestChunksCostLessThanTheirBytes migrates a device half of whose 4 KiB
// pages are zero, and one that is all zero, with and without
// compression, over direct data connections and in gRPC messages: each
// verifies bit for bit (the destination's simulated device checks every
// byte), and the bytes on the wire are far fewer than the state's.
func TestChunksCostLessThanTheirBytes(t *testing.T) {
	for _, tc := range []struct {
		name     string
		spec     string
		compress bool
		noZero   bool // the destination grants no zero chunks
		// most is the largest share of the state the wire may carry.
		most float64
	}{
		{"half zero pages", "sim:size=32MiB,seed=%d,zero=0.5", false, false, 0.55},
		{"all zero", "sim:size=32MiB,seed=%d,zero=1", false, false, 0.001},
		{"half zero pages, compressed", "sim:size=32MiB,seed=%d,zero=0.5", true, false, 0.55},
		{"half zero pages, compressed alone", "sim:size=32MiB,seed=%d,zero=0.5", true, true, 0.55},
		{"no zero chunks, no compression", "sim:size=32MiB,seed=%d,zero=0.5", false, true, 1},
	} {
		for _, direct := range []bool{true, false} {
			t.Run(fmt.Sprintf("%s, direct %v", tc.name, direct), func(t *testing.T) {
				var a *agents
				if tc.noZero {
					a, _ = loggedAgents(t, loopback.Config{DestUnary: noZeroChunks, DataListener: dataListener(t, direct)})
				} else {
					a = startAgentsData(t, dest.Config{}, direct)
				}
				spec := fmt.Sprintf(tc.spec, 70)
				prep, err := a.dest.PrepareIncoming(t.Context(), &ferryv1.PrepareIncomingRequest{MigrationId: "zeros", Devices: []string{spec}})
				if err != nil {
					t.Fatal(err)
				}
				req := &ferryv1.StartMigrationRequest{MigrationId: "zeros", DestAddress: a.destAddr, Token: prep.GetToken(), Channels: 4,
					ChunkSize: 256 << 10, Devices: []*ferryv1.DevicePair{{SourceDevice: spec, DestDevice: spec}}}
				if tc.compress {
					req.Compression = ferryv1.ChunkCompression_CHUNK_COMPRESSION_ZSTD
				}
				if _, err := a.source.StartMigration(t.Context(), req); err != nil {
					t.Fatal(err)
				}
				src, dst := a.waitSource(t, "zeros"), a.waitDest(t, "zeros")
				if src.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED || !dst.GetDevices()[0].GetVerified() {
					t.Fatalf("source %v (%v), destination %v (%v)", src.GetPhase(), src.GetError(), dst.GetPhase(), dst.GetError())
				}
				state, wire := dst.GetBytes(), dst.GetWireBytes()
				if state != 32<<20 || src.GetBytes() != state {
					t.Fatalf("state bytes: source %d, destination %d, want %d", src.GetBytes(), state, 32<<20)
				}
				if float64(wire) > tc.most*float64(state) || src.GetWireBytes() != wire || tc.most == 1 && wire != state {
					t.Fatalf("wire bytes: source %d, destination %d, for %d of state (at most %.3f of it)", src.GetWireBytes(), wire, state, tc.most)
				}
			})
		}
	}
}

// dataListener is a direct data listener when direct, else nil.
func dataListener(t *testing.T, direct bool) net.Listener {
	t.Helper()
	if !direct {
		return nil
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return lis
}
