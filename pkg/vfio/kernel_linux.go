//go:build linux

// The Linux backend.
//
// A pci: or mdev: spec is opened by finding the device in sysfs
// (/sys/bus/pci/devices/DDDD:BB:DD.F or /sys/bus/mdev/devices/UUID), never
// from a path a caller supplied, and then through one of the kernel's two
// ways to a VFIO device fd:
//
//   - cdev + iommufd (Linux 6.6+ with CONFIG_VFIO_DEVICE_CDEV and
//     CONFIG_IOMMUFD): open /dev/vfio/devices/vfioX, bind it to a fresh
//     iommufd (/dev/iommu) and attach it to an empty I/O address space;
//   - group + container (every kernel; the only way on Debian's 6.1): open
//     /dev/vfio/vfio and the group /dev/vfio/N (or /dev/vfio/noiommu-N),
//     join them, choose the type1 IOMMU (v2 when offered; emulated-IOMMU
//     groups such as mdevs need no hardware) or the no-IOMMU mode, and ask
//     the group for the device by name.
//
// The cdev path is tried first when the kernel has it; if it fails the
// group path is tried. Migration moves no DMA, so no memory is mapped. A
// group may be open only once at a time: a device whose group is in use
// (by QEMU, or by another Device of a multi-function group) fails with
// EBUSY.
//
// Opening checks VFIO_DEVICE_FEATURE_MIGRATION: a device that answers ENOTTY
// or EINVAL does not support migration and the open fails with
// ErrNotSupported. The migration state is read and set with
// VFIO_DEVICE_FEATURE MIG_DEVICE_STATE, where one SET makes the kernel
// walk every arc to the target itself; when the last arc opens a data
// stream the kernel's data_fd is returned as the DataStream, an owned
// *os.File. After a failed SET the state is read back and reported in the
// error; errors wrap the errno (errors.Is(err, syscall.EINVAL)) and the
// package's sentinels: ErrInvalidTransition when the kernel refused the
// request as such, ErrVerify when RESUMING->STOP failed.
//
// Kernel features by version: Linux 6.1 has STOP_COPY and P2P only;
// VFIO_DEVICE_FEATURE_MIG_DATA_SIZE, PRE_COPY and VFIO_MIG_GET_PRECOPY_INFO
// arrived in 6.2 (older kernels answer ENOTTY: ErrNotSupported), the
// device cdev in 6.6, VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2 (REINIT) in
// 2026. A device with PRE_COPY is opted in to PRECOPY_INFOv2 at open;
// where the kernel lacks it (ENOTTY, EINVAL) PrecopyInfo never reports
// Reinit, as older kernels require.

package vfio

import (
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// openKernel opens a VFIO device named by a pci: or mdev: spec.
func openKernel(s Spec) (Device, error) {
	d, err := openKernelDevice(realHost, s)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", s, err)
	}
	return d, nil
}

// kernelDevice is a VFIO device of the running kernel. mu serialises every
// use of the descriptors, so Close may race with the other methods. An
// ioctl may take long, or never return (a driver that does not answer):
// State and Close never wait for one in progress. State then answers the
// state last read or set; Close leaves the descriptors to the ioctl's
// caller, who closes them when it returns.
type kernelDevice struct {
	spec  string
	flags Flags
	// infoV2: the opt-in to VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2
	// succeeded at open, so vfio_precopy_info.flags (REINIT) is valid.
	infoV2 bool
	last   atomic.Uint32 // the state last read or set

	pmu          sync.Mutex // guards busy and closePending; held by unlock across mu.Unlock
	busy         bool       // a method holds mu
	closePending bool       // Close found mu held: unlock closes the descriptors

	mu        sync.Mutex
	dev       *fdOwner // the VFIO device fd
	group     *fdOwner // group path only
	container *fdOwner // group path only
	iommufd   *fdOwner // cdev path only
}

// openKernelDevice resolves s under h and opens it.
func openKernelDevice(h hostPaths, s Spec) (*kernelDevice, error) {
	r, err := resolveSpec(h, s)
	if err != nil {
		return nil, err
	}
	d := &kernelDevice{spec: s.String()}
	var cdevErr error
	if r.cdevNode != "" {
		if !isCharDevice(h.dev + "/iommu") {
			cdevErr = fmt.Errorf("%s needs iommufd, and there is no %s/iommu: %w", r.cdevNode, h.dev, ErrNotSupported)
		} else if cdevErr = d.openCdev(h, r); cdevErr != nil {
			d.closeFDs()
		}
	}
	if d.dev == nil {
		if r.groupNode == "" {
			return nil, cdevErr
		}
		if err := d.openGroup(h, r); err != nil {
			d.closeFDs()
			if cdevErr != nil {
				err = fmt.Errorf("%w (cdev path: %w)", err, cdevErr)
			}
			return nil, err
		}
	}

	if err := d.probeMigration(); err != nil {
		d.closeFDs()
		return nil, err
	}
	return d, nil
}

// AdoptDeviceFD makes a Device of a VFIO device descriptor a VMM holds
// and handed over (the VMM socket): the device is named vmm:NAME, its
// group, container or iommufd stay the VMM's, and Close closes fd only,
// which neither resets the device nor ends its state while the VMM's
// own descriptor is open. fd must be a VFIO device's (pkg/vmm checks
// that before any ioctl) with migration support: otherwise the error
// wraps ErrNotSupported and fd is closed. The Device takes fd over.
func AdoptDeviceFD(fd int, name string) (Device, error) {
	if err := ValidateVMMName(name); err != nil {
		unix.Close(fd)
		return nil, err
	}
	d := &kernelDevice{spec: Spec{Kind: SpecVMM, VMM: name}.String(), dev: newFDOwner(fd)}
	if err := d.probeMigration(); err != nil {
		d.closeFDs()
		return nil, fmt.Errorf("adopt %s: %w", d.spec, err)
	}
	return d, nil
}

// DeviceFD returns a duplicate of the VFIO device descriptor of a
// kernel device, for handing to an agent over its VMM socket (as a VMM
// does): the caller owns it. Devices of other backends have none
// (ErrNotSupported).
func DeviceFD(dev Device) (*os.File, error) {
	d, ok := dev.(*kernelDevice)
	if !ok {
		return nil, fmt.Errorf("%s: not a kernel VFIO device: %w", dev.Spec(), ErrNotSupported)
	}
	d.lock()
	defer d.unlock()
	if d.dev == nil {
		return nil, fmt.Errorf("%s: closed: %w", d.spec, os.ErrClosed)
	}
	fd, err := unix.FcntlInt(uintptr(d.dev.raw()), unix.F_DUPFD_CLOEXEC, 0)
	runtime.KeepAlive(d.dev)
	if err != nil {
		return nil, fmt.Errorf("%s: dup: %w", d.spec, err)
	}
	return os.NewFile(uintptr(fd), d.spec), nil
}

// probeMigration reads the device's migration flags, refuses a device
// without STOP_COPY, and opts a PRE_COPY device in to REINIT reports.
func (d *kernelDevice) probeMigration() error {
	flags, err := deviceGetMigration(d.dev)
	if err != nil {
		if errors.Is(err, unix.ENOTTY) || errors.Is(err, unix.EINVAL) {
			return fmt.Errorf("device has no migration support: %w: %w", ErrNotSupported, err)
		}
		return fmt.Errorf("get migration flags: %w", err)
	}
	d.flags = Flags(flags)
	if !d.flags.Supports(StateStopCopy) {
		return fmt.Errorf("migration flags %v lack STOP_COPY: %w", d.flags, ErrNotSupported)
	}
	if d.flags&FlagPreCopy != 0 {
		// Opt in to REINIT reports. A kernel without the feature answers
		// ENOTTY or EINVAL; on any failure the flags stay unused, as
		// kernels before it require.
		d.infoV2 = deviceSetPrecopyInfoV2(d.dev) == nil
	}
	return nil
}

// openGroup opens the device through its group and a new container.
func (d *kernelDevice) openGroup(h hostPaths, r resolved) error {
	var err error
	if d.container, err = openFD(h.dev+"/vfio/vfio", unix.O_RDWR); err != nil {
		return err
	}
	if v, err := getAPIVersion(d.container); err != nil {
		return fmt.Errorf("VFIO_GET_API_VERSION: %w", err)
	} else if v != vfioAPIVersion {
		return fmt.Errorf("VFIO API version %d, want %d: %w", v, vfioAPIVersion, ErrNotSupported)
	}
	if d.group, err = openFD(r.groupNode, unix.O_RDWR); err != nil {
		if errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("group in use (by another process or device of the group): %w", err)
		}
		return err
	}
	st, err := groupGetStatus(d.group)
	if err != nil {
		return fmt.Errorf("VFIO_GROUP_GET_STATUS: %w", err)
	}
	if st.Flags&vfioGroupFlagsViable == 0 {
		return fmt.Errorf("group %s is not viable: bind every device of the group to vfio: %w", r.groupNode, ErrNotSupported)
	}
	if err := groupSetContainer(d.group, d.container); err != nil {
		return fmt.Errorf("VFIO_GROUP_SET_CONTAINER: %w", err)
	}
	iommuType, err := d.pickIOMMU(r.noIOMMU)
	if err != nil {
		return err
	}
	if err := setIOMMU(d.container, iommuType); err != nil {
		return fmt.Errorf("VFIO_SET_IOMMU %d: %w", iommuType, err)
	}
	fd, err := groupGetDeviceFD(d.group, r.name)
	if err != nil {
		return fmt.Errorf("VFIO_GROUP_GET_DEVICE_FD %s: %w", r.name, err)
	}
	d.dev = newFDOwner(fd)
	return nil
}

// pickIOMMU chooses the container's IOMMU model: no-IOMMU for a noiommu
// group, else type1v2 or type1 (both also take emulated-IOMMU groups).
func (d *kernelDevice) pickIOMMU(noIOMMU bool) (uintptr, error) {
	candidates := []uintptr{vfioType1v2IOMMU, vfioType1IOMMU}
	if noIOMMU {
		candidates = []uintptr{vfioNoIOMMU}
	}
	for _, t := range candidates {
		ok, err := checkExtension(d.container, t)
		if err != nil {
			return 0, fmt.Errorf("VFIO_CHECK_EXTENSION %d: %w", t, err)
		}
		if ok {
			return t, nil
		}
	}
	return 0, fmt.Errorf("container offers none of IOMMU types %v (is vfio_iommu_type1 loaded?): %w", candidates, ErrNotSupported)
}

// openCdev opens the device's cdev and binds it to a new iommufd.
func (d *kernelDevice) openCdev(h hostPaths, r resolved) error {
	var err error
	if d.iommufd, err = openFD(h.dev+"/iommu", unix.O_RDWR); err != nil {
		return err
	}
	if d.dev, err = openFD(r.cdevNode, unix.O_RDWR); err != nil {
		return err
	}
	if _, err := deviceBindIOMMUFD(d.dev, d.iommufd); err != nil {
		return fmt.Errorf("VFIO_DEVICE_BIND_IOMMUFD: %w", err)
	}
	ioas, err := ioasAlloc(d.iommufd)
	if err != nil {
		return fmt.Errorf("IOMMU_IOAS_ALLOC: %w", err)
	}
	if err := deviceAttachIOMMUFDPt(d.dev, ioas); err != nil {
		return fmt.Errorf("VFIO_DEVICE_ATTACH_IOMMUFD_PT: %w", err)
	}
	return nil
}

// closeFDs closes every descriptor, the device first.
func (d *kernelDevice) closeFDs() error {
	err := errors.Join(d.dev.Close(), d.group.Close(), d.container.Close(), d.iommufd.Close())
	d.dev, d.group, d.container, d.iommufd = nil, nil, nil, nil
	return err
}

// lock takes mu for an ioctl.
func (d *kernelDevice) lock() {
	d.mu.Lock()
	d.markBusy()
}

func (d *kernelDevice) markBusy() {
	d.pmu.Lock()
	d.busy = true
	d.pmu.Unlock()
}

// unlock releases mu, closing the descriptors first when a Close came
// while it was held.
func (d *kernelDevice) unlock() {
	d.pmu.Lock()
	defer d.pmu.Unlock()
	d.busy = false
	if d.closePending {
		d.closePending = false
		d.closeFDs()
	}
	d.mu.Unlock()
}

// Spec returns the canonical spec of the device.
func (d *kernelDevice) Spec() string { return d.spec }

// Flags returns the migration flags the kernel reported at open.
func (d *kernelDevice) Flags() Flags { return d.flags }

// State reads the migration state (VFIO_DEVICE_FEATURE GET MIG_DEVICE_STATE).
// While another ioctl is in progress it does not queue behind it (a SET
// the driver never answers would hold it for ever): it answers the state
// last read or set, without asking.
func (d *kernelDevice) State() (State, error) {
	if !d.mu.TryLock() {
		return State(d.last.Load()), nil
	}
	d.markBusy()
	defer d.unlock()
	s, err := d.getState()
	if err != nil {
		return s, fmt.Errorf("%s: get state: %w", d.spec, err)
	}
	return s, nil
}

func (d *kernelDevice) getState() (State, error) {
	if d.dev == nil {
		return StateError, os.ErrClosed
	}
	s, err := deviceGetMigState(d.dev)
	if err == nil {
		d.last.Store(s)
	}
	return State(s), err
}

// SetState asks the kernel for target with one VFIO_DEVICE_FEATURE SET
// MIG_DEVICE_STATE: the kernel (vfio_mig_get_next_state) walks the arcs.
// The current state is read first, to refuse STOP_COPY -> PRE_COPY(_P2P)
// without asking (kernels 6.2+ without the 2026 fix spin forever on it)
// and to explain a failure.
func (d *kernelDevice) SetState(target State) (DataStream, error) {
	d.lock()
	defer d.unlock()
	from, err := d.getState()
	if err != nil {
		return nil, fmt.Errorf("%s: set state %v: get state: %w", d.spec, target, err)
	}
	if from == StateStopCopy && (target == StatePreCopy || target == StatePreCopyP2P) {
		return nil, fmt.Errorf("%s: set state %v -> %v: never requested (kernels without the fix spin on it): %w",
			d.spec, from, target, ErrInvalidTransition)
	}
	fd, err := deviceSetMigState(d.dev, uint32(target))
	if err != nil {
		return nil, d.setFailed(from, target, err)
	}
	d.last.Store(uint32(target))
	if fd < 0 {
		return nil, nil
	}
	return newKernelStream(fd, d.spec, target, d.infoV2), nil
}

// setFailed reads the state back after a failed SET and builds the error.
func (d *kernelDevice) setFailed(from, target State, errno error) error {
	now, gerr := d.getState()
	where := fmt.Sprintf("device now %v", now)
	if gerr != nil {
		where = fmt.Sprintf("state unknown: %v", gerr)
	}
	var sentinel error
	_, perr := Path(d.flags, from, target)
	switch {
	case perr != nil && errors.Is(errno, unix.EINVAL):
		// The kernel refused the request itself: no arc was taken.
		sentinel = ErrInvalidTransition
	case from == StateResuming && gerr == nil && (now == StateResuming || now == StateError):
		// Every path out of RESUMING starts with RESUMING -> STOP, where
		// the driver validates what it was given.
		sentinel = ErrVerify
	}
	if sentinel != nil {
		return fmt.Errorf("%s: set state %v -> %v (%s): %w: %w", d.spec, from, target, where, sentinel, errno)
	}
	return fmt.Errorf("%s: set state %v -> %v (%s): %w", d.spec, from, target, where, errno)
}

// DataSize asks for the estimated stop-copy size
// (VFIO_DEVICE_FEATURE_MIG_DATA_SIZE, Linux 6.2+).
func (d *kernelDevice) DataSize() (uint64, error) {
	d.lock()
	defer d.unlock()
	if d.dev == nil {
		return 0, fmt.Errorf("%s: data size: %w", d.spec, os.ErrClosed)
	}
	n, err := deviceGetMigDataSize(d.dev)
	if errors.Is(err, unix.ENOTTY) || errors.Is(err, unix.EINVAL) {
		return 0, fmt.Errorf("%s: data size: %w: %w", d.spec, ErrNotSupported, err)
	}
	if err != nil {
		return 0, fmt.Errorf("%s: data size: %w", d.spec, err)
	}
	return n, nil
}

// Reset issues VFIO_DEVICE_RESET: the device returns to RUNNING and any
// data stream ends.
func (d *kernelDevice) Reset() error {
	d.lock()
	defer d.unlock()
	if d.dev == nil {
		return fmt.Errorf("%s: reset: %w", d.spec, os.ErrClosed)
	}
	if err := deviceReset(d.dev); err != nil {
		return fmt.Errorf("%s: reset: %w", d.spec, err)
	}
	d.last.Store(uint32(StateRunning))
	return nil
}

// Close releases the device fd, then its group and container (or
// iommufd). The kernel ends any data stream's session on close (its fd
// stays the caller's to close). Close never waits for an ioctl in
// progress: the descriptors are then closed as it returns. Idempotent.
func (d *kernelDevice) Close() error {
	for {
		d.pmu.Lock()
		if d.busy {
			d.closePending = true
			d.pmu.Unlock()
			return nil
		}
		if d.mu.TryLock() {
			err := d.closeFDs()
			d.mu.Unlock()
			d.pmu.Unlock()
			if err != nil {
				return fmt.Errorf("%s: close: %w", d.spec, err)
			}
			return nil
		}
		// mu is held by a method that has not marked itself busy yet
		// (it waits for pmu): let it.
		d.pmu.Unlock()
		runtime.Gosched()
	}
}

// kernelStream is a data_fd: an *os.File it owns, with the kernel's errors
// translated (see streamErr). Read returns io.EOF at the end of a
// STOP_COPY stream; in PRE_COPY "no data now" is ErrNoData (ENOMSG) or
// io.EOF (a read of 0), as with the simulated device. It is safe to Close while another goroutine reads or writes.
type kernelStream struct {
	f      *os.File
	infoV2 bool // the device opted in to PRECOPY_INFOv2: REINIT is valid
	closed atomic.Bool
}

func newKernelStream(fd int, spec string, state State, infoV2 bool) *kernelStream {
	return &kernelStream{f: os.NewFile(uintptr(fd), fmt.Sprintf("%s %v data", spec, state)), infoV2: infoV2}
}

// Read reads the saving stream.
func (s *kernelStream) Read(p []byte) (int, error) {
	n, err := s.f.Read(p)
	return n, streamErr(err)
}

// Write writes all of p to the resuming stream.
func (s *kernelStream) Write(p []byte) (int, error) {
	n, err := s.f.Write(p)
	return n, streamErr(err)
}

// Close closes the data_fd. Idempotent.
func (s *kernelStream) Close() error {
	if s.closed.Swap(true) {
		return nil
	}
	return s.f.Close()
}

// File returns the stream's *os.File; it stays owned by the stream.
func (s *kernelStream) File() *os.File { return s.f }

// PrecopyInfo issues VFIO_MIG_GET_PRECOPY_INFO on the stream: how many
// initial bytes are still to be read and how many bytes were dirtied
// since, and, where the device opted in to PRECOPY_INFOv2, whether new
// initial data appeared (Reinit). Only in PRE_COPY and PRE_COPY_P2P: the
// kernel answers EINVAL elsewhere (ErrNotPreCopy); ErrNotSupported before
// Linux 6.2.
func (s *kernelStream) PrecopyInfo() (PrecopyInfo, error) {
	rc, err := s.f.SyscallConn()
	if err != nil {
		return PrecopyInfo{}, fmt.Errorf("precopy info: %w", err)
	}
	var info vfioPrecopyInfo
	var ierr error
	if err := rc.Control(func(fd uintptr) { info, ierr = migGetPrecopyInfo(fd) }); err != nil {
		return PrecopyInfo{}, fmt.Errorf("precopy info: %w", err)
	}
	if err := precopyInfoErr(ierr); err != nil {
		return PrecopyInfo{}, fmt.Errorf("precopy info: %w", err)
	}
	return precopyInfoOf(info, s.infoV2), nil
}

// precopyInfoErr translates the errno of VFIO_MIG_GET_PRECOPY_INFO,
// keeping it in the chain.
func precopyInfoErr(errno error) error {
	switch {
	case errno == nil:
		return nil
	case errors.Is(errno, unix.ENOTTY):
		return fmt.Errorf("%w: %w", ErrNotSupported, errno)
	case errors.Is(errno, unix.EINVAL):
		return fmt.Errorf("%w: %w", ErrNotPreCopy, errno)
	case errors.Is(errno, unix.ENODEV):
		return fmt.Errorf("%w: %w", ErrStreamEnded, errno)
	}
	return errno
}

// precopyInfoOf converts the kernel's struct; its flags count only after
// the PRECOPY_INFOv2 opt-in (before it drivers echo what was passed in).
func precopyInfoOf(info vfioPrecopyInfo, infoV2 bool) PrecopyInfo {
	return PrecopyInfo{
		InitialBytes: info.InitialBytes,
		DirtyBytes:   info.DirtyBytes,
		Reinit:       infoV2 && info.Flags&vfioPrecopyInfoReinit != 0,
	}
}

// streamErr translates the kernel's data_fd errors into the package's:
//
//   - ENODEV: the session ended (the device left the saving or resuming
//     state, or was reset): ErrStreamEnded;
//   - ENOMSG: "no data now" in PRE_COPY(_P2P): ErrNoData (a 0-byte read
//     there, as mtty answers, is io.EOF and means the same; the stream
//     carries on once the device moves on);
//   - ENOMEM on a write: more than a whole state was written (mlx5, mtty):
//     ErrStreamTooLong.
//
// The errno stays in the chain for errors.Is.
func streamErr(err error) error {
	switch {
	case err == nil || err == io.EOF:
		return err
	case errors.Is(err, unix.ENOMSG):
		return fmt.Errorf("%w: %w", ErrNoData, err)
	case errors.Is(err, unix.ENODEV):
		return fmt.Errorf("%w: %w", ErrStreamEnded, err)
	case errors.Is(err, unix.ENOMEM):
		var pe *os.PathError
		if errors.As(err, &pe) && pe.Op == "write" {
			return fmt.Errorf("%w: %w", ErrStreamTooLong, err)
		}
	}
	return err
}
