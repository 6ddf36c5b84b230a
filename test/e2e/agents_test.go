package e2e

import (
	"fmt"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/services/dest"
	"github.com/vfio-ferry/ferry/services/deviceapi"
	"github.com/vfio-ferry/ferry/services/wire"
)

const (
	succeeded = ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED
	failed    = ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED
	cancelled = ferryv1.MigrationPhase_MIGRATION_PHASE_CANCELLED
)

// Every way the source reads and sends arrives bit-exact: several devices
// (a reader goroutine per device) and one (the channels' senders read it
// in turn), states that end on a chunk boundary, inside a chunk, and after
// one byte, over one channel and several, on direct data connections and
// in gRPC messages.
func TestMigrationIsBitExact(t *testing.T) {
	for _, tc := range []struct {
		name     string
		src      []string
		bytes    uint64
		channels uint32
	}{
		{"several devices", []string{"sim:size=24MiB,seed=11", "sim:size=5000123,seed=12,zero=0.3", "sim:size=1,seed=13"}, 24<<20 + 5000123 + 1, 4},
		{"one device", []string{"sim:size=5000123,seed=14,zero=0.3"}, 5000123, 4},
		{"one device on a chunk boundary", []string{"sim:size=6MiB,seed=15"}, 6 << 20, 3},
		{"one device, one channel", []string{"sim:size=3000001,seed=16"}, 3000001, 1},
		{"one byte", []string{"sim:size=1,seed=17"}, 1, 2},
	} {
		for _, direct := range []bool{true, false} {
			how := "direct data"
			if !direct {
				how = "chunks in gRPC messages"
			}
			t.Run(tc.name+", "+how, func(t *testing.T) {
				testMigrationIsBitExact(t, direct, tc.src, tc.bytes, tc.channels)
			})
		}
	}
}

func testMigrationIsBitExact(t *testing.T, direct bool, src []string, want uint64, channels uint32) {
	a := startAgentsData(t, dest.Config{}, direct)
	s, d := a.run(t, migration{id: "bit-exact", src: src, dst: src, channels: channels, chunkSize: 256 << 10})
	if s.GetPhase() != succeeded || d.GetPhase() != succeeded {
		t.Fatalf("source %v, destination %v: %v", s.GetPhase(), d.GetPhase(), s.GetError())
	}
	if s.GetDirectData() != direct || d.GetDirectData() != direct {
		t.Errorf("direct data: source %v, destination %v, want %v", s.GetDirectData(), d.GetDirectData(), direct)
	}
	if s.GetBytes() != want || d.GetBytes() != want {
		t.Fatalf("moved %d bytes (source) / %d (destination), want %d", s.GetBytes(), d.GetBytes(), want)
	}
	for i, p := range d.GetDevices() {
		if !p.GetVerified() {
			t.Errorf("destination device %d not verified", i)
		}
	}
	for _, spec := range src {
		canon, _ := deviceapi.CanonicalSpec(spec)
		// The destination device validated its state at RESUMING->STOP;
		// the source device left STOP_COPY once read to its end.
		if st := deviceState(t, a.destReg, canon); st != vfio.StateStop {
			t.Errorf("destination %s in %v, want STOP", canon, st)
		}
		if st := deviceState(t, a.sourceReg, canon); st != vfio.StateStop {
			t.Errorf("source %s in %v, want STOP", canon, st)
		}
	}
	if n := a.destAgent.BudgetInUse(); n != 0 {
		t.Errorf("budget in use after the migration: %d", n)
	}
	if s.GetDowntime() == nil || s.GetThroughputBytesPerSecond() <= 0 {
		t.Errorf("downtime %v, throughput %v not reported", s.GetDowntime(), s.GetThroughputBytesPerSecond())
	}
}

func TestWrongDestinationSeedFailsAndRollsBack(t *testing.T) {
	a := startAgents(t, dest.Config{})
	src, dst := "sim:size=16MiB,seed=7", "sim:size=16MiB,seed=8"
	s, d := a.run(t, migration{id: "wrong-seed", src: []string{src}, dst: []string{dst}, channels: 2})
	if s.GetPhase() != failed || d.GetPhase() != failed {
		t.Fatalf("source %v, destination %v; want both FAILED", s.GetPhase(), d.GetPhase())
	}
	e := s.GetError()
	if e.GetReason() != wire.ReasonVerifyFailed || codes.Code(e.GetCode()) != codes.DataLoss {
		t.Errorf("error %v, want DATA_LOSS %s", e, wire.ReasonVerifyFailed)
	}
	if !strings.Contains(e.GetMessage(), dst) || !strings.Contains(e.GetMessage(), "mismatch") {
		t.Errorf("error message %q does not name the device and the verification", e.GetMessage())
	}
	if st := deviceState(t, a.sourceReg, src); st != vfio.StateRunning {
		t.Errorf("source device in %v after the failure, want RUNNING", st)
	}
	if st := deviceState(t, a.destReg, dst); st != vfio.StateRunning {
		t.Errorf("destination device in %v, want RUNNING (reset)", st)
	}
	if n := a.destAgent.BudgetInUse(); n != 0 {
		t.Errorf("budget in use after the failure: %d", n)
	}
}

func TestSmallWindowBoundsDestinationMemory(t *testing.T) {
	a := startAgents(t, dest.Config{MaxChunks: 4, MaxBytes: 8 << 20})
	spec := []string{"sim:size=48MiB,seed=3"}
	s, d := a.run(t, migration{id: "small-window", src: spec, dst: spec, channels: 4})
	if s.GetPhase() != succeeded {
		t.Fatalf("phase %v: %v", s.GetPhase(), s.GetError())
	}
	if d.GetWindowBytes() != 8<<20 {
		t.Errorf("window %d bytes, want 8 MiB", d.GetWindowBytes())
	}
	if p := d.GetPeakBufferedBytes(); p == 0 || p > 8<<20 {
		t.Errorf("peak buffered %d bytes, want 1..8 MiB", p)
	}
}

func TestSourceDeviceFaultRollsBack(t *testing.T) {
	a := startAgents(t, dest.Config{})
	src, dst := "sim:size=16MiB,seed=5,fault=3MiB", "sim:size=16MiB,seed=5"
	s, d := a.run(t, migration{id: "fault", src: []string{src}, dst: []string{dst}})
	if s.GetPhase() != failed || d.GetPhase() != failed {
		t.Fatalf("source %v, destination %v; want both FAILED", s.GetPhase(), d.GetPhase())
	}
	if r := s.GetError().GetReason(); r != wire.ReasonSourceDeviceFailed {
		t.Errorf("reason %q, want %s", r, wire.ReasonSourceDeviceFailed)
	}
	canon, _ := deviceapi.CanonicalSpec(src)
	if st := deviceState(t, a.sourceReg, canon); st != vfio.StateRunning {
		t.Errorf("source device in %v, want RUNNING", st)
	}
	if st := deviceState(t, a.destReg, dst); st != vfio.StateRunning {
		t.Errorf("destination device in %v, want RUNNING (reset)", st)
	}
}

func TestCancelWhileStreaming(t *testing.T) {
	a := startAgents(t, dest.Config{})
	// A slow source device keeps the migration streaming until cancelled.
	src, dst := "sim:size=1GiB,seed=9,rate=16MB/s", "sim:size=1GiB,seed=9"
	ctx := t.Context()
	prep, err := a.dest.PrepareIncoming(ctx, &ferryv1.PrepareIncomingRequest{MigrationId: "cancel", Devices: []string{dst}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.source.StartMigration(ctx, &ferryv1.StartMigrationRequest{MigrationId: "cancel", DestAddress: a.destAddr, Token: prep.GetToken(),
		Devices: []*ferryv1.DevicePair{{SourceDevice: src, DestDevice: dst}}}); err != nil {
		t.Fatal(err)
	}
	a.sourceUntil(t, "cancel", moving)
	resp, err := a.source.CancelMigration(ctx, &ferryv1.CancelMigrationRequest{MigrationId: "cancel"})
	if err != nil {
		t.Fatal(err)
	}
	m := resp.GetMigration()
	if m.GetPhase() != cancelled || codes.Code(m.GetError().GetCode()) != codes.Canceled {
		t.Fatalf("after cancel: %v %v", m.GetPhase(), m.GetError())
	}
	canon, _ := deviceapi.CanonicalSpec(src)
	if st := deviceState(t, a.sourceReg, canon); st != vfio.StateRunning {
		t.Errorf("source device in %v, want RUNNING", st)
	}
	if d := a.waitDest(t, "cancel"); d.GetPhase() != failed || d.GetError().GetReason() != wire.ReasonAborted {
		t.Errorf("destination %v %v, want FAILED by the source's abort", d.GetPhase(), d.GetError())
	}
	if st := deviceState(t, a.destReg, dst); st != vfio.StateRunning {
		t.Errorf("destination device in %v, want RUNNING (reset)", st)
	}
}

func TestMemoryBudget(t *testing.T) {
	a := startAgents(t, dest.Config{MaxBytes: 16 << 20, MemoryBudget: 40 << 20})
	ctx := t.Context()
	prepare := func(id string, n int) error {
		var devs []string
		for i := range n {
			devs = append(devs, fmt.Sprintf("sim:size=1MiB,seed=%d,flags=stopcopy", i+100*len(id)))
		}
		_, err := a.dest.PrepareIncoming(ctx, &ferryv1.PrepareIncomingRequest{MigrationId: id, Devices: devs})
		return err
	}
	if err := prepare("too-big", 3); wire.Code(err) != codes.ResourceExhausted || wire.Reason(err) != wire.ReasonBudgetExhausted {
		t.Fatalf("3 windows of 16 MiB in a 40 MiB budget: %v, want RESOURCE_EXHAUSTED", err)
	}
	if err := prepare("fits", 2); err != nil {
		t.Fatalf("2 windows: %v", err)
	}
	if err := prepare("no-room", 1); wire.Code(err) != codes.ResourceExhausted {
		t.Fatalf("a third window: %v, want RESOURCE_EXHAUSTED", err)
	}
	if _, err := a.dest.CancelIncoming(ctx, &ferryv1.CancelIncomingRequest{MigrationId: "fits"}); err != nil {
		t.Fatal(err)
	}
	if err := prepare("room-again", 1); err != nil {
		t.Fatalf("after the cancel released the budget: %v", err)
	}
}

func TestIdempotentIDs(t *testing.T) {
	a := startAgents(t, dest.Config{})
	ctx := t.Context()
	prep := &ferryv1.PrepareIncomingRequest{MigrationId: "same", Devices: []string{"sim:size=4MiB,seed=1"}}
	p1, err := a.dest.PrepareIncoming(ctx, prep)
	if err != nil {
		t.Fatal(err)
	}
	p2, err := a.dest.PrepareIncoming(ctx, prep)
	if err != nil || p2.GetToken() != p1.GetToken() {
		t.Fatalf("repeated prepare: %v, same token %v", err, p2.GetToken() == p1.GetToken())
	}
	other := &ferryv1.PrepareIncomingRequest{MigrationId: "same", Devices: []string{"sim:size=4MiB,seed=2"}}
	if _, err := a.dest.PrepareIncoming(ctx, other); wire.Code(err) != codes.AlreadyExists || wire.Reason(err) != wire.ReasonSpecMismatch {
		t.Fatalf("prepare with another spec: %v, want ALREADY_EXISTS %s", err, wire.ReasonSpecMismatch)
	}
	start := &ferryv1.StartMigrationRequest{MigrationId: "same", DestAddress: a.destAddr, Token: p1.GetToken(),
		Devices: []*ferryv1.DevicePair{{SourceDevice: "sim:size=4MiB,seed=1", DestDevice: "sim:size=4MiB,seed=1"}}}
	if _, err := a.source.StartMigration(ctx, start); err != nil {
		t.Fatal(err)
	}
	if _, err := a.source.StartMigration(ctx, start); err != nil {
		t.Fatalf("repeated start: %v", err)
	}
	changed := &ferryv1.StartMigrationRequest{MigrationId: "same", DestAddress: a.destAddr, Token: p1.GetToken(), Channels: 7,
		Devices: start.GetDevices()}
	if _, err := a.source.StartMigration(ctx, changed); wire.Code(err) != codes.AlreadyExists {
		t.Fatalf("start with another spec: %v, want ALREADY_EXISTS", err)
	}
	if s := a.waitSource(t, "same"); s.GetPhase() != succeeded {
		t.Fatalf("phase %v: %v", s.GetPhase(), s.GetError())
	}
	list, err := a.source.ListMigrations(ctx, &ferryv1.ListMigrationsRequest{})
	if err != nil || len(list.GetMigrations()) != 1 {
		t.Fatalf("ListMigrations: %v, %d migrations", err, len(list.GetMigrations()))
	}
}

func TestStartMigrationRejectsBadRequests(t *testing.T) {
	a := startAgents(t, dest.Config{})
	ok := func() *ferryv1.StartMigrationRequest {
		return &ferryv1.StartMigrationRequest{MigrationId: "bad", DestAddress: a.destAddr, Token: "t",
			Devices: []*ferryv1.DevicePair{{SourceDevice: "sim:size=1MiB,seed=1", DestDevice: "sim:size=1MiB,seed=1"}}}
	}
	cases := []struct {
		name   string
		mutate func(*ferryv1.StartMigrationRequest)
		code   codes.Code
		reason string
	}{
		{"empty id", func(r *ferryv1.StartMigrationRequest) { r.MigrationId = "" }, codes.InvalidArgument, wire.ReasonInvalidArgument},
		{"id with a slash", func(r *ferryv1.StartMigrationRequest) { r.MigrationId = "a/b" }, codes.InvalidArgument, wire.ReasonInvalidArgument},
		{"no devices", func(r *ferryv1.StartMigrationRequest) { r.Devices = nil }, codes.InvalidArgument, wire.ReasonInvalidArgument},
		{"absurd channels", func(r *ferryv1.StartMigrationRequest) { r.Channels = 100000 }, codes.InvalidArgument, wire.ReasonInvalidArgument},
		{"tiny chunks", func(r *ferryv1.StartMigrationRequest) { r.ChunkSize = 1 }, codes.InvalidArgument, wire.ReasonInvalidArgument},
		{"huge chunks", func(r *ferryv1.StartMigrationRequest) { r.ChunkSize = 1 << 30 }, codes.InvalidArgument, wire.ReasonInvalidArgument},
		{"bad dest address", func(r *ferryv1.StartMigrationRequest) { r.DestAddress = "nowhere" }, codes.InvalidArgument, wire.ReasonInvalidArgument},
		{"malformed spec", func(r *ferryv1.StartMigrationRequest) { r.Devices[0].SourceDevice = "sim:sise=1" }, codes.InvalidArgument, wire.ReasonInvalidArgument},
		{"device twice", func(r *ferryv1.StartMigrationRequest) { r.Devices = append(r.Devices, r.Devices[0]) }, codes.InvalidArgument, wire.ReasonInvalidArgument},
		{"host device outside --devices", func(r *ferryv1.StartMigrationRequest) { r.Devices[0].SourceDevice = "pci:0000:3b:00.2" }, codes.PermissionDenied, wire.ReasonDeviceNotAllowed},
		{"unknown mode", func(r *ferryv1.StartMigrationRequest) { r.Mode = 42 }, codes.InvalidArgument, wire.ReasonInvalidArgument},
		{"unknown digest", func(r *ferryv1.StartMigrationRequest) { r.Digest = 42 }, codes.InvalidArgument, wire.ReasonInvalidArgument},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := ok()
			tc.mutate(r)
			_, err := a.source.StartMigration(t.Context(), r)
			if wire.Code(err) != tc.code || (tc.reason != "" && wire.Reason(err) != tc.reason) || wire.Reason(err) == "" {
				t.Fatalf("got %v (reason %q), want %v %s", err, wire.Reason(err), tc.code, tc.reason)
			}
		})
	}
	// The agent keeps serving.
	if _, err := a.source.ListDevices(t.Context(), &ferryv1.ListDevicesRequest{}); err != nil {
		t.Fatal(err)
	}
}
