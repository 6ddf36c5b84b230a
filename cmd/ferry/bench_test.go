package main

import (
	"context"
	"fmt"
	"log/slog"
	"testing"

	"google.golang.org/grpc/credentials/insecure"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/services/dest"
)

// BenchmarkMigration runs whole migrations of one simulated device
// between two agents in this process over loopback gRPC: both agents' data
// paths at once, for profiling (go test -bench Migration -cpuprofile).
// `ferry bench` is the measurement that separates the two sides and
// compares them with raw TCP.
func BenchmarkMigration(b *testing.B) {
	const devSize = 256 << 20
	for _, channels := range []uint32{1, 4} {
		b.Run(fmt.Sprintf("channels=%d", channels), func(b *testing.B) {
			ctx := context.Background()
			env, err := startDemoAgents(ctx, slog.New(slog.DiscardHandler), dest.DefaultMaxChunks, dest.DefaultMaxBytes)
			if err != nil {
				b.Fatal(err)
			}
			defer env.stop()
			b.SetBytes(devSize)
			b.ReportAllocs()
			seed := 0
			for b.Loop() {
				// A migrated device stays in STOP (source) or verified
				// (destination) in the agents' registries: use a new one.
				seed++
				spec := fmt.Sprintf("sim:size=%d,seed=%d", devSize, seed)
				p := plan{
					id: newMigrationID(), sourceAddr: env.sourceAddr, destAddr: env.destAddr, transfer: env.destAddr,
					channels: channels, chunkSize: 1 << 20, creds: insecure.NewCredentials(),
					pairs: []*ferryv1.DevicePair{{SourceDevice: spec, DestDevice: spec}},
				}
				r, err := migrate(ctx, p, nil)
				if err != nil {
					b.Fatal(err)
				}
				if !r.Verified {
					b.Fatalf("migration %s: %+v", r.Phase, r.Error)
				}
			}
		})
	}
}
