//go:build linux

package e2e

import (
	"bytes"
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	vmmv1 "github.com/vfio-ferry/ferry/api/proto/ferry/vmm/v1"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/pkg/vmm"
	"github.com/vfio-ferry/ferry/services/dest"
	"github.com/vfio-ferry/ferry/services/vmmsock"
	"github.com/vfio-ferry/ferry/services/wire"
)

// The VMM socket, host side: a VMM lends devices to the agents over
// their sockets. Here the "VFIO device fds" are pipes that the test's
// socket servers turn into simulated devices (Options.Check and Adopt),
// except in the test of the real descriptor check; test/vm proves the
// kernel path.

// lentSim is a simulated device lent as vmm:NAME.
type lentSim struct {
	vfio.Device
	spec string
}

func (d lentSim) Spec() string { return d.spec }

// vmmSocket serves a VMM socket over reg until the end of the test; a
// lent descriptor becomes the simulated device sims names for it.
func vmmSocket(t *testing.T, reg *vfio.Registry, allow vmm.Allow, sims map[string]string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "vmm.sock")
	ln, err := vmmsock.Listen(path, -1)
	if err != nil {
		t.Fatal(err)
	}
	opts := vmmsock.Options{Lender: reg, Allow: allow}
	if sims != nil {
		opts.Check = func(int) error { return nil }
		opts.Adopt = func(fd int, name string) (vfio.Device, error) {
			unix.Close(fd)
			spec, ok := sims[name]
			if !ok {
				return nil, errors.New("test: no simulated device for " + name)
			}
			s, err := vfio.ParseSpec(spec)
			if err != nil {
				return nil, err
			}
			dev, err := vfio.NewSim(s)
			if err != nil {
				return nil, err
			}
			return lentSim{dev, "vmm:" + name}, nil
		}
	}
	srv := vmmsock.NewServer(opts)
	done := make(chan error, 1)
	ctx, cancel := context.WithCancel(context.Background())
	go func() { done <- srv.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("vmm socket: %v", err)
		}
	})
	return path
}

func dialVMM(t *testing.T, path string) *vmm.Client {
	t.Helper()
	cl, err := vmm.Dial(t.Context(), path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cl.Close() })
	return cl
}

// pipeFD is a descriptor to pass that is no VFIO device's.
func pipeFD(t *testing.T) *os.File {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close(); w.Close() })
	return r
}

func wantReason(t *testing.T, err error, reason string) {
	t.Helper()
	var e *vmm.Error
	if !errors.As(err, &e) || e.Reason != reason {
		t.Fatalf("got %v, want reason %s", err, reason)
	}
}

// nextEvent returns the next event for which ok holds; the test fails if
// the connection ends first.
func nextEvent(t *testing.T, cl *vmm.Client, ok func(*vmmv1.Event) bool) *vmmv1.Event {
	t.Helper()
	for ev := range cl.Events() {
		if ok(ev) {
			return ev
		}
	}
	t.Fatalf("events ended: %v", cl.Err())
	return nil
}

func TestVMMSocketRefusesWhatIsNotALentVFIODevice(t *testing.T) {
	a := startAgents(t, dest.Config{})
	path := vmmSocket(t, a.sourceReg, vmm.Allow{}, nil) // the real descriptor check
	cl := dialVMM(t, path)

	wantReason(t, cl.Attach(t.Context(), "vm1-nic", pipeFD(t), nil), vmmsock.ReasonNotVFIODevice)
	null, err := os.Open("/dev/null")
	if err != nil {
		t.Fatal(err)
	}
	defer null.Close()
	wantReason(t, cl.Attach(t.Context(), "vm1-nic", null, nil), vmmsock.ReasonNotVFIODevice)
	wantReason(t, cl.Attach(t.Context(), "bad/name", pipeFD(t), nil), wire.ReasonInvalidArgument)
	wantReason(t, cl.Attach(t.Context(), "vm1-nic", pipeFD(t), make([]byte, vmm.MaxConfigState+1)), vmmsock.ReasonConfigTooLarge)
	wantReason(t, cl.Detach(t.Context(), "vm1-nic"), wire.ReasonDeviceNotFound)

	// Nothing was lent, nothing was opened: the registry holds no
	// device, and a spec naming one is refused.
	if got := a.sourceReg.List(); len(got) != 0 {
		t.Fatalf("registry holds %v", got)
	}
	_, _, err = a.sourceReg.Acquire("vmm:vm1-nic", "test")
	if !errors.Is(err, vfio.ErrNotLent) {
		t.Fatalf("Acquire of an unlent vmm: spec: %v", err)
	}
}

func TestVMMSocketRefusesAPeerNotAllowed(t *testing.T) {
	a := startAgents(t, dest.Config{})
	other := uint32(os.Getuid()) + 4242
	path := vmmSocket(t, a.sourceReg, vmm.Allow{UIDs: []uint32{other}, GIDs: []uint32{other}}, map[string]string{"x": "sim:size=1MiB"})
	cl := dialVMM(t, path)
	err := cl.Attach(t.Context(), "x", pipeFD(t), nil)
	wantReason(t, err, vmmsock.ReasonPeerNotAllowed)
	if len(a.sourceReg.List()) != 0 {
		t.Fatal("a refused peer lent a device")
	}
}

func TestVMMSocketRefusesAnOversizedFrame(t *testing.T) {
	a := startAgents(t, dest.Config{})
	path := vmmSocket(t, a.sourceReg, vmm.Allow{}, map[string]string{"x": "sim:size=1MiB"})
	raw, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	// A length far beyond MaxFrame, and no body: the agent refuses it
	// before reading (allocating) anything and closes the connection.
	if _, err := raw.Write([]byte{0, 0, 0, 0x40}); err != nil {
		t.Fatal(err)
	}
	c := vmm.NewConn(raw.(*net.UnixConn))
	var m vmmv1.AgentMessage
	if _, err := c.Read(&m); err != nil {
		t.Fatal(err)
	}
	if r := m.GetReply().GetError().GetReason(); r != vmmsock.ReasonBadFrame {
		t.Fatalf("reply %v, want reason %s", &m, vmmsock.ReasonBadFrame)
	}
	// The agent still serves: another VMM lends a device.
	cl := dialVMM(t, path)
	if err := cl.Attach(t.Context(), "x", pipeFD(t), nil); err != nil {
		t.Fatal(err)
	}
}

// TestVMMLentDevicesMigrateWithTheirConfigState lends a device to each
// agent, migrates vmm:src to vmm:dst, and checks that the destination
// VMM receives its device verified with the source VMM's config state as
// it was at the switchover.
func TestVMMLentDevicesMigrateWithTheirConfigState(t *testing.T) {
	a := startAgents(t, dest.Config{})
	srcPath := vmmSocket(t, a.sourceReg, vmm.Allow{}, map[string]string{"src": "sim:size=8MiB,seed=11"})
	dstPath := vmmSocket(t, a.destReg, vmm.Allow{}, map[string]string{"dst": "sim:size=8MiB,seed=11"})
	srcVMM, dstVMM := dialVMM(t, srcPath), dialVMM(t, dstPath)

	config := bytes.Repeat([]byte("pci-config-space/msix/"), 40000) // 880 KB: several chunks
	if err := srcVMM.Attach(t.Context(), "src", pipeFD(t), []byte("stale")); err != nil {
		t.Fatal(err)
	}
	if err := srcVMM.UpdateConfig(t.Context(), "src", config); err != nil {
		t.Fatal(err)
	}
	if err := dstVMM.Attach(t.Context(), "dst", pipeFD(t), nil); err != nil {
		t.Fatal(err)
	}
	devs, err := a.source.ListDevices(t.Context(), &ferryv1.ListDevicesRequest{})
	if err != nil || len(devs.GetDevices()) != 1 || devs.GetDevices()[0].GetSpec() != "vmm:src" {
		t.Fatalf("ListDevices: %v %v", devs, err)
	}

	src, dst := a.run(t, migration{id: "vmm-config", src: []string{"vmm:src"}, dst: []string{"vmm:dst"}, channels: 4, chunkSize: 256 << 10})
	if src.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED || dst.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED {
		t.Fatalf("source %v (%v), destination %v (%v)", src.GetPhase(), src.GetError(), dst.GetPhase(), dst.GetError())
	}
	if got := dst.GetDevices()[0].GetConfigStateBytes(); got != uint64(len(config)) {
		t.Fatalf("destination reports %d bytes of config state, want %d", got, len(config))
	}
	if got := dst.GetDevices()[0].GetBytes(); got != 8<<20 {
		t.Fatalf("destination wrote %d bytes of device state, want %d", got, 8<<20)
	}

	ev := nextEvent(t, dstVMM, func(e *vmmv1.Event) bool { return e.GetConfigReceived() })
	if !bytes.Equal(ev.GetConfigState(), config) || ev.GetState() != uint32(vfio.StateStop) {
		t.Fatalf("destination VMM got %d bytes in %s, want the %d the source attached in STOP", len(ev.GetConfigState()), ev.GetStateName(), len(config))
	}
	got, ok, err := dstVMM.FetchConfig(t.Context(), "dst")
	if err != nil || !ok || !bytes.Equal(got, config) {
		t.Fatalf("FetchConfig: %d bytes, %v, %v", len(got), ok, err)
	}
	inc, err := a.dest.GetIncoming(t.Context(), &ferryv1.GetIncomingRequest{MigrationId: "vmm-config"})
	if err != nil || len(inc.GetConfigStates()) != 1 || !bytes.Equal(inc.GetConfigStates()[0].GetConfigState(), config) {
		t.Fatalf("GetIncoming config states: %v", err)
	}
	// The migration has ended: the device is free again, in STOP with
	// its state loaded, and the source VMM may change its config again.
	nextEvent(t, dstVMM, func(e *vmmv1.Event) bool { return e.GetMigrationId() == "" && e.GetState() == uint32(vfio.StateStop) })
	if err := srcVMM.UpdateConfig(t.Context(), "src", []byte("after")); err != nil {
		t.Fatal(err)
	}
}

// withdrawMidMigration lends a rate-capped device to the source, starts
// a migration of it, and once the device is in STOP_COPY lets end (a
// Detach, or the VMM's connection closing) take it back. The migration
// must fail with DEVICE_WITHDRAWN, rolled back: the device's last state
// before its withdrawal is RUNNING, the destination device is reset, and
// the agent still serves.
func withdrawMidMigration(t *testing.T, end func(cl *vmm.Client) error) {
	a := startAgents(t, dest.Config{})
	path := vmmSocket(t, a.sourceReg, vmm.Allow{}, map[string]string{"vm": "sim:size=64MiB,seed=3,rate=8MB/s", "next": "sim:size=1MiB"})
	cl := dialVMM(t, path)
	if err := cl.Attach(t.Context(), "vm", pipeFD(t), []byte("cfg")); err != nil {
		t.Fatal(err)
	}
	watcher := dialVMM(t, path)
	if err := watcher.Watch(t.Context(), "vm"); err != nil {
		t.Fatal(err)
	}

	const id = "vmm-withdrawn"
	prep, err := a.dest.PrepareIncoming(t.Context(), &ferryv1.PrepareIncomingRequest{MigrationId: id, Devices: []string{"sim:size=64MiB,seed=3"}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.source.StartMigration(t.Context(), &ferryv1.StartMigrationRequest{MigrationId: id, DestAddress: a.destAddr, Token: prep.GetToken(),
		Devices: []*ferryv1.DevicePair{{SourceDevice: "vmm:vm", DestDevice: "sim:size=64MiB,seed=3"}}}); err != nil {
		t.Fatal(err)
	}
	nextEvent(t, cl, func(e *vmmv1.Event) bool {
		return e.GetState() == uint32(vfio.StateStopCopy) && e.GetMigrationId() == id
	})
	// The switchover took the config state: it is frozen now.
	wantReason(t, cl.UpdateConfig(t.Context(), "vm", []byte("late")), vmmsock.ReasonConfigFrozen)
	if err := end(cl); err != nil {
		t.Fatal(err)
	}

	src := a.waitSource(t, id)
	if src.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED || src.GetError().GetReason() != wire.ReasonWithdrawn {
		t.Fatalf("source ended %v (%v), want FAILED with %s", src.GetPhase(), src.GetError(), wire.ReasonWithdrawn)
	}
	dst := a.waitDest(t, id)
	if wire.Final(dst.GetPhase()) && dst.GetPhase() == ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED {
		t.Fatalf("destination ended %v", dst.GetPhase())
	}
	if st := deviceState(t, a.destReg, "sim:size=64MiB,seed=3"); st != vfio.StateRunning {
		t.Fatalf("destination device in %v after the rollback, want RUNNING (reset)", st)
	}
	var last *vmmv1.Event
	withdrawn := nextEvent(t, watcher, func(e *vmmv1.Event) bool {
		if !e.GetWithdrawn() {
			last = e
		}
		return e.GetWithdrawn()
	})
	if last == nil || last.GetState() != uint32(vfio.StateRunning) || withdrawn.GetState() != uint32(vfio.StateRunning) {
		t.Fatalf("the device's last state before it was withdrawn: %v; at withdrawal %v; want RUNNING", last, withdrawn)
	}
	if got := a.sourceReg.List(); len(got) != 0 {
		t.Fatalf("the registry still holds %v", got)
	}
	// The agent still serves: another VMM lends another device.
	if err := dialVMM(t, path).Attach(t.Context(), "next", pipeFD(t), nil); err != nil {
		t.Fatal(err)
	}
}

func TestVMMDetachMidMigrationRollsBack(t *testing.T) {
	withdrawMidMigration(t, func(cl *vmm.Client) error { return cl.Detach(t.Context(), "vm") })
}

func TestVMMDisconnectMidMigrationRollsBack(t *testing.T) {
	withdrawMidMigration(t, func(cl *vmm.Client) error { return cl.Close() })
}
