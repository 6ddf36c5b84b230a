package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/flow"
	"github.com/vfio-ferry/ferry/services/dest"
)

// benchFerry runs one real migration between a `ferry dest` and a `ferry
// source` child process on loopback, fresh for the run, and measures them.
func benchFerry(ctx context.Context, cfg benchConfig, channels int) (benchRun, error) {
	ctx, cancel := context.WithTimeout(ctx, benchTimeout(cfg))
	defer cancel()
	daddr, err := freeLoopbackAddr()
	if err != nil {
		return benchRun{}, err
	}
	saddr, err := freeLoopbackAddr()
	if err != nil {
		return benchRun{}, err
	}
	// The window in chunks follows the window in bytes, so the byte
	// window is the one that binds.
	maxChunks := min(max(cfg.window/uint64(cfg.chunkSize), dest.DefaultMaxChunks), flow.MaxWindowChunks)
	budget := max(cfg.window*uint64(cfg.devices), dest.DefaultMemoryBudget)
	commonArgs := []string{"--allow-sim", "--log-level", "warn", "--log-format", "json"}
	creds, err := cfg.tls.clientCreds()
	if err != nil {
		return benchRun{}, err
	}
	dargs := []string{"dest", "--listen", daddr,
		"--max-buffers", strconv.FormatUint(maxChunks, 10), "--max-buffer-bytes", strconv.FormatUint(cfg.window, 10),
		"--memory-budget", strconv.FormatUint(budget, 10)}
	if !cfg.grpcData {
		dargs = append(dargs, "--data-listen", "127.0.0.1:0")
	}
	dargs = append(append(dargs, cfg.tls.agentArgs(true)...), commonArgs...)
	d, err := startBenchChild(ctx, "ferry dest", cfg.exe, dargs...)
	if err != nil {
		return benchRun{}, err
	}
	sargs := append(append([]string{"source", "--listen", saddr}, cfg.tls.agentArgs(false)...), commonArgs...)
	s, err := startBenchChild(ctx, "ferry source", cfg.exe, sargs...)
	if err != nil {
		d.kill()
		return benchRun{}, err
	}
	fail := func(err error) (benchRun, error) {
		s.kill()
		d.kill()
		return benchRun{}, fmt.Errorf("%w\n%s: %s\n%s: %s", err, d.name, d.stderr, s.name, s.stderr)
	}
	if err := waitServing(ctx, daddr, creds); err != nil {
		return fail(fmt.Errorf("the destination agent did not start: %w", err))
	}
	if err := waitServing(ctx, saddr, creds); err != nil {
		return fail(fmt.Errorf("the source agent did not start: %w", err))
	}
	p := plan{
		id: newMigrationID(), sourceAddr: saddr, destAddr: daddr, transfer: daddr,
		channels: uint32(channels), chunkSize: cfg.chunkSize, creds: creds,
	}
	for _, spec := range cfg.specs() {
		p.pairs = append(p.pairs, &ferryv1.DevicePair{SourceDevice: spec, DestDevice: spec})
	}
	r, err := migrate(ctx, p, nil)
	if err != nil {
		return fail(err)
	}
	if !r.Verified {
		msg := r.Phase
		if r.Error != nil {
			msg += ": " + r.Error.Message
		}
		return fail(fmt.Errorf("the migration did not succeed: %s", msg))
	}
	if r.DirectData == cfg.grpcData {
		// A source that cannot reach the data port sends in Channel
		// messages: the run would measure the other path.
		return fail(fmt.Errorf("the migration's chunks did not travel as asked (direct data: %v)", r.DirectData))
	}
	drss, srss := d.peakRSS(), s.peakRSS()
	// The agents drain and exit on an interrupt, as under a supervisor.
	s.cmd.Process.Signal(os.Interrupt)
	d.cmd.Process.Signal(os.Interrupt)
	scpu, serr := s.wait()
	dcpu, derr := d.wait()
	if err := errors.Join(serr, derr); err != nil {
		return benchRun{}, err
	}
	if r.DurationSeconds <= 0 || r.Bytes != cfg.totalBytes() {
		return benchRun{}, fmt.Errorf("the migration moved %d bytes in %vs, want %d bytes", r.Bytes, r.DurationSeconds, cfg.totalBytes())
	}
	return benchRun{
		bytesPerSecond: float64(r.Bytes) / r.DurationSeconds, seconds: r.DurationSeconds,
		cpuSeconds: scpu + dcpu, sendCPU: scpu, recvCPU: dcpu,
		recvRSS: drss, sendRSS: srss,
	}, nil
}

// freeLoopbackAddr returns a loopback address with a port that was free a
// moment ago, for an agent child to listen on.
func freeLoopbackAddr() (string, error) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	addr := lis.Addr().String()
	lis.Close()
	return addr, nil
}

// waitServing waits until the agent at addr answers its health check.
func waitServing(ctx context.Context, addr string, creds credentials.TransportCredentials) error {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(creds))
	if err != nil {
		return err
	}
	defer conn.Close()
	hc := healthpb.NewHealthClient(conn)
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for {
		cctx, ccancel := context.WithTimeout(ctx, time.Second)
		resp, err := hc.Check(cctx, &healthpb.HealthCheckRequest{})
		ccancel()
		if err == nil && resp.GetStatus() == healthpb.HealthCheckResponse_SERVING {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: %v", addr, err)
		case <-time.After(20 * time.Millisecond):
		}
	}
}
