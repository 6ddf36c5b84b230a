package source

import (
	"log/slog"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/services/chunkwire"
	"github.com/vfio-ferry/ferry/services/wire"
)

// recorder logs every state a device is asked for, across devices.
type recorder struct {
	mu  sync.Mutex
	log []string
}

type recordedDevice struct {
	vfio.Device
	r *recorder
}

func (d recordedDevice) SetState(s vfio.State) (vfio.DataStream, error) {
	d.r.mu.Lock()
	d.r.log = append(d.r.log, d.Spec()+" "+s.String())
	d.r.mu.Unlock()
	return d.Device.SetState(s)
}

// stoppedMigration is a migration of sim devices, each taken to STOP_COPY
// the way stopDevices does, their SetStates recorded.
func stoppedMigration(t *testing.T, specs ...string) (*migration, *recorder) {
	t.Helper()
	r := &recorder{}
	m := &migration{
		a:   &Agent{cfg: Config{Pool: chunkwire.NewPool(), Logger: slog.New(slog.DiscardHandler), Registry: vfio.NewRegistry(vfio.RegistryOptions{})}},
		req: &ferryv1.StartMigrationRequest{},
		log: slog.New(slog.DiscardHandler),
	}
	for i, spec := range specs {
		s, err := vfio.ParseSpec(spec)
		if err != nil {
			t.Fatal(err)
		}
		dev, err := vfio.NewSim(s)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { dev.Close() })
		m.devs = append(m.devs, &srcDevice{index: i, spec: dev.Spec(), dev: recordedDevice{dev, r}, release: func() {}})
	}
	if err := m.stopDevices(); err != nil {
		t.Fatal(err)
	}
	r.log = nil
	return m, r
}

// Rollback keeps the uAPI's P2P order: every device back to RUNNING_P2P
// before any to RUNNING. It took each straight to RUNNING, so one device
// could DMA into another still stopped.
func TestRollbackReturnsThroughRunningP2P(t *testing.T) {
	m, r := stoppedMigration(t, "sim:size=1MiB,seed=1", "sim:size=1MiB,seed=2", "sim:size=1MiB,seed=3")
	m.rollback(nil, ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED)
	lastP2P, firstRunning := -1, len(r.log)
	for i, e := range r.log {
		switch {
		case strings.HasSuffix(e, " RUNNING_P2P"):
			lastP2P = i
		case strings.HasSuffix(e, " RUNNING"):
			firstRunning = min(firstRunning, i)
		}
	}
	if lastP2P < 0 || lastP2P > firstRunning || firstRunning == len(r.log) {
		t.Errorf("rollback asked for %q: want every RUNNING_P2P before any RUNNING", r.log)
	}
	for _, d := range m.devs {
		if st, _ := d.dev.State(); st != vfio.StateRunning {
			t.Errorf("%s in %v, want RUNNING", d.spec, st)
		}
	}
}

// Without P2P on every device, the devices stopped straight from RUNNING
// and go straight back.
func TestRollbackWithoutP2P(t *testing.T) {
	m, r := stoppedMigration(t, "sim:size=1MiB,seed=1,flags=stopcopy", "sim:size=1MiB,seed=2")
	m.rollback(nil, ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED)
	if slices.ContainsFunc(r.log, func(e string) bool { return strings.HasSuffix(e, "RUNNING_P2P") }) {
		t.Errorf("rollback asked for %q: no RUNNING_P2P without P2P on every device", r.log)
	}
}

// A device that fails its way back to RUNNING is reset, and says so; one
// whose reset fails too says that, and the rest are rolled back.
func TestRollbackResetsADeviceThatCannotReturn(t *testing.T) {
	m, _ := stoppedMigration(t, "sim:size=1MiB,seed=1,fail=state:RUNNING", "sim:size=1MiB,seed=2,fail=state:RUNNING|reset", "sim:size=1MiB,seed=3")
	m.rollback(nil, ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED)
	want := []struct {
		state vfio.State
		msg   string
	}{
		{vfio.StateRunning, "returned to RUNNING by a device reset"},
		{vfio.StateError, "the reset failed too"},
		{vfio.StateRunning, ""},
	}
	for i, d := range m.devs {
		st, _ := d.dev.State()
		var msg string
		if e := d.errMsg.Load(); e != nil {
			msg = *e
		}
		if st != want[i].state || !strings.Contains(msg, want[i].msg) || (want[i].msg == "") != (msg == "") {
			t.Errorf("%s: %v %q, want %v %q", d.spec, st, msg, want[i].state, want[i].msg)
		}
	}
}

// A device whose read never returns fails its migration with
// DEVICE_STUCK: the healthy device is rolled back without waiting for it,
// and the agent goes on answering.
func TestStuckDeviceDoesNotHoldTheMigration(t *testing.T) {
	const healthy, stuck = "sim:size=4MiB,seed=1", "sim:size=4MiB,seed=2,hang=read@1MiB"
	f := &fakeDest{windows: []*ferryv1.WindowUpdate{{Device: 0, LimitSeq: 64, LimitOffset: 64 << 20}, {Device: 1, LimitSeq: 64, LimitOffset: 64 << 20}}}
	f.channel = func(_ int, st grpc.BidiStreamingServer[ferryv1.ChannelRequest, ferryv1.ChannelResponse]) error {
		if err := st.Send(&ferryv1.ChannelResponse{}); err != nil {
			return err
		}
		return recvAll(st)
	}
	a, reg := sourceAgentOn(t, Config{}, vfio.RegistryOptions{OpTimeout: 100 * time.Millisecond})
	_, err := a.StartMigration(t.Context(), &ferryv1.StartMigrationRequest{
		MigrationId: "stuck", DestAddress: serveFake(t, f), Token: "token", Channels: 2, ChunkSize: 1 << 20,
		Devices: []*ferryv1.DevicePair{{SourceDevice: healthy, DestDevice: healthy}, {SourceDevice: stuck, DestDevice: stuck}},
	})
	if err != nil {
		t.Fatal(err)
	}
	m := waitEnd(t, a, "stuck")
	if m.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED || m.GetError().GetReason() != wire.ReasonDeviceStuck {
		t.Errorf("ended %v %v, want FAILED with %s", m.GetPhase(), m.GetError(), wire.ReasonDeviceStuck)
	}
	if codes.Code(m.GetError().GetCode()) != codes.Unavailable {
		t.Errorf("code %v, want UNAVAILABLE", codes.Code(m.GetError().GetCode()))
	}
	if d := m.GetDevices()[1]; !d.GetStuck() || d.GetError() == "" {
		t.Errorf("stuck device reported %+v, want stuck with its error", d)
	}
	if m.GetDevices()[0].GetStuck() {
		t.Error("the healthy device is reported stuck")
	}
	if st := deviceState(t, reg, healthy); st != vfio.StateRunning {
		t.Errorf("healthy device in %v, want RUNNING", st)
	}
	if _, err := a.ListMigrations(t.Context(), &ferryv1.ListMigrationsRequest{}); err != nil {
		t.Errorf("the agent stopped answering: %v", err)
	}
	if n, _ := f.counts(); n == 0 {
		t.Error("the destination was not aborted")
	}
}

// slowDevice's arc into STOP_COPY waits for its gate: a device that is
// slow, not hung. Its arc back to RUNNING, once it succeeded, closes
// back.
type slowDevice struct {
	vfio.Device
	gate, back, closed chan struct{}
	closeOnce          *sync.Once
}

func (d slowDevice) Close() error {
	d.closeOnce.Do(func() { close(d.closed) })
	return d.Device.Close()
}

func (d slowDevice) SetState(s vfio.State) (vfio.DataStream, error) {
	if s == vfio.StateStopCopy {
		<-d.gate
	}
	ds, err := d.Device.SetState(s)
	if s == vfio.StateRunning && err == nil {
		close(d.back)
	}
	return ds, err
}

// A device that answers its arc into STOP_COPY only after the device
// timeout fails the migration (DEVICE_STUCK), and once it answers it is
// returned to RUNNING: its VM's state stays in it. It was left in
// STOP_COPY, owned by nobody.
func TestSlowDeviceIsRolledBackWhenItAnswers(t *testing.T) {
	const slow = "sim:size=4MiB,seed=5"
	dev := slowDevice{gate: make(chan struct{}), back: make(chan struct{}), closed: make(chan struct{}), closeOnce: new(sync.Once)}
	f := &fakeDest{windows: []*ferryv1.WindowUpdate{{Device: 0, LimitSeq: 64, LimitOffset: 64 << 20}}}
	f.channel = func(_ int, st grpc.BidiStreamingServer[ferryv1.ChannelRequest, ferryv1.ChannelResponse]) error {
		if err := st.Send(&ferryv1.ChannelResponse{}); err != nil {
			return err
		}
		return recvAll(st)
	}
	a, _ := sourceAgentOn(t, Config{}, vfio.RegistryOptions{OpTimeout: 100 * time.Millisecond, Open: func(s vfio.Spec) (vfio.Device, error) {
		d, err := vfio.Open(s)
		dev.Device = d
		return dev, err
	}})
	if _, err := a.StartMigration(t.Context(), &ferryv1.StartMigrationRequest{
		MigrationId: "slow", DestAddress: serveFake(t, f), Token: "token", Channels: 1, ChunkSize: 1 << 20,
		Devices: []*ferryv1.DevicePair{{SourceDevice: slow, DestDevice: slow}},
	}); err != nil {
		t.Fatal(err)
	}
	m := waitEnd(t, a, "slow")
	if m.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED || m.GetError().GetReason() != wire.ReasonDeviceStuck {
		t.Fatalf("ended %v %v, want FAILED with %s", m.GetPhase(), m.GetError(), wire.ReasonDeviceStuck)
	}
	select {
	case <-dev.back:
		t.Fatal("the device was moved to RUNNING while its arc into STOP_COPY had not answered")
	default:
	}
	close(dev.gate)
	select {
	case <-dev.back:
	case <-dev.closed:
		t.Fatal("the device answered and was closed without being returned to RUNNING")
	}
}
