package vfio

import (
	"errors"
	"io/fs"
	"slices"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

func newRegistry(t *testing.T, opts RegistryOptions) *Registry {
	t.Helper()
	r := NewRegistry(opts)
	t.Cleanup(func() { r.Close() })
	return r
}

func TestRegistryRefuses(t *testing.T) {
	tests := []struct {
		name  string
		opts  RegistryOptions
		spec  string
		owner string
		want  error // nil: any error
	}{
		{"sim-not-allowed", RegistryOptions{}, "sim:size=1MiB,seed=1", "m1", ErrNotAllowed},
		{"bad-spec", RegistryOptions{AllowSim: true}, "sim:size=1MiB,sped=1", "m1", ErrBadSpec},
		{"empty-owner", RegistryOptions{AllowSim: true}, "sim:size=1MiB", "", nil},
		// No such device on a test machine (and no VFIO off Linux).
		{"kernel-open-fails", RegistryOptions{AllowSim: true, Devices: []string{"pci:*"}}, "pci:ffff:ff:1f.7", "m1", nil},
		// Host devices only as the allowlist names them.
		{"no-allowlist", RegistryOptions{AllowSim: true}, "pci:0000:3b:00.2", "m1", ErrNotAllowed},
		{"outside-allowlist", RegistryOptions{Devices: []string{"pci:0000:3b:*", "mdev:*"}}, "pci:0000:3c:00.2", "m1", ErrNotAllowed},
		{"sim-is-not-a-host-device", RegistryOptions{Devices: []string{"*"}}, "sim:size=1MiB", "m1", ErrNotAllowed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := newRegistry(t, tt.opts)
			dev, release, err := r.Acquire(tt.spec, tt.owner)
			if err == nil || tt.want != nil && !errors.Is(err, tt.want) {
				t.Fatalf("Acquire(%q): %v, %v; want error %v", tt.spec, dev, err, tt.want)
			}
			if dev != nil || release != nil {
				t.Error("Acquire returned a device or release func with its error")
			}
			if l := r.List(); len(l) != 0 {
				t.Errorf("List() = %+v after a failed Acquire, want empty", l)
			}
		})
	}
}

// TestRegistryOwnership checks exclusive ownership by canonical spec, that
// the device (and its state) outlives a release, and that release funcs
// are idempotent and never free a later owner's lease.
func TestRegistryOwnership(t *testing.T) {
	r := newRegistry(t, RegistryOptions{AllowSim: true})
	d1, release1, err := r.Acquire("sim:seed=7,size=1MiB", "migration-1")
	if err != nil {
		t.Fatal(err)
	}
	if d1.Spec() != "sim:size=1MiB,seed=7" {
		t.Errorf("Spec() = %q", d1.Spec())
	}
	setState(t, d1, StateStop)

	_, _, err = r.Acquire("sim:size=1024KiB,seed=7", "migration-2")
	if !errors.Is(err, ErrBusy) || !strings.Contains(err.Error(), `"migration-1"`) {
		t.Fatalf("second Acquire: %v, want ErrBusy naming migration-1", err)
	}

	release1()
	d2, release2, err := r.Acquire("sim:size=1MiB,seed=7", "migration-2")
	if err != nil {
		t.Fatalf("Acquire after release: %v", err)
	}
	if d2 != d1 {
		t.Error("Acquire after release opened a new device")
	}
	wantState(t, d2, StateStop) // the state outlived the first owner

	release1() // stale: must not free migration-2's lease
	if _, _, err := r.Acquire("sim:size=1MiB,seed=7", "migration-3"); !errors.Is(err, ErrBusy) {
		t.Fatalf("Acquire after a stale release: %v, want ErrBusy", err)
	}
	release2()
	release2()
	if _, _, err := r.Acquire("sim:size=1MiB,seed=7", "migration-3"); err != nil {
		t.Fatalf("Acquire after release: %v", err)
	}
}

func TestRegistryList(t *testing.T) {
	r := newRegistry(t, RegistryOptions{AllowSim: true})
	if l := r.List(); len(l) != 0 {
		t.Fatalf("List() of a new registry = %+v", l)
	}
	dB, _, err := r.Acquire("sim:size=2MiB,seed=2,flags=stopcopy", "m-b")
	if err != nil {
		t.Fatal(err)
	}
	setState(t, dB, StateResuming)
	_, releaseA, err := r.Acquire("sim:size=1MiB,seed=1", "m-a")
	if err != nil {
		t.Fatal(err)
	}
	releaseA()

	want := []DeviceInfo{
		{Spec: "sim:size=1MiB,seed=1", Opened: true, Flags: FlagStopCopy | FlagP2P, State: StateRunning, DataSize: 1 << 20},
		{Spec: "sim:size=2MiB,seed=2,flags=stopcopy", Opened: true, Flags: FlagStopCopy, State: StateResuming,
			Owner: "m-b", DataSize: 2 << 20},
	}
	if got := r.List(); !slices.Equal(got, want) {
		t.Errorf("List() =\n%+v\nwant\n%+v", got, want)
	}

	// A closed device is reported in ERROR.
	dB.Close()
	if got := r.List(); got[1].State != StateError {
		t.Errorf("State of a closed device = %v, want ERROR", got[1].State)
	}
}

func TestRegistryClose(t *testing.T) {
	r := NewRegistry(RegistryOptions{AllowSim: true})
	d, release, err := r.Acquire("sim:size=1MiB", "m1")
	if err != nil {
		t.Fatal(err)
	}
	if err := errors.Join(r.Close(), r.Close()); err != nil {
		t.Fatalf("Close twice: %v", err)
	}
	if _, err := d.State(); !errors.Is(err, fs.ErrClosed) {
		t.Errorf("device State after registry Close: %v, want fs.ErrClosed", err)
	}
	release() // harmless after Close
	if _, _, err := r.Acquire("sim:size=1MiB", "m2"); !errors.Is(err, fs.ErrClosed) {
		t.Errorf("Acquire after Close: %v, want fs.ErrClosed", err)
	}
	if l := r.List(); len(l) != 0 {
		t.Errorf("List() after Close = %+v", l)
	}
}

// TestRegistryConcurrentAcquire races owners for one device: exactly one
// wins, and every device they see is the same.
func TestRegistryConcurrentAcquire(t *testing.T) {
	r := newRegistry(t, RegistryOptions{AllowSim: true})
	const n = 8
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		wins []Device
	)
	for i := range n {
		wg.Go(func() {
			d, _, err := r.Acquire("sim:size=1MiB,seed=3", string(rune('a'+i)))
			if err != nil && !errors.Is(err, ErrBusy) {
				t.Errorf("Acquire: %v", err)
			}
			if err == nil {
				mu.Lock()
				wins = append(wins, d)
				mu.Unlock()
			}
			r.List()
		})
	}
	wg.Wait()
	if len(wins) != 1 {
		t.Fatalf("%d owners won the device, want 1", len(wins))
	}
}

func TestOpen(t *testing.T) {
	s, err := ParseSpec("sim:size=1KiB,seed=1")
	if err != nil {
		t.Fatal(err)
	}
	d, err := Open(s)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if _, ok := d.(*SimDevice); !ok {
		t.Errorf("Open(sim) = %T, want *SimDevice", d)
	}
	if d, err := Open(Spec{}); !errors.Is(err, ErrBadSpec) || d != nil {
		t.Errorf("Open(Spec{}) = %v, %v; want nil, ErrBadSpec", d, err)
	}
	if d, err := Open(Spec{Kind: SpecSim}); err == nil || d != nil {
		t.Errorf("Open of an invalid sim spec = %v, %v; want nil and an error", d, err)
	}
}

// fakeOpener hands out fakeDevices and counts opens; a spec in hold
// blocks its open until the channel is closed.
type fakeOpener struct {
	mu    sync.Mutex
	devs  map[string]*fakeDevice
	opens int
	hold  map[string]chan struct{}
}

func (o *fakeOpener) open(s Spec) (Device, error) {
	o.mu.Lock()
	o.opens++
	ch := o.hold[s.String()]
	f := newFake(s.String())
	if o.devs == nil {
		o.devs = map[string]*fakeDevice{}
	}
	o.devs[s.String()] = f
	o.mu.Unlock()
	if ch != nil {
		<-ch
	}
	return f, nil
}

func (o *fakeOpener) count() int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.opens
}

func (o *fakeOpener) dev(spec string) *fakeDevice {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.devs[spec]
}

// TestRegistryStuckDevice checks a device released while stuck: the
// registry keeps it (owner OwnerStuck) and gives it to nobody, List
// reports it without waiting, Close of another registry state does not
// hang, and once its operation answers it is closed and the next Acquire
// opens it afresh.
func TestRegistryStuckDevice(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const spec = "pci:0000:3b:00.2"
		var o fakeOpener
		r := NewRegistry(RegistryOptions{Devices: []string{"*"}, OpTimeout: testTimeout, Open: o.open})
		defer r.Close()
		dev, release, f, unblock := acquireStuck(t, r, &o, spec)
		defer unblock()
		release()

		before := time.Now()
		l := r.List()
		if time.Since(before) != 0 {
			t.Errorf("List waited %v on a stuck device", time.Since(before))
		}
		if len(l) != 1 || l[0].Owner != OwnerStuck || !l[0].Stuck || l[0].State != StateRunning ||
			!strings.Contains(l[0].Error, `released by "m1"`) || !strings.Contains(l[0].Error, "SET_STATE to STOP") {
			t.Errorf("List() = %+v, want the device held as stuck, in RUNNING, released by m1", l)
		}
		if _, _, err := r.Acquire(spec, "m2"); !errors.Is(err, ErrBusy) || !errors.Is(err, ErrStuck) {
			t.Errorf("Acquire of a retired device: %v, want ErrBusy and ErrStuck", err)
		}
		if _, err := r.Recover(spec, true); !errors.Is(err, ErrBusy) {
			t.Errorf("Recover of a retired device: %v, want ErrBusy", err)
		}
		if f.isClosed() {
			t.Fatal("the stuck device was closed before its operation answered")
		}

		unblock()
		synctest.Wait()
		if !f.isClosed() {
			t.Error("the retired device was not closed once its operation answered")
		}
		if l := r.List(); len(l) != 0 {
			t.Errorf("List() after the retired device closed = %+v", l)
		}
		d2, _, err := r.Acquire(spec, "m2")
		if err != nil {
			t.Fatalf("Acquire after the retired device closed: %v", err)
		}
		if d2 == dev || o.count() != 2 {
			t.Errorf("Acquire gave the old device back (opens %d), want a fresh open", o.count())
		}
	})
}

// TestRegistryCloseDoesNotHang closes a registry holding a stuck device:
// it returns at once, closes every device and names the stuck one.
func TestRegistryCloseDoesNotHang(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var o fakeOpener
		r := NewRegistry(RegistryOptions{Devices: []string{"*"}, OpTimeout: testTimeout, Open: o.open})
		stuckDev, _, err := r.Acquire("pci:0000:3b:00.2", "m1")
		if err != nil {
			t.Fatal(err)
		}
		if _, _, err := r.Acquire("pci:0000:3b:00.3", "m2"); err != nil {
			t.Fatal(err)
		}
		unblock := o.dev("pci:0000:3b:00.2").block(fakeReset)
		defer unblock()
		if err := stuckDev.Reset(); !errors.Is(err, ErrStuck) {
			t.Fatalf("Reset: %v, want ErrStuck", err)
		}
		before := time.Now()
		err = r.Close()
		if time.Since(before) != 0 {
			t.Errorf("Close waited %v", time.Since(before))
		}
		if !errors.Is(err, ErrStuck) || !strings.Contains(err.Error(), "pci:0000:3b:00.2") || strings.Contains(err.Error(), "00.3") {
			t.Errorf("Close: %v, want ErrStuck naming the stuck device alone", err)
		}
		for _, s := range []string{"pci:0000:3b:00.2", "pci:0000:3b:00.3"} {
			if !o.dev(s).isClosed() {
				t.Errorf("%s not closed", s)
			}
		}
		unblock()
	})
}

// TestRegistryOpensOutsideLock holds one device's open: Acquire and List
// of other devices go on, and a second acquirer of the device being
// opened is refused at once.
func TestRegistryOpensOutsideLock(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		hold := make(chan struct{})
		o := fakeOpener{hold: map[string]chan struct{}{"pci:0000:3b:00.2": hold}}
		r := NewRegistry(RegistryOptions{Devices: []string{"*"}, Open: o.open})
		defer r.Close()
		done := make(chan error, 1)
		go func() {
			_, _, err := r.Acquire("pci:0000:3b:00.2", "m1")
			done <- err
		}()
		synctest.Wait() // the open is in progress
		if _, _, err := r.Acquire("pci:0000:3b:00.2", "m2"); !errors.Is(err, ErrBusy) || !strings.Contains(err.Error(), `"m1"`) {
			t.Errorf("Acquire during the open: %v, want ErrBusy naming m1", err)
		}
		if _, _, err := r.Acquire("pci:0000:3b:00.3", "m3"); err != nil {
			t.Errorf("Acquire of another device during the open: %v", err)
		}
		if l := r.List(); len(l) != 1 {
			t.Errorf("List() during the open = %+v, want the other device alone", l)
		}
		close(hold)
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		if o.count() != 2 {
			t.Errorf("%d opens, want 2", o.count())
		}
	})
}

// TestRegistryListAllOpensNothing lists host devices from a fake sysfs
// listing beside open ones: no listing opens a device, host devices the
// allowlist admits are listed with their spec alone.
func TestRegistryListAllOpensNothing(t *testing.T) {
	var o fakeOpener
	var host []Spec
	for _, h := range []string{"pci:0000:3b:00.2", "pci:0000:3b:00.3", "pci:0000:5e:00.0"} {
		s, err := ParseSpec(h)
		if err != nil {
			t.Fatal(err)
		}
		host = append(host, s)
	}
	r := newRegistry(t, RegistryOptions{AllowSim: true, Devices: []string{"pci:0000:3b:*"}, Open: o.open,
		ListHost: func() ([]Spec, error) { return host, nil }})
	if _, _, err := r.Acquire("pci:0000:3b:00.3", "m1"); err != nil {
		t.Fatal(err)
	}
	opens := o.count()
	for range 3 {
		r.List()
		r.ListAll()
	}
	if o.count() != opens {
		t.Errorf("listing opened %d devices", o.count()-opens)
	}
	want := []DeviceInfo{
		{Spec: "pci:0000:3b:00.2"},
		{Spec: "pci:0000:3b:00.3", Opened: true, Flags: FlagStopCopy | FlagP2P, State: StateRunning, Owner: "m1", DataSize: 1 << 20},
	}
	if got := r.ListAll(); !slices.Equal(got, want) {
		t.Errorf("ListAll() =\n%+v\nwant\n%+v", got, want)
	}
}

// TestRegistryRecover checks Recover's rules on simulated devices.
func TestRegistryRecover(t *testing.T) {
	tests := []struct {
		name  string
		spec  string
		setup []State // states to walk to before
		reset bool
		want  State
		err   error // nil: success
	}{
		{"stop-to-running", "sim:size=1MiB", []State{StateStop}, false, StateRunning, nil},
		{"running-left-alone", "sim:size=1MiB", nil, false, StateRunning, nil},
		{"reset-asked", "sim:size=1MiB", []State{StateStop}, true, StateRunning, nil},
		{"stop-copy", "sim:size=1MiB", []State{StateStop, StateStopCopy}, false, StateRunning, nil},
		{"arc-fails-reset", "sim:size=1MiB,flags=stopcopy,fail=state:RUNNING", []State{StateStop}, false, StateRunning, nil},
		{"error-reset", "sim:size=1MiB,fail=state:STOP", []State{StateStop}, false, StateRunning, nil},
		{"reset-fails", "sim:size=1MiB,flags=stopcopy,fail=state:RUNNING|reset", []State{StateStop}, false, StateError, ErrInjectedFault},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := newRegistry(t, RegistryOptions{AllowSim: true})
			dev, release, err := r.Acquire(tt.spec, "m1")
			if err != nil {
				t.Fatal(err)
			}
			for _, s := range tt.setup {
				dev.SetState(s) // may fail on purpose (fail=)
			}
			if _, err := r.Recover(tt.spec, tt.reset); !errors.Is(err, ErrBusy) {
				t.Errorf("Recover of a held device: %v, want ErrBusy", err)
			}
			release()
			info, err := r.Recover(tt.spec, tt.reset)
			if tt.err == nil && err != nil || tt.err != nil && !errors.Is(err, tt.err) {
				t.Fatalf("Recover: %v, want %v", err, tt.err)
			}
			if info.State != tt.want || info.Owner != "" {
				t.Errorf("Recover info = %+v, want %v and no owner", info, tt.want)
			}
			if tt.err != nil && info.Error == "" {
				t.Error("a failed Recover left no Error in the info")
			}
			wantState(t, dev, tt.want)
		})
	}
}

// TestRegistryStuckDeviceSettled checks a device released while stuck
// whose owner left a settle with its guard (WhenAnswered): once its
// operation answers the settle returns it to RUNNING, and the registry
// frees it, still open, instead of closing it.
func TestRegistryStuckDeviceSettled(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const spec = "pci:0000:3b:00.2"
		var o fakeOpener
		r := NewRegistry(RegistryOptions{Devices: []string{"*"}, OpTimeout: testTimeout, Open: o.open})
		defer r.Close()
		dev, release, f, unblock := acquireStuck(t, r, &o, spec)
		defer unblock()
		if !dev.(*GuardedDevice).WhenAnswered(func(d Device) { d.SetState(StateRunning) }) {
			t.Fatal("WhenAnswered refused the stuck device")
		}
		release()
		if l := r.List(); len(l) != 1 || l[0].Owner != OwnerStuck {
			t.Fatalf("List() = %+v, want the device held as stuck", l)
		}
		unblock()
		synctest.Wait()
		if f.isClosed() {
			t.Error("the settled device was closed")
		}
		if l := r.List(); len(l) != 1 || l[0].Owner != "" || l[0].State != StateRunning || l[0].Stuck {
			t.Errorf("List() after the settle = %+v, want the device free in RUNNING", l)
		}
		d2, _, err := r.Acquire(spec, "m2")
		if err != nil {
			t.Fatalf("Acquire after the settle: %v", err)
		}
		if d2 != dev || o.count() != 1 {
			t.Errorf("Acquire opened the device again (opens %d), want the settled one", o.count())
		}
	})
}

// acquireStuck acquires spec for "m1" and makes its arc into STOP hang
// past the device timeout: the device is stuck until unblock.
func acquireStuck(t *testing.T, r *Registry, o *fakeOpener, spec string) (dev Device, release func(), f *fakeDevice, unblock func()) {
	t.Helper()
	dev, release, err := r.Acquire(spec, "m1")
	if err != nil {
		t.Fatal(err)
	}
	f = o.dev(spec)
	unblock = f.block(fakeSet)
	if _, err := dev.SetState(StateStop); !errors.Is(err, ErrStuck) {
		unblock()
		t.Fatalf("SetState: %v, want ErrStuck", err)
	}
	return dev, release, f, unblock
}
