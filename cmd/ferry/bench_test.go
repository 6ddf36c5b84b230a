package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os/exec"
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
			env, err := startDemoAgents(ctx, slog.New(slog.DiscardHandler), nil, dest.DefaultMaxChunks, dest.DefaultMaxBytes)
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

// TestBenchRuns runs `ferry bench` on small devices, as a user would, and
// checks that every figure it promises is there. It asserts nothing about
// speed.
func TestBenchRuns(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary and runs eight migrations")
	}
	bin := buildFerry(t)
	for _, tc := range []struct {
		devices, data string
		tls           bool
	}{{"1", "direct", false}, {"2", "direct", false}, {"1", "grpc", false}, {"1", "direct", true}} {
		devices := tc.devices
		args := []string{"bench", "--size", "8MiB", "--chunk-size", "256KiB", "--channels", "1,3",
			"--devices", devices, "--rounds", "1", "--data", tc.data, "--json"}
		if tc.tls {
			args = append(args, "--tls")
		}
		out, err := exec.Command(bin, args...).Output()
		if err != nil {
			t.Fatalf("devices %s: %v: %s", devices, err, out)
		}
		var rows []map[string]any
		sc := bufio.NewScanner(bytes.NewReader(out))
		for sc.Scan() {
			var row map[string]any
			if err := json.Unmarshal(sc.Bytes(), &row); err != nil {
				t.Fatalf("line %q: %v", sc.Text(), err)
			}
			rows = append(rows, row)
		}
		if len(rows) != 2 {
			t.Fatalf("devices %s: %d rows, want one per channel count:\n%s", devices, len(rows), out)
		}
		for _, row := range rows {
			if row["data"] != tc.data || row["tls"] != tc.tls {
				t.Errorf("devices %s, channels %v: data %v, tls %v, want %s, %v", devices, row["channels"], row["data"], row["tls"], tc.data, tc.tls)
			}
			for _, k := range []string{"channels", "rawtcp_bytes_per_second", "ferry_bytes_per_second", "ratio",
				"rawtcp_cpu_seconds_per_gib", "ferry_cpu_seconds_per_gib", "dest_peak_rss_bytes", "source_peak_rss_bytes"} {
				if v, ok := row[k].(float64); !ok || v <= 0 {
					t.Errorf("devices %s, channels %v: %s = %v", devices, row["channels"], k, row[k])
				}
			}
		}
	}
}
