package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/durationpb"

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

// TestPrecopyProgress: while it pre-copies, the progress shows the
// predicted downtime (or why there is none), the bytes sent while the VM
// runs and the dirty rate; after the switchover it does not.
func TestPrecopyProgress(t *testing.T) {
	m := func(ph ferryv1.MigrationPhase, pred time.Duration, note string) *ferryv1.Migration {
		m := &ferryv1.Migration{Id: "m1", Phase: ph, PrecopyBytes: 6 << 20, DirtyBytesPerSecond: 2e6, PredictionNote: note,
			Devices: []*ferryv1.DeviceProgress{{Device: "sim:a", Bytes: 6 << 20, TotalBytes: 8 << 20}}}
		if pred > 0 {
			m.PredictedDowntime = durationpb.New(pred)
		}
		return m
	}
	for _, tc := range []struct {
		name string
		m    *ferryv1.Migration
		want []string
		not  []string
	}{
		{"precopy", m(ferryv1.MigrationPhase_MIGRATION_PHASE_PRECOPY, 35*time.Millisecond, ""),
			[]string{"PRECOPY", "predicted downtime 35ms", "pre-copy 6MiB", "dirty 2.00 MB/s"}, nil},
		{"ready, no prediction", m(ferryv1.MigrationPhase_MIGRATION_PHASE_READY, 0, "no throughput measured yet"),
			[]string{"READY", "no downtime prediction: no throughput measured yet", "pre-copy 6MiB"}, []string{"predicted downtime"}},
		{"prediction that leaves a device out", m(ferryv1.MigrationPhase_MIGRATION_PHASE_READY, time.Second, "sim:a gave no size estimate"),
			[]string{"predicted downtime 1s (sim:a gave no size estimate)"}, nil},
		{"stop-copy", m(ferryv1.MigrationPhase_MIGRATION_PHASE_STOPCOPY, 35*time.Millisecond, ""),
			[]string{"STOPCOPY"}, []string{"predicted", "pre-copy", "dirty"}},
	} {
		for _, tty := range []bool{false, true} {
			var out bytes.Buffer
			v := &progressView{w: &out, tty: tty, now: time.Now, width: func() int { return 200 }}
			v.update(tc.m)
			for _, w := range tc.want {
				if !strings.Contains(out.String(), w) {
					t.Errorf("%s (tty %v): no %q in %q", tc.name, tty, w, out.String())
				}
			}
			for _, w := range tc.not {
				if strings.Contains(out.String(), w) {
					t.Errorf("%s (tty %v): %q in %q", tc.name, tty, w, out.String())
				}
			}
		}
	}
}

// TestPrecopySummary: the summary of a pre-copy migration, text and
// JSON, says how many bytes moved before and after the switchover, the
// predicted and the measured downtime, and what switched it over; a
// stop-copy summary says none of it.
func TestPrecopySummary(t *testing.T) {
	m := &ferryv1.Migration{Id: "m1", Phase: ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED, Owner: ferryv1.DeviceOwner_DEVICE_OWNER_DESTINATION,
		Downtime: durationpb.New(6 * time.Millisecond), PrecopyBytes: 6 << 20, StopcopyBytes: 2 << 20, PredictedDowntime: durationpb.New(36 * time.Millisecond),
		SwitchoverTrigger: "downtime_limit", DowntimeLimit: durationpb.New(time.Second), PrecopyTimeout: durationpb.New(10 * time.Minute)}
	var text strings.Builder
	printSummary(&text, summarize(m, nil))
	for _, want := range []string{"pre-copy     6MiB while the VM ran, 2MiB after the devices stopped", "predicted    0.036s downtime", "measured 0.006s", "switchover   downtime_limit"} {
		if !strings.Contains(text.String(), want) {
			t.Errorf("no %q in\n%s", want, text.String())
		}
	}
	var js bytes.Buffer
	if err := report(&js, summarize(m, nil), true); err != nil {
		t.Fatal(err)
	}
	var got struct {
		Downtime float64 `json:"downtime_seconds"`
		Precopy  *struct {
			PrecopyBytes  uint64   `json:"precopy_bytes"`
			StopcopyBytes uint64   `json:"stopcopy_bytes"`
			Predicted     *float64 `json:"predicted_downtime_seconds"`
			Trigger       string   `json:"switchover_trigger"`
		} `json:"precopy"`
	}
	if err := json.Unmarshal(js.Bytes(), &got); err != nil {
		t.Fatal(err)
	}
	if p := got.Precopy; p == nil || p.PrecopyBytes != 6<<20 || p.StopcopyBytes != 2<<20 || p.Predicted == nil || *p.Predicted != 0.036 || p.Trigger != "downtime_limit" || got.Downtime != 0.006 {
		t.Errorf("JSON %s", js.String())
	}

	// No prediction was ever made: the summary says so, and why.
	m.PredictedDowntime, m.PredictionNote, m.SwitchoverTrigger = nil, "no throughput measured yet", "forced"
	text.Reset()
	printSummary(&text, summarize(m, nil))
	if !strings.Contains(text.String(), "predicted    none (no throughput measured yet)") || !strings.Contains(text.String(), "switchover   forced") {
		t.Errorf("without a prediction:\n%s", text.String())
	}

	stopcopy := &ferryv1.Migration{Id: "m1", Phase: ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED, Downtime: durationpb.New(time.Second)}
	text.Reset()
	r := summarize(stopcopy, nil)
	printSummary(&text, r)
	if r.Precopy != nil || strings.Contains(text.String(), "pre-copy") || strings.Contains(text.String(), "predicted") {
		t.Errorf("a stop-copy summary speaks of pre-copy:\n%s", text.String())
	}
}
