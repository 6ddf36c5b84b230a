package main

import (
	"context"
	"io"
	"net"
	"strings"
	"sync"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
)

// fakeAgents serves SourceAgent, and with fakeDestAgent DestAgent, on one
// address: every migration prepares, starts and succeeds at once, and the
// requests are recorded.
type fakeAgents struct {
	ferryv1.UnimplementedSourceAgentServer
	mu         sync.Mutex
	start      *ferryv1.StartMigrationRequest
	switchover *ferryv1.SwitchoverRequest
}

type fakeDestAgent struct {
	ferryv1.UnimplementedDestAgentServer
}

func (fakeDestAgent) PrepareIncoming(context.Context, *ferryv1.PrepareIncomingRequest) (*ferryv1.PrepareIncomingResponse, error) {
	return &ferryv1.PrepareIncomingResponse{Token: "t"}, nil
}

func (fakeDestAgent) GetIncoming(_ context.Context, req *ferryv1.GetIncomingRequest) (*ferryv1.GetIncomingResponse, error) {
	return &ferryv1.GetIncomingResponse{Migration: &ferryv1.Migration{Id: req.GetMigrationId(), Phase: ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED}}, nil
}

func (f *fakeAgents) StartMigration(_ context.Context, req *ferryv1.StartMigrationRequest) (*ferryv1.StartMigrationResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.start = req
	return &ferryv1.StartMigrationResponse{}, nil
}

func (f *fakeAgents) WatchMigration(req *ferryv1.WatchMigrationRequest, stream grpc.ServerStreamingServer[ferryv1.WatchMigrationResponse]) error {
	return stream.Send(&ferryv1.WatchMigrationResponse{Migration: &ferryv1.Migration{Id: req.GetMigrationId(), Phase: ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED,
		Owner: ferryv1.DeviceOwner_DEVICE_OWNER_DESTINATION}})
}

func (f *fakeAgents) Switchover(_ context.Context, req *ferryv1.SwitchoverRequest) (*ferryv1.SwitchoverResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.switchover = req
	return &ferryv1.SwitchoverResponse{Migration: &ferryv1.Migration{Id: req.GetMigrationId(), Phase: ferryv1.MigrationPhase_MIGRATION_PHASE_STOPCOPY}}, nil
}

// serveFakeAgents serves f on loopback until the test ends.
func serveFakeAgents(t *testing.T, f *fakeAgents) string {
	t.Helper()
	srv := grpc.NewServer(grpc.Creds(insecure.NewCredentials()))
	ferryv1.RegisterSourceAgentServer(srv, f)
	ferryv1.RegisterDestAgentServer(srv, fakeDestAgent{})
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(lis)
	t.Cleanup(srv.Stop)
	return lis.Addr().String()
}

// TestSwitchoverForce: ferry switchover asks for a forced switchover only
// with --force.
func TestSwitchoverForce(t *testing.T) {
	f := &fakeAgents{}
	addr := serveFakeAgents(t, f)
	for _, force := range []bool{false, true} {
		args := []string{"switchover", "--insecure", "--source", addr, "--id", "m1"}
		if force {
			args = append(args, "--force")
		}
		code, out, errOut := runCLI(t, args...)
		if code != 0 || out != "migration m1: switchover asked (STOPCOPY)\n" {
			t.Fatalf("ferry %q: exit %d, stdout %q, stderr %q", args, code, out, errOut)
		}
		f.mu.Lock()
		got := f.switchover
		f.mu.Unlock()
		if got.GetMigrationId() != "m1" || got.GetForce() != force {
			t.Errorf("ferry %q sent %v", args, got)
		}
	}
	if code, out, _ := runCLI(t, "help", "switchover"); code != 0 || !strings.Contains(out, "before the destination has loaded the initial data") {
		t.Errorf("ferry help switchover: exit %d, %q", code, out)
	}
}

// TestDriveSwitchesOverWhenReady: a plan that asks for the switchover
// itself asks once, unforced, when the migration is READY, and not before.
func TestDriveSwitchesOverWhenReady(t *testing.T) {
	precopy, ready, done := phase(ferryv1.MigrationPhase_MIGRATION_PHASE_PRECOPY), phase(ferryv1.MigrationPhase_MIGRATION_PHASE_READY), phase(ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED)
	src := &fakeSource{watches: [][]*ferryv1.Migration{{precopy, ready, ready, done}}, errs: []error{io.EOF}}
	p := testPlan
	p.precopy, p.switchoverWhenReady = true, true
	var phases []string
	progress := func(m *ferryv1.Migration) {
		src.mu.Lock()
		defer src.mu.Unlock()
		phases = append(phases, phaseName(m.GetPhase())+":"+strings.Join(src.switchovers, ","))
	}
	if _, err := drive(t.Context(), p, &fakeDest{}, src, progress); err != nil {
		t.Fatal(err)
	}
	// Each state is shown before it is acted on.
	want := "PRECOPY: READY: READY:m1 SUCCEEDED:m1"
	if got := strings.Join(phases, " "); got != want || len(src.switchovers) != 1 || src.forced {
		t.Errorf("progress %q (want %q), switchovers %v, forced %v", got, want, src.switchovers, src.forced)
	}
}
