//go:build linux

package vfio

import (
	"errors"
	"fmt"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// This file is the raw layer of the Linux backend: one small function per
// ioctl, all through the single choke point ioctl. They return the errno
// wrapped (see wrappedErrno) and add no context; callers name the
// operation once.

// wrappedErrno is an errno from the kernel. It exists so that comparing
// with == stops working by accident (err == unix.EINVAL is always false):
// callers must use errors.Is(err, unix.EINVAL). Never export it.
type wrappedErrno struct {
	unix.Errno
}

func (e wrappedErrno) Unwrap() error { return e.Errno }

func (e wrappedErrno) Error() string { return e.Errno.Error() }

// errnoErr wraps err when it is an errno and returns other errors as they
// are. A zero errno is no error.
func errnoErr(err error) error {
	var errno unix.Errno
	if errors.As(err, &errno) {
		if errno == 0 {
			return nil
		}
		return wrappedErrno{errno}
	}
	return err
}

// ioctl is the choke point for every ioctl with a pointer argument. The
// conversion to uintptr happens in the Syscall argument list, so the
// pointed-to memory stays alive and in place for the call (rule 4 of
// unsafe.Pointer). It returns the ioctl's non-negative result.
func ioctl(fd *fdOwner, req uintptr, arg unsafe.Pointer) (int, error) {
	r, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd.raw()), req, uintptr(arg))
	runtime.KeepAlive(fd)
	if errno != 0 {
		return -1, wrappedErrno{errno}
	}
	return int(r), nil
}

// ioctlValue is ioctl for requests whose argument is an integer passed by
// value (VFIO_CHECK_EXTENSION, VFIO_SET_IOMMU) or no argument at all.
func ioctlValue(fd *fdOwner, req uintptr, val uintptr) (int, error) {
	r, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd.raw()), req, val)
	runtime.KeepAlive(fd)
	if errno != 0 {
		return -1, wrappedErrno{errno}
	}
	return int(r), nil
}

// getAPIVersion issues VFIO_GET_API_VERSION on a container.
func getAPIVersion(container *fdOwner) (int, error) {
	return ioctlValue(container, reqGetAPIVersion, 0)
}

// checkExtension issues VFIO_CHECK_EXTENSION on a container; the extension
// is passed by value and a positive result means it is supported.
func checkExtension(container *fdOwner, ext uintptr) (bool, error) {
	r, err := ioctlValue(container, reqCheckExtension, ext)
	return r > 0, err
}

// setIOMMU issues VFIO_SET_IOMMU on a container; the type is passed by
// value.
func setIOMMU(container *fdOwner, iommuType uintptr) error {
	_, err := ioctlValue(container, reqSetIOMMU, iommuType)
	return err
}

// groupGetStatus issues VFIO_GROUP_GET_STATUS.
func groupGetStatus(group *fdOwner) (vfioGroupStatus, error) {
	st := vfioGroupStatus{Argsz: uint32(unsafe.Sizeof(vfioGroupStatus{}))}
	_, err := ioctl(group, reqGroupGetStatus, unsafe.Pointer(&st))
	return st, err
}

// groupSetContainer issues VFIO_GROUP_SET_CONTAINER with a pointer to an
// s32 holding the container fd.
func groupSetContainer(group, container *fdOwner) error {
	cfd := int32(container.raw())
	_, err := ioctl(group, reqGroupSetContainer, unsafe.Pointer(&cfd))
	runtime.KeepAlive(container)
	return err
}

// groupGetDeviceFD issues VFIO_GROUP_GET_DEVICE_FD with a NUL-terminated
// device name; the new device fd (O_RDWR, O_CLOEXEC) is the result.
func groupGetDeviceFD(group *fdOwner, name string) (int, error) {
	p, err := unix.BytePtrFromString(name)
	if err != nil {
		return -1, err
	}
	return ioctl(group, reqGroupGetDeviceFD, unsafe.Pointer(p))
}

// deviceGetInfo issues VFIO_DEVICE_GET_INFO.
func deviceGetInfo(dev *fdOwner) (vfioDeviceInfo, error) {
	info := vfioDeviceInfo{Argsz: uint32(unsafe.Sizeof(vfioDeviceInfo{}))}
	_, err := ioctl(dev, reqDeviceGetInfo, unsafe.Pointer(&info))
	return info, err
}

// deviceReset issues VFIO_DEVICE_RESET (no argument).
func deviceReset(dev *fdOwner) error {
	_, err := ioctlValue(dev, reqDeviceReset, 0)
	return err
}

// deviceFeatureProbe issues VFIO_DEVICE_FEATURE with PROBE for a feature
// index and the GET/SET operations asked about. The kernel answers before
// looking at any payload, so the header alone is passed.
func deviceFeatureProbe(dev *fdOwner, feature, ops uint32) error {
	hdr := vfioDeviceFeature{
		Argsz: uint32(unsafe.Sizeof(vfioDeviceFeature{})),
		Flags: featureProbe | ops | feature,
	}
	_, err := ioctl(dev, reqDeviceFeature, unsafe.Pointer(&hdr))
	return err
}

// deviceGetMigration issues VFIO_DEVICE_FEATURE GET MIGRATION: the
// device's migration flags.
func deviceGetMigration(dev *fdOwner) (uint64, error) {
	arg := featureMigrationArg{Hdr: vfioDeviceFeature{
		Argsz: uint32(unsafe.Sizeof(featureMigrationArg{})),
		Flags: featureGet | featureMigration,
	}}
	_, err := ioctl(dev, reqDeviceFeature, unsafe.Pointer(&arg))
	return arg.Mig.Flags, err
}

// deviceGetMigState issues VFIO_DEVICE_FEATURE GET MIG_DEVICE_STATE.
func deviceGetMigState(dev *fdOwner) (uint32, error) {
	arg := featureMigStateArg{
		Hdr: vfioDeviceFeature{
			Argsz: uint32(unsafe.Sizeof(featureMigStateArg{})),
			Flags: featureGet | featureMigDeviceState,
		},
		State: vfioDeviceFeatureMigState{DataFD: -1},
	}
	_, err := ioctl(dev, reqDeviceFeature, unsafe.Pointer(&arg))
	return arg.State.DeviceState, err
}

// deviceSetMigState issues VFIO_DEVICE_FEATURE SET MIG_DEVICE_STATE. The
// kernel walks every arc to state itself; when the last arc opens a data
// stream its new fd (O_CLOEXEC, owned by the caller) is returned, else -1.
func deviceSetMigState(dev *fdOwner, state uint32) (int, error) {
	arg := featureMigStateArg{
		Hdr: vfioDeviceFeature{
			Argsz: uint32(unsafe.Sizeof(featureMigStateArg{})),
			Flags: featureSet | featureMigDeviceState,
		},
		State: vfioDeviceFeatureMigState{DeviceState: state, DataFD: -1},
	}
	if _, err := ioctl(dev, reqDeviceFeature, unsafe.Pointer(&arg)); err != nil {
		// The kernel copies the struct back with data_fd = -1 and the
		// requested state; neither says anything about the device.
		return -1, err
	}
	return int(arg.State.DataFD), nil
}

// deviceGetMigDataSize issues VFIO_DEVICE_FEATURE GET MIG_DATA_SIZE (6.2+).
func deviceGetMigDataSize(dev *fdOwner) (uint64, error) {
	arg := featureMigDataSizeArg{Hdr: vfioDeviceFeature{
		Argsz: uint32(unsafe.Sizeof(featureMigDataSizeArg{})),
		Flags: featureGet | featureMigDataSize,
	}}
	_, err := ioctl(dev, reqDeviceFeature, unsafe.Pointer(&arg))
	return arg.Size.StopCopyLength, err
}

// deviceSetPrecopyInfoV2 issues VFIO_DEVICE_FEATURE SET
// MIG_PRECOPY_INFOv2, which carries no payload: the header alone. Kernels
// without the feature answer ENOTTY or EINVAL.
func deviceSetPrecopyInfoV2(dev *fdOwner) error {
	hdr := vfioDeviceFeature{
		Argsz: uint32(unsafe.Sizeof(vfioDeviceFeature{})),
		Flags: featureSet | featureMigPrecopyInfoV2,
	}
	_, err := ioctl(dev, reqDeviceFeature, unsafe.Pointer(&hdr))
	return err
}

// migGetPrecopyInfo issues VFIO_MIG_GET_PRECOPY_INFO on a data_fd (6.2+).
func migGetPrecopyInfo(dataFD uintptr) (vfioPrecopyInfo, error) {
	info := vfioPrecopyInfo{Argsz: uint32(unsafe.Sizeof(vfioPrecopyInfo{}))}
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, dataFD, reqMigGetPrecopyInfo, uintptr(unsafe.Pointer(&info)))
	if errno != 0 {
		return info, wrappedErrno{errno}
	}
	return info, nil
}

// deviceBindIOMMUFD issues VFIO_DEVICE_BIND_IOMMUFD on a vfio cdev.
func deviceBindIOMMUFD(dev, iommufd *fdOwner) (uint32, error) {
	arg := vfioDeviceBindIOMMUFD{
		Argsz:   uint32(unsafe.Sizeof(vfioDeviceBindIOMMUFD{})),
		IOMMUFD: int32(iommufd.raw()),
	}
	_, err := ioctl(dev, reqDeviceBindIOMMUFD, unsafe.Pointer(&arg))
	runtime.KeepAlive(iommufd)
	return arg.OutDevID, err
}

// ioasAlloc issues IOMMU_IOAS_ALLOC on an iommufd: a new, empty I/O
// address space.
func ioasAlloc(iommufd *fdOwner) (uint32, error) {
	arg := iommuIOASAlloc{Size: uint32(unsafe.Sizeof(iommuIOASAlloc{}))}
	_, err := ioctl(iommufd, reqIOMMUIOASAlloc, unsafe.Pointer(&arg))
	return arg.OutIOASID, err
}

// deviceAttachIOMMUFDPt issues VFIO_DEVICE_ATTACH_IOMMUFD_PT: attach a
// bound cdev to an IOAS (or page table) id.
func deviceAttachIOMMUFDPt(dev *fdOwner, id uint32) error {
	arg := vfioDeviceAttachIOMMUFDPt{
		Argsz: uint32(unsafe.Sizeof(vfioDeviceAttachIOMMUFDPt{})),
		PtID:  id,
	}
	_, err := ioctl(dev, reqDeviceAttachIOMMUFDPt, unsafe.Pointer(&arg))
	return err
}

// fdOwner owns one file descriptor. Close is idempotent, and a descriptor
// whose owner is dropped without Close is closed by a cleanup, so a leak
// costs a descriptor only until the next garbage collection. It is not
// safe for concurrent use with Close; kernelDevice serialises it.
type fdOwner struct {
	fd      int
	cleanup runtime.Cleanup
}

// newFDOwner takes ownership of fd.
func newFDOwner(fd int) *fdOwner {
	o := &fdOwner{fd: fd}
	o.cleanup = runtime.AddCleanup(o, func(fd int) { _ = unix.Close(fd) }, fd)
	return o
}

// openFD opens path (with O_CLOEXEC added) and owns the descriptor.
func openFD(path string, flags int) (*fdOwner, error) {
	fd, err := unix.Open(path, flags|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, errnoErr(err))
	}
	return newFDOwner(fd), nil
}

// raw is the descriptor, -1 once closed. Callers that pass it to a system
// call keep the owner alive until the call returns (runtime.KeepAlive).
func (o *fdOwner) raw() int {
	if o == nil {
		return -1
	}
	return o.fd
}

// Close closes the descriptor; closing again, or a nil owner, does nothing.
func (o *fdOwner) Close() error {
	if o == nil || o.fd < 0 {
		return nil
	}
	fd := o.fd
	o.fd = -1
	o.cleanup.Stop()
	return errnoErr(unix.Close(fd))
}
