package e2e

import (
	"context"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/internal/loopback"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/services/dest"
	"github.com/vfio-ferry/ferry/services/deviceapi"
	"github.com/vfio-ferry/ferry/services/source"
	"github.com/vfio-ferry/ferry/services/wire"
)

// Version skew. A peer of Ferry 0.1.0's wire behaviour is made here of a
// current agent behind a shim, not of a 0.1.0 binary: the shim sends and
// answers exactly what 0.1.0 did (no agent_version, no features, no
// device descriptions, no Commit, SwitchoverAck or Preflight), in
// process, in milliseconds, and it stays right as long as 0.1.0's wire
// does not change, which a release never does. Building 0.1.0 from its
// tag would test the same bytes at the cost of a second build in every
// CI run and of the tag being present in every clone.

// legacyMethods are the Transfer methods 0.1.0 did not have.
var legacyMethods = map[string]bool{
	ferryv1.Transfer_Commit_FullMethodName:        true,
	ferryv1.Transfer_SwitchoverAck_FullMethodName: true,
}

// legacyDest is a server interceptor that makes a destination speak as
// 0.1.0 did; calls counts the calls of methods 0.1.0 did not have.
type legacyDest struct{ calls atomic.Int32 }

func (l *legacyDest) unary(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	if legacyMethods[info.FullMethod] || info.FullMethod == ferryv1.DestAgent_Preflight_FullMethodName {
		l.calls.Add(1)
		return nil, status.Errorf(codes.Unimplemented, "unknown method %s", info.FullMethod)
	}
	if open, ok := req.(*ferryv1.OpenRequest); ok {
		// 0.1.0 did not know these fields: it never saw them.
		open.AgentVersion, open.Features, open.SourceDescriptions = "", nil, nil
		resp, err := h(ctx, open)
		if r, ok := resp.(*ferryv1.OpenResponse); ok {
			r.AgentVersion, r.GrantedFeatures = "", nil
		}
		return resp, err
	}
	return h(ctx, req)
}

// legacySource is a client interceptor that makes a source's calls to
// its destination those of a 0.1.0 source.
type legacySource struct{ calls atomic.Int32 }

func (l *legacySource) unary(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	if legacyMethods[method] {
		l.calls.Add(1) // a 0.1.0 source never calls these
	}
	if open, ok := req.(*ferryv1.OpenRequest); ok {
		open.AgentVersion, open.Features, open.SourceDescriptions = "", nil, nil
	}
	return invoker(ctx, method, req, reply, cc, opts...)
}

// stateLog records every state a source device is asked to enter.
type stateLog struct {
	mu   sync.Mutex
	sets []vfio.State
}

type loggedDevice struct {
	vfio.Device
	log *stateLog
}

func (d loggedDevice) SetState(s vfio.State) (vfio.DataStream, error) {
	d.log.mu.Lock()
	d.log.sets = append(d.log.sets, s)
	d.log.mu.Unlock()
	return d.Device.SetState(s)
}

func (l *stateLog) all() []vfio.State {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]vfio.State(nil), l.sets...)
}

// loggedAgents starts agents whose source devices record their state
// changes.
func loggedAgents(t *testing.T, cfg loopback.Config) (*agents, *stateLog) {
	t.Helper()
	log := &stateLog{}
	cfg.SourceDevices.Open = func(s vfio.Spec) (vfio.Device, error) {
		d, err := vfio.Open(s)
		if err != nil {
			return nil, err
		}
		return loggedDevice{d, log}, nil
	}
	a := startLoopback(t, cfg)
	dconn := dial(t, a.destAddr)
	a.dest, a.transfer = ferryv1.NewDestAgentClient(dconn), ferryv1.NewTransferClient(dconn)
	a.source = ferryv1.NewSourceAgentClient(dial(t, a.sourceAddr))
	return a, log
}

// start prepares and starts a migration of one pair and watches both
// ends to their final phase.
func (a *agents) runOne(t *testing.T, id, src, dst string, mode ferryv1.MigrationMode, preflight bool) (s, d *ferryv1.Migration) {
	t.Helper()
	prep, err := a.dest.PrepareIncoming(t.Context(), &ferryv1.PrepareIncomingRequest{MigrationId: id, Devices: []string{dst}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.source.StartMigration(t.Context(), &ferryv1.StartMigrationRequest{MigrationId: id, DestAddress: a.destAddr, Token: prep.GetToken(),
		Mode: mode, Preflight: preflight, Devices: []*ferryv1.DevicePair{{SourceDevice: src, DestDevice: dst}}}); err != nil {
		t.Fatal(err)
	}
	return a.waitSource(t, id), a.waitDest(t, id)
}

// neverStopped fails the test if a source device was asked into any
// state but RUNNING.
func neverStopped(t *testing.T, log *stateLog) {
	t.Helper()
	for _, s := range log.all() {
		if s != vfio.StateRunning {
			t.Fatalf("a source device was moved to %v: %v", s, log.all())
		}
	}
}

func TestIncompatibleDestinationIsRefusedBeforeTheSourceStops(t *testing.T) {
	const pre = "sim:size=16MiB,seed=5,flags=stopcopy|p2p|precopy,precopy=16MiB"
	for _, tc := range []struct {
		name, src, dst string
		mode           ferryv1.MigrationMode
		field          string
	}{
		{"another flag set", "sim:size=16MiB,seed=5", "sim:size=16MiB,seed=5,flags=stopcopy", ferryv1.MigrationMode_MIGRATION_MODE_STOP_COPY, "migration_flags"},
		{"another size", "sim:size=16MiB,seed=5", "sim:size=32MiB,seed=5", ferryv1.MigrationMode_MIGRATION_MODE_STOP_COPY, "sim_size"},
		{"no pre-copy where pre-copy is asked", pre, "sim:size=16MiB,seed=5", ferryv1.MigrationMode_MIGRATION_MODE_PRECOPY, "migration_flags"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, log := loggedAgents(t, loopback.Config{})
			src, dst := a.runOne(t, "incompatible", tc.src, tc.dst, tc.mode, false)
			if src.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED || src.GetError().GetReason() != wire.ReasonIncompatibleDevice ||
				!strings.Contains(src.GetError().GetMessage(), "field "+tc.field) {
				t.Fatalf("source ended %v (%v), want FAILED, %s naming %s", src.GetPhase(), src.GetError(), wire.ReasonIncompatibleDevice, tc.field)
			}
			if dst.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED {
				t.Fatalf("destination ended %v", dst.GetPhase())
			}
			neverStopped(t, log)
			if st := deviceState(t, a.destReg, tc.dst); st != vfio.StateRunning {
				t.Fatalf("destination device in %v, want RUNNING (reset)", st)
			}
		})
	}
}

func TestPreflight(t *testing.T) {
	a := startAgents(t, dest.Config{})
	describe := func(spec string) *ferryv1.DeviceDescription {
		s, err := vfio.ParseSpec(spec)
		if err != nil {
			t.Fatal(err)
		}
		d, err := vfio.NewSim(s)
		if err != nil {
			t.Fatal(err)
		}
		defer d.Close()
		return deviceapi.DescriptionToProto(vfio.Describe(d))
	}
	src := describe("sim:size=8MiB,seed=2")
	resp, err := a.dest.Preflight(t.Context(), &ferryv1.PreflightRequest{Devices: []*ferryv1.PreflightPair{
		{Source: src, DestDevice: "sim:size=8MiB,seed=2"},
		{Source: src, DestDevice: "sim:size=8MiB,seed=3,flags=stopcopy"},
		{Source: src, DestDevice: "sim:size=nonsense"},
	}, Features: []ferryv1.Feature{ferryv1.Feature_FEATURE_COMMIT}})
	if err != nil {
		t.Fatal(err)
	}
	v := resp.GetDevices()
	if resp.GetCompatible() || len(v) != 3 || !v[0].GetCompatible() || v[1].GetCompatible() || v[1].GetField() != "migration_flags" ||
		v[1].GetError().GetReason() != wire.ReasonIncompatibleDevice || v[2].GetCompatible() || v[2].GetError().GetReason() != wire.ReasonInvalidArgument {
		t.Fatalf("Preflight: %v", resp)
	}
	if resp.GetAgentVersion() == "" || len(resp.GetFeatures()) == 0 {
		t.Fatalf("Preflight says no version or features: %v", resp)
	}
	// Preflight changes no device's state.
	if st := deviceState(t, a.destReg, "sim:size=8MiB,seed=2"); st != vfio.StateRunning {
		t.Fatalf("a device preflight looked at is in %v", st)
	}
	// A feature this build does not know makes the migration impossible.
	resp, err = a.dest.Preflight(t.Context(), &ferryv1.PreflightRequest{Devices: []*ferryv1.PreflightPair{{Source: src, DestDevice: "sim:size=8MiB,seed=2"}},
		Features: []ferryv1.Feature{ferryv1.Feature(40)}})
	if err != nil || resp.GetCompatible() || resp.GetError().GetReason() != wire.ReasonFeatureNotSupported {
		t.Fatalf("Preflight with an unknown feature: %v, %v", resp, err)
	}
}

func TestCurrentSourceToA010Destination(t *testing.T) {
	shim := &legacyDest{}
	a, log := loggedAgents(t, loopback.Config{DestUnary: shim.unary})
	src, dst := a.runOne(t, "to-old", "sim:size=16MiB,seed=8", "sim:size=16MiB,seed=8", ferryv1.MigrationMode_MIGRATION_MODE_STOP_COPY, false)
	if src.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED || dst.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED || !dst.GetDevices()[0].GetVerified() {
		t.Fatalf("source %v (%v), destination %v (%v)", src.GetPhase(), src.GetError(), dst.GetPhase(), dst.GetError())
	}
	if n := shim.calls.Load(); n != 0 {
		t.Fatalf("the source called %d methods a 0.1.0 destination does not have", n)
	}
	// A 0.1.0 destination updates the window every quarter window: the
	// source keeps the whole window in flight, not its in-flight limit.
	if got, want := src.GetDevices()[0].GetInFlightLimitBytes(), dst.GetWindowBytes(); got != want {
		t.Errorf("in flight to a 0.1.0 destination: at most %d bytes, want the window, %d", got, want)
	}

	// What 0.1.0 cannot do is refused before any device stops.
	log.mu.Lock()
	log.sets = nil
	log.mu.Unlock()
	const pre = "sim:size=16MiB,seed=9,flags=stopcopy|p2p|precopy,precopy=16MiB"
	src, _ = a.runOne(t, "precopy-to-old", pre, pre, ferryv1.MigrationMode_MIGRATION_MODE_PRECOPY, false)
	if src.GetError().GetReason() != wire.ReasonFeatureNotSupported || !strings.Contains(src.GetError().GetMessage(), "0.1.0") {
		t.Fatalf("pre-copy to a 0.1.0 destination: %v (%v)", src.GetPhase(), src.GetError())
	}
	src, _ = a.runOne(t, "preflight-to-old", "sim:size=16MiB,seed=10", "sim:size=16MiB,seed=10", ferryv1.MigrationMode_MIGRATION_MODE_STOP_COPY, true)
	if src.GetError().GetReason() != wire.ReasonFeatureNotSupported {
		t.Fatalf("a preflight against a 0.1.0 destination: %v (%v)", src.GetPhase(), src.GetError())
	}
	neverStopped(t, log)
}

// A current destination grants FEATURE_PROMPT_FEEDBACK: the source
// measures the path (256 MiB: long enough for a bandwidth sample,
// rateInterval being 20 ms) and keeps in flight twice the product it
// measured, at least the 16 MiB floor, at most the window, where to a
// 0.1.0 destination it keeps the window (TestCurrentSourceToA010Destination).
// The product depends on the machine's load (a loaded machine's round
// trips are long), so the test holds the limit to the rule applied to
// the figures the source reports with it, not to a number.
func TestCurrentDestinationGetsTheInFlightLimit(t *testing.T) {
	a, _ := loggedAgents(t, loopback.Config{})
	src, dst := a.runOne(t, "current", "sim:size=256MiB,seed=12", "sim:size=256MiB,seed=12", ferryv1.MigrationMode_MIGRATION_MODE_STOP_COPY, false)
	if src.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED || !dst.GetDevices()[0].GetVerified() {
		t.Fatalf("source %v (%v), destination %v (%v)", src.GetPhase(), src.GetError(), dst.GetPhase(), dst.GetError())
	}
	d := src.GetDevices()[0]
	rtt, rate := d.GetMinRoundTrip().AsDuration(), d.GetPathBytesPerSecond()
	if rtt <= 0 || rate <= 0 {
		t.Fatalf("the path was not measured: round trip %v, %v bytes/s", rtt, rate)
	}
	window := dst.GetWindowBytes()
	want := window
	if bdp := 2 * float64(rate) * rtt.Seconds(); bdp < float64(window) {
		want = max(uint64(bdp), min(16<<20, window))
	}
	if got := d.GetInFlightLimitBytes(); got != want {
		t.Errorf("in flight: at most %d bytes of a %d-byte window, want %d (twice %v bytes/s over %v, at least 16 MiB)", got, window, want, rate, rtt)
	}
}

func TestA010SourceToCurrentDestination(t *testing.T) {
	shim := &legacySource{}
	a, _ := loggedAgents(t, loopback.Config{Source: source.Config{DialOptions: []grpc.DialOption{grpc.WithChainUnaryInterceptor(shim.unary)}}})
	src, dst := a.runOne(t, "from-old", "sim:size=16MiB,seed=11", "sim:size=16MiB,seed=11", ferryv1.MigrationMode_MIGRATION_MODE_STOP_COPY, false)
	// The destination takes the verified verdict as the commit, as 0.1.0
	// did: it owns the devices without a Commit.
	if src.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED || dst.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED ||
		dst.GetOwner() != ferryv1.DeviceOwner_DEVICE_OWNER_DESTINATION {
		t.Fatalf("source %v (%v), destination %v owner %v (%v)", src.GetPhase(), src.GetError(), dst.GetPhase(), dst.GetOwner(), dst.GetError())
	}
	if n := shim.calls.Load(); n != 0 {
		t.Fatalf("the source called %d methods a 0.1.0 source does not have", n)
	}
}
