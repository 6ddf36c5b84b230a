package vfio

import (
	"errors"
	"io"
)

// State is a VFIO device migration state, numbered exactly as the kernel's
// enum vfio_device_mig_state in include/uapi/linux/vfio.h.
type State uint32

// The migration states. ERROR cannot be requested; only a device reset
// leaves it (to RUNNING).
const (
	StateError      State = 0
	StateStop       State = 1
	StateRunning    State = 2
	StateStopCopy   State = 3
	StateResuming   State = 4
	StateRunningP2P State = 5
	StatePreCopy    State = 6
	StatePreCopyP2P State = 7
)

// Flags are the migration capabilities a device reports through
// VFIO_DEVICE_FEATURE_MIGRATION (struct vfio_device_feature_migration).
type Flags uint64

// The migration flags, with the kernel's values.
const (
	FlagStopCopy Flags = 1 << 0 // VFIO_MIGRATION_STOP_COPY
	FlagP2P      Flags = 1 << 1 // VFIO_MIGRATION_P2P
	FlagPreCopy  Flags = 1 << 2 // VFIO_MIGRATION_PRE_COPY
)

// Errors shared by every backend. Compare with errors.Is.
var (
	// ErrNotSupported: the device or the kernel lacks the feature.
	ErrNotSupported = errors.New("not supported")
	// ErrInvalidTransition: the requested state cannot be reached from the
	// current one (the kernel answers EINVAL).
	ErrInvalidTransition = errors.New("invalid state transition")
	// ErrVerify: a destination device rejected the state written to it at
	// RESUMING->STOP (incomplete, inconsistent or not its own).
	ErrVerify = errors.New("device state did not verify")
	// ErrStreamEnded: the data stream's session has ended (the kernel's
	// ENODEV after the saving/resuming state was left).
	ErrStreamEnded = errors.New("data stream ended")
	// ErrNoData: a saving stream in PRE_COPY(_P2P) has no new data now
	// (the kernel's ENOMSG); read again later, or move on to STOP_COPY.
	ErrNoData = errors.New("no pre-copy data now")
	// ErrNotPreCopy: PrecopyInfo was asked of a stream whose device is not
	// in PRE_COPY or PRE_COPY_P2P (the kernel's EINVAL).
	ErrNotPreCopy = errors.New("data stream is not in a pre-copy state")
)

// PrecopyInfo is what a saving stream in PRE_COPY(_P2P) reports about
// the data still to read (struct vfio_precopy_info). Both counts are the
// device's estimates, never a promise: a device may report anything.
type PrecopyInfo struct {
	// InitialBytes is the initial pre-copy data not yet read; it counts
	// down as the stream is read. Leave PRE_COPY for STOP_COPY only once
	// it is zero, or the stop-copy phase carries it.
	InitialBytes uint64
	// DirtyBytes estimates the state changed since it was read: data the
	// stream will carry again. It may grow and shrink; it is no estimate
	// of the stop-copy size (DataSize is).
	DirtyBytes uint64
	// Reinit says new initial data appeared since the last report and
	// InitialBytes was reset (VFIO_PRECOPY_INFO_REINIT). Only devices
	// whose kernel has VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2 report it;
	// elsewhere it is always false and InitialBytes may simply grow.
	Reinit bool
}

// PrecopyInfoer is implemented by saving streams that answer
// VFIO_MIG_GET_PRECOPY_INFO: the kernel's, the simulated device's and a
// GuardedDevice's streams over either. PrecopyInfo is valid only while
// the device is in PRE_COPY or PRE_COPY_P2P; elsewhere it fails with
// ErrNotPreCopy. When both counts are zero a read fails with ErrNoData.
type PrecopyInfoer interface {
	PrecopyInfo() (PrecopyInfo, error)
}

// DataStream is the migration data stream of a device in a saving or
// resuming state: the kernel's data_fd. Reads in STOP_COPY return io.EOF at
// the end of the device state; writes in RESUMING accept any chunking of
// the stream. The caller owns it and must Close it.
type DataStream interface {
	io.Reader
	io.Writer
	io.Closer
}

// Device is one migration-capable VFIO device: the kernel's (ioctls on a
// VFIO device fd) or the simulated one. It is not safe for concurrent use
// of SetState; reads and writes on a DataStream may run beside State.
type Device interface {
	// Spec is the canonical spec string that names the device.
	Spec() string
	// Flags are the device's migration capabilities.
	Flags() Flags
	// State reads the device's current migration state.
	State() (State, error)
	// SetState moves the device to target, walking the kernel's arcs. When
	// the last arc opens a data stream it is returned; otherwise the stream
	// is nil. After a failed SetState the device may rest in any state on
	// the path (or ERROR): read it back with State.
	SetState(target State) (DataStream, error)
	// DataSize is the device's estimate of its stop-copy state size
	// (VFIO_DEVICE_FEATURE_MIG_DATA_SIZE); ErrNotSupported when unknown.
	DataSize() (uint64, error)
	// Reset issues a device reset: any state, ERROR included, becomes
	// RUNNING and any data stream ends.
	Reset() error
	// Close releases the device. Idempotent.
	Close() error
}
