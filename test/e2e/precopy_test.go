package e2e

import (
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/services/dest"
	"github.com/vfio-ferry/ferry/services/deviceapi"
	"github.com/vfio-ferry/ferry/services/wire"
)

// precopying holds while the VM runs and pre-copy streams: PRECOPY, or
// READY once the destination has loaded the initial data.
func precopying(m *ferryv1.Migration) bool {
	p := m.GetPhase()
	return p == ferryv1.MigrationPhase_MIGRATION_PHASE_PRECOPY || p == ferryv1.MigrationPhase_MIGRATION_PHASE_READY
}

// startPrecopy prepares and starts a pre-copy migration of the pairs.
func (a *agents) startPrecopy(t testing.TB, id string, src, dst []string, opts ...func(*ferryv1.StartMigrationRequest)) {
	t.Helper()
	ctx := t.Context()
	prep, err := a.dest.PrepareIncoming(ctx, &ferryv1.PrepareIncomingRequest{MigrationId: id, Devices: dst})
	if err != nil {
		t.Fatal(err)
	}
	req := &ferryv1.StartMigrationRequest{MigrationId: id, DestAddress: a.destAddr, Token: prep.GetToken(), Channels: 4,
		Mode: ferryv1.MigrationMode_MIGRATION_MODE_PRECOPY}
	for i := range src {
		req.Devices = append(req.Devices, &ferryv1.DevicePair{SourceDevice: src[i], DestDevice: dst[i]})
	}
	for _, o := range opts {
		o(req)
	}
	if _, err := a.source.StartMigration(ctx, req); err != nil {
		t.Fatal(err)
	}
}

// A pre-copy migration streams the device's initial data while it runs,
// switches over when asked, and verifies; far fewer bytes move after the
// switchover than before it. A device without PRE_COPY in the same
// migration streams at the switchover.
func TestPrecopyMigration(t *testing.T) {
	const pre = "sim:size=64MiB,seed=81,flags=stopcopy|p2p|precopy,precopy=48MiB,dirty=4MB/s"
	const plain = "sim:size=4MiB,seed=82,flags=stopcopy|p2p"
	a := startAgents(t, dest.Config{})
	a.startPrecopy(t, "precopy", []string{pre, plain}, []string{pre, plain})
	running := a.sourceUntil(t, "precopy", func(m *ferryv1.Migration) bool {
		return precopying(m) && m.GetDevices()[0].GetBytes() >= 48<<20
	})
	if st := running.GetDevices()[1].GetState(); st != ferryv1.DeviceState_DEVICE_STATE_RUNNING || running.GetDevices()[1].GetBytes() != 0 {
		t.Errorf("the device without PRE_COPY is %v with %d bytes sent during pre-copy, want RUNNING and none", st, running.GetDevices()[1].GetBytes())
	}
	before := running.GetDevices()[0].GetBytes()
	if _, err := a.source.Switchover(t.Context(), &ferryv1.SwitchoverRequest{MigrationId: "precopy"}); err != nil {
		t.Fatal(err)
	}
	src := a.waitSource(t, "precopy")
	if src.GetPhase() != succeeded {
		t.Fatalf("source %v %v, want SUCCEEDED", src.GetPhase(), src.GetError())
	}
	if d := a.waitDest(t, "precopy"); d.GetPhase() != succeeded || !d.GetDevices()[0].GetVerified() || !d.GetDevices()[1].GetVerified() {
		t.Fatalf("destination %v %v, want both devices verified", d.GetPhase(), d.GetError())
	}
	after := src.GetDevices()[0].GetBytes() - before
	if after >= before {
		t.Errorf("%d bytes sent after the switchover against %d before it: pre-copy moved too little", after, before)
	}
}

// A cancel during pre-copy returns the devices to RUNNING (the VM never
// stopped) and resets the destination's.
func TestCancelDuringPrecopy(t *testing.T) {
	const pre = "sim:size=16MiB,seed=83,flags=stopcopy|p2p|precopy,precopy=8MiB,dirty=1MB/s"
	a := startAgents(t, dest.Config{})
	a.startPrecopy(t, "precopy-cancel", []string{pre}, []string{pre})
	a.sourceUntil(t, "precopy-cancel", func(m *ferryv1.Migration) bool {
		return precopying(m) && m.GetBytes() > 0
	})
	resp, err := a.source.CancelMigration(t.Context(), &ferryv1.CancelMigrationRequest{MigrationId: "precopy-cancel"})
	if err != nil {
		t.Fatal(err)
	}
	if m := resp.GetMigration(); m.GetPhase() != cancelled {
		t.Fatalf("source %v %v, want CANCELLED", m.GetPhase(), m.GetError())
	}
	a.rolledBack(t, "precopy-cancel", pre)
}

// A channel cut while pre-copy streams is re-dialled and its chunks sent
// again, as in stop-copy; the migration then switches over and verifies.
func TestChannelCutDuringPrecopy(t *testing.T) {
	const pre = "sim:size=64MiB,seed=84,flags=stopcopy|p2p|precopy,precopy=48MiB,dirty=2MB/s"
	p := startPair(t)
	// Connection 0 carries Open; 1-4 are the channels.
	p.proxy.CutFirstAfter(8<<20, 1, 4)
	prep, err := p.dest.PrepareIncoming(t.Context(), &ferryv1.PrepareIncomingRequest{MigrationId: "precopy-cut", Devices: []string{pre}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.source.StartMigration(t.Context(), &ferryv1.StartMigrationRequest{MigrationId: "precopy-cut", DestAddress: p.proxy.Addr(), Token: prep.GetToken(),
		Channels: 4, Mode: ferryv1.MigrationMode_MIGRATION_MODE_PRECOPY, Devices: []*ferryv1.DevicePair{{SourceDevice: pre, DestDevice: pre}}}); err != nil {
		t.Fatal(err)
	}
	a := p.agents()
	a.sourceUntil(t, "precopy-cut", func(m *ferryv1.Migration) bool {
		return precopying(m) && m.GetBytes() >= 48<<20
	})
	if _, err := p.source.Switchover(t.Context(), &ferryv1.SwitchoverRequest{MigrationId: "precopy-cut"}); err != nil {
		t.Fatal(err)
	}
	s := a.waitSource(t, "precopy-cut")
	if s.GetPhase() != succeeded {
		t.Fatalf("source %v %v, want SUCCEEDED", s.GetPhase(), s.GetError())
	}
	if s.GetRetransmittedChunks() == 0 {
		t.Error("no chunk was re-sent after the cut")
	}
	if d := a.waitDest(t, "precopy-cut"); !d.GetDevices()[0].GetVerified() {
		t.Error("destination device not verified")
	}
}

// A pre-copy nobody switches over ends at its precopy_timeout: by
// default it fails with PRECOPY_NOT_CONVERGED, naming the dirty rate and
// the throughput; the source device is back in RUNNING (the VM never
// stopped) and the destination's is reset.
func TestPrecopyNotConverged(t *testing.T) {
	const pre = "sim:size=16MiB,seed=85,flags=stopcopy|p2p|precopy,precopy=8MiB,dirty=200MB/s"
	a := startAgents(t, dest.Config{})
	a.startPrecopy(t, "unconverged", []string{pre}, []string{pre}, func(r *ferryv1.StartMigrationRequest) {
		r.PrecopyTimeout = durationpb.New(500 * time.Millisecond)
	})
	m := a.waitSource(t, "unconverged")
	if m.GetPhase() != failed || m.GetError().GetReason() != wire.ReasonNotConverged {
		t.Fatalf("source %v %v, want FAILED %s", m.GetPhase(), m.GetError(), wire.ReasonNotConverged)
	}
	if msg := m.GetError().GetMessage(); !strings.Contains(msg, "devices dirty") || !strings.Contains(msg, "Ferry sent") {
		t.Errorf("the error %q does not give the dirty rate and the throughput", msg)
	}
	a.rolledBack(t, "unconverged", pre)
}

// With on_precopy_timeout SWITCHOVER, the same migration switches over at
// its timeout, forced, and verifies.
func TestPrecopyTimeoutSwitchesOver(t *testing.T) {
	const pre = "sim:size=16MiB,seed=86,flags=stopcopy|p2p|precopy,precopy=8MiB,dirty=50MB/s"
	a := startAgents(t, dest.Config{})
	a.startPrecopy(t, "timeout-switch", []string{pre}, []string{pre}, func(r *ferryv1.StartMigrationRequest) {
		r.PrecopyTimeout = durationpb.New(300 * time.Millisecond)
		r.OnPrecopyTimeout = ferryv1.PrecopyTimeoutAction_PRECOPY_TIMEOUT_ACTION_SWITCHOVER
	})
	m := a.waitSource(t, "timeout-switch")
	if m.GetPhase() != succeeded || m.GetSwitchoverTrigger() != "precopy_timeout" {
		t.Fatalf("source %v (trigger %q) %v, want SUCCEEDED by precopy_timeout", m.GetPhase(), m.GetSwitchoverTrigger(), m.GetError())
	}
	if d := a.waitDest(t, "timeout-switch"); !d.GetDevices()[0].GetVerified() {
		t.Errorf("destination device not verified: %v", d.GetError())
	}
}

// A migration with a downtime_limit switches over by itself once READY and
// predicted within the limit; the last prediction stands beside the
// measured downtime.
func TestPrecopyDowntimeLimit(t *testing.T) {
	const pre = "sim:size=32MiB,seed=87,flags=stopcopy|p2p|precopy,precopy=24MiB,dirty=1MB/s"
	a := startAgents(t, dest.Config{})
	a.startPrecopy(t, "limit", []string{pre}, []string{pre}, func(r *ferryv1.StartMigrationRequest) {
		r.DowntimeLimit = durationpb.New(time.Minute)
	})
	m := a.waitSource(t, "limit")
	if m.GetPhase() != succeeded || m.GetSwitchoverTrigger() != "downtime_limit" {
		t.Fatalf("source %v (trigger %q) %v, want SUCCEEDED by downtime_limit", m.GetPhase(), m.GetSwitchoverTrigger(), m.GetError())
	}
	if m.GetPredictedDowntime().AsDuration() <= 0 || m.GetDowntime().AsDuration() <= 0 {
		t.Errorf("predicted %v, measured %v: want both", m.GetPredictedDowntime().AsDuration(), m.GetDowntime().AsDuration())
	}
	if m.GetPrecopyBytes() < 24<<20 || m.GetPrecopyBytes()+m.GetStopcopyBytes() != m.GetBytes() {
		t.Errorf("pre-copy %d + stop-copy %d bytes of %d", m.GetPrecopyBytes(), m.GetStopcopyBytes(), m.GetBytes())
	}
	if d := a.waitDest(t, "limit"); !d.GetDevices()[0].GetVerified() {
		t.Errorf("destination device not verified: %v", d.GetError())
	}
}

// A device that reinitialises its initial data after it was read whole
// sends the new initial data too; the migration verifies the final image
// and counts the reinit.
func TestPrecopyReinit(t *testing.T) {
	const pre = "sim:size=16MiB,seed=88,flags=stopcopy|p2p|precopy,precopy=8MiB,reinit=8MiB"
	a := startAgents(t, dest.Config{})
	a.startPrecopy(t, "reinit", []string{pre}, []string{pre})
	a.sourceUntil(t, "reinit", func(m *ferryv1.Migration) bool {
		return m.GetPhase() == ferryv1.MigrationPhase_MIGRATION_PHASE_READY && m.GetDevices()[0].GetReinits() == 1
	})
	if _, err := a.source.Switchover(t.Context(), &ferryv1.SwitchoverRequest{MigrationId: "reinit"}); err != nil {
		t.Fatal(err)
	}
	m := a.waitSource(t, "reinit")
	if m.GetPhase() != succeeded || m.GetDevices()[0].GetReinits() != 1 {
		t.Fatalf("source %v, reinits %d, %v; want SUCCEEDED after 1", m.GetPhase(), m.GetDevices()[0].GetReinits(), m.GetError())
	}
	if m.GetPrecopyBytes() < 16<<20 {
		t.Errorf("%d pre-copy bytes: the initial data was not sent twice", m.GetPrecopyBytes())
	}
	if d := a.waitDest(t, "reinit"); !d.GetDevices()[0].GetVerified() {
		t.Errorf("destination device not verified: %v", d.GetError())
	}
}

// Real agent processes: a 2 GiB device whose whole state is initial data,
// dirtied slowly while it runs, migrates verified in pre-copy mode, and
// the bytes sent after the switchover are a small part of those before it.
func TestPrecopyBetweenProcesses(t *testing.T) {
	const pre = "sim:size=2GiB,seed=89,flags=stopcopy|p2p|precopy,precopy=2GiB,dirty=4MB/s"
	a := &agents{destAddr: startAgent(t, "dest", "--data-listen", "127.0.0.1:0").Addr(), sourceAddr: startAgent(t, "source").Addr()}
	a.dest = ferryv1.NewDestAgentClient(dial(t, a.destAddr))
	a.source = ferryv1.NewSourceAgentClient(dial(t, a.sourceAddr))
	a.startPrecopy(t, "procs", []string{pre}, []string{pre})
	a.sourceUntil(t, "procs", inPhase(ferryv1.MigrationPhase_MIGRATION_PHASE_READY))
	if _, err := a.source.Switchover(t.Context(), &ferryv1.SwitchoverRequest{MigrationId: "procs"}); err != nil {
		t.Fatal(err)
	}
	m := a.waitSource(t, "procs")
	if m.GetPhase() != succeeded {
		t.Fatalf("source %v %v, want SUCCEEDED", m.GetPhase(), m.GetError())
	}
	if d := a.waitDest(t, "procs"); !d.GetDevices()[0].GetVerified() {
		t.Fatalf("destination device not verified: %v", d.GetError())
	}
	if m.GetPrecopyBytes() < 2<<30 || m.GetStopcopyBytes()*16 > m.GetPrecopyBytes() {
		t.Errorf("%d bytes before the switchover and %d after it: want all the initial data before and a small rest after", m.GetPrecopyBytes(), m.GetStopcopyBytes())
	}
}

// A forced switchover does not wait for READY: the destination accepts
// SwitchoverStart with the initial data still on its way, and the rest
// streams after the stop; the migration verifies.
func TestForcedSwitchoverBeforeReady(t *testing.T) {
	const pre = "sim:size=64MiB,seed=90,flags=stopcopy|p2p|precopy,precopy=64MiB,rate=64MB/s"
	a := startAgents(t, dest.Config{})
	a.startPrecopy(t, "forced", []string{pre}, []string{pre})
	a.sourceUntil(t, "forced", func(m *ferryv1.Migration) bool { return precopying(m) && m.GetBytes() > 0 })
	if _, err := a.source.Switchover(t.Context(), &ferryv1.SwitchoverRequest{MigrationId: "forced", Force: true}); err != nil {
		t.Fatal(err)
	}
	m := a.waitSource(t, "forced")
	if m.GetPhase() != succeeded || m.GetSwitchoverTrigger() != "forced" {
		t.Fatalf("source %v (trigger %q) %v, want SUCCEEDED, forced", m.GetPhase(), m.GetSwitchoverTrigger(), m.GetError())
	}
	if m.GetStopcopyBytes() == 0 {
		t.Error("no bytes were sent after a switchover forced before the initial data was across")
	}
	if d := a.waitDest(t, "forced"); !d.GetDevices()[0].GetVerified() {
		t.Errorf("destination device not verified: %v", d.GetError())
	}
}

// rolledBack checks what a failed migration of one device leaves: the
// source device in RUNNING (the VM never lost it), the destination's
// migration FAILED and its device reset.
func (a *agents) rolledBack(t testing.TB, id, spec string) {
	t.Helper()
	canon, _ := deviceapi.CanonicalSpec(spec)
	if st := deviceState(t, a.sourceReg, canon); st != vfio.StateRunning {
		t.Errorf("source device in %v, want RUNNING", st)
	}
	if d := a.waitDest(t, id); d.GetPhase() != failed {
		t.Errorf("destination %v, want FAILED", d.GetPhase())
	}
	if st := deviceState(t, a.destReg, canon); st != vfio.StateRunning {
		t.Errorf("destination device in %v, want RUNNING (reset)", st)
	}
}
