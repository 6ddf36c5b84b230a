package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/vfio-ferry/ferry/pkg/flow"
	"github.com/vfio-ferry/ferry/services/dest"
)

// runFerry runs one real migration between a `ferry dest` and a `ferry
// source` child process on loopback, fresh for the run, and measures them.
// With maxBandwidth the migration is limited to it (the --max-bandwidth
// arm).
func runFerry(ctx context.Context, cfg config, channels int, maxBandwidth uint64) (sample, error) {
	ctx, cancel := context.WithTimeout(ctx, transferTimeout(cfg))
	defer cancel()
	daddr, err := cfg.freeAddr(cfg.destNS())
	if err != nil {
		return sample{}, err
	}
	saddr, err := cfg.freeAddr(cfg.sourceNS())
	if err != nil {
		return sample{}, err
	}
	// The window in chunks follows the window in bytes, so the byte
	// window is the one that binds.
	maxChunks := min(max(cfg.window/uint64(cfg.chunkSize), dest.DefaultMaxChunks), flow.MaxWindowChunks)
	budget := max(dest.WindowCost(uint32(maxChunks), cfg.window)*uint64(cfg.devices), dest.DefaultMemoryBudget)
	commonArgs := []string{"--allow-sim", "--log-level", "warn", "--log-format", "json"}
	creds, err := cfg.tls.clientCreds()
	if err != nil {
		return sample{}, err
	}
	dargs := []string{"dest", "--listen", daddr,
		"--max-buffers", strconv.FormatUint(maxChunks, 10), "--max-buffer-bytes", strconv.FormatUint(cfg.window, 10),
		"--memory-budget", strconv.FormatUint(budget, 10)}
	if !cfg.grpcData {
		dargs = append(dargs, "--data-listen", cfg.anyPort(cfg.destNS()))
	}
	dargs = append(append(dargs, cfg.tls.agentArgs(true)...), commonArgs...)
	d, err := startChild(ctx, "ferry dest", cfg.destNS(), cfg.exe, dargs...)
	if err != nil {
		return sample{}, err
	}
	sargs := append(append([]string{"source", "--listen", saddr}, cfg.tls.agentArgs(false)...), commonArgs...)
	s, err := startChild(ctx, "ferry source", cfg.sourceNS(), cfg.exe, sargs...)
	if err != nil {
		d.kill()
		return sample{}, err
	}
	fail := func(err error) (sample, error) {
		s.kill()
		d.kill()
		return sample{}, fmt.Errorf("%w\n%s: %s\n%s: %s", err, d.name, d.stderr, s.name, s.stderr)
	}
	if err := waitServing(ctx, daddr, creds, cfg.dialer(cfg.destNS())); err != nil {
		return fail(fmt.Errorf("the destination agent did not start: %w", err))
	}
	if err := waitServing(ctx, saddr, creds, cfg.dialer(cfg.sourceNS())); err != nil {
		return fail(fmt.Errorf("the source agent did not start: %w", err))
	}
	r, err := cfg.migrate(ctx, Migration{
		SourceAddr: saddr, DestAddr: daddr, Channels: uint32(channels), ChunkSize: cfg.chunkSize,
		Specs: cfg.specs(), Creds: creds, MaxBandwidth: maxBandwidth, Compress: cfg.compress,
		DestDial: cfg.dialer(cfg.destNS()), SourceDial: cfg.dialer(cfg.sourceNS()),
	})
	if err != nil {
		return fail(err)
	}
	if !r.Verified {
		msg := r.Phase
		if r.Error != "" {
			msg += ": " + r.Error
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
		return sample{}, err
	}
	if r.TransferSeconds <= 0 || r.Bytes != cfg.totalBytes() {
		return sample{}, fmt.Errorf("the migration moved %d bytes in %vs, want %d bytes", r.Bytes, r.TransferSeconds, cfg.totalBytes())
	}
	return sample{
		bytesPerSecond: float64(r.Bytes) / r.TransferSeconds, seconds: r.TransferSeconds,
		cpuSeconds: scpu + dcpu, sendCPU: scpu, recvCPU: dcpu,
		recvRSS: drss, sendRSS: srss,
	}, nil
}

// waitServing waits until the agent at addr answers its health check,
// dialled with dial (nil: from this namespace).
func waitServing(ctx context.Context, addr string, creds credentials.TransportCredentials, dial DialFunc) error {
	opts := []grpc.DialOption{grpc.WithTransportCredentials(creds)}
	if dial != nil {
		opts = append(opts, grpc.WithContextDialer(dial))
		addr = "passthrough:///" + addr
	}
	conn, err := grpc.NewClient(addr, opts...)
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
