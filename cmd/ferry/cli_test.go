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
	"testing/synctest"
	"time"
	"unicode/utf8"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/services/peerauth"
	"github.com/vfio-ferry/ferry/services/peerauth/peerauthtest"
	"github.com/vfio-ferry/ferry/services/wire"
)

// fakeSource is a SourceAgent client whose watches follow a script: each
// WatchMigration gets the next list of states, then the next error (nil:
// the stream ends). It records cancels.
type fakeSource struct {
	ferryv1.SourceAgentClient
	mu      sync.Mutex
	watches [][]*ferryv1.Migration
	errs    []error
	get     *ferryv1.Migration // GetMigration's answer
	start   *ferryv1.StartMigrationRequest
	cancels int
	// switchovers are the ids of the Switchover calls; forced says one
	// was forced.
	switchovers []string
	forced      bool
}

func (f *fakeSource) Switchover(_ context.Context, req *ferryv1.SwitchoverRequest, _ ...grpc.CallOption) (*ferryv1.SwitchoverResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.switchovers = append(f.switchovers, req.GetMigrationId())
	f.forced = f.forced || req.GetForce()
	return &ferryv1.SwitchoverResponse{}, nil
}

func (f *fakeSource) StartMigration(_ context.Context, req *ferryv1.StartMigrationRequest, _ ...grpc.CallOption) (*ferryv1.StartMigrationResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.start = req
	return &ferryv1.StartMigrationResponse{}, nil
}

func (f *fakeSource) WatchMigration(ctx context.Context, _ *ferryv1.WatchMigrationRequest, _ ...grpc.CallOption) (grpc.ServerStreamingClient[ferryv1.WatchMigrationResponse], error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.watches) == 0 {
		// Past the script: a watch that never answers.
		return &fakeStream{ctx: ctx, block: true}, nil
	}
	s := &fakeStream{ctx: ctx, states: f.watches[0], err: f.errs[0]}
	f.watches, f.errs = f.watches[1:], f.errs[1:]
	return s, nil
}

func (f *fakeSource) GetMigration(context.Context, *ferryv1.GetMigrationRequest, ...grpc.CallOption) (*ferryv1.GetMigrationResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.get == nil {
		return nil, wire.Errorf(codes.Unavailable, "", "connection refused")
	}
	return &ferryv1.GetMigrationResponse{Migration: f.get}, nil
}

func (f *fakeSource) CancelMigration(_ context.Context, req *ferryv1.CancelMigrationRequest, _ ...grpc.CallOption) (*ferryv1.CancelMigrationResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.cancels++
	return &ferryv1.CancelMigrationResponse{Migration: &ferryv1.Migration{Id: req.GetMigrationId(), Phase: ferryv1.MigrationPhase_MIGRATION_PHASE_CANCELLED}}, nil
}

type fakeStream struct {
	grpc.ClientStream
	ctx    context.Context
	states []*ferryv1.Migration
	err    error
	block  bool
}

func (s *fakeStream) Recv() (*ferryv1.WatchMigrationResponse, error) {
	if len(s.states) > 0 {
		m := s.states[0]
		s.states = s.states[1:]
		return &ferryv1.WatchMigrationResponse{Migration: m}, nil
	}
	if s.block {
		<-s.ctx.Done()
		return nil, s.ctx.Err()
	}
	if s.err != nil {
		return nil, s.err
	}
	return nil, io.EOF
}

// fakeDest is a DestAgent client that prepares, reports SUCCEEDED, and
// records cancels.
type fakeDest struct {
	ferryv1.DestAgentClient
	mu      sync.Mutex
	cancels int
}

func (f *fakeDest) PrepareIncoming(context.Context, *ferryv1.PrepareIncomingRequest, ...grpc.CallOption) (*ferryv1.PrepareIncomingResponse, error) {
	return &ferryv1.PrepareIncomingResponse{Token: "t"}, nil
}

func (f *fakeDest) GetIncoming(_ context.Context, req *ferryv1.GetIncomingRequest, _ ...grpc.CallOption) (*ferryv1.GetIncomingResponse, error) {
	return &ferryv1.GetIncomingResponse{Migration: &ferryv1.Migration{Id: req.GetMigrationId(), Phase: ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED}}, nil
}

func (f *fakeDest) CancelIncoming(context.Context, *ferryv1.CancelIncomingRequest, ...grpc.CallOption) (*ferryv1.CancelIncomingResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.cancels++
	return &ferryv1.CancelIncomingResponse{}, nil
}

func phase(p ferryv1.MigrationPhase) *ferryv1.Migration {
	return &ferryv1.Migration{Id: "m1", Phase: p, Owner: ferryv1.DeviceOwner_DEVICE_OWNER_SOURCE}
}

var testPlan = plan{id: "m1", pairs: []*ferryv1.DevicePair{{SourceDevice: "sim:size=1MiB,seed=1", DestDevice: "sim:size=1MiB,seed=1"}}}

// TestDriveRewatchesABrokenWatch breaks the watch mid-migration, twice
// (once with an error, once with an early end), while the migration goes
// on at the source: ferry migrate watches again, never cancels, and
// reports the verdict.
func TestDriveRewatchesABrokenWatch(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		stopcopy, done := phase(ferryv1.MigrationPhase_MIGRATION_PHASE_STOPCOPY), phase(ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED)
		done.Owner = ferryv1.DeviceOwner_DEVICE_OWNER_DESTINATION
		src := &fakeSource{
			watches: [][]*ferryv1.Migration{{stopcopy}, {stopcopy}, {done}},
			errs:    []error{wire.Errorf(codes.Unavailable, "", "connection reset by peer"), nil, nil},
			get:     stopcopy,
		}
		dst := &fakeDest{}
		var lost []error
		p := testPlan
		p.lost = func(err error) { lost = append(lost, err) }
		r, err := drive(t.Context(), p, dst, src, nil)
		if err != nil {
			t.Fatal(err)
		}
		if !r.Verified || r.Owner != "DESTINATION" {
			t.Errorf("result %+v, want verified, owned by the destination", r)
		}
		if src.cancels != 0 || dst.cancels != 0 {
			t.Errorf("a broken watch cancelled the migration: %d source, %d destination cancels", src.cancels, dst.cancels)
		}
		if len(lost) != 2 {
			t.Errorf("heard of %d broken watches, want 2: %v", len(lost), lost)
		}
	})
}

// TestDriveMigrationEndsWhileUnwatched: the watch breaks and the
// migration ends before a new one opens; GetMigration gives the verdict.
func TestDriveMigrationEndsWhileUnwatched(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		src := &fakeSource{
			watches: [][]*ferryv1.Migration{{phase(ferryv1.MigrationPhase_MIGRATION_PHASE_STOPCOPY)}},
			errs:    []error{wire.Errorf(codes.Unavailable, "", "connection reset by peer")},
			get:     phase(ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED),
		}
		r, err := drive(t.Context(), testPlan, &fakeDest{}, src, nil)
		if err != nil || !r.Verified || src.cancels != 0 {
			t.Fatalf("result %+v, %v, %d cancels", r, err, src.cancels)
		}
	})
}

// TestDriveCancelsOnlyWhenAsked: a watch that waits is cancelled when the
// caller's context ends (an interrupt, --timeout), and not before.
func TestDriveCancelsOnlyWhenAsked(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		src := &fakeSource{watches: [][]*ferryv1.Migration{{phase(ferryv1.MigrationPhase_MIGRATION_PHASE_STOPCOPY)}}, errs: []error{wire.Errorf(codes.Unavailable, "", "reset")},
			get: phase(ferryv1.MigrationPhase_MIGRATION_PHASE_STOPCOPY)}
		dst := &fakeDest{}
		ctx, cancel := context.WithTimeout(t.Context(), time.Hour)
		defer cancel()
		p := testPlan
		p.switchoverDeadline = 90 * time.Second
		r, err := drive(ctx, p, dst, src, nil)
		if err != nil {
			t.Fatal(err)
		}
		if src.cancels != 1 || dst.cancels == 0 || r.Phase != "CANCELLED" || r.Verified {
			t.Errorf("after the deadline: %d source, %d destination cancels, result %+v", src.cancels, dst.cancels, r)
		}
		if got := src.start.GetSwitchoverDeadline().AsDuration(); got != 90*time.Second {
			t.Errorf("StartMigration's switchover deadline %v, want 90s", got)
		}
	})
}

// TestMigratePrecopyFlags: ferry migrate's pre-copy flags reach the
// source's StartMigrationRequest as given, and only with --mode precopy.
func TestMigratePrecopyFlags(t *testing.T) {
	f := &fakeAgents{}
	addr := serveFakeAgents(t, f)
	none := ferryv1.PrecopyTimeoutAction_PRECOPY_TIMEOUT_ACTION_UNSPECIFIED
	for _, tc := range []struct {
		name          string
		args          []string
		mode          ferryv1.MigrationMode
		downtimeLimit *durationpb.Duration
		timeout       *durationpb.Duration
		onTimeout     ferryv1.PrecopyTimeoutAction
	}{
		{"stop-copy", nil, ferryv1.MigrationMode_MIGRATION_MODE_STOP_COPY, nil, nil, none},
		{"pre-copy, the source's defaults", []string{"--mode", "precopy"}, ferryv1.MigrationMode_MIGRATION_MODE_PRECOPY, nil, nil,
			ferryv1.PrecopyTimeoutAction_PRECOPY_TIMEOUT_ACTION_FAIL},
		{"pre-copy with its limits", []string{"--mode", "precopy", "--downtime-limit", "300ms", "--precopy-timeout", "2m", "--on-timeout", "switchover"},
			ferryv1.MigrationMode_MIGRATION_MODE_PRECOPY, durationpb.New(300 * time.Millisecond), durationpb.New(2 * time.Minute),
			ferryv1.PrecopyTimeoutAction_PRECOPY_TIMEOUT_ACTION_SWITCHOVER},
	} {
		args := append([]string{"migrate", "--insecure", "--source", addr, "--dest", addr, "--src-device", "sim:a", "--dest-device", "sim:a"}, tc.args...)
		if code, out, errOut := runCLI(t, args...); code != 0 {
			t.Fatalf("%s: exit %d, stdout %q, stderr %q", tc.name, code, out, errOut)
		}
		f.mu.Lock()
		got := f.start
		f.mu.Unlock()
		if got.GetMode() != tc.mode || got.GetOnPrecopyTimeout() != tc.onTimeout ||
			got.GetDowntimeLimit().AsDuration() != tc.downtimeLimit.AsDuration() || got.GetPrecopyTimeout().AsDuration() != tc.timeout.AsDuration() {
			t.Errorf("%s: StartMigration mode %v, downtime limit %v, precopy timeout %v, on timeout %v",
				tc.name, got.GetMode(), got.GetDowntimeLimit(), got.GetPrecopyTimeout(), got.GetOnPrecopyTimeout())
		}
	}
}

// TestDriveStopsOnAnUnknownMigration: a source that no longer knows the
// id cannot be watched again, and nothing is cancelled on a guess.
func TestDriveStopsOnAnUnknownMigration(t *testing.T) {
	src := &fakeSource{watches: [][]*ferryv1.Migration{nil}, errs: []error{wire.Errorf(codes.NotFound, wire.ReasonMigrationNotFound, "no migration m1")}}
	_, err := drive(t.Context(), testPlan, &fakeDest{}, src, nil)
	if wire.Code(err) != codes.NotFound || src.cancels != 0 {
		t.Fatalf("%v, %d cancels", err, src.cancels)
	}
}

func runCLI(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errOut bytes.Buffer
	code = run(t.Context(), args, &out, &errOut)
	return code, out.String(), errOut.String()
}

func TestHelpRouting(t *testing.T) {
	for _, tc := range []struct {
		args       []string
		code       int
		stdout     string // contained in stdout
		stderr     string // contained in stderr
		notStdout  string
		emptyStdio bool
	}{
		{args: []string{"help"}, code: 0, stdout: "commands:"},
		{args: []string{"--help"}, code: 0, stdout: "commands:"},
		{args: []string{"help", "migrate"}, code: 0, stdout: "usage: ferry migrate", notStdout: "commands:"},
		{args: []string{"help", "release"}, code: 0, stdout: "rests in STOP"},
		{args: []string{"help", "agent"}, code: 0, stdout: "usage: ferry agent"},
		{args: []string{"help", "bench"}, code: 0, stdout: "usage: ferry bench"},
		{args: []string{"help", "vmm"}, code: 0, stdout: "usage: ferry vmm attach|detach|watch"},
		{args: []string{"help", "preflight"}, code: 0, stdout: "changes any device"},
		{args: []string{"help", "nope"}, code: 2, stderr: `unknown command "nope"`},
		{args: []string{"migrate", "-h"}, code: 0, stderr: "usage: ferry migrate"},
		{args: []string{"nope"}, code: 2, stderr: "run 'ferry help'"},
		{args: nil, code: 2, stderr: "commands:"},
	} {
		code, out, errOut := runCLI(t, tc.args...)
		if code != tc.code || !strings.Contains(out, tc.stdout) || !strings.Contains(errOut, tc.stderr) ||
			(tc.notStdout != "" && strings.Contains(out, tc.notStdout)) {
			t.Errorf("ferry %q: exit %d, stdout %q, stderr %q", tc.args, code, out, errOut)
		}
	}
}

// TestUsageErrors: an error in the command line is printed first, then a
// one-line hint to the command's help, not the help itself.
func TestUsageErrors(t *testing.T) {
	migrateArgs := []string{"migrate", "--insecure", "--source", "a", "--dest", "b", "--src-device", "sim:a", "--dest-device", "sim:a"}
	for _, tc := range []struct {
		args  []string
		error string
	}{
		{[]string{"migrate", "--dest", "x"}, "--source and --dest are required"},
		{[]string{"migrate", "--bogus"}, "flag provided but not defined: -bogus"},
		{[]string{"devices", "--insecure"}, "--agent is required"},
		{[]string{"release", "--insecure", "--source", "x"}, "give one DEVICE"},
		{[]string{"release", "--insecure", "a", "b", "--source", "x"}, "got 2 arguments"},
		{[]string{"bench", "--only", "udp"}, "--only must be rawtcp or ferry"},
		{append(migrateArgs, "--downtime-limit", "1s"), "--downtime-limit needs --mode precopy"},
		{append(migrateArgs, "--on-timeout", "switchover"), "--on-timeout needs --mode precopy"},
		{append(migrateArgs, "--mode", "precopy", "--downtime-limit", "0s"), "--downtime-limit must be above 0"},
		{append(migrateArgs, "--mode", "precopy", "--precopy-timeout", "-1m"), "--precopy-timeout must be above 0"},
		{append(migrateArgs, "--mode", "precopy", "--on-timeout", "retry"), `--on-timeout "retry": want fail or switchover`},
		{[]string{"source", "--insecure", "--devices", "pci:[0"}, "--devices"},
	} {
		code, _, errOut := runCLI(t, tc.args...)
		cmd := tc.args[0]
		want := "ferry " + cmd + ": "
		if code != 2 || !strings.HasPrefix(errOut, want) || !strings.Contains(errOut, tc.error) ||
			!strings.HasSuffix(errOut, "run 'ferry help "+cmd+"' for its flags\n") || strings.Contains(errOut, "flags:\n") ||
			strings.Count(errOut, "\n") != 2 {
			t.Errorf("ferry %q: exit %d, stderr %q", tc.args, code, errOut)
		}
	}
}

// TestJSONErrors: with --json, an early failure is a JSON object on
// stdout.
func TestJSONErrors(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := lis.Addr().String()
	lis.Close()
	for _, tc := range []struct {
		args []string
		code string
		want string // in the message
	}{
		{[]string{"migrate", "--json", "--dest", "x"}, "INVALID_ARGUMENT", "--source and --dest are required"},
		{[]string{"migrate", "--json", "--nope"}, "INVALID_ARGUMENT", "flag provided but not defined"},
		{[]string{"migrate", "--json", "--insecure", "--source", closed, "--dest", closed, "--src-device", "a", "--dest-device", "b"}, "UNAVAILABLE", "prepare the destination"},
		{[]string{"devices", "--json=true", "--insecure", "--agent", closed}, "UNAVAILABLE", "list the devices"},
	} {
		code, out, _ := runCLI(t, tc.args...)
		var got jsonError
		if err := json.Unmarshal([]byte(out), &got); err != nil || code == 0 {
			t.Errorf("ferry %q: exit %d, stdout %q: %v", tc.args, code, out, err)
			continue
		}
		if got.Error.Code != tc.code || !strings.Contains(got.Error.Message, tc.want) {
			t.Errorf("ferry %q: %+v, want %s with %q", tc.args, got.Error, tc.code, tc.want)
		}
	}
	// Without --json, nothing on stdout.
	if _, out, _ := runCLI(t, "migrate", "--json=false", "--dest", "x"); out != "" {
		t.Errorf("--json=false printed %q", out)
	}
}

func TestWantsJSON(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want bool
	}{
		{nil, false},
		{[]string{"--json"}, true},
		{[]string{"-json"}, true},
		{[]string{"--json=false"}, false},
		{[]string{"--json", "--json=0"}, false},
		{[]string{"--", "--json"}, false},
		{[]string{"--jsonx"}, false},
		{[]string{"json"}, false},
	} {
		if got := wantsJSON(tc.args); got != tc.want {
			t.Errorf("wantsJSON(%q) = %v", tc.args, got)
		}
	}
}

func TestCodeNames(t *testing.T) {
	for _, tc := range []struct {
		code codes.Code
		want string
	}{
		{codes.OK, "OK"},
		{codes.Canceled, "CANCELLED"},
		{codes.DataLoss, "DATA_LOSS"},
		{codes.FailedPrecondition, "FAILED_PRECONDITION"},
		{codes.DeadlineExceeded, "DEADLINE_EXCEEDED"},
		{codes.ResourceExhausted, "RESOURCE_EXHAUSTED"},
		{codes.Unauthenticated, "UNAUTHENTICATED"},
		{codes.Code(99), "CODE_99"},
	} {
		if got := codeName(tc.code); got != tc.want {
			t.Errorf("codeName(%v) = %q, want %q", tc.code, got, tc.want)
		}
	}
	// Every code has its name, in the spelling of google.rpc.Code.
	for c := codes.OK; c <= codes.Unauthenticated; c++ {
		if codeName(c) == "" {
			t.Errorf("no name for %v", c)
		}
	}
	// The one-line errors and the summaries spell them alike.
	err := wire.Errorf(codes.FailedPrecondition, wire.ReasonDeviceState, "device is in STOP")
	if got := describe(err, false); got != "device is in STOP (FAILED_PRECONDITION, DEVICE_STATE_ERROR)" {
		t.Errorf("describe: %q", got)
	}
	r := summarize(&ferryv1.Migration{Phase: ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED,
		Error: &ferryv1.MigrationError{Code: int32(codes.DataLoss), Reason: wire.ReasonChunkCRC, Message: "bad chunk"}}, nil)
	var b strings.Builder
	printSummary(&b, r)
	if !strings.Contains(b.String(), "bad chunk (DATA_LOSS, CHUNK_CRC_MISMATCH)") {
		t.Errorf("summary:\n%s", b.String())
	}
}

// TestPlaintextClientAgainstTLS: the error of a plaintext client at a TLS
// agent says that the agent expects TLS.
func TestPlaintextClientAgainstTLS(t *testing.T) {
	ca := peerauthtest.NewCA(t, "ferry test CA")
	server, _, err := peerauth.AgentTLS(ca.Issue(t, "127.0.0.1", "localhost"))
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(grpc.Creds(server))
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(lis)
	defer srv.Stop()
	code, out, errOut := runCLI(t, "devices", "--insecure", "--json", "--agent", lis.Addr().String())
	if code != 1 || !strings.Contains(errOut, "the agent expects TLS") || !strings.Contains(errOut, "(UNAVAILABLE)") {
		t.Errorf("exit %d, stderr %q", code, errOut)
	}
	if !strings.Contains(out, "the agent expects TLS") {
		t.Errorf("--json: %q", out)
	}
}

// fakeReleaser serves SourceAgent.ReleaseDevice.
type fakeReleaser struct {
	ferryv1.UnimplementedSourceAgentServer
	got chan *ferryv1.ReleaseDeviceRequest
}

func (f *fakeReleaser) ReleaseDevice(_ context.Context, req *ferryv1.ReleaseDeviceRequest) (*ferryv1.ReleaseDeviceResponse, error) {
	f.got <- req
	if req.GetDevice() == "busy" {
		return nil, wire.Errorf(codes.FailedPrecondition, wire.ReasonDeviceBusy, "busy is held by migration m1")
	}
	return &ferryv1.ReleaseDeviceResponse{Device: &ferryv1.Device{Spec: req.GetDevice(), State: ferryv1.DeviceState_DEVICE_STATE_RUNNING}}, nil
}

func TestRelease(t *testing.T) {
	f := &fakeReleaser{got: make(chan *ferryv1.ReleaseDeviceRequest, 1)}
	srv := grpc.NewServer(grpc.Creds(insecure.NewCredentials()))
	ferryv1.RegisterSourceAgentServer(srv, f)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(lis)
	defer srv.Stop()
	addr := lis.Addr().String()
	for _, tc := range []struct {
		args   []string
		device string
		reset  bool
		code   int
		out    string
	}{
		{[]string{"release", "--source", addr, "--insecure", "sim:size=1MiB,seed=1"}, "sim:size=1MiB,seed=1", false, 0, "sim:size=1MiB,seed=1: moved to RUNNING, now RUNNING\n"},
		{[]string{"release", "mdev:f3a1c0de-0000-4000-8000-000000000001", "--reset", "--source", addr, "--insecure"}, "mdev:f3a1c0de-0000-4000-8000-000000000001", true, 0, "reset, now RUNNING"},
		{[]string{"release", "--source", addr, "--insecure", "busy"}, "busy", false, 1, ""},
	} {
		code, out, errOut := runCLI(t, tc.args...)
		req := <-f.got
		if req.GetDevice() != tc.device || req.GetReset_() != tc.reset {
			t.Errorf("ferry %q sent %v", tc.args, req)
		}
		if code != tc.code || !strings.Contains(out, tc.out) {
			t.Errorf("ferry %q: exit %d, stdout %q, stderr %q", tc.args, code, out, errOut)
		}
		if tc.code != 0 && !strings.Contains(errOut, "(FAILED_PRECONDITION, DEVICE_BUSY)") {
			t.Errorf("ferry %q: stderr %q", tc.args, errOut)
		}
	}
}

const uuidSpec = "mdev:f3a1c0de-1234-4abc-8def-0123456789ab"

func TestFitDevices(t *testing.T) {
	stats := deviceStats{frac: 0.5, bytes: "512MiB/1GiB", rate: "150.00 MB/s", eta: "ETA 3.6s", state: "STOP_COPY"}
	for _, tc := range []struct {
		name       string
		width      int
		names      []string
		lines      int  // lines per device
		bar        bool // a progress bar is drawn
		wholeNames bool // every name is there whole
	}{
		{"wide", 160, []string{uuidSpec, "pci:0000:3b:00.2"}, 1, true, true},
		{"80 columns, short names", 80, []string{"sim:size=1GiB,seed=1", "pci:0000:3b:00.2"}, 1, false, true},
		{"80 columns, a UUID", 80, []string{uuidSpec, "pci:0000:3b:00.2"}, 2, false, true},
		{"narrow", 40, []string{uuidSpec}, 2, false, false},
		{"very narrow", 20, []string{uuidSpec}, 2, false, false},
	} {
		all := make([]deviceStats, len(tc.names))
		for i := range all {
			all[i] = stats
		}
		lines := fitDevices(tc.width, tc.names, all)
		if len(lines) != tc.lines*len(tc.names) {
			t.Errorf("%s: %d lines for %d devices:\n%s", tc.name, len(lines), len(tc.names), strings.Join(lines, "\n"))
		}
		text := strings.Join(lines, "\n")
		for _, l := range lines {
			if n := utf8.RuneCountInString(l); n >= tc.width {
				t.Errorf("%s: a line of %d columns at %d: %q", tc.name, n, tc.width, l)
			}
		}
		if strings.Contains(text, "[#") != tc.bar {
			t.Errorf("%s: bar %v:\n%s", tc.name, !tc.bar, text)
		}
		for _, n := range tc.names {
			if tc.wholeNames && !strings.Contains(text, n) {
				t.Errorf("%s: %s cut:\n%s", tc.name, n, text)
			}
			// Elided names keep both ends.
			if !strings.Contains(text, n[:4]) || !strings.Contains(text, n[len(n)-4:]) {
				t.Errorf("%s: %s lost an end:\n%s", tc.name, n, text)
			}
		}
	}
}

func TestElide(t *testing.T) {
	for _, tc := range []struct {
		s    string
		n    int
		want string
	}{
		{"abcdef", 10, "abcdef"},
		{"abcdef", 6, "abcdef"},
		{"abcdefgh", 5, "ab…gh"},
		{uuidSpec, 21, "mdev:f3a1c…0123456789ab"[:0] + "mdev:f3a1c…23456789ab"},
		{"abc", 1, "a"},
	} {
		if got := elide(tc.s, tc.n); got != tc.want || utf8.RuneCountInString(got) > max(tc.n, 0) {
			t.Errorf("elide(%q, %d) = %q, want %q", tc.s, tc.n, got, tc.want)
		}
	}
}

func TestWidthFromEnv(t *testing.T) {
	for _, tc := range []struct {
		env  string
		want int
	}{{"", 80}, {"120", 120}, {" 100 ", 100}, {"0", 80}, {"-3", 80}, {"wide", 80}} {
		if got := widthFromEnv(tc.env); got != tc.want {
			t.Errorf("COLUMNS=%q: %d, want %d", tc.env, got, tc.want)
		}
	}
}

// TestProgressFinishedRate: a device that finished shows its average
// rate from then on, not a rate decaying towards zero.
func TestProgressFinishedRate(t *testing.T) {
	var out bytes.Buffer
	clock := time.Unix(1000, 0)
	v := &progressView{w: &out, tty: true, now: func() time.Time { return clock }, width: func() int { return 200 }}
	const total = 150e6
	dev := func(b uint64) *ferryv1.Migration {
		return &ferryv1.Migration{Id: "m1", Phase: ferryv1.MigrationPhase_MIGRATION_PHASE_STOPCOPY,
			Devices: []*ferryv1.DeviceProgress{{Device: "sim:a", Bytes: b, TotalBytes: total}}}
	}
	v.update(dev(0))
	for b := uint64(15e6); b <= total; b += 15e6 { // 150 MB/s in 100 ms steps
		clock = clock.Add(100 * time.Millisecond)
		v.update(dev(b))
	}
	for range 20 {
		clock = clock.Add(time.Second)
		out.Reset()
		v.update(dev(total))
	}
	if !strings.Contains(out.String(), "150.00 MB/s") || !strings.Contains(out.String(), "done") {
		t.Errorf("a finished device at 150 MB/s drawn as:\n%q", out.String())
	}
}

// TestSummaryIntervals: the downtime is never printed longer than the
// duration, and each interval says what it is.
func TestSummaryIntervals(t *testing.T) {
	at := func(ms int) *timestamppb.Timestamp {
		return timestamppb.New(time.Unix(1000, 0).Add(time.Duration(ms) * time.Millisecond))
	}
	for _, tc := range []struct {
		name                      string
		create, start, end        int // ms
		downtime                  time.Duration
		wantDuration, wantTransfr float64
	}{
		// Stop-copy: the devices stop before their first chunk is read.
		{"stop-copy", 0, 12, 745, 734 * time.Millisecond, 0.745, 0.733},
		// A wall clock stepped back between create and end: clamped.
		{"stepped clock", 0, 0, 500, 734 * time.Millisecond, 0.734, 0.5},
	} {
		m := &ferryv1.Migration{Id: "m1", Phase: ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED, CreateTime: at(tc.create), StartTime: at(tc.start),
			EndTime: at(tc.end), Downtime: durationpb.New(tc.downtime), Owner: ferryv1.DeviceOwner_DEVICE_OWNER_DESTINATION}
		r := summarize(m, nil)
		if r.DurationSeconds < r.DowntimeSeconds || r.DurationSeconds != tc.wantDuration || r.TransferSeconds != tc.wantTransfr {
			t.Errorf("%s: duration %v, transfer %v, downtime %v", tc.name, r.DurationSeconds, r.TransferSeconds, r.DowntimeSeconds)
		}
		var b strings.Builder
		printSummary(&b, r)
		for _, want := range []string{"(accepted to verdict)", "(first chunk read to verdict)", "(switchover start to the commit", "owner        DESTINATION", "ferry release"} {
			if !strings.Contains(b.String(), want) {
				t.Errorf("%s: no %q in\n%s", tc.name, want, b.String())
			}
		}
	}
}

// TestNextStep: a summary without a verdict says what to do.
func TestNextStep(t *testing.T) {
	for _, tc := range []struct {
		name     string
		m        *ferryv1.Migration
		incoming *ferryv1.Migration
		want     string
	}{
		{"failed", &ferryv1.Migration{Id: "m1", Phase: ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED, Owner: ferryv1.DeviceOwner_DEVICE_OWNER_SOURCE}, nil, "keeps its devices on the source host"},
		{"failed, destination still open", &ferryv1.Migration{Id: "m1", Phase: ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED},
			&ferryv1.Migration{Phase: ferryv1.MigrationPhase_MIGRATION_PHASE_VERIFIED}, "DestAgent.CancelIncoming m1"},
		{"unknown", &ferryv1.Migration{Id: "m1", Phase: ferryv1.MigrationPhase_MIGRATION_PHASE_FINISHING}, nil, "ask the source"},
		{"committed, destination unconfirmed", &ferryv1.Migration{Id: "m1", Phase: ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED},
			&ferryv1.Migration{Phase: ferryv1.MigrationPhase_MIGRATION_PHASE_VERIFIED}, "do not run the VM on the source"},
	} {
		r := summarize(tc.m, tc.incoming)
		if r.Verified || !strings.Contains(r.Next, tc.want) {
			t.Errorf("%s: next %q, want %q", tc.name, r.Next, tc.want)
		}
	}
}
