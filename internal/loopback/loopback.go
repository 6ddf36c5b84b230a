// Package loopback starts a destination and a source agent in one process,
// serving gRPC on loopback TCP, with optional mutual TLS and the
// destination's direct data connections: `ferry demo` and the end-to-end
// tests run migrations between them.
package loopback

import (
	"context"
	"errors"
	"log/slog"
	"net"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/vfio-ferry/ferry/internal/tracing"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/services/chunkwire"
	"github.com/vfio-ferry/ferry/services/dest"
	"github.com/vfio-ferry/ferry/services/grpcserver"
	"github.com/vfio-ferry/ferry/services/peerauth"
	"github.com/vfio-ferry/ferry/services/source"
)

// Config configures Start.
type Config struct {
	// Dest and Source configure the agents; Start fills in their
	// Registry, Pool and (when nil) Logger, and the source's PeerCreds.
	Dest   dest.Config
	Source source.Config
	// DestDevices and SourceDevices configure the agents' registries;
	// AllowSim admits simulated devices.
	DestDevices, SourceDevices vfio.RegistryOptions
	// Logger receives the agents' and their servers' logs (none when nil).
	Logger *slog.Logger
	// DataListener, when set, is where the destination serves direct data
	// connections; it advertises DataListener.Addr(). Start takes it
	// over: Close closes it, and so does a failed Start.
	DataListener net.Listener
	// TLS, when set, serves mutual TLS; plaintext otherwise.
	TLS *TLS
	// DestUnary, when set, wraps every unary call of the destination's
	// server (grpcserver.Config.Unary).
	DestUnary grpc.UnaryServerInterceptor
	// Tracing, when set, traces both agents' migrations and calls (it
	// fills in the agents' Config.Tracing when nil).
	Tracing *tracing.Tracing
}

// TLS is the transport security of both agents: the credentials of their
// listeners, those the source dials the destination with, and each
// server's authorization.
type TLS struct {
	DestCreds, SourceCreds credentials.TransportCredentials
	SourcePeerCreds        credentials.TransportCredentials
	DestAccess             []peerauth.AccessRule
	SourceAccess           []peerauth.AccessRule
}

// Agents are the two running agents.
type Agents struct {
	// DestAddr and SourceAddr are the agents' gRPC addresses.
	DestAddr, SourceAddr string
	Dest                 *dest.Agent
	Source               *source.Agent
	// DestRegistry and SourceRegistry hold the agents' devices.
	DestRegistry, SourceRegistry *vfio.Registry

	dsrv, ssrv *grpcserver.Server
	dataLis    net.Listener
	serving    chan error // one per Serve and ServeData, when it returns
	serves     int
}

// Start starts the destination and the source agent, each serving gRPC on
// a port of 127.0.0.1 of its own.
func Start(cfg Config) (*Agents, error) {
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	dcreds, screds, peer := credentials.TransportCredentials(insecure.NewCredentials()), credentials.TransportCredentials(insecure.NewCredentials()), credentials.TransportCredentials(insecure.NewCredentials())
	var daccess, saccess []peerauth.AccessRule
	if t := cfg.TLS; t != nil {
		dcreds, screds, peer = t.DestCreds, t.SourceCreds, t.SourcePeerCreds
		daccess, saccess = t.DestAccess, t.SourceAccess
	}
	var lis [2]net.Listener
	fail := func(err error) (*Agents, error) {
		for _, l := range append(lis[:], cfg.DataListener) {
			if l != nil {
				l.Close()
			}
		}
		return nil, err
	}
	for i := range lis {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return fail(err)
		}
		lis[i] = l
	}
	// A device its VMM withdraws cancels the migration holding it: each
	// registry's evictions go to its agent, made below.
	a := &Agents{}
	if cfg.DestDevices.Evict == nil {
		cfg.DestDevices.Evict = func(owner, spec string, why error) { a.Dest.Evict(owner, spec, why) }
	}
	if cfg.SourceDevices.Evict == nil {
		cfg.SourceDevices.Evict = func(owner, spec string, why error) { a.Source.Evict(owner, spec, why) }
	}
	*a = Agents{
		DestRegistry:   vfio.NewRegistry(cfg.DestDevices),
		SourceRegistry: vfio.NewRegistry(cfg.SourceDevices),
		dataLis:        cfg.DataListener,
		serving:        make(chan error, 3),
	}
	closeRegs := func() {
		a.SourceRegistry.Close()
		a.DestRegistry.Close()
	}
	dpool, spool := chunkwire.NewPool(), chunkwire.NewPool()
	dcfg, scfg := cfg.Dest, cfg.Source
	dcfg.Registry, dcfg.Pool = a.DestRegistry, dpool
	scfg.Registry, scfg.Pool, scfg.PeerCreds = a.SourceRegistry, spool, peer
	if dcfg.Logger == nil {
		dcfg.Logger = log
	}
	if scfg.Logger == nil {
		scfg.Logger = log
	}
	if dcfg.Tracing == nil {
		dcfg.Tracing = cfg.Tracing
	}
	if scfg.Tracing == nil {
		scfg.Tracing = cfg.Tracing
	}
	da, err := dest.New(dcfg)
	if err != nil {
		closeRegs()
		return fail(err)
	}
	sa, err := source.New(scfg)
	if err != nil {
		da.Close()
		closeRegs()
		return fail(err)
	}
	a.Dest, a.Source = da, sa
	a.dsrv = grpcserver.New(grpcserver.Config{Creds: dcreds, Logger: log, Pool: dpool, Access: daccess, Unary: cfg.DestUnary, StatsHandler: cfg.Tracing.ServerHandler()})
	da.Register(a.dsrv)
	a.dsrv.Ready()
	a.ssrv = grpcserver.New(grpcserver.Config{Creds: screds, Logger: log, Pool: spool, Access: saccess, StatsHandler: cfg.Tracing.ServerHandler()})
	sa.Register(a.ssrv)
	a.ssrv.Ready()
	a.DestAddr, a.SourceAddr = lis[0].Addr().String(), lis[1].Addr().String()
	a.serve(func() error { return a.dsrv.GRPC.Serve(lis[0]) })
	a.serve(func() error { return a.ssrv.GRPC.Serve(lis[1]) })
	if a.dataLis != nil {
		a.serve(func() error { return da.ServeData(a.dataLis, dcreds) })
	}
	return a, nil
}

func (a *Agents) serve(f func() error) {
	a.serves++
	go func() { a.serving <- f() }()
}

// Close stops both agents and their servers (gracefully until ctx ends,
// then at once) and closes the registries. It returns the error of the
// direct data server, if it failed.
func (a *Agents) Close(ctx context.Context) error {
	a.Source.Close()
	a.Dest.Close()
	a.ssrv.Stop(ctx)
	a.dsrv.Stop(ctx)
	if a.dataLis != nil {
		a.dataLis.Close()
	}
	var errs []error
	for range a.serves {
		// Serve returns nil after Stop, ServeData nil once its listener
		// is closed.
		if err := <-a.serving; err != nil {
			errs = append(errs, err)
		}
	}
	a.SourceRegistry.Close()
	a.DestRegistry.Close()
	return errors.Join(errs...)
}
