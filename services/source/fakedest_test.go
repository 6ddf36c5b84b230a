package source

import (
	"context"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/durationpb"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/services/chunkwire"
	"github.com/vfio-ferry/ferry/services/grpcserver"
	"github.com/vfio-ferry/ferry/services/wire"
	"github.com/vfio-ferry/ferry/services/wire/wiretest"
)

// fakeDest is a destination agent's Transfer service whose every answer a
// test scripts: the hostile or lying destinations the source must survive.
type fakeDest struct {
	ferryv1.UnimplementedTransferServer

	// windows answers Open (one per device).
	windows []*ferryv1.WindowUpdate
	// withhold is what Open does not grant, as an older destination.
	withhold []ferryv1.Feature
	// channel serves a Channel stream; n counts the streams before it.
	channel func(n int, st grpc.BidiStreamingServer[ferryv1.ChannelRequest, ferryv1.ChannelResponse]) error
	// finish answers Finish; nil: verified.
	finish func(ctx context.Context) (*ferryv1.FinishResponse, error)

	mu      sync.Mutex
	streams int
	aborts  []*ferryv1.AbortRequest
	commits int
	// aborted is closed by the first Abort.
	aborted chan struct{}
}

func (f *fakeDest) Open(_ context.Context, req *ferryv1.OpenRequest) (*ferryv1.OpenResponse, error) {
	// A current destination: it grants what it is asked, but what it
	// withholds.
	var granted []ferryv1.Feature
	for _, x := range req.GetFeatures() {
		if !slices.Contains(f.withhold, x) {
			granted = append(granted, x)
		}
	}
	return &ferryv1.OpenResponse{SessionId: "session", Windows: f.windows, AgentVersion: "fake", GrantedFeatures: granted}, nil
}

func (f *fakeDest) Channel(st grpc.BidiStreamingServer[ferryv1.ChannelRequest, ferryv1.ChannelResponse]) error {
	f.mu.Lock()
	n := f.streams
	f.streams++
	f.mu.Unlock()
	return f.channel(n, st)
}

func (f *fakeDest) SwitchoverStart(context.Context, *ferryv1.SwitchoverStartRequest) (*ferryv1.SwitchoverStartResponse, error) {
	return &ferryv1.SwitchoverStartResponse{}, nil
}

func (f *fakeDest) Finish(ctx context.Context, _ *ferryv1.FinishRequest) (*ferryv1.FinishResponse, error) {
	if f.finish != nil {
		return f.finish(ctx)
	}
	return &ferryv1.FinishResponse{Verified: true}, nil
}

func (f *fakeDest) Abort(_ context.Context, req *ferryv1.AbortRequest) (*ferryv1.AbortResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.aborts) == 0 {
		close(f.aborted)
	}
	f.aborts = append(f.aborts, req)
	return &ferryv1.AbortResponse{}, nil
}

func (f *fakeDest) Commit(context.Context, *ferryv1.CommitRequest) (*ferryv1.CommitResponse, error) {
	f.mu.Lock()
	f.commits++
	f.mu.Unlock()
	return &ferryv1.CommitResponse{}, nil
}

func (f *fakeDest) counts() (aborts, commits int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.aborts), f.commits
}

// serveFake serves f on loopback and returns its address.
func serveFake(t *testing.T, f *fakeDest) string {
	t.Helper()
	f.aborted = make(chan struct{})
	return serveTransfer(t, f)
}

// serveTransfer serves a Transfer service on loopback until the end of
// the test and returns its address.
func serveTransfer(t *testing.T, f ferryv1.TransferServer) string {
	t.Helper()
	srv := grpcserver.New(grpcserver.Config{Creds: insecure.NewCredentials(), Pool: chunkwire.NewPool()})
	ferryv1.RegisterTransferServer(srv.GRPC, f)
	srv.Ready()
	return wiretest.Serve(t, srv.GRPC)
}

// sourceAgent is a source agent on a registry of simulated devices.
func sourceAgent(t *testing.T, cfg Config) (*Agent, *vfio.Registry) {
	t.Helper()
	return sourceAgentOn(t, cfg, vfio.RegistryOptions{})
}

// sourceAgentOn is sourceAgent with registry options.
func sourceAgentOn(t *testing.T, cfg Config, opts vfio.RegistryOptions) (*Agent, *vfio.Registry) {
	t.Helper()
	opts.AllowSim = true
	reg := vfio.NewRegistry(opts)
	cfg.Registry = reg
	cfg.PeerCreds = insecure.NewCredentials()
	cfg.Logger = slog.New(slog.DiscardHandler)
	a, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		a.Close()
		reg.Close()
	})
	return a, reg
}

// start starts a one-device migration of spec to addr.
func start(t *testing.T, a *Agent, id, addr, spec string, chunk uint32, deadline time.Duration) {
	t.Helper()
	req := &ferryv1.StartMigrationRequest{
		MigrationId: id, DestAddress: addr, Token: "token", Channels: 1, ChunkSize: chunk,
		Devices: []*ferryv1.DevicePair{{SourceDevice: spec, DestDevice: spec}},
	}
	if deadline > 0 {
		req.SwitchoverDeadline = durationpb.New(deadline)
	}
	if _, err := a.StartMigration(t.Context(), req); err != nil {
		t.Fatal(err)
	}
}

// waitEnd follows the migration to its final phase.
func waitEnd(t *testing.T, a *Agent, id string) *ferryv1.Migration {
	t.Helper()
	m, err := a.lookup(id)
	if err != nil {
		t.Fatal(err)
	}
	<-m.done
	snap, _, _ := m.snapshot()
	return snap
}

// deviceState reads a device's state through the registry.
func deviceState(t *testing.T, reg *vfio.Registry, spec string) vfio.State {
	t.Helper()
	for _, d := range reg.List() {
		if d.Spec == spec {
			return d.State
		}
	}
	t.Fatalf("device %s not in the registry", spec)
	return 0
}

// recvAll takes chunks until the stream ends.
func recvAll(st grpc.BidiStreamingServer[ferryv1.ChannelRequest, ferryv1.ChannelResponse]) error {
	for {
		if _, err := st.Recv(); err != nil {
			return err
		}
	}
}

const hostileSpec = "sim:size=64MiB,seed=3"

// A destination that opens with a window of one chunk, widens it to the
// maximum, takes thousands of chunks without acknowledging one and then
// loses the only channel: every chunk goes back for a resend at once. A
// resend queue sized from the first window filled, and the channel's own
// goroutine, the only one that drains it, blocked on it for good: the
// devices stayed stopped and Close hung. The migration must end with the
// device RUNNING.
func TestWidenedWindowThenLostChannelDoesNotWedge(t *testing.T) {
	const chunk = 4 << 10
	const before = 4000 // chunks taken before the channel is lost
	f := &fakeDest{
		windows: []*ferryv1.WindowUpdate{{LimitSeq: 1, LimitOffset: 64 << 20}},
		// Without prompt feedback the source fills the window it is
		// given (inflight.go): the 4000 chunks, 16 MB.
		withhold: []ferryv1.Feature{ferryv1.Feature_FEATURE_PROMPT_FEEDBACK},
	}
	lost := make(chan struct{})
	f.channel = func(n int, st grpc.BidiStreamingServer[ferryv1.ChannelRequest, ferryv1.ChannelResponse]) error {
		if err := st.Send(&ferryv1.ChannelResponse{Windows: []*ferryv1.WindowUpdate{{LimitSeq: 1 << 20, LimitOffset: 64 << 20}}}); err != nil {
			return err
		}
		if n > 0 {
			// The re-dialled channel answers, then takes chunks and says
			// nothing more.
			return recvAll(st)
		}
		for range before {
			if _, err := st.Recv(); err != nil {
				return err
			}
		}
		close(lost)
		return wire.Errorf(codes.Unavailable, "", "lost")
	}
	a, reg := sourceAgent(t, Config{ReconnectTimeout: time.Hour, ProgressTimeout: time.Hour})
	start(t, a, "wedge", serveFake(t, f), hostileSpec, chunk, time.Hour)
	<-lost
	resp, err := a.CancelMigration(t.Context(), &ferryv1.CancelMigrationRequest{MigrationId: "wedge"})
	if err != nil {
		t.Fatal(err)
	}
	if got := resp.GetMigration().GetPhase(); got != ferryv1.MigrationPhase_MIGRATION_PHASE_CANCELLED {
		t.Errorf("phase %v, want CANCELLED", got)
	}
	if st := deviceState(t, reg, hostileSpec); st != vfio.StateRunning {
		t.Errorf("device in %v after the rollback, want RUNNING", st)
	}
	if n, _ := f.counts(); n == 0 {
		t.Error("the destination was not aborted")
	}
}

// A destination that advertises the largest window and acknowledges
// nothing makes the source hold only its own cap: the initial window's
// bytes, within the agent's budget.
func TestSourceHoldsNoMoreThanItsBudget(t *testing.T) {
	const chunk = 64 << 10
	const budget = 1 << 20
	stalled := make(chan struct{})
	var got int
	f := &fakeDest{
		windows: []*ferryv1.WindowUpdate{{LimitSeq: 1 << 20, LimitOffset: 1 << 30}},
	}
	f.channel = func(n int, st grpc.BidiStreamingServer[ferryv1.ChannelRequest, ferryv1.ChannelResponse]) error {
		if err := st.Send(&ferryv1.ChannelResponse{Windows: []*ferryv1.WindowUpdate{{LimitSeq: 1 << 20, LimitOffset: 1 << 30}}}); err != nil {
			return err
		}
		for {
			req, err := st.Recv()
			if err != nil {
				return err
			}
			got += len(req.GetData())
			if got == budget {
				close(stalled)
			}
		}
	}
	a, reg := sourceAgent(t, Config{MemoryBudget: budget, ReconnectTimeout: time.Hour, ProgressTimeout: time.Hour})
	start(t, a, "greedy", serveFake(t, f), hostileSpec, chunk, time.Hour)
	m, err := a.lookup("greedy")
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-stalled:
	case <-m.done:
		snap, _, _ := m.snapshot()
		t.Fatalf("the migration ended before it held its budget: %v %v", snap.GetPhase(), snap.GetError())
	}
	d := m.devs[0]
	if d.capBytes != budget {
		t.Errorf("cap %d bytes, want the budget, %d", d.capBytes, budget)
	}
	if w := d.gate.Window(); w.LimitOffset > budget {
		t.Errorf("window %v reaches past the budget of %d bytes", w, budget)
	}
	if used := a.BudgetUsed(); used != budget {
		t.Errorf("budget in use %d, want %d", used, budget)
	}
	if _, err := a.CancelMigration(t.Context(), &ferryv1.CancelMigrationRequest{MigrationId: "greedy"}); err != nil {
		t.Fatal(err)
	}
	if used := a.BudgetUsed(); used != 0 {
		t.Errorf("budget in use %d after the migration ended, want 0", used)
	}
	if st := deviceState(t, reg, hostileSpec); st != vfio.StateRunning {
		t.Errorf("device in %v, want RUNNING", st)
	}
}

// A second migration that finds the budget taken is refused before any
// device stops.
func TestSourceBudgetExhausted(t *testing.T) {
	const chunk = 64 << 10
	f := &fakeDest{windows: []*ferryv1.WindowUpdate{{LimitSeq: 16, LimitOffset: 1 << 20}}}
	f.channel = func(n int, st grpc.BidiStreamingServer[ferryv1.ChannelRequest, ferryv1.ChannelResponse]) error {
		return recvAll(st)
	}
	a, reg := sourceAgent(t, Config{MemoryBudget: chunk - 1})
	start(t, a, "small", serveFake(t, f), hostileSpec, chunk, 0)
	m := waitEnd(t, a, "small")
	if r := m.GetError().GetReason(); r != wire.ReasonBudgetExhausted {
		t.Errorf("reason %q, want %s", r, wire.ReasonBudgetExhausted)
	}
	if st := deviceState(t, reg, hostileSpec); st != vfio.StateRunning {
		t.Errorf("device in %v, want RUNNING", st)
	}
	if n, _ := f.counts(); n == 0 {
		t.Error("the session the destination opened was not aborted")
	}
}

// serveVerdict is a channel that takes every chunk and acknowledges each,
// as a healthy destination does.
func serveVerdict(_ int, st grpc.BidiStreamingServer[ferryv1.ChannelRequest, ferryv1.ChannelResponse]) error {
	if err := st.Send(&ferryv1.ChannelResponse{}); err != nil {
		return err
	}
	for {
		req, err := st.Recv()
		if err != nil {
			return err
		}
		next := req.GetSeq() + 1
		w := &ferryv1.WindowUpdate{Device: req.GetDevice(), AckedSeq: next, LimitSeq: next + 64, LimitOffset: req.GetOffset() + uint64(len(req.GetData())) + 64<<20}
		if err := st.Send(&ferryv1.ChannelResponse{Windows: []*ferryv1.WindowUpdate{w}}); err != nil {
			return err
		}
	}
}

const verdictSpec = "sim:size=4MiB,seed=5"

var openWindow = []*ferryv1.WindowUpdate{{LimitSeq: 64, LimitOffset: 64 << 20}}

// A destination that never answers Finish cannot keep the VM's devices
// stopped: the switchover deadline rolls the migration back.
func TestFinishNeverAnsweredRollsBackAtTheDeadline(t *testing.T) {
	f := &fakeDest{windows: openWindow, channel: serveVerdict}
	f.finish = func(ctx context.Context) (*ferryv1.FinishResponse, error) {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	a, reg := sourceAgent(t, Config{})
	start(t, a, "silent", serveFake(t, f), verdictSpec, 1<<20, time.Second)
	m := waitEnd(t, a, "silent")
	if m.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED || m.GetError().GetReason() != wire.ReasonSwitchoverDeadline {
		t.Errorf("ended %v %v, want FAILED with %s", m.GetPhase(), m.GetError(), wire.ReasonSwitchoverDeadline)
	}
	if m.GetOwner() != ferryv1.DeviceOwner_DEVICE_OWNER_SOURCE {
		t.Errorf("owner %v, want SOURCE", m.GetOwner())
	}
	if st := deviceState(t, reg, verdictSpec); st != vfio.StateRunning {
		t.Errorf("device in %v, want RUNNING", st)
	}
	if n, _ := f.counts(); n == 0 {
		t.Error("the destination was not aborted")
	}
}

// A partition during Finish (every call fails on the transport) ends in
// a rollback once the reconnect timeout passes, and the source still owns
// the device; the destination is told to abort.
func TestPartitionDuringFinishRollsBack(t *testing.T) {
	f := &fakeDest{windows: openWindow, channel: serveVerdict}
	f.finish = func(context.Context) (*ferryv1.FinishResponse, error) {
		return nil, wire.Errorf(codes.Unavailable, "", "partitioned")
	}
	a, reg := sourceAgent(t, Config{ReconnectTimeout: 200 * time.Millisecond})
	start(t, a, "partition", serveFake(t, f), verdictSpec, 1<<20, 0)
	m := waitEnd(t, a, "partition")
	if m.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED || m.GetOwner() != ferryv1.DeviceOwner_DEVICE_OWNER_SOURCE {
		t.Errorf("ended %v owner %v, want FAILED, owner SOURCE", m.GetPhase(), m.GetOwner())
	}
	if st := deviceState(t, reg, verdictSpec); st != vfio.StateRunning {
		t.Errorf("device in %v, want RUNNING", st)
	}
	if aborts, commits := f.counts(); aborts == 0 || commits != 0 {
		t.Errorf("%d aborts and %d commits, want an abort and no commit", aborts, commits)
	}
}

// A cancel while the source waits for the verdict wins: the migration is
// rolled back and the destination aborted, even if it verified.
func TestCancelDuringFinishing(t *testing.T) {
	f := &fakeDest{windows: openWindow, channel: serveVerdict}
	finishing := make(chan struct{})
	f.finish = func(ctx context.Context) (*ferryv1.FinishResponse, error) {
		close(finishing)
		<-ctx.Done()
		return nil, ctx.Err()
	}
	a, reg := sourceAgent(t, Config{})
	start(t, a, "cancel", serveFake(t, f), verdictSpec, 1<<20, time.Hour)
	<-finishing
	resp, err := a.CancelMigration(t.Context(), &ferryv1.CancelMigrationRequest{MigrationId: "cancel"})
	if err != nil {
		t.Fatal(err)
	}
	if m := resp.GetMigration(); m.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_CANCELLED || m.GetOwner() != ferryv1.DeviceOwner_DEVICE_OWNER_SOURCE {
		t.Errorf("ended %v owner %v, want CANCELLED, owner SOURCE", m.GetPhase(), m.GetOwner())
	}
	if st := deviceState(t, reg, verdictSpec); st != vfio.StateRunning {
		t.Errorf("device in %v, want RUNNING", st)
	}
	if aborts, commits := f.counts(); aborts == 0 || commits != 0 {
		t.Errorf("%d aborts and %d commits, want an abort and no commit", aborts, commits)
	}
}

// A verified verdict commits: the destination is told, the source device
// rests in STOP, the destination owns it, and a cancel is refused.
func TestVerdictCommits(t *testing.T) {
	f := &fakeDest{windows: openWindow, channel: serveVerdict}
	a, reg := sourceAgent(t, Config{})
	start(t, a, "commit", serveFake(t, f), verdictSpec, 1<<20, 0)
	m := waitEnd(t, a, "commit")
	if m.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED || m.GetOwner() != ferryv1.DeviceOwner_DEVICE_OWNER_DESTINATION {
		t.Errorf("ended %v owner %v, want SUCCEEDED, owner DESTINATION", m.GetPhase(), m.GetOwner())
	}
	if aborts, commits := f.counts(); aborts != 0 || commits != 1 {
		t.Errorf("%d aborts and %d commits, want one commit", aborts, commits)
	}
	if st := deviceState(t, reg, verdictSpec); st != vfio.StateStop {
		t.Errorf("device in %v, want STOP", st)
	}
	_, err := a.CancelMigration(t.Context(), &ferryv1.CancelMigrationRequest{MigrationId: "commit"})
	if wire.Code(err) != codes.FailedPrecondition || wire.Reason(err) != wire.ReasonCommitted {
		t.Errorf("cancel after the commit: %v, want FAILED_PRECONDITION %s", err, wire.ReasonCommitted)
	}
}

// A repeated start with another request is refused, names the field, and
// leaves the running migration alone.
func TestConflictingStartIsRefused(t *testing.T) {
	f := &fakeDest{windows: openWindow, channel: serveVerdict}
	a, _ := sourceAgent(t, Config{})
	addr := serveFake(t, f)
	start(t, a, "twice", addr, verdictSpec, 1<<20, 0)
	_, err := a.StartMigration(t.Context(), &ferryv1.StartMigrationRequest{
		MigrationId: "twice", DestAddress: addr, Token: "token", Channels: 2, ChunkSize: 1 << 20,
		Devices: []*ferryv1.DevicePair{{SourceDevice: verdictSpec, DestDevice: verdictSpec}},
	})
	if wire.Code(err) != codes.AlreadyExists || wire.Reason(err) != wire.ReasonSpecMismatch || !strings.Contains(wire.Message(err), "channels") {
		t.Errorf("second start: %v, want ALREADY_EXISTS %s naming channels", err, wire.ReasonSpecMismatch)
	}
	if m := waitEnd(t, a, "twice"); m.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED {
		t.Errorf("the first migration ended %v %v, want SUCCEEDED", m.GetPhase(), m.GetError())
	}
}

// A destination that acknowledges chunks the source never sent is refused
// (BAD_WINDOW_UPDATE): its word cannot free what the source holds, and
// the device returns to RUNNING.
func TestAckPastWhatWasSentIsRefused(t *testing.T) {
	f := &fakeDest{windows: openWindow}
	f.channel = func(_ int, st grpc.BidiStreamingServer[ferryv1.ChannelRequest, ferryv1.ChannelResponse]) error {
		if err := st.Send(&ferryv1.ChannelResponse{}); err != nil {
			return err
		}
		if _, err := st.Recv(); err != nil {
			return err
		}
		lie := &ferryv1.WindowUpdate{AckedSeq: 1000, AckedOffset: 1 << 30, LimitSeq: 1064, LimitOffset: 1<<30 + 64<<20}
		if err := st.Send(&ferryv1.ChannelResponse{Windows: []*ferryv1.WindowUpdate{lie}}); err != nil {
			return err
		}
		return recvAll(st)
	}
	a, reg := sourceAgent(t, Config{})
	start(t, a, "liar", serveFake(t, f), verdictSpec, 64<<10, time.Hour)
	m := waitEnd(t, a, "liar")
	if m.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED || m.GetError().GetReason() != wire.ReasonBadWindow {
		t.Errorf("ended %v %v, want FAILED %s", m.GetPhase(), m.GetError(), wire.ReasonBadWindow)
	}
	if st := deviceState(t, reg, verdictSpec); st != vfio.StateRunning {
		t.Errorf("device in %v, want RUNNING", st)
	}
	if _, err := a.ListDevices(t.Context(), &ferryv1.ListDevicesRequest{}); err != nil {
		t.Errorf("the agent stopped serving: %v", err)
	}
}
