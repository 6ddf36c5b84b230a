package vfio

import (
	"errors"
	"io/fs"
	"slices"
	"strings"
	"sync"
	"testing"
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
