package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"

	"google.golang.org/grpc"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/internal/bench"
	"github.com/vfio-ferry/ferry/services/dest"
	"github.com/vfio-ferry/ferry/services/wire"
)

// runBench is `ferry bench` (internal/bench): the flags, this binary for
// the bench's child processes, and migrate as its control plane.
func runBench(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) > 0 && args[0] == "peer" {
		// The hidden half of the benchmark: a child process that is one
		// side of a raw TCP transfer.
		err := bench.RunPeer(ctx, args[1:], stdout, stderr)
		switch {
		case errors.Is(err, bench.ErrUsage):
			return usageError(err)
		case errors.Is(err, bench.ErrPeerFailed):
			return &exitError{code: 1}
		}
		return err
	}
	fs := newFlagSet("bench", stderr, "[--size SIZE] [--channels 1,2,4,8] [--chunk-size SIZE] [--devices K] [--rounds N] [--window SIZE] [--rate RATE] [--data direct|grpc] [--tls] [--only rawtcp|ferry] [--link RATE] [--max-bandwidth RATE] [--zero FRACTION] [--compress none|zstd] [--json]")
	devSize := sizeFlag(4 << 30)
	fs.Var(&devSize, "size", "state size of each simulated device")
	channelList := fs.String("channels", "1,2,4,8", "comma-separated channel counts (TCP connections) to measure")
	chunk := sizeFlag(wire.DefaultChunkSize)
	fs.Var(&chunk, "chunk-size", "chunk size (and raw TCP write size)")
	devices := fs.Uint("devices", 1, "number of simulated devices, migrated in parallel")
	rounds := fs.Uint("rounds", 3, "rounds per channel count; each round runs rawtcp then ferry, the median is reported")
	window := sizeFlag(dest.DefaultMaxBytes)
	fs.Var(&window, "window", "destination window per device, in bytes (ferry dest --max-buffer-bytes)")
	rate := fs.String("rate", "", "cap each simulated device's reads at this rate, e.g. 256MB/s (default: uncapped)")
	only := fs.String("only", "", "run only rawtcp or only ferry (no ratio)")
	data := fs.String("data", "direct", "how ferry's chunks travel: direct (the destination's direct data connections, ferry dest --data-listen) or grpc (in Channel messages)")
	useTLS := fs.Bool("tls", false, "mutual TLS 1.3 on every connection, both ferry's and raw TCP's, with certificates from a CA made for the run (default: plaintext)")
	asJSON := fs.Bool("json", false, "print one JSON object per channel count")
	var link, maxBandwidth rateFlag
	fs.Var(&link, "link", "run both arms across a link shaped to this rate, e.g. 4Gbit/s: two network namespaces joined by a tbf-shaped veth pair (needs root), instead of loopback")
	zero := fs.Float64("zero", 0, "the share of the simulated devices' 4 KiB pages that are all zero (0 to 1): ferry sends them as headers, raw TCP every byte")
	compress := fs.String("compress", "none", "none, or zstd: ferry's migration compresses its chunks")
	fs.Var(&maxBandwidth, "max-bandwidth", "add an arm to every round: ferry with the migration limited to this rate, e.g. 1Gbit/s, to measure how well the limit holds")
	if err := parse(fs, args); err != nil {
		return err
	}
	var chans []int
	for _, f := range strings.Split(*channelList, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 || n > wire.MaxChannels {
			return usageError(fmt.Errorf("--channels: %q is not a channel count of 1 to %d", f, wire.MaxChannels))
		}
		chans = append(chans, n)
	}
	if *data != "direct" && *data != "grpc" {
		return usageError(errors.New("--data must be direct or grpc"))
	}
	if *compress != "none" && *compress != "zstd" {
		return usageError(errors.New("--compress must be none or zstd"))
	}
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	cfg := bench.Config{
		Size: uint64(devSize), Devices: int(min(*devices, 1<<16)), ChunkSize: uint32(min(uint64(chunk), 1<<32-1)), Window: uint64(window),
		Rate: *rate, Zero: *zero, Compress: *compress == "zstd", Link: uint64(link), MaxBandwidth: uint64(maxBandwidth), Channels: chans, Rounds: int(min(*rounds, 1<<16)), Only: *only, GRPCData: *data == "grpc", TLS: *useTLS, JSON: *asJSON,
		Exe: exe, Migrate: benchMigrate,
	}
	if err := cfg.Validate(); err != nil {
		return usageError(err)
	}
	return bench.Run(ctx, cfg, stdout, stderr)
}

// benchMigrate is the bench's control plane: migrate, as `ferry migrate`
// drives a migration.
func benchMigrate(ctx context.Context, m bench.Migration) (bench.Outcome, error) {
	p := plan{
		id: newMigrationID(), sourceAddr: m.SourceAddr, destAddr: m.DestAddr, transfer: m.DestAddr,
		channels: m.Channels, chunkSize: m.ChunkSize, creds: m.Creds, maxBandwidth: m.MaxBandwidth, compress: m.Compress,
	}
	if m.DestDial != nil || m.SourceDial != nil {
		// The agents run in network namespaces of their own: each is
		// dialled from its namespace, by its address.
		addrs := map[string]bench.DialFunc{m.DestAddr: m.DestDial, m.SourceAddr: m.SourceDial}
		p.dialOptions = append(p.dialOptions, grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			if dial := addrs[addr]; dial != nil {
				return dial(ctx, addr)
			}
			var d net.Dialer
			return d.DialContext(ctx, "tcp", addr)
		}))
	}
	for _, spec := range m.Specs {
		p.pairs = append(p.pairs, &ferryv1.DevicePair{SourceDevice: spec, DestDevice: spec})
	}
	r, err := migrate(ctx, p, nil)
	if err != nil {
		return bench.Outcome{}, err
	}
	o := bench.Outcome{Verified: r.Verified, Phase: r.Phase, DirectData: r.DirectData, Bytes: r.Bytes, TransferSeconds: r.DurationSeconds}
	if r.Error != nil {
		o.Error = r.Error.Message
	}
	return o, nil
}
