package vfio

import (
	"context"
	"errors"
	"sync"
	"testing"
)

// lentDevice is a simulated device named vmm:NAME, as a VMM's would be.
type lentDevice struct {
	Device
	spec   string
	closed chan struct{}
}

func (d *lentDevice) Spec() string { return d.spec }
func (d *lentDevice) Close() error {
	close(d.closed)
	return d.Device.Close()
}

func newLent(t *testing.T, name string) *lentDevice {
	t.Helper()
	s, err := ParseSpec("sim:size=1MiB,seed=5")
	if err != nil {
		t.Fatal(err)
	}
	dev, err := NewSim(s)
	if err != nil {
		t.Fatal(err)
	}
	return &lentDevice{Device: dev, spec: "vmm:" + name, closed: make(chan struct{})}
}

// events records a lent device's events.
type events struct {
	mu  sync.Mutex
	evs []DeviceEvent
}

func (e *events) watch(ev DeviceEvent) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.evs = append(e.evs, ev)
}

func (e *events) all() []DeviceEvent {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]DeviceEvent(nil), e.evs...)
}

func TestLendListsAndAcquires(t *testing.T) {
	r := NewRegistry(RegistryOptions{})
	defer r.Close()
	var ev events
	if err := r.Lend("vm1.nic-0", newLent(t, "vm1.nic-0"), []byte("cfg"), ev.watch); err != nil {
		t.Fatal(err)
	}
	if err := r.Lend("vm1.nic-0", newLent(t, "vm1.nic-0"), nil, nil); !errors.Is(err, ErrLent) {
		t.Fatalf("second Lend under the name: %v, want ErrLent", err)
	}
	for _, bad := range []string{"", "a/b", "a b", string(make([]byte, MaxVMMName+1))} {
		if err := r.Lend(bad, newLent(t, "x"), nil, nil); !errors.Is(err, ErrBadSpec) {
			t.Errorf("Lend(%q): %v, want ErrBadSpec", bad, err)
		}
	}
	list := r.List()
	if len(list) != 1 || list[0].Spec != "vmm:vm1.nic-0" || list[0].State != StateRunning {
		t.Fatalf("List: %+v", list)
	}
	dev, release, err := r.Acquire("vmm:vm1.nic-0", "m1")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := dev.SetState(StateStop); err != nil {
		t.Fatal(err)
	}
	release()
	var states []State
	var owners []string
	for _, e := range ev.all() {
		states, owners = append(states, e.State), append(owners, e.Owner)
	}
	// Lent (RUNNING), acquired by m1, STOP under m1, released.
	if got := ev.all(); len(got) < 4 || got[0].State != StateRunning || got[len(got)-1].Owner != "" || got[len(got)-1].State != StateStop {
		t.Fatalf("events: states %v owners %q", states, owners)
	}
	sawM1Stop := false
	for _, e := range ev.all() {
		sawM1Stop = sawM1Stop || (e.Owner == "m1" && e.State == StateStop)
	}
	if !sawM1Stop {
		t.Fatalf("no event of STOP under m1: states %v owners %q", states, owners)
	}
}

func TestVMMSpecsAreNeverOpened(t *testing.T) {
	opened := 0
	r := NewRegistry(RegistryOptions{Open: func(Spec) (Device, error) { opened++; return nil, errors.New("opened") }, Devices: []string{"*"}})
	defer r.Close()
	if _, _, err := r.Acquire("vmm:nobody", "m1"); !errors.Is(err, ErrNotLent) {
		t.Fatalf("Acquire of an unlent device: %v, want ErrNotLent", err)
	}
	if _, err := Open(Spec{Kind: SpecVMM, VMM: "x"}); !errors.Is(err, ErrNotAllowed) {
		t.Fatalf("Open(vmm:x): %v, want ErrNotAllowed", err)
	}
	if opened != 0 {
		t.Fatalf("the registry opened %d devices for vmm: specs", opened)
	}
}

func TestWithdrawEvictsTheOwnerAndWaits(t *testing.T) {
	evicted := make(chan string, 1)
	r := NewRegistry(RegistryOptions{Evict: func(owner, spec string, why error) {
		if !errors.Is(why, ErrWithdrawn) || spec != "vmm:vm" {
			t.Errorf("Evict(%q, %q, %v)", owner, spec, why)
		}
		evicted <- owner
	}})
	defer r.Close()
	var ev events
	d := newLent(t, "vm")
	if err := r.Lend("vm", d, nil, ev.watch); err != nil {
		t.Fatal(err)
	}
	dev, release, err := r.Acquire("vmm:vm", "m1")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := dev.SetState(StateStopCopy); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- r.Withdraw(context.Background(), "vm") }()
	if owner := <-evicted; owner != "m1" {
		t.Fatalf("evicted %q, want m1", owner)
	}
	// Being withdrawn: nobody else may take it.
	if _, _, err := r.Acquire("vmm:vm", "m2"); !errors.Is(err, ErrBusy) {
		t.Fatalf("Acquire while withdrawing: %v, want ErrBusy", err)
	}
	// The owner rolls back, then releases: only then does Withdraw return.
	if _, err := dev.SetState(StateRunning); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		t.Fatalf("Withdraw returned (%v) before the owner released the device", err)
	default:
	}
	release()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	<-d.closed // the registry closed its descriptor
	all := ev.all()
	last := all[len(all)-1]
	if !last.Withdrawn || last.State != StateRunning {
		t.Fatalf("last event %+v, want withdrawn in RUNNING", last)
	}
	if len(r.List()) != 0 {
		t.Fatalf("List after Withdraw: %+v", r.List())
	}
	if err := r.Withdraw(context.Background(), "vm"); !errors.Is(err, ErrNotLent) {
		t.Fatalf("second Withdraw: %v, want ErrNotLent", err)
	}
}

func TestWithdrawGivenUpDropsTheDeviceAtRelease(t *testing.T) {
	r := NewRegistry(RegistryOptions{})
	defer r.Close()
	d := newLent(t, "vm")
	if err := r.Lend("vm", d, nil, nil); err != nil {
		t.Fatal(err)
	}
	_, release, err := r.Acquire("vmm:vm", "m1")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := r.Withdraw(ctx, "vm"); !errors.Is(err, context.Canceled) {
		t.Fatalf("Withdraw with an ended context: %v", err)
	}
	release()
	<-d.closed
	if len(r.List()) != 0 {
		t.Fatalf("List: %+v", r.List())
	}
}

func TestConfigStateFrozenFromSwitchoverToRelease(t *testing.T) {
	r := NewRegistry(RegistryOptions{})
	defer r.Close()
	if err := r.Lend("vm", newLent(t, "vm"), []byte("v1"), nil); err != nil {
		t.Fatal(err)
	}
	if err := r.SetConfig("vm", []byte("v2")); err != nil {
		t.Fatal(err)
	}
	_, release, err := r.Acquire("vmm:vm", "m1")
	if err != nil {
		t.Fatal(err)
	}
	if err := r.SetConfig("vm", []byte("v3")); err != nil {
		t.Fatalf("SetConfig before the switchover: %v", err)
	}
	if got := string(r.TakeConfig("vmm:vm")); got != "v3" {
		t.Fatalf("TakeConfig: %q, want v3", got)
	}
	if err := r.SetConfig("vm", []byte("v4")); !errors.Is(err, ErrConfigFrozen) {
		t.Fatalf("SetConfig after the switchover: %v, want ErrConfigFrozen", err)
	}
	release()
	if err := r.SetConfig("vm", []byte("v5")); err != nil {
		t.Fatalf("SetConfig after the migration: %v", err)
	}
	if err := r.SetConfig("other", nil); !errors.Is(err, ErrNotLent) {
		t.Fatalf("SetConfig of an unlent device: %v", err)
	}
	if r.TakeConfig("sim:size=1MiB,seed=5") != nil {
		t.Fatal("a device the registry opened has a config state")
	}
	r.SetReceivedConfig("vmm:vm", []byte("received"))
	got, ok, err := r.ReceivedConfig("vm")
	if err != nil || !ok || string(got) != "received" {
		t.Fatalf("ReceivedConfig: %q %v %v", got, ok, err)
	}
}

// countedClose counts the closes of the devices a registry opens.
type countedClose struct {
	Device
	closes *int
}

func (d countedClose) Close() error { *d.closes++; return d.Device.Close() }

func TestLetGo(t *testing.T) {
	closes, opens := 0, 0
	r := NewRegistry(RegistryOptions{AllowSim: true, Open: func(s Spec) (Device, error) {
		opens++
		d, err := Open(s)
		return countedClose{d, &closes}, err
	}})
	defer r.Close()
	const spec = "sim:size=1MiB,seed=9"
	_, release, err := r.Acquire(spec, "m1")
	if err != nil {
		t.Fatal(err)
	}
	if err := r.LetGo(spec); !errors.Is(err, ErrBusy) {
		t.Fatalf("LetGo of a held device: %v, want ErrBusy", err)
	}
	release()
	if err := r.LetGo(spec); err != nil {
		t.Fatal(err)
	}
	if closes != 1 || len(r.List()) != 0 {
		t.Fatalf("after LetGo: %d closes, listed %v", closes, r.List())
	}
	if err := r.LetGo(spec); err != nil {
		t.Fatalf("LetGo of a device not open: %v", err)
	}
	// The next user opens it afresh.
	_, release, err = r.Acquire(spec, "m2")
	if err != nil || opens != 2 {
		t.Fatalf("Acquire after LetGo: %v, %d opens", err, opens)
	}
	release()
	// A lent device is its VMM's to withdraw.
	if err := r.Lend("vm", newLent(t, "vm"), nil, nil); err != nil {
		t.Fatal(err)
	}
	if err := r.LetGo("vmm:vm"); !errors.Is(err, ErrNotAllowed) {
		t.Fatalf("LetGo of a lent device: %v, want ErrNotAllowed", err)
	}
}
