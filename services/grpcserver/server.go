package grpcserver

import (
	"context"
	"github.com/vfio-ferry/ferry/services/chunkwire"
	"github.com/vfio-ferry/ferry/services/peerauth"
	"github.com/vfio-ferry/ferry/services/wire"
	"log/slog"
	"time"

	grpcprom "github.com/grpc-ecosystem/go-grpc-middleware/providers/prometheus"
	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors"
	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors/logging"
	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors/recovery"
	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors/selector"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/experimental"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/reflection"
	"google.golang.org/grpc/stats"
)

// Config configures an agent's gRPC server.
type Config struct {
	// Creds are the transport credentials (insecure.NewCredentials() only
	// with --insecure).
	Creds credentials.TransportCredentials
	// Logger receives one line per finished call (never one per message).
	Logger *slog.Logger
	// Metrics, when set, counts calls and messages.
	Metrics *grpcprom.ServerMetrics
	// Pool receives chunk payloads.
	Pool *chunkwire.Pool
	// Access, when not nil, says which client identities may call which
	// services (see peerauth.AccessRule); health and reflection stay open, and a
	// service no rule names is refused to everyone. Nil: no
	// authorization (plaintext agents, tests).
	Access []peerauth.AccessRule
	// NoReflection leaves gRPC reflection unregistered.
	NoReflection bool
	// Unary, when set, runs innermost, around each unary handler: tests
	// put a peer of another version's wire behaviour in front of an
	// agent with it.
	Unary grpc.UnaryServerInterceptor
	// StatsHandler, when set, sees every call (the tracing's server
	// handler, internal/tracing).
	StatsHandler stats.Handler
}

// Server is a gRPC server with Ferry's codec, interceptors, health and
// reflection. Register the agent's services on the Server itself (it is a
// grpc.ServiceRegistrar, see RegisterService), then call Ready.
type Server struct {
	GRPC   *grpc.Server
	Health *health.Server
	cfg    Config
}

// New builds the server. The interceptor chain, outermost first:
// metrics, logging (skipping health and reflection), authorization (when
// cfg.Access is set), recovery (innermost, so a panic becomes INTERNAL and
// is still counted and logged).
func New(cfg Config) *Server {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Pool == nil {
		cfg.Pool = chunkwire.NewPool()
	}
	logOpts := []logging.Option{logging.WithLogOnEvents(logging.FinishCall)}
	loggable := selector.MatchFunc(func(_ context.Context, c interceptors.CallMeta) bool {
		return c.Service != healthpb.Health_ServiceDesc.ServiceName &&
			c.Service != "grpc.reflection.v1.ServerReflection" &&
			c.Service != "grpc.reflection.v1alpha.ServerReflection"
	})
	logger := interceptorLogger(cfg.Logger)
	recover := recovery.WithRecoveryHandler(func(p any) error {
		cfg.Logger.Error("panic in handler", "panic", p)
		return wire.Errorf(codes.Internal, wire.ReasonInternal, "internal error")
	})
	var unary []grpc.UnaryServerInterceptor
	var stream []grpc.StreamServerInterceptor
	if cfg.Metrics != nil {
		unary = append(unary, cfg.Metrics.UnaryServerInterceptor())
		stream = append(stream, cfg.Metrics.StreamServerInterceptor())
	}
	authUnary, authStream := peerauth.Interceptors(cfg.Access)
	unary = append(unary, selector.UnaryServerInterceptor(logging.UnaryServerInterceptor(logger, logOpts...), loggable))
	unary = append(unary, authUnary...)
	unary = append(unary, recovery.UnaryServerInterceptor(recover))
	if cfg.Unary != nil {
		unary = append(unary, cfg.Unary)
	}
	stream = append(stream, selector.StreamServerInterceptor(logging.StreamServerInterceptor(logger, logOpts...), loggable))
	stream = append(stream, authStream...)
	stream = append(stream, recovery.StreamServerInterceptor(recover))

	opts := []grpc.ServerOption{
		grpc.Creds(peerauth.LogRefusedHandshakes(cfg.Creds, cfg.Logger)),
		grpc.ForceServerCodecV2(targetCodec{chunkwire.ServerCodec{Codec: chunkwire.NewCodec(cfg.Pool)}}),
		// gRPC reads DATA frames into buffers from the Ferry pool, which
		// does not zero them; the codec keeps them as the chunk (see chunkwire.Pool
		// and InChunk).
		experimental.BufferPool(cfg.Pool),
		grpc.WriteBufferSize(writeBufferSize),
		// Above Ferry's limit, which the codec enforces (recverr.go).
		grpc.MaxRecvMsgSize(grpcRecvLimit),
		grpc.ChainUnaryInterceptor(unary...),
		grpc.ChainStreamInterceptor(stream...),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 5 * time.Second, PermitWithoutStream: true}),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 15 * time.Second, Timeout: 10 * time.Second}),
	}
	if cfg.StatsHandler != nil {
		opts = append(opts, grpc.StatsHandler(cfg.StatsHandler))
	}
	s := grpc.NewServer(opts...)
	srv := &Server{GRPC: s, Health: health.NewServer(), cfg: cfg}
	healthpb.RegisterHealthServer(srv, srv.Health)
	if !cfg.NoReflection {
		reflection.Register(s)
	}
	return srv
}

// Ready marks every registered service SERVING and initialises metrics.
func (s *Server) Ready() {
	for name := range s.GRPC.GetServiceInfo() {
		s.Health.SetServingStatus(name, healthpb.HealthCheckResponse_SERVING)
	}
	s.Health.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	if s.cfg.Metrics != nil {
		s.cfg.Metrics.InitializeMetrics(s.GRPC)
	}
}

// Stop marks the server NOT_SERVING and stops it, gracefully until ctx
// ends, then at once.
func (s *Server) Stop(ctx context.Context) {
	s.Health.Shutdown()
	done := make(chan struct{})
	go func() {
		s.GRPC.GracefulStop()
		close(done)
	}()
	select {
	case <-done:
	case <-ctx.Done():
		s.GRPC.Stop()
		<-done
	}
}

func interceptorLogger(l *slog.Logger) logging.Logger {
	return logging.LoggerFunc(func(ctx context.Context, lvl logging.Level, msg string, fields ...any) {
		l.Log(ctx, slog.Level(lvl), msg, fields...)
	})
}

// writeBufferSize is how many bytes of HTTP/2 frames gRPC gathers before
// one write to the socket (its default is 32 KiB). gRPC copies every frame
// into this buffer either way; what a larger one saves is write calls, and
// with them TCP segments and wake-ups at the peer: 256 KiB cut the CPU per
// GiB of both agents by about 10-15% against 32 KiB in interleaved
// perf-sampled runs of 2 GiB (128 KiB to 512 KiB did about as well; 0,
// which writes each frame straight to the socket, was 30% worse). The
// buffer is taken from a shared pool only while a connection writes.
const writeBufferSize = 256 << 10

// DialOptions are the options for a client connection to an agent: the
// codec (so chunks take the fast path), message limits and keepalives that
// notice a dead peer on an idle connection.
func DialOptions(creds credentials.TransportCredentials, pool *chunkwire.Pool) []grpc.DialOption {
	if pool == nil {
		pool = chunkwire.NewPool()
	}
	return []grpc.DialOption{
		grpc.WithTransportCredentials(creds),
		experimental.WithBufferPool(pool),
		grpc.WithWriteBufferSize(writeBufferSize),
		grpc.WithDefaultCallOptions(
			grpc.ForceCodecV2(chunkwire.NewCodec(pool)),
			grpc.MaxCallRecvMsgSize(wire.MaxRecvMsgSize),
			grpc.MaxCallSendMsgSize(wire.MaxRecvMsgSize),
		),
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: 10 * time.Second, Timeout: 10 * time.Second, PermitWithoutStream: true}),
	}
}
