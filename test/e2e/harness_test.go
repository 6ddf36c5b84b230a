package e2e

import (
	"net"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/internal/loopback"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/services/chunkwire"
	"github.com/vfio-ferry/ferry/services/dest"
	"github.com/vfio-ferry/ferry/services/grpcserver"
	"github.com/vfio-ferry/ferry/services/source"
	"github.com/vfio-ferry/ferry/services/wire"
	"github.com/vfio-ferry/ferry/services/wire/wiretest"
)

// agents is a destination and a source agent serving on loopback TCP.
type agents struct {
	destAddr, sourceAddr string
	dest                 ferryv1.DestAgentClient
	transfer             ferryv1.TransferClient
	source               ferryv1.SourceAgentClient
	destAgent            *dest.Agent
	destReg, sourceReg   *vfio.Registry
}

// startAgents starts both agents; cfg sets the destination's limits (its
// Registry and Pool are filled in). The destination serves direct data
// connections, so chunks travel on them. Everything stops at the end of
// the test.
func startAgents(t testing.TB, cfg dest.Config) *agents {
	t.Helper()
	return startAgentsData(t, cfg, true)
}

// startAgentsData is startAgents with direct data connections (direct) or
// without them (chunks in Channel messages).
func startAgentsData(t testing.TB, cfg dest.Config, direct bool) *agents {
	t.Helper()
	var lis net.Listener
	if direct {
		var err error
		if lis, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
			t.Fatal(err)
		}
	}
	return startAgentsOn(t, cfg, source.Config{}, lis)
}

// startAgentsOn is startAgents with the source's fault deadlines of scfg
// and the destination's direct data connections accepted on dataLis
// (none when nil).
func startAgentsOn(t testing.TB, cfg dest.Config, scfg source.Config, dataLis net.Listener) *agents {
	t.Helper()
	a := startLoopback(t, loopback.Config{Dest: cfg, Source: scfg, DataListener: dataLis})
	dconn := dial(t, a.destAddr)
	a.dest = ferryv1.NewDestAgentClient(dconn)
	a.transfer = ferryv1.NewTransferClient(dconn)
	a.source = ferryv1.NewSourceAgentClient(dial(t, a.sourceAddr))
	return a
}

// startLoopback starts the agents of cfg, with simulated devices
// allowed, until the end of the test; the clients are the caller's to
// fill in.
func startLoopback(t testing.TB, cfg loopback.Config) *agents {
	t.Helper()
	cfg.DestDevices.AllowSim, cfg.SourceDevices.AllowSim = true, true
	l, err := loopback.Start(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// The test's context has ended: the servers stop at once.
		if err := l.Close(t.Context()); err != nil {
			t.Errorf("closing the agents: %v", err)
		}
	})
	return &agents{destAddr: l.DestAddr, sourceAddr: l.SourceAddr, destAgent: l.Dest, destReg: l.DestRegistry, sourceReg: l.SourceRegistry}
}

func dial(t testing.TB, addr string) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpcserver.DialOptions(insecure.NewCredentials(), chunkwire.NewPool())...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// migration names the device pairs and options of one migration.
type migration struct {
	id        string
	src, dst  []string
	channels  uint32
	chunkSize uint32
	maxChunks uint32
	maxBytes  uint64
	// maxBandwidth is the migration's bandwidth limit (0: none).
	maxBandwidth uint64
}

// run prepares, starts and watches a migration to its end, returning the
// source's and the destination's final views.
func (a *agents) run(t testing.TB, m migration) (src, dst *ferryv1.Migration) {
	t.Helper()
	ctx := t.Context()
	prep, err := a.dest.PrepareIncoming(ctx, &ferryv1.PrepareIncomingRequest{MigrationId: m.id, Devices: m.dst, MaxChunks: m.maxChunks, MaxBytes: m.maxBytes})
	if err != nil {
		t.Fatalf("PrepareIncoming: %v", err)
	}
	req := &ferryv1.StartMigrationRequest{MigrationId: m.id, DestAddress: a.destAddr, Token: prep.GetToken(), Channels: m.channels, ChunkSize: m.chunkSize, MaxBandwidth: m.maxBandwidth}
	for i := range m.src {
		req.Devices = append(req.Devices, &ferryv1.DevicePair{SourceDevice: m.src[i], DestDevice: m.dst[i]})
	}
	if _, err := a.source.StartMigration(ctx, req); err != nil {
		t.Fatalf("StartMigration: %v", err)
	}
	src = a.waitSource(t, m.id)
	return src, a.waitDest(t, m.id)
}

// waitSource watches the migration on the source to its final phase.
func (a *agents) waitSource(t testing.TB, id string) *ferryv1.Migration {
	t.Helper()
	stream, err := a.source.WatchMigration(t.Context(), &ferryv1.WatchMigrationRequest{MigrationId: id})
	if err != nil {
		t.Fatal(err)
	}
	return toFinal(t, stream.Recv)
}

// waitDest watches the incoming migration to its final phase.
func (a *agents) waitDest(t testing.TB, id string) *ferryv1.Migration {
	t.Helper()
	stream, err := a.dest.WatchIncoming(t.Context(), &ferryv1.WatchIncomingRequest{MigrationId: id})
	if err != nil {
		t.Fatal(err)
	}
	return toFinal(t, stream.Recv)
}

// sourceUntil watches the migration on the source until it sends a view
// for which ok holds, and returns that view; the test fails if the watch
// ends first.
func (a *agents) sourceUntil(t testing.TB, id string, ok func(*ferryv1.Migration) bool) *ferryv1.Migration {
	t.Helper()
	stream, err := a.source.WatchMigration(t.Context(), &ferryv1.WatchMigrationRequest{MigrationId: id})
	if err != nil {
		t.Fatal(err)
	}
	for {
		resp, err := stream.Recv()
		if err != nil {
			t.Fatalf("watch of %s: %v", id, err)
		}
		if m := resp.GetMigration(); ok(m) {
			return m
		}
	}
}

// moving holds once a migration has moved some bytes.
func moving(m *ferryv1.Migration) bool { return m.GetBytes() > 0 }

// inPhase holds in phase p.
func inPhase(p ferryv1.MigrationPhase) func(*ferryv1.Migration) bool {
	return func(m *ferryv1.Migration) bool { return m.GetPhase() == p }
}

// toFinal follows a watch to its end, which must be a final phase.
func toFinal[R wiretest.Watched](t testing.TB, recv func() (R, error)) *ferryv1.Migration {
	t.Helper()
	last, err := wiretest.LastMigration(recv)
	if last == nil || !wire.Final(last.GetPhase()) {
		t.Fatalf("watch ended at %v: %v", last.GetPhase(), err)
	}
	return last
}

// deviceState reads a device's state from an agent's registry.
func deviceState(t testing.TB, r *vfio.Registry, spec string) vfio.State {
	t.Helper()
	for _, d := range r.List() {
		if d.Spec == spec {
			return d.State
		}
	}
	t.Fatalf("device %s not in the registry", spec)
	return vfio.StateError
}
