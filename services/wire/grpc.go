package wire

import (
	"context"
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
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/reflection"
)

// ServerConfig configures an agent's gRPC server.
type ServerConfig struct {
	// Creds are the transport credentials (insecure.NewCredentials() only
	// with --insecure).
	Creds credentials.TransportCredentials
	// Logger receives one line per finished call (never one per message).
	Logger *slog.Logger
	// Metrics, when set, counts calls and messages.
	Metrics *grpcprom.ServerMetrics
	// Pool receives chunk payloads.
	Pool *Pool
}

// Server is a gRPC server with Ferry's codec, interceptors, health and
// reflection. Register the agent's services on GRPC, then call Ready.
type Server struct {
	GRPC   *grpc.Server
	Health *health.Server
	cfg    ServerConfig
}

// NewServer builds the server. The interceptor chain, outermost first:
// metrics, logging (skipping health and reflection), recovery (innermost,
// so a panic becomes INTERNAL and is still counted and logged).
func NewServer(cfg ServerConfig) *Server {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Pool == nil {
		cfg.Pool = NewPool()
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
		return Errorf(codes.Internal, ReasonInternal, "internal error")
	})
	var unary []grpc.UnaryServerInterceptor
	var stream []grpc.StreamServerInterceptor
	if cfg.Metrics != nil {
		unary = append(unary, cfg.Metrics.UnaryServerInterceptor())
		stream = append(stream, cfg.Metrics.StreamServerInterceptor())
	}
	unary = append(unary,
		selector.UnaryServerInterceptor(logging.UnaryServerInterceptor(logger, logOpts...), loggable),
		recovery.UnaryServerInterceptor(recover))
	stream = append(stream,
		selector.StreamServerInterceptor(logging.StreamServerInterceptor(logger, logOpts...), loggable),
		recovery.StreamServerInterceptor(recover))

	s := grpc.NewServer(
		grpc.Creds(cfg.Creds),
		grpc.ForceServerCodecV2(NewCodec(cfg.Pool)),
		grpc.MaxRecvMsgSize(MaxRecvMsgSize),
		grpc.ChainUnaryInterceptor(unary...),
		grpc.ChainStreamInterceptor(stream...),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 5 * time.Second, PermitWithoutStream: true}),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 15 * time.Second, Timeout: 10 * time.Second}),
	)
	hs := health.NewServer()
	healthpb.RegisterHealthServer(s, hs)
	reflection.Register(s)
	return &Server{GRPC: s, Health: hs, cfg: cfg}
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

// DialOptions are the options for a client connection to an agent: the
// codec (so chunks take the fast path), message limits and keepalives that
// notice a dead peer on an idle connection.
func DialOptions(creds credentials.TransportCredentials, pool *Pool) []grpc.DialOption {
	return []grpc.DialOption{
		grpc.WithTransportCredentials(creds),
		grpc.WithDefaultCallOptions(
			grpc.ForceCodecV2(NewCodec(pool)),
			grpc.MaxCallRecvMsgSize(MaxRecvMsgSize),
			grpc.MaxCallSendMsgSize(MaxRecvMsgSize),
		),
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: 10 * time.Second, Timeout: 10 * time.Second, PermitWithoutStream: true}),
	}
}
