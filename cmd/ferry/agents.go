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
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	grpcprom "github.com/grpc-ecosystem/go-grpc-middleware/providers/prometheus"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/reflection"

	"github.com/vfio-ferry/ferry/internal/buildinfo"
	"github.com/vfio-ferry/ferry/internal/tracing"
	"github.com/vfio-ferry/ferry/pkg/size"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/services/chunkwire"
	"github.com/vfio-ferry/ferry/services/dest"
	"github.com/vfio-ferry/ferry/services/grpcserver"
	"github.com/vfio-ferry/ferry/services/peerauth"
	"github.com/vfio-ferry/ferry/services/source"
	"github.com/vfio-ferry/ferry/services/telemetry"
	"github.com/vfio-ferry/ferry/services/wire"
)

// agentFlags are the flags every agent command takes.
type agentFlags struct {
	listen        string
	sec           securityFlags // registered by each command (security.go)
	allowSim      bool
	metricsListen string
	dataListen    string // the destination's direct data listener
	healthListen  string
	drainTimeout  time.Duration
	deviceTimeout time.Duration
	vmm           vmmSocketFlags
	log           logFlags
}

func (f *agentFlags) register(fs *flag.FlagSet, defaultListen string) {
	fs.StringVar(&f.listen, "listen", defaultListen, "gRPC listen address (host:port)")
	fs.BoolVar(&f.allowSim, "allow-sim", false, "serve simulated devices (sim:size=...,seed=...)")
	fs.StringVar(&f.metricsListen, "metrics-listen", "", "serve Prometheus metrics on this address at /metrics (off when empty)")
	fs.StringVar(&f.healthListen, "health-listen", "", "serve plaintext grpc.health.v1 (and reflection), nothing else, on this address for Kubernetes gRPC probes (off when empty)")
	fs.DurationVar(&f.drainTimeout, "drain-timeout", 30*time.Second, "on SIGTERM, how long running migrations may go on before they are aborted and rolled back (a second SIGTERM aborts them at once)")
	fs.DurationVar(&f.deviceTimeout, "device-timeout", vfio.DefaultOpTimeout, "how long a device operation (a state change, a reset, one read or write of its state) may take before the device is reported stuck and its migration rolls back without it")
	f.vmm.register(fs)
	f.log.register(fs)
}

// metrics returns the metrics of the roles r and their registry when
// --metrics-listen is set, else nil and nil (no metrics are kept).
func (f *agentFlags) metrics(r roles) (*telemetry.Metrics, *prometheus.Registry) {
	if f.metricsListen == "" {
		return nil, nil
	}
	o := telemetry.Options{Build: buildinfo.Read()}
	if r.source {
		o.Roles = append(o.Roles, telemetry.RoleSource)
	}
	if r.dest {
		o.Roles = append(o.Roles, telemetry.RoleDest)
	}
	reg := prometheus.NewRegistry()
	return telemetry.New(reg, o), reg
}

// destFlags are the destination agent's limits.
type destFlags struct {
	maxBuffers     *uint
	maxBufferBytes sizeFlag
	budget         sizeFlag
	sourceTimeout  *time.Duration
}

// sourceFlags are the source agent's fault deadlines.
type sourceFlags struct {
	reconnect *time.Duration
	progress  *time.Duration
	budget    sizeFlag
	bandwidth rateFlag
}

func (f *sourceFlags) register(fs *flag.FlagSet) {
	f.reconnect = fs.Duration("reconnect-timeout", source.DefaultReconnectTimeout, "how long a lost channel or an unreachable destination is retried before the migration fails")
	f.progress = fs.Duration("progress-timeout", source.DefaultProgressTimeout, "how long a channel's send may block, or what it sent go unacknowledged while its device's acknowledgements stand still, before it is re-dialled")
	f.budget = sizeFlag(source.DefaultMemoryBudget)
	fs.Var(&f.bandwidth, "max-bandwidth", "the most all outgoing migrations of this agent together may put on the wire, e.g. 10Gbit/s, beside each migration's own limit (default: none)")
	fs.Var(&f.budget, "send-memory-budget", "memory for all outgoing migrations' unacknowledged chunks on this node, whatever windows the destinations advertise; a migration that cannot get a chunk per device is refused (0: the default)")
}

// apply sets the deadlines in cfg.
func (f *sourceFlags) apply(cfg *source.Config) error {
	if *f.reconnect <= 0 || *f.progress <= 0 {
		return errors.New("--reconnect-timeout and --progress-timeout must be positive")
	}
	cfg.ReconnectTimeout, cfg.ProgressTimeout = *f.reconnect, *f.progress
	cfg.MemoryBudget = uint64(f.budget)
	if f.bandwidth != 0 && f.bandwidth < source.MinBandwidth {
		return fmt.Errorf("--max-bandwidth must be at least %s (or 0 for none)", size.FormatRate(source.MinBandwidth))
	}
	cfg.MaxBandwidth = uint64(f.bandwidth)
	return nil
}

func (f *destFlags) register(fs *flag.FlagSet) {
	f.maxBuffers = fs.Uint("max-buffers", dest.DefaultMaxChunks, "per-device window: chunks the source may have in flight")
	f.maxBufferBytes = sizeFlag(dest.DefaultMaxBytes)
	fs.Var(&f.maxBufferBytes, "max-buffer-bytes", "per-device window: bytes the source may have in flight (bounds memory per device)")
	f.budget = sizeFlag(dest.DefaultMemoryBudget)
	fs.Var(&f.budget, "memory-budget", "memory for all incoming migrations' windows on this node; a prepare beyond it is refused (0: the default)")
	f.sourceTimeout = fs.Duration("source-timeout", dest.DefaultSourceTimeout, "how long an opened session may have no channel connected before it fails and its devices are reset")
}

// config is the destination agent's Config, without its registry, pool,
// logger and metrics.
func (f *destFlags) config() (dest.Config, error) {
	if *f.maxBuffers == 0 || *f.maxBuffers > 1<<20 {
		return dest.Config{}, fmt.Errorf("--max-buffers must be 1 to %d", 1<<20)
	}
	if *f.sourceTimeout <= 0 {
		return dest.Config{}, errors.New("--source-timeout must be positive")
	}
	// The default is applied here, not left to the agent, so that the
	// budget gauge reports the budget in force.
	budget := uint64(f.budget)
	if budget == 0 {
		budget = dest.DefaultMemoryBudget
	}
	return dest.Config{MaxChunks: uint32(*f.maxBuffers), MaxBytes: uint64(f.maxBufferBytes), MemoryBudget: budget, SourceTimeout: *f.sourceTimeout}, nil
}

// creds returns the transport credentials of the agent's listener and
// those it dials peer agents with: mutual TLS, or plaintext with an
// explicit --insecure; an agent refuses to start without either. With
// TLS, r reads the files again when they change (serve runs it).
func (f *agentFlags) creds(log *slog.Logger) (server, peer credentials.TransportCredentials, r *peerauth.Reloader, err error) {
	return f.sec.transport(log)
}

func runDest(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	return runRoles(ctx, "dest", "--listen ADDR (--insecure | --tls-cert FILE --tls-key FILE --tls-ca FILE --allow-client ID... --allow-peer ID...) [--devices PATTERN...] [--allow-sim] [--max-buffers N] [--max-buffer-bytes SIZE] [--memory-budget SIZE] [--source-timeout D] [--data-listen ADDR] [--metrics-listen ADDR] [--health-listen ADDR] [--drain-timeout D]",
		"127.0.0.1:7100", roles{dest: true}, args, stderr)
}

func runSource(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	return runRoles(ctx, "source", "--listen ADDR (--insecure | --tls-cert FILE --tls-key FILE --tls-ca FILE --allow-client ID...) [--devices PATTERN...] [--allow-sim] [--reconnect-timeout D] [--progress-timeout D] [--send-memory-budget SIZE] [--max-bandwidth RATE] [--metrics-listen ADDR] [--health-listen ADDR] [--drain-timeout D]",
		"127.0.0.1:7200", roles{source: true}, args, stderr)
}

// roles says which agents a process serves.
type roles struct{ source, dest bool }

// runRoles parses an agent command's flags, builds the agents of the roles
// asked for on one device registry and one buffer pool, and serves them on
// one listener until ctx ends.
func runRoles(ctx context.Context, name, synopsis, listen string, r roles, args []string, stderr io.Writer) error {
	fs := newFlagSet(name, stderr, synopsis)
	var af agentFlags
	af.register(fs, listen)
	af.sec.register(fs, r.dest)
	var df destFlags
	var sf sourceFlags
	if r.dest {
		df.register(fs)
		fs.StringVar(&af.dataListen, "data-listen", "", "accept direct data connections on this address (host:port): sources then send chunks there, beside their Channel streams and with the same TLS, instead of in gRPC messages, at a fraction of the CPU (off when empty)")
	}
	if r.source {
		sf.register(fs)
	}
	if err := parse(fs, args); err != nil {
		return err
	}
	var dcfg dest.Config
	var scfg source.Config
	if r.dest {
		var err error
		if dcfg, err = df.config(); err != nil {
			return usageError(err)
		}
	}
	if r.source {
		if err := sf.apply(&scfg); err != nil {
			return usageError(err)
		}
	}
	log, err := af.log.logger(stderr)
	if err != nil {
		return usageError(err)
	}
	creds, peerCreds, reloader, err := af.creds(log)
	if err != nil {
		return usageError(err)
	}
	if af.deviceTimeout <= 0 {
		return &exitError{code: 2, err: fmt.Errorf("--device-timeout %v: must be above zero", af.deviceTimeout)}
	}
	regOpts := af.sec.registry(af.allowSim)
	regOpts.OpTimeout = af.deviceTimeout
	ev := &evictors{log: log}
	regOpts.Evict = ev.evict
	reg := vfio.NewRegistry(regOpts)
	defer reg.Close()
	// Stopped after the agents (deferred before them): a drain lets the
	// migrations of lent devices end before the socket withdraws them.
	stopVMM, err := startVMMSocket(ctx, &af.vmm, reg, log)
	if err != nil {
		return usageError(err)
	}
	defer stopVMM()
	pool := chunkwire.NewPool()
	metrics, promReg := af.metrics(r)
	tr, err := tracing.FromEnv(ctx, "ferry")
	if err != nil {
		return usageError(err)
	}
	defer shutdownTracing(tr, stderr)
	var served []servedAgent
	if r.dest {
		dcfg.Registry, dcfg.Pool, dcfg.Logger, dcfg.Metrics, dcfg.Tracing = reg, pool, log, metrics, tr
		dagent, err := dest.New(dcfg)
		if err != nil {
			return usageError(err)
		}
		defer dagent.Close()
		ev.agents = append(ev.agents, dagent)
		metrics.WatchBudget(promReg, dagent.BudgetInUse, dcfg.MemoryBudget)
		served = append(served, dagent)
	}
	if r.source {
		scfg.Registry, scfg.Pool, scfg.Logger, scfg.PeerCreds, scfg.Metrics, scfg.Tracing = reg, pool, log, peerCreds, metrics, tr
		sagent, err := source.New(scfg)
		if err != nil {
			return usageError(err)
		}
		// Deferred last, closed first: its rollback tells the peer
		// destinations before this process's own destination closes.
		defer sagent.Close()
		sendBudget := scfg.MemoryBudget
		if sendBudget == 0 {
			sendBudget = source.DefaultMemoryBudget
		}
		metrics.WatchSendBudget(promReg, sagent.BudgetUsed, sendBudget)
		metrics.WatchNodeBandwidth(promReg, sagent.NodeBandwidth())
		ev.agents = append(ev.agents, sagent)
		served = append([]servedAgent{sagent}, served...)
	}
	if reloader != nil {
		metrics.WatchCertificates(promReg, certificates(reloader))
	}
	return serve(ctx, &af, creds, reloader, tr, pool, log, name, metrics, promReg, served...)
}

// certificates exports what r holds to the metrics.
func certificates(r *peerauth.Reloader) telemetry.Certificates {
	return telemetry.Certificates{
		InUse: func() []telemetry.Certificate {
			var out []telemetry.Certificate
			for _, c := range r.Certificates() {
				out = append(out, telemetry.Certificate{Kind: c.Kind, Subject: c.Subject, Serial: c.Serial, NotAfter: c.NotAfter})
			}
			return out
		},
		Reloads:  r.Reloads,
		Failures: r.Failures,
	}
}

// Health service names the Kubernetes probes ask for, beside "" and the
// name of every gRPC service the agent serves.
const (
	// healthLiveness is SERVING while the process serves, draining or not:
	// the liveness probe asks for it.
	healthLiveness = "liveness"
	// healthReadiness is SERVING while the agent takes new migrations and
	// NOT_SERVING from the moment it drains, as are "" and every service
	// name: the readiness probe asks for it.
	healthReadiness = "readiness"
)

// dataServer is an agent that takes direct data connections (the
// destination).
type dataServer interface {
	ServeData(net.Listener, credentials.TransportCredentials) error
}

// servedAgent is one role's agent as serve runs it.
type servedAgent interface {
	// Register registers the agent's gRPC services.
	Register(grpc.ServiceRegistrar)
	// Refuse refuses new migrations with UNAVAILABLE from now on.
	Refuse()
	// Drain refuses new migrations and waits for the running ones until
	// ctx ends.
	Drain(context.Context) error
	// Running reports the migrations not yet ended.
	Running() int
	// Close aborts what still runs, with the rollback rule, and waits.
	Close()
}

// stopTimeout bounds the graceful stop of the servers once the agents
// have drained: streams still open then are cut.
const stopTimeout = 10 * time.Second

// serve runs the agents' gRPC server, and the health and metrics
// endpoints when their flags are set, until ctx ends (SIGTERM). Then it
// drains: readiness goes NOT_SERVING at once, new migrations are refused
// with UNAVAILABLE, running ones get --drain-timeout to end and are then
// aborted with the rollback rule, and the servers stop. Agents are closed
// in the order given.
func serve(ctx context.Context, af *agentFlags, creds credentials.TransportCredentials, reloader *peerauth.Reloader, tr *tracing.Tracing, pool *chunkwire.Pool, log *slog.Logger, role string, metrics *telemetry.Metrics, promReg *prometheus.Registry, agents ...servedAgent) error {
	tuneAgentGC()
	var serverMetrics *grpcprom.ServerMetrics
	if metrics != nil {
		serverMetrics = metrics.Server
	}
	srv := grpcserver.New(grpcserver.Config{Creds: creds, Logger: log, Metrics: serverMetrics, Pool: pool,
		Access: af.sec.access(), NoReflection: !af.sec.reflection, StatsHandler: tr.ServerHandler()})
	for _, a := range agents {
		a.Register(srv)
	}
	srv.Ready()
	srv.Health.SetServingStatus(healthLiveness, healthpb.HealthCheckResponse_SERVING)
	srv.Health.SetServingStatus(healthReadiness, healthpb.HealthCheckResponse_SERVING)

	var listeners []net.Listener
	closeAll := func() {
		for _, l := range listeners {
			l.Close()
		}
	}
	listen := func(addr string) (net.Listener, error) {
		l, err := net.Listen("tcp", addr)
		if err != nil {
			closeAll()
			return nil, err
		}
		listeners = append(listeners, l)
		return l, nil
	}
	lis, err := listen(af.listen)
	if err != nil {
		return err
	}
	var hlis, mlis, dlis net.Listener
	if af.dataListen != "" {
		if dlis, err = listen(af.dataListen); err != nil {
			return fmt.Errorf("--data-listen: %w", err)
		}
	}
	if af.healthListen != "" {
		if hlis, err = listen(af.healthListen); err != nil {
			return fmt.Errorf("--health-listen: %w", err)
		}
	}
	if af.metricsListen != "" {
		if mlis, err = listen(af.metricsListen); err != nil {
			return fmt.Errorf("--metrics-listen: %w", err)
		}
	}

	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return srv.GRPC.Serve(lis) })
	if reloader != nil && af.sec.reload > 0 {
		g.Go(func() error {
			reloader.Watch(gctx, af.sec.reload)
			return nil
		})
	}
	// The probes' server: plaintext, grpc.health.v1 only (and reflection,
	// for grpcurl), sharing the statuses of the agent's server.
	var hsrv *grpc.Server
	if hlis != nil {
		hsrv = grpc.NewServer()
		healthpb.RegisterHealthServer(hsrv, srv.Health)
		reflection.Register(hsrv)
		g.Go(func() error { return hsrv.Serve(hlis) })
		log.Info("health listening", "address", hlis.Addr().String(), "liveness", healthLiveness, "readiness", healthReadiness)
	}
	for _, a := range agents {
		d, ok := a.(dataServer)
		switch {
		case !ok:
		case dlis != nil:
			g.Go(func() error { return d.ServeData(dlis, creds) })
			log.Info("direct data listening", "address", dlis.Addr().String())
		default:
			// Not an error: the gRPC path carries everything. But an
			// operator comparing nodes should see why one costs more.
			log.Info("direct data connections off (no --data-listen): sources send chunks in gRPC messages, at about twice the CPU per GiB")
		}
	}
	var hs *http.Server
	if mlis != nil {
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(promReg, promhttp.HandlerOpts{}))
		hs = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		g.Go(func() error {
			if err := hs.Serve(mlis); !errors.Is(err, http.ErrServerClosed) {
				return err
			}
			return nil
		})
		log.Info("metrics listening", "address", mlis.Addr().String())
	}
	af.sec.logSummary(log, af.allowSim)
	b := buildinfo.Read()
	log.Info("agent listening", "role", role, "address", lis.Addr().String(), "version", b.Version, "revision", b.Revision, "features", wire.Supported.String())
	g.Go(func() error {
		<-gctx.Done()
		drain(log, srv, af.drainTimeout, agents)
		sctx, cancel := context.WithTimeout(context.Background(), stopTimeout)
		defer cancel()
		srv.Stop(sctx)
		if hsrv != nil {
			hsrv.Stop()
		}
		if hs != nil {
			hs.Shutdown(sctx)
		}
		log.Info("stopped", "role", role)
		return nil
	})
	err = g.Wait()
	if errors.Is(err, grpc.ErrServerStopped) {
		return nil
	}
	return err
}

// drain turns readiness off, refuses new migrations, waits up to timeout
// (or until a second SIGTERM or interrupt) for the running ones, then
// closes the agents, which aborts (rolls back) what still runs.
func drain(log *slog.Logger, srv *grpcserver.Server, timeout time.Duration, agents []servedAgent) {
	dctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	// A second signal cuts the wait short. It is caught from here on,
	// before readiness changes, so whoever sees NOT_SERVING can rely on it.
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	var watcher sync.WaitGroup
	watcher.Go(func() {
		select {
		case <-sig:
			cancel()
		case <-dctx.Done():
		}
	})
	defer func() {
		signal.Stop(sig)
		cancel()
		watcher.Wait()
	}()

	// New migrations are refused before readiness says so: a client that
	// sees NOT_SERVING finds them refused.
	for _, a := range agents {
		a.Refuse()
	}
	for name := range srv.GRPC.GetServiceInfo() {
		srv.Health.SetServingStatus(name, healthpb.HealthCheckResponse_NOT_SERVING)
	}
	srv.Health.SetServingStatus("", healthpb.HealthCheckResponse_NOT_SERVING)
	srv.Health.SetServingStatus(healthReadiness, healthpb.HealthCheckResponse_NOT_SERVING)
	running := func() int {
		n := 0
		for _, a := range agents {
			n += a.Running()
		}
		return n
	}
	log.Info("draining: not ready, new migrations refused", "running", running(), "drain_timeout", timeout.String())
	var dg errgroup.Group
	for _, a := range agents {
		dg.Go(func() error { return a.Drain(dctx) })
	}
	if err := dg.Wait(); err != nil {
		why := "drain timeout passed"
		if errors.Is(err, context.Canceled) {
			why = "second signal"
		}
		log.Warn(why+": aborting the running migrations with the rollback rule", "running", running())
	} else {
		log.Info("drained: no migration running")
	}
	for _, a := range agents {
		a.Close()
	}
}
