//go:build linux

package vfio

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// The tests named TestKernel* drive real VFIO devices. They change the
// devices' migration state, so they only touch devices named in
// FERRY_TEST_VFIO_DEVICES (comma-separated pci: or mdev: specs) and skip
// without it. test/vm/ boots a kernel with test/vm/module's ferry_mig
// devices and runs them there; with ferry_mig the walk also compares the
// arcs the kernel took (its migration/trace attribute) with Path.
const testDevicesEnv = "FERRY_TEST_VFIO_DEVICES"

// kernelSkipReason says why the TestKernel* tests skip here.
const kernelSkipReason = "the kernel tests (TestKernel*) need real VFIO devices: " +
	testDevicesEnv + " is not set, so they skip; `make vm-test` boots a kernel with test devices and runs them"

// TestMain says, once, that the kernel tests skip, so a run that passes
// without them does not look like one that ran them (go test prints it
// with -v, or when it runs this package alone).
func TestMain(m *testing.M) {
	if os.Getenv(testDevicesEnv) == "" {
		fmt.Println("pkg/vfio: " + kernelSkipReason)
	}
	os.Exit(m.Run())
}

// testDevices returns the specs in FERRY_TEST_VFIO_DEVICES or skips.
func testDevices(t *testing.T) []Spec {
	t.Helper()
	v := os.Getenv(testDevicesEnv)
	if v == "" {
		t.Skip(kernelSkipReason)
	}
	var specs []Spec
	for f := range strings.SplitSeq(v, ",") {
		specs = append(specs, mustSpec(t, f))
	}
	return specs
}

func openTestDevice(t *testing.T, s Spec) *kernelDevice {
	t.Helper()
	d, err := openKernelDevice(realHost, s)
	if err != nil {
		t.Fatalf("open %v: %v", s, err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

func TestWrappedErrno(t *testing.T) {
	var err error = wrappedErrno{unix.EINVAL}
	if !errors.Is(err, unix.EINVAL) {
		t.Error("errors.Is(wrappedErrno{EINVAL}, EINVAL) is false")
	}
	if err == error(unix.EINVAL) {
		t.Error("wrappedErrno{EINVAL} == EINVAL: callers could skip errors.Is")
	}
	if errnoErr(unix.Errno(0)) != nil {
		t.Error("errnoErr(0) is not nil")
	}
	if got := fmt.Errorf("set: %w", errnoErr(unix.ENOTTY)); !errors.Is(got, unix.ENOTTY) {
		t.Errorf("%v does not wrap ENOTTY", got)
	}
}

func TestFDOwnerClose(t *testing.T) {
	o, err := openFD("/dev/null", unix.O_RDONLY)
	if err != nil {
		t.Fatal(err)
	}
	if err := o.Close(); err != nil {
		t.Fatalf("first Close: %v", err)
	}
	if err := o.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if o.raw() != -1 {
		t.Errorf("raw after Close = %d, want -1", o.raw())
	}
	var nilOwner *fdOwner
	if err := nilOwner.Close(); err != nil {
		t.Errorf("nil Close: %v", err)
	}
	if _, err := deviceGetMigState(o); !errors.Is(err, unix.EBADF) {
		t.Errorf("ioctl on a closed owner: %v, want EBADF", err)
	}
}

func TestOpenKernelMissing(t *testing.T) {
	_, err := openKernel(mustSpec(t, "pci:ffff:ff:1f.7"))
	if !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("open of a missing device: %v, want fs.ErrNotExist", err)
	}
}

func TestStreamErr(t *testing.T) {
	pe := func(op string, errno unix.Errno) error { return &os.PathError{Op: op, Path: "x", Err: errno} }
	for _, tc := range []struct {
		in   error
		want []error
	}{
		{nil, nil},
		{io.EOF, []error{io.EOF}},
		{pe("read", unix.ENODEV), []error{ErrStreamEnded, unix.ENODEV}},
		{pe("read", unix.ENOMSG), []error{ErrNoData, unix.ENOMSG}},
		{pe("write", unix.ENOMEM), []error{ErrStreamTooLong, unix.ENOMEM}},
		{pe("read", unix.EIO), []error{unix.EIO}},
	} {
		got := streamErr(tc.in)
		if tc.want == nil && got != nil {
			t.Errorf("streamErr(nil) = %v", got)
		}
		for _, w := range tc.want {
			if !errors.Is(got, w) {
				t.Errorf("streamErr(%v) = %v, want it to match %v", tc.in, got, w)
			}
		}
	}
}

// TestPrecopyInfoTranslation checks the errno translation of
// VFIO_MIG_GET_PRECOPY_INFO and that REINIT counts only after the
// PRECOPY_INFOv2 opt-in (before it drivers echo the flags passed in).
func TestPrecopyInfoTranslation(t *testing.T) {
	for _, tc := range []struct {
		in   error
		want []error
	}{
		{wrappedErrno{unix.ENOTTY}, []error{ErrNotSupported, unix.ENOTTY}},
		{wrappedErrno{unix.EINVAL}, []error{ErrNotPreCopy, unix.EINVAL}},
		{wrappedErrno{unix.ENODEV}, []error{ErrStreamEnded, unix.ENODEV}},
		{wrappedErrno{unix.EIO}, []error{unix.EIO}},
	} {
		got := precopyInfoErr(tc.in)
		for _, w := range tc.want {
			if !errors.Is(got, w) {
				t.Errorf("precopyInfoErr(%v) = %v, want it to match %v", tc.in, got, w)
			}
		}
	}
	if err := precopyInfoErr(nil); err != nil {
		t.Errorf("precopyInfoErr(nil) = %v", err)
	}
	raw := vfioPrecopyInfo{Flags: vfioPrecopyInfoReinit, InitialBytes: 7, DirtyBytes: 3}
	if got := precopyInfoOf(raw, false); got != (PrecopyInfo{InitialBytes: 7, DirtyBytes: 3}) {
		t.Errorf("v1: %+v, want no Reinit", got)
	}
	if got := precopyInfoOf(raw, true); got != (PrecopyInfo{InitialBytes: 7, DirtyBytes: 3, Reinit: true}) {
		t.Errorf("v2: %+v, want Reinit", got)
	}
}

// TestKernelDevice saves a device's state and loads it back into the same
// device, checking the data stream's rules on the way.
func TestKernelDevice(t *testing.T) {
	for _, s := range testDevices(t) {
		t.Run(s.String(), func(t *testing.T) {
			d := openTestDevice(t, s)
			if !d.Flags().Supports(StateStopCopy) {
				t.Fatalf("flags %v", d.Flags())
			}
			mustResetKernel(t, d)
			if _, err := d.DataSize(); err != nil && !errors.Is(err, ErrNotSupported) {
				t.Errorf("DataSize: %v", err)
			}

			saved := saveKernelState(t, d)
			// After STOP_COPY -> STOP the stream's session has ended.
			st, err := d.SetState(StateStopCopy)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := d.SetState(StateStop); err != nil {
				t.Fatal(err)
			}
			if _, err := st.Read(make([]byte, 16)); !errors.Is(err, ErrStreamEnded) || !errors.Is(err, unix.ENODEV) {
				t.Errorf("read after STOP_COPY -> STOP: %v, want ErrStreamEnded wrapping ENODEV", err)
			}
			if ks, ok := st.(*kernelStream); ok {
				if _, err := ks.PrecopyInfo(); err == nil {
					t.Error("PrecopyInfo outside PRE_COPY succeeded")
				}
			}
			if err := st.Close(); err != nil {
				t.Errorf("stream Close: %v", err)
			}
			if err := st.Close(); err != nil {
				t.Errorf("second stream Close: %v", err)
			}

			loadKernelState(t, d, saved)
			if _, err := d.SetState(StateRunning); err != nil {
				t.Fatalf("RUNNING after a load: %v", err)
			}

			// Writing more than a whole state is refused.
			w, err := d.SetState(StateResuming)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := w.Write(append(slices.Clone(saved), 0)); !errors.Is(err, ErrStreamTooLong) {
				t.Errorf("writing more than a whole state: %v, want ErrStreamTooLong", err)
			}
			w.Close()
			mustResetKernel(t, d)

			if err := d.Close(); err != nil {
				t.Errorf("Close: %v", err)
			}
			if err := d.Close(); err != nil {
				t.Errorf("second Close: %v", err)
			}
			if _, err := d.State(); !errors.Is(err, os.ErrClosed) {
				t.Errorf("State after Close: %v, want os.ErrClosed", err)
			}
		})
	}
}

func mustResetKernel(t *testing.T, d Device) {
	t.Helper()
	if err := d.Reset(); err != nil {
		t.Fatalf("Reset: %v", err)
	}
	if s, err := d.State(); err != nil || s != StateRunning {
		t.Fatalf("state after Reset = %v, %v; want RUNNING", s, err)
	}
}

// saveKernelState reads the device's whole state from RUNNING and returns it to
// RUNNING.
func saveKernelState(t *testing.T, d Device) []byte {
	t.Helper()
	st, err := d.SetState(StateStopCopy)
	if err != nil {
		t.Fatalf("STOP_COPY: %v", err)
	}
	if st == nil {
		t.Fatal("STOP_COPY opened no data stream")
	}
	defer st.Close()
	data, err := io.ReadAll(st)
	if err != nil {
		t.Fatalf("reading the state: %v", err)
	}
	if n, err := st.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Errorf("read after the end = %d, %v; want 0, io.EOF", n, err)
	}
	if _, err := d.SetState(StateRunning); err != nil {
		t.Fatalf("STOP_COPY -> RUNNING: %v", err)
	}
	return data
}

// loadKernelState moves the device to RESUMING, writes data in uneven chunks and
// moves it to STOP, where the device validates it.
func loadKernelState(t *testing.T, d Device, data []byte) {
	t.Helper()
	w, err := d.SetState(StateResuming)
	if err != nil {
		t.Fatalf("RESUMING: %v", err)
	}
	if w == nil {
		t.Fatal("RESUMING opened no data stream")
	}
	for rest := data; len(rest) > 0; {
		n := min(len(rest), 4093)
		if _, err := w.Write(rest[:n]); err != nil {
			t.Fatalf("writing the state: %v", err)
		}
		rest = rest[n:]
	}
	// The driver holds its own reference: closing before STOP is fine.
	w.Close()
	if _, err := d.SetState(StateStop); err != nil {
		t.Fatalf("RESUMING -> STOP after writing a whole state: %v", err)
	}
}

// kernelWalkStats counts what TestKernelWalk compared.
type kernelWalkStats struct {
	pairs int // (from, to) requests whose outcome was compared
	arcs  int // single arcs compared with the driver's trace
}

// TestKernelWalk requests every (from, to) pair on each device and compares
// the kernel's answers with Path: success or EINVAL, the state reached, the
// data stream, and, where the driver records them (ferry_mig's
// migration/trace), the arcs walked. It also checks that a failed
// RESUMING -> STOP is ErrVerify, that ERROR refuses everything, and that a
// reset leaves it.
func TestKernelWalk(t *testing.T) {
	var total kernelWalkStats
	for _, s := range testDevices(t) {
		t.Run(s.String(), func(t *testing.T) {
			d := openTestDevice(t, s)
			r, err := resolveSpec(realHost, s)
			if err != nil {
				t.Fatal(err)
			}
			w := &kernelWalker{t: t, d: d, attrs: filepath.Join(r.sysDir, "migration")}
			w.run()
			t.Logf("%v: flags %v: %d pairs, %d arcs checked", s, d.Flags(), w.stats.pairs, w.stats.arcs)
			total.pairs += w.stats.pairs
			total.arcs += w.stats.arcs
		})
	}
	// The VM test's host side reads this line.
	fmt.Printf("WALK pairs=%d arcs=%d\n", total.pairs, total.arcs)
}

type kernelWalker struct {
	t     *testing.T
	d     *kernelDevice
	attrs string // the driver's sysfs attribute directory, if it has one
	saved []byte // a valid state of the device, to load in RESUMING
	stats kernelWalkStats
}

// hasTrace reports whether the driver records the arcs it walks.
func (w *kernelWalker) hasTrace() bool {
	_, err := os.Stat(filepath.Join(w.attrs, "trace"))
	return err == nil
}

// trace reads the arcs of the last SET from the driver and its errno.
func (w *kernelWalker) trace() (arcs [][2]State, errno int) {
	w.t.Helper()
	b, err := os.ReadFile(filepath.Join(w.attrs, "trace"))
	if err != nil {
		w.t.Fatal(err)
	}
	line, errStr, ok := strings.Cut(strings.TrimSpace(string(b)), "=")
	if !ok {
		w.t.Fatalf("trace %q has no '='", b)
	}
	errno, err = strconv.Atoi(strings.TrimSpace(errStr))
	if err != nil {
		w.t.Fatalf("trace %q: %v", b, err)
	}
	for f := range strings.FieldsSeq(line) {
		a, b, ok := strings.Cut(f, ">")
		x, e1 := strconv.Atoi(a)
		y, e2 := strconv.Atoi(b)
		if !ok || e1 != nil || e2 != nil {
			w.t.Fatalf("trace arc %q", f)
		}
		arcs = append(arcs, [2]State{State(x), State(y)})
	}
	return arcs, errno
}

// reach puts the device in state from, via a reset; in RESUMING the saved
// state has been written when valid is set.
func (w *kernelWalker) reach(from State, valid bool) {
	w.t.Helper()
	mustResetKernel(w.t, w.d)
	if from == StateRunning {
		return
	}
	st, err := w.d.SetState(from)
	if err != nil {
		w.t.Fatalf("reaching %v: %v", from, err)
	}
	if st != nil {
		if from == StateResuming && valid {
			if _, err := st.Write(w.saved); err != nil {
				w.t.Fatalf("writing the state: %v", err)
			}
		}
		st.Close()
	}
	if got, err := w.d.State(); err != nil || got != from {
		w.t.Fatalf("reaching %v: state %v, %v", from, got, err)
	}
}

func (w *kernelWalker) run() {
	t, d := w.t, w.d
	flags := d.Flags()
	if w.hasTrace() {
		b, err := os.ReadFile(filepath.Join(w.attrs, "flags"))
		if err != nil {
			t.Fatal(err)
		}
		if got := strings.TrimSpace(string(b)); got != strconv.FormatUint(uint64(flags), 10) {
			t.Errorf("driver's flags %s, VFIO_DEVICE_FEATURE_MIGRATION %v", got, flags)
		}
	} else {
		t.Logf("%s has no trace attribute: comparing outcomes only", w.attrs)
	}
	mustResetKernel(t, d)
	w.saved = saveKernelState(t, d)

	// Every state value the kernel defines, plus one beyond them.
	var targets []State
	for s := StateError; s <= StatePreCopyP2P+1; s++ {
		targets = append(targets, s)
	}
	for from := StateStop; from <= StatePreCopyP2P; from++ {
		if !flags.Supports(from) {
			continue
		}
		for _, to := range targets {
			w.reach(from, true)
			w.request(from, to)
		}
	}

	// RESUMING -> anything with a stream that is not a whole state: the
	// first arc, RESUMING -> STOP, must fail validation.
	for _, to := range targets {
		if to == StateResuming || !flags.Supports(to) {
			continue
		}
		w.reach(StateResuming, false)
		_, err := d.SetState(to)
		if !errors.Is(err, ErrVerify) || !errors.Is(err, unix.EINVAL) {
			t.Errorf("RESUMING (empty) -> %v: %v, want ErrVerify wrapping EINVAL", to, err)
		}
		if got, _ := d.State(); got != StateResuming {
			t.Errorf("RESUMING (empty) -> %v: device in %v, want RESUMING", to, got)
		}
		w.stats.pairs++
		if w.hasTrace() {
			arcs, errno := w.trace()
			if want := [][2]State{{StateResuming, StateStop}}; !slices.Equal(arcs, want) || errno != int(unix.EINVAL) {
				t.Errorf("RESUMING (empty) -> %v: driver walked %v = %d, want %v = EINVAL", to, arcs, errno, want)
			}
			w.stats.arcs++
		}
	}

	// ERROR: every request is refused, a reset leaves it.
	if w.hasTrace() {
		mustResetKernel(t, d)
		if err := os.WriteFile(filepath.Join(w.attrs, "inject_error"), []byte("1"), 0); err != nil {
			t.Fatal(err)
		}
		for _, to := range targets {
			_, err := d.SetState(to)
			if got, _ := d.State(); got != StateError {
				t.Errorf("ERROR -> %v: device in %v", to, got)
			}
			if !errors.Is(err, ErrInvalidTransition) {
				t.Errorf("ERROR -> %v: %v, want ErrInvalidTransition", to, err)
			}
			w.stats.pairs++
		}
		mustResetKernel(t, d)
	}
}

// request asks for to from the current state from and compares the
// kernel's answer with Path.
func (w *kernelWalker) request(from, to State) {
	t, d := w.t, w.d
	t.Helper()
	path, perr := Path(d.Flags(), from, to)
	if from == StateStopCopy && (to == StatePreCopy || to == StatePreCopyP2P) {
		// Never sent to the kernel; SetState refuses it itself.
		if perr == nil {
			t.Errorf("Path allows %v -> %v", from, to)
		}
	}
	st, err := d.SetState(to)
	got, gerr := d.State()
	if gerr != nil {
		t.Fatalf("%v -> %v: reading the state: %v", from, to, gerr)
	}
	w.stats.pairs++
	var arcs [][2]State
	errno := 0
	traced := w.hasTrace()
	if traced {
		arcs, errno = w.trace()
	}

	if perr != nil {
		// Path refuses: the kernel must refuse with EINVAL and take no arc.
		switch {
		case err == nil:
			t.Errorf("%v -> %v: kernel accepted, Path refuses (%v)", from, to, perr)
		case !errors.Is(err, ErrInvalidTransition):
			t.Errorf("%v -> %v: %v, want ErrInvalidTransition", from, to, err)
		}
		if got != from {
			t.Errorf("%v -> %v: refused, but the device moved to %v", from, to, got)
		}
		// STOP_COPY -> PRE_COPY(_P2P) never reaches the driver, whose trace
		// then still shows the previous request.
		if traced && !(from == StateStopCopy && (to == StatePreCopy || to == StatePreCopyP2P)) {
			if len(arcs) != 0 || errno != int(unix.EINVAL) {
				t.Errorf("%v -> %v: refused, but the driver walked %v = %d", from, to, arcs, errno)
			}
		}
		if st != nil {
			st.Close()
		}
		return
	}

	if err != nil {
		t.Errorf("%v -> %v: %v (Path: %v)", from, to, err, path)
		return
	}
	if got != to {
		t.Errorf("%v -> %v: device in %v", from, to, got)
	}
	wantStream := len(path) > 0 && OpensStream(pathPrev(from, path), to)
	if (st != nil) != wantStream {
		t.Errorf("%v -> %v: data stream %v, want one: %v", from, to, st != nil, wantStream)
	}
	if st != nil {
		st.Close()
	}
	if traced {
		var want [][2]State
		cur := from
		for _, next := range path {
			want = append(want, [2]State{cur, next})
			cur = next
		}
		if !slices.Equal(arcs, want) || errno != 0 {
			t.Errorf("%v -> %v: driver walked %v = %d, Path says %v", from, to, arcs, errno, want)
		}
		w.stats.arcs += len(want)
	}
}

// prev is the state before the last one of path, which starts at from.
func pathPrev(from State, path []State) State {
	if len(path) < 2 {
		return from
	}
	return path[len(path)-2]
}

// TestOpenKernelDeviceFake opens devices of a fake host whose device nodes
// are /dev/null: the open must fail cleanly, naming the step and wrapping
// the errno.
func TestOpenKernelDeviceFake(t *testing.T) {
	h := newFakeHost(t)
	h.device("pci", "0000:3b:00.7", "", "vfio-pci", "vfio5") // cdev only
	h.node("vfio/devices/vfio5")
	h.device("pci", "0000:3b:00.2", "12", "vfio-pci", "vfio0")
	h.node("vfio/12")
	h.node("vfio/vfio")

	_, err := openKernelDevice(h.hostPaths, mustSpec(t, "pci:0000:3b:00.7"))
	if !errors.Is(err, ErrNotSupported) {
		t.Errorf("cdev-only device without /dev/iommu: %v, want ErrNotSupported", err)
	}
	// /dev/null answers VFIO_GET_API_VERSION with ENOTTY.
	_, err = openKernelDevice(h.hostPaths, mustSpec(t, "pci:0000:3b:00.2"))
	if !errors.Is(err, unix.ENOTTY) || !strings.Contains(err.Error(), "VFIO_GET_API_VERSION") {
		t.Errorf("container that is not VFIO's: %v, want VFIO_GET_API_VERSION: ENOTTY", err)
	}
}

// TestIoctlLockDoesNotQueue holds the device's ioctl lock as a SET the
// driver never answers would: State answers the state last set without
// waiting, and Close returns at once, leaving the descriptors to be closed
// when the ioctl returns.
func TestIoctlLockDoesNotQueue(t *testing.T) {
	fd, err := openFD(os.DevNull, unix.O_RDONLY)
	if err != nil {
		t.Fatal(err)
	}
	d := &kernelDevice{spec: "pci:0000:3b:00.2", dev: fd}
	d.last.Store(uint32(StateStopCopy))
	d.lock() // an ioctl in progress
	if st, err := d.State(); err != nil || st != StateStopCopy {
		t.Errorf("State during an ioctl = %v, %v; want the last state, STOP_COPY", st, err)
	}
	if err := d.Close(); err != nil {
		t.Errorf("Close during an ioctl: %v", err)
	}
	if d.dev == nil {
		t.Fatal("Close closed the descriptors under a running ioctl")
	}
	d.unlock() // the ioctl returns
	if d.dev != nil {
		t.Error("the descriptors were not closed when the ioctl returned")
	}
	if _, err := d.State(); !errors.Is(err, os.ErrClosed) {
		t.Errorf("State after Close: %v, want os.ErrClosed", err)
	}
}
