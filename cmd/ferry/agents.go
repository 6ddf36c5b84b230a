package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"time"

	grpcprom "github.com/grpc-ecosystem/go-grpc-middleware/providers/prometheus"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/services/dest"
	"github.com/vfio-ferry/ferry/services/source"
	"github.com/vfio-ferry/ferry/services/wire"
)

// agentFlags are the flags both agents take.
type agentFlags struct {
	listen        string
	insecure      bool
	allowSim      bool
	metricsListen string
	log           logFlags
}

func (f *agentFlags) register(fs *flag.FlagSet, defaultListen string) {
	fs.StringVar(&f.listen, "listen", defaultListen, "gRPC listen address (host:port)")
	fs.BoolVar(&f.insecure, "insecure", false, "serve and dial plaintext gRPC (no TLS): for loopback, tests and demos only")
	fs.BoolVar(&f.allowSim, "allow-sim", false, "serve simulated devices (sim:size=...,seed=...)")
	fs.StringVar(&f.metricsListen, "metrics-listen", "", "serve Prometheus metrics on this address at /metrics (off when empty)")
	f.log.register(fs)
}

// creds returns the transport credentials. TLS is not served yet, so the
// agents refuse to start without an explicit --insecure.
func (f *agentFlags) creds() (credentials.TransportCredentials, error) {
	if !f.insecure {
		return nil, errors.New("TLS is not configured: pass --insecure to serve plaintext gRPC (trusted networks only)")
	}
	return insecure.NewCredentials(), nil
}

func runDest(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("dest", stderr, "--listen ADDR [--insecure] [--allow-sim] [--max-buffers N] [--max-buffer-bytes SIZE] [--memory-budget SIZE]")
	var af agentFlags
	af.register(fs, "127.0.0.1:7100")
	maxBuffers := fs.Uint("max-buffers", dest.DefaultMaxChunks, "per-device window: chunks the source may have in flight")
	maxBufferBytes := sizeFlag(dest.DefaultMaxBytes)
	fs.Var(&maxBufferBytes, "max-buffer-bytes", "per-device window: bytes the source may have in flight (bounds memory per device)")
	budget := sizeFlag(dest.DefaultMemoryBudget)
	fs.Var(&budget, "memory-budget", "memory for all incoming migrations' windows on this node; a prepare beyond it is refused")
	if err := parse(fs, args); err != nil {
		return err
	}
	if *maxBuffers == 0 || *maxBuffers > 1<<20 {
		return &exitError{code: 2, err: fmt.Errorf("--max-buffers must be 1 to %d", 1<<20)}
	}
	log, err := af.log.logger(stderr)
	if err != nil {
		return &exitError{code: 2, err: err}
	}
	creds, err := af.creds()
	if err != nil {
		return &exitError{code: 2, err: err}
	}
	reg := vfio.NewRegistry(vfio.RegistryOptions{AllowSim: af.allowSim})
	defer reg.Close()
	pool := wire.NewPool()
	agent, err := dest.New(dest.Config{
		Registry: reg, Pool: pool, Logger: log,
		MaxChunks: uint32(*maxBuffers), MaxBytes: uint64(maxBufferBytes), MemoryBudget: uint64(budget),
	})
	if err != nil {
		return &exitError{code: 2, err: err}
	}
	defer agent.Close()
	return serve(ctx, &af, creds, pool, log, "dest", agent.Register)
}

func runSource(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("source", stderr, "--listen ADDR [--insecure] [--allow-sim]")
	var af agentFlags
	af.register(fs, "127.0.0.1:7200")
	if err := parse(fs, args); err != nil {
		return err
	}
	log, err := af.log.logger(stderr)
	if err != nil {
		return &exitError{code: 2, err: err}
	}
	creds, err := af.creds()
	if err != nil {
		return &exitError{code: 2, err: err}
	}
	reg := vfio.NewRegistry(vfio.RegistryOptions{AllowSim: af.allowSim})
	defer reg.Close()
	pool := wire.NewPool()
	agent, err := source.New(source.Config{Registry: reg, Pool: pool, Logger: log, PeerCreds: creds})
	if err != nil {
		return &exitError{code: 2, err: err}
	}
	defer agent.Close()
	return serve(ctx, &af, creds, pool, log, "source", agent.Register)
}

// serve runs an agent's gRPC server (and metrics endpoint) until ctx ends,
// then drains it.
func serve(ctx context.Context, af *agentFlags, creds credentials.TransportCredentials, pool *wire.Pool, log *slog.Logger, role string, register func(*grpc.Server)) error {
	lis, err := net.Listen("tcp", af.listen)
	if err != nil {
		return err
	}
	reg := prometheus.NewRegistry()
	metrics := grpcprom.NewServerMetrics()
	reg.MustRegister(metrics)
	srv := wire.NewServer(wire.ServerConfig{Creds: creds, Logger: log, Metrics: metrics, Pool: pool})
	register(srv.GRPC)
	srv.Ready()

	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return srv.GRPC.Serve(lis) })
	var hs *http.Server
	if af.metricsListen != "" {
		mlis, err := net.Listen("tcp", af.metricsListen)
		if err != nil {
			srv.GRPC.Stop()
			return err
		}
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
		hs = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		g.Go(func() error {
			if err := hs.Serve(mlis); !errors.Is(err, http.ErrServerClosed) {
				return err
			}
			return nil
		})
		log.Info("metrics listening", "address", mlis.Addr().String())
	}
	log.Info("agent listening", "role", role, "address", lis.Addr().String())
	g.Go(func() error {
		<-gctx.Done()
		log.Info("shutting down", "role", role)
		sctx, cancel := context.WithTimeout(context.WithoutCancel(gctx), 30*time.Second)
		defer cancel()
		srv.Stop(sctx)
		if hs != nil {
			hs.Shutdown(sctx)
		}
		return nil
	})
	err = g.Wait()
	if errors.Is(err, grpc.ErrServerStopped) {
		return nil
	}
	return err
}
