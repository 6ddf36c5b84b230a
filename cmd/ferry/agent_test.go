package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/internal/agentproc"
	"github.com/vfio-ferry/ferry/services/dest"
	"github.com/vfio-ferry/ferry/services/grpcserver"
	"github.com/vfio-ferry/ferry/services/wire"
	"github.com/vfio-ferry/ferry/services/wire/wiretest"
)

// These tests run `ferry agent` as real processes on loopback, drive them
// as a control plane would, and stop them with real signals.

// ferryBuild is this command, built once per run of the package's tests
// (by the first test that needs it) into a directory TestMain removes.
var ferryBuild = agentproc.NewBuild("github.com/vfio-ferry/ferry/cmd/ferry")

func TestMain(m *testing.M) { os.Exit(ferryBuild.Run(m)) }

// buildFerry returns the path of this command's binary, building it the
// first time.
func buildFerry(t *testing.T) string {
	t.Helper()
	return ferryBuild.Binary(t)
}

// startAgent starts `ferry agent` on loopback ports chosen by the kernel,
// with health and metrics endpoints, and waits until it listens.
func startAgent(t *testing.T, bin string, extra ...string) *agentproc.Agent {
	t.Helper()
	return startRole(t, bin, "agent", extra...)
}

// startSource is startAgent for `ferry source`.
func startSource(t *testing.T, bin string, extra ...string) *agentproc.Agent {
	t.Helper()
	return startRole(t, bin, "source", extra...)
}

func startRole(t *testing.T, bin, role string, extra ...string) *agentproc.Agent {
	t.Helper()
	return agentproc.Start(t, bin, append([]string{role, "--insecure", "--allow-sim", "--log-format=json",
		"--listen=127.0.0.1:0", "--health-listen=127.0.0.1:0", "--metrics-listen=127.0.0.1:0"}, extra...)...)
}

func dialAgent(t *testing.T, addr string) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpcserver.DialOptions(insecure.NewCredentials(), nil)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// scrape returns the agent's /metrics page.
func scrape(t *testing.T, p *agentproc.Agent) string {
	t.Helper()
	resp, err := http.Get("http://" + p.MetricsAddr() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /metrics: %v %s", err, resp.Status)
	}
	return string(b)
}

var (
	seriesLine = regexp.MustCompile(`^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$`)
	labelPair  = regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"`)
)

// metric returns the value of the series name whose labels include
// labels, from a Prometheus text page; ok is false if there is none.
func metric(page, name string, labels map[string]string) (v float64, ok bool) {
	for line := range strings.Lines(page) {
		m := seriesLine.FindStringSubmatch(strings.TrimSpace(line))
		if m == nil || m[1] != name {
			continue
		}
		have := map[string]string{}
		for _, l := range labelPair.FindAllStringSubmatch(m[2], -1) {
			have[l[1]], _ = strconv.Unquote(`"` + l[2] + `"`)
		}
		match := true
		for k, want := range labels {
			match = match && have[k] == want
		}
		if match {
			f, err := strconv.ParseFloat(m[3], 64)
			return f, err == nil
		}
	}
	return 0, false
}

func mustMetric(t *testing.T, page, name string, labels map[string]string) float64 {
	t.Helper()
	v, ok := metric(page, name, labels)
	if !ok {
		t.Fatalf("no %s%v on /metrics", name, labels)
	}
	return v
}

// TestAgentSaysHowChunksTravel checks the start-up line an operator
// comparing nodes reads: whether the agent takes direct data connections,
// and where, or why its migrations cost more CPU.
func TestAgentSaysHowChunksTravel(t *testing.T) {
	bin := buildFerry(t)
	off := startAgent(t, bin)
	if !off.LoggedPrefix("direct data connections off (no --data-listen)") || off.Logged("direct data listening") {
		t.Errorf("an agent without --data-listen logged:\n%s", off.Log())
	}
	on := startAgent(t, bin, "--data-listen=127.0.0.1:0")
	if !on.Logged("direct data listening") || on.LoggedPrefix("direct data connections off") {
		t.Errorf("an agent with --data-listen logged:\n%s", on.Log())
	}
	// The source role alone takes no chunks: it says nothing of them.
	src := startSource(t, bin)
	if src.LoggedPrefix("direct data") {
		t.Errorf("a source agent logged:\n%s", src.Log())
	}
}

// TestAgentMetrics migrates two simulated devices between two agents with
// metrics on, scrapes both while and after it runs, and checks the byte
// and chunk counters against the migrated sizes.
func TestAgentMetrics(t *testing.T) {
	bin := buildFerry(t)
	src, dst := startAgent(t, bin), startAgent(t, bin, "--memory-budget=512MiB")
	const chunk = 1 << 20
	sizes := []uint64{48 << 20, 16<<20 + 4097} // the second ends in a short chunk
	p := plan{id: "metrics-1", sourceAddr: src.Addr(), destAddr: dst.Addr(), transfer: dst.Addr(),
		channels: 3, chunkSize: chunk, creds: insecure.NewCredentials()}
	for i, n := range sizes {
		spec := fmt.Sprintf("sim:size=%d,seed=%d", n, i+11)
		p.pairs = append(p.pairs, &ferryv1.DevicePair{SourceDevice: spec, DestDevice: spec})
	}
	scrapedDuring := false
	r, err := migrate(t.Context(), p, func(m *ferryv1.Migration) {
		if scrapedDuring || m.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_STOPCOPY {
			return
		}
		// During the migration: the families are there, and no counter
		// exceeds what there is to send.
		scrapedDuring = true
		page := scrape(t, src)
		for i, d := range m.GetDevices() {
			if v, ok := metric(page, "ferry_source_sent_bytes_total", map[string]string{"device": d.GetDevice()}); ok && v > float64(sizes[i]) {
				t.Errorf("during: %s sent %v bytes of %d", d.GetDevice(), v, sizes[i])
			}
		}
		if v := mustMetric(t, page, "ferry_migrations_active", map[string]string{"role": "source"}); v != 1 {
			t.Errorf("during: ferry_migrations_active{role=source} = %v, want 1", v)
		}
		if v := mustMetric(t, page, "ferry_migrations_by_phase", map[string]string{"role": "source", "phase": "stopcopy"}); v != 1 {
			t.Errorf("during: ferry_migrations_by_phase{role=source,phase=stopcopy} = %v, want 1", v)
		}
		for i, d := range m.GetDevices() {
			if v := mustMetric(t, page, "ferry_source_device_total_bytes", map[string]string{"device": d.GetDevice()}); v != float64(sizes[i]) {
				t.Errorf("during: %s total %v, want %d", d.GetDevice(), v, sizes[i])
			}
			mustMetric(t, page, "ferry_source_device_remaining_bytes", map[string]string{"device": d.GetDevice()})
		}
		mustMetric(t, page, "grpc_server_started_total", map[string]string{"grpc_method": "StartMigration"})
	})
	if err != nil {
		t.Fatal(err)
	}
	if !r.Verified {
		t.Fatalf("migration not verified: %+v", r)
	}
	if !scrapedDuring {
		t.Error("the watch never reported STOPCOPY, so nothing was scraped during the migration")
	}

	sp, dp := scrape(t, src), scrape(t, dst)
	for i, d := range r.DeviceResults {
		n := sizes[i]
		chunks := float64((n + chunk - 1) / chunk)
		if got := mustMetric(t, sp, "ferry_source_sent_bytes_total", map[string]string{"device": d.Source}); got != float64(n) {
			t.Errorf("source %s: ferry_source_sent_bytes_total %v, migrated %d", d.Source, got, n)
		}
		if got := mustMetric(t, sp, "ferry_source_sent_chunks_total", map[string]string{"device": d.Source}); got != chunks {
			t.Errorf("source %s: ferry_source_sent_chunks_total %v, want %v", d.Source, got, chunks)
		}
		if got := mustMetric(t, dp, "ferry_dest_loaded_bytes_total", map[string]string{"device": d.Dest}); got != float64(n) {
			t.Errorf("dest %s: ferry_dest_loaded_bytes_total %v, migrated %d", d.Dest, got, n)
		}
		if got := mustMetric(t, dp, "ferry_dest_loaded_chunks_total", map[string]string{"device": d.Dest}); got != chunks {
			t.Errorf("dest %s: ferry_dest_loaded_chunks_total %v, want %v", d.Dest, got, chunks)
		}
		mustMetric(t, sp, "ferry_source_window_stalls_total", map[string]string{"device": d.Source})
		mustMetric(t, sp, "ferry_source_window_stall_seconds_total", map[string]string{"device": d.Source})
		mustMetric(t, sp, "ferry_source_retransmitted_chunks_total", map[string]string{"device": d.Source})
		mustMetric(t, dp, "ferry_dest_duplicate_chunks_total", map[string]string{"device": d.Dest})
	}
	for _, c := range []struct {
		page, name string
		labels     map[string]string
		want       float64
	}{
		{sp, "ferry_migrations_total", map[string]string{"role": "source", "outcome": "succeeded"}, 1},
		{sp, "ferry_migrations_by_phase", map[string]string{"role": "source", "phase": "stopcopy"}, 0},
		{sp, "ferry_build_info", nil, 1},
		{dp, "ferry_migrations_total", map[string]string{"role": "dest", "outcome": "succeeded"}, 1},
		{sp, "ferry_migrations_active", map[string]string{"role": "source"}, 0},
		{dp, "ferry_migrations_active", map[string]string{"role": "dest"}, 0},
		{sp, "ferry_migration_duration_seconds_count", map[string]string{"role": "source"}, 1},
		{sp, "ferry_migration_downtime_seconds_count", map[string]string{"role": "source"}, 1},
		{dp, "ferry_migration_downtime_seconds_count", map[string]string{"role": "dest"}, 1},
		{dp, "ferry_dest_memory_budget_bytes", nil, 512 << 20},
		{dp, "ferry_dest_memory_budget_in_use_bytes", nil, 0},
		{sp, "grpc_server_handled_total", map[string]string{"grpc_method": "StartMigration", "grpc_code": "OK"}, 1},
		{dp, "grpc_server_handled_total", map[string]string{"grpc_method": "PrepareIncoming", "grpc_code": "OK"}, 1},
		{dp, "grpc_server_started_total", map[string]string{"grpc_service": "ferry.v1.Transfer", "grpc_method": "Channel"}, 3},
		{sp, "grpc_client_started_total", map[string]string{"grpc_service": "ferry.v1.Transfer", "grpc_method": "Channel"}, 3},
		{sp, "grpc_client_handled_total", map[string]string{"grpc_method": "Finish", "grpc_code": "OK"}, 1},
	} {
		if got := mustMetric(t, c.page, c.name, c.labels); got != c.want {
			t.Errorf("%s%v = %v, want %v", c.name, c.labels, got, c.want)
		}
	}
	src.Signal(t, syscall.SIGTERM)
	dst.Signal(t, syscall.SIGTERM)
	if code := src.Wait(); code != 0 {
		t.Errorf("source exited %d", code)
	}
	if code := dst.Wait(); code != 0 {
		t.Errorf("destination exited %d", code)
	}
}

// healthWatch follows one health service of an agent's health port.
func healthWatch(t *testing.T, ctx context.Context, addr, service string) func() healthpb.HealthCheckResponse_ServingStatus {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	stream, err := healthpb.NewHealthClient(conn).Watch(ctx, &healthpb.HealthCheckRequest{Service: service})
	if err != nil {
		t.Fatal(err)
	}
	return func() healthpb.HealthCheckResponse_ServingStatus {
		t.Helper()
		resp, err := stream.Recv()
		if err != nil {
			t.Fatalf("health watch %q: %v", service, err)
		}
		return resp.GetStatus()
	}
}

// TestAgentDrainLetsRunningMigrationFinish sends SIGTERM to a destination
// agent that holds a prepared migration: readiness goes NOT_SERVING while
// liveness stays SERVING, a new PrepareIncoming is refused with
// UNAVAILABLE, the prepared migration still runs to SUCCEEDED, and then the
// agent exits by itself.
func TestAgentDrainLetsRunningMigrationFinish(t *testing.T) {
	bin := buildFerry(t)
	src, dst := startAgent(t, bin), startAgent(t, bin, "--drain-timeout=1h")
	dconn := dialAgent(t, dst.Addr())
	dagent := ferryv1.NewDestAgentClient(dconn)
	ctx := t.Context()
	const spec = "sim:size=24MiB,seed=21"
	prep, err := dagent.PrepareIncoming(ctx, &ferryv1.PrepareIncomingRequest{MigrationId: "drain-1", Devices: []string{spec}})
	if err != nil {
		t.Fatal(err)
	}

	wctx, stopWatch := context.WithCancel(ctx)
	ready := healthWatch(t, wctx, dst.HealthAddr(), healthReadiness)
	if s := ready(); s != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("readiness before SIGTERM: %v", s)
	}
	dst.Signal(t, syscall.SIGTERM)
	if s := ready(); s != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Fatalf("readiness after SIGTERM: %v", s)
	}
	stopWatch()
	hconn, err := grpc.NewClient(dst.HealthAddr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer hconn.Close()
	for service, want := range map[string]healthpb.HealthCheckResponse_ServingStatus{
		healthLiveness:       healthpb.HealthCheckResponse_SERVING,
		"":                   healthpb.HealthCheckResponse_NOT_SERVING,
		"ferry.v1.DestAgent": healthpb.HealthCheckResponse_NOT_SERVING,
	} {
		resp, err := healthpb.NewHealthClient(hconn).Check(ctx, &healthpb.HealthCheckRequest{Service: service})
		if err != nil || resp.GetStatus() != want {
			t.Errorf("health %q while draining: %v %v, want %v", service, resp.GetStatus(), err, want)
		}
	}

	_, err = dagent.PrepareIncoming(ctx, &ferryv1.PrepareIncomingRequest{MigrationId: "drain-2", Devices: []string{"sim:size=4MiB,seed=22"}})
	if wire.Code(err) != codes.Unavailable || wire.Reason(err) != wire.ReasonDraining {
		t.Fatalf("PrepareIncoming while draining: %v (%s), want UNAVAILABLE %s", err, wire.Reason(err), wire.ReasonDraining)
	}

	// The migration prepared before SIGTERM still runs to its end.
	sagent := ferryv1.NewSourceAgentClient(dialAgent(t, src.Addr()))
	_, err = sagent.StartMigration(ctx, &ferryv1.StartMigrationRequest{MigrationId: "drain-1", DestAddress: dst.Addr(), Token: prep.GetToken(),
		Devices: []*ferryv1.DevicePair{{SourceDevice: spec, DestDevice: spec}}})
	if err != nil {
		t.Fatal(err)
	}
	final, err := watch(ctx, sagent, "drain-1", nil)
	if err != nil {
		t.Fatal(err)
	}
	if final.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED {
		t.Fatalf("the migration running at SIGTERM ended %v: %v", final.GetPhase(), final.GetError())
	}
	if code := dst.Wait(); code != 0 {
		t.Errorf("destination exited %d\n%s", code, dst.Log())
	}
	if !dst.Logged("drained: no migration running") || dst.Logged("drain timeout passed: aborting the running migrations with the rollback rule") {
		t.Errorf("the destination's log does not show a clean drain:\n%s", dst.Log())
	}
	src.Signal(t, syscall.SIGTERM)
	if code := src.Wait(); code != 0 {
		t.Errorf("source exited %d", code)
	}
}

// slowSrc is a source device that cannot be migrated within any of the
// tests: 1 GiB read at 4 MB/s takes over four minutes.
const slowSrc, slowDst = "sim:size=1GiB,seed=31,rate=4MB/s", "sim:size=1GiB,seed=31"

// startSlowMigration prepares and starts migration id of the slow device
// from src to dst and returns a watch on the source, past its first state.
func startSlowMigration(t *testing.T, src, dst *agentproc.Agent, id string) (ferryv1.SourceAgentClient, ferryv1.DestAgentClient, grpc.ServerStreamingClient[ferryv1.WatchMigrationResponse]) {
	t.Helper()
	ctx := t.Context()
	dagent := ferryv1.NewDestAgentClient(dialAgent(t, dst.Addr()))
	prep, err := dagent.PrepareIncoming(ctx, &ferryv1.PrepareIncomingRequest{MigrationId: id, Devices: []string{slowDst}})
	if err != nil {
		t.Fatal(err)
	}
	sagent := ferryv1.NewSourceAgentClient(dialAgent(t, src.Addr()))
	_, err = sagent.StartMigration(ctx, &ferryv1.StartMigrationRequest{MigrationId: id, DestAddress: dst.Addr(), Token: prep.GetToken(),
		Devices: []*ferryv1.DevicePair{{SourceDevice: slowSrc, DestDevice: slowDst}}})
	if err != nil {
		t.Fatal(err)
	}
	stream, err := sagent.WatchMigration(ctx, &ferryv1.WatchMigrationRequest{MigrationId: id})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Recv(); err != nil {
		t.Fatal(err)
	}
	return sagent, dagent, stream
}

// checkRolledBack follows the watch to the migration's end and checks the
// rollback rule: FAILED with UNAVAILABLE, the source device RUNNING and not
// read to its end; the destination failed too and reset its device.
func checkRolledBack(t *testing.T, stream grpc.ServerStreamingClient[ferryv1.WatchMigrationResponse], dagent ferryv1.DestAgentClient, id string) {
	t.Helper()
	last, err := wiretest.LastMigration(stream.Recv)
	if !errors.Is(err, io.EOF) {
		t.Fatalf("watch: %v", err)
	}
	if last.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED || codes.Code(last.GetError().GetCode()) != codes.Unavailable {
		t.Fatalf("the migration ended %v (%v), want FAILED with UNAVAILABLE", last.GetPhase(), last.GetError())
	}
	d := last.GetDevices()[0]
	if d.GetState() != ferryv1.DeviceState_DEVICE_STATE_RUNNING {
		t.Errorf("source device %s is %v after the rollback, want RUNNING", d.GetDevice(), d.GetState())
	}
	if d.GetBytes() >= 1<<30 {
		t.Errorf("the device was read to its end (%d bytes): the migration was not cut short", d.GetBytes())
	}
	in, err := dagent.WatchIncoming(t.Context(), &ferryv1.WatchIncomingRequest{MigrationId: id})
	if err != nil {
		t.Fatal(err)
	}
	inc, _ := wiretest.LastMigration(in.Recv)
	if inc.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED || inc.GetError().GetReason() != wire.ReasonAborted {
		t.Errorf("destination: %v %v, want FAILED %s", inc.GetPhase(), inc.GetError(), wire.ReasonAborted)
	}
	if s := inc.GetDevices()[0].GetState(); s != ferryv1.DeviceState_DEVICE_STATE_RUNNING {
		t.Errorf("destination device is %v, want RUNNING after its reset", s)
	}
}

// TestAgentDrainTimeoutRollsBack sends SIGTERM to a source agent whose
// migration cannot end within --drain-timeout: at the deadline the
// migration is aborted with the rollback rule and the agent exits 0.
func TestAgentDrainTimeoutRollsBack(t *testing.T) {
	bin := buildFerry(t)
	src, dst := startAgent(t, bin, "--drain-timeout=200ms"), startAgent(t, bin)
	_, dagent, stream := startSlowMigration(t, src, dst, "deadline-1")
	src.Signal(t, syscall.SIGTERM)
	checkRolledBack(t, stream, dagent, "deadline-1")
	if code := src.Wait(); code != 0 {
		t.Errorf("source exited %d", code)
	}
	if !src.Logged("drain timeout passed: aborting the running migrations with the rollback rule") {
		t.Errorf("the source's log does not show the drain deadline:\n%s", src.Log())
	}
	dst.Signal(t, syscall.SIGTERM)
	if code := dst.Wait(); code != 0 {
		t.Errorf("destination exited %d", code)
	}
}

// TestAgentSecondSignalAborts sends SIGTERM to a source agent with a long
// --drain-timeout and a running migration: while it drains, a new
// StartMigration is refused with UNAVAILABLE and the running one still
// answers GetMigration; a second SIGTERM aborts the migration at once with
// the rollback rule, and the agent exits 0.
func TestAgentSecondSignalAborts(t *testing.T) {
	bin := buildFerry(t)
	src, dst := startAgent(t, bin, "--drain-timeout=1h"), startAgent(t, bin)
	sagent, dagent, stream := startSlowMigration(t, src, dst, "second-1")
	ctx := t.Context()

	wctx, stopWatch := context.WithCancel(ctx)
	ready := healthWatch(t, wctx, src.HealthAddr(), healthReadiness)
	if s := ready(); s != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("readiness before SIGTERM: %v", s)
	}
	src.Signal(t, syscall.SIGTERM)
	if s := ready(); s != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Fatalf("readiness after SIGTERM: %v", s)
	}
	stopWatch()

	_, err := sagent.StartMigration(ctx, &ferryv1.StartMigrationRequest{MigrationId: "second-2", DestAddress: dst.Addr(), Token: "t",
		Devices: []*ferryv1.DevicePair{{SourceDevice: "sim:size=4MiB,seed=32", DestDevice: "sim:size=4MiB,seed=32"}}})
	if wire.Code(err) != codes.Unavailable || wire.Reason(err) != wire.ReasonDraining {
		t.Errorf("StartMigration while draining: %v (%s), want UNAVAILABLE %s", err, wire.Reason(err), wire.ReasonDraining)
	}
	if _, err := sagent.GetMigration(ctx, &ferryv1.GetMigrationRequest{MigrationId: "second-1"}); err != nil {
		t.Errorf("GetMigration while draining: %v", err)
	}

	src.Signal(t, syscall.SIGTERM)
	checkRolledBack(t, stream, dagent, "second-1")
	if code := src.Wait(); code != 0 {
		t.Errorf("source exited %d", code)
	}
	if !src.Logged("second signal: aborting the running migrations with the rollback rule") {
		t.Errorf("the source's log does not show the second signal:\n%s", src.Log())
	}
	dst.Signal(t, syscall.SIGTERM)
	if code := dst.Wait(); code != 0 {
		t.Errorf("destination exited %d", code)
	}
}

// TestAgentBudgetGaugeDefault: with --memory-budget 0 the default budget
// applies, and the gauge reports it, not 0.
func TestAgentBudgetGaugeDefault(t *testing.T) {
	bin := buildFerry(t)
	a := startAgent(t, bin, "--memory-budget=0")
	if got := mustMetric(t, scrape(t, a), "ferry_dest_memory_budget_bytes", nil); got != dest.DefaultMemoryBudget {
		t.Errorf("ferry_dest_memory_budget_bytes %v with --memory-budget 0, want the default %d", got, dest.DefaultMemoryBudget)
	}
}
