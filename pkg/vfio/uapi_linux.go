//go:build linux

package vfio

import "structs"

// This file mirrors the parts of the kernel's VFIO (include/uapi/linux/vfio.h)
// and iommufd (include/uapi/linux/iommufd.h) uAPI that the Linux backend
// uses. Every struct is laid out exactly as its C original, named in its
// doc comment; uapi_linux_test.go pins sizes, offsets and request numbers
// to the values of the kernel's headers, upstream at
// https://git.kernel.org/pub/scm/linux/kernel/git/torvalds/linux.git/tree/include/uapi/linux/vfio.h
// and .../include/uapi/linux/iommufd.h.

// Ioctl request numbers. Every VFIO and iommufd ioctl is _IO(';', nr): no
// size bits, the argument size travels in each struct's argsz. iocDirNone is
// the architecture's _IOC_NONE direction, already shifted: 0 on amd64 and
// arm64, where the request is simply 0x3B00 | nr.
const (
	vfioType = ';' // VFIO_TYPE, also IOMMUFD_TYPE
	vfioBase = 100 // VFIO_BASE

	// Container (/dev/vfio/vfio).
	reqGetAPIVersion  = iocDirNone | vfioType<<8 | (vfioBase + 0) // VFIO_GET_API_VERSION
	reqCheckExtension = iocDirNone | vfioType<<8 | (vfioBase + 1) // VFIO_CHECK_EXTENSION
	reqSetIOMMU       = iocDirNone | vfioType<<8 | (vfioBase + 2) // VFIO_SET_IOMMU

	// Group (/dev/vfio/N).
	reqGroupGetStatus    = iocDirNone | vfioType<<8 | (vfioBase + 3) // VFIO_GROUP_GET_STATUS
	reqGroupSetContainer = iocDirNone | vfioType<<8 | (vfioBase + 4) // VFIO_GROUP_SET_CONTAINER
	reqGroupGetDeviceFD  = iocDirNone | vfioType<<8 | (vfioBase + 6) // VFIO_GROUP_GET_DEVICE_FD

	// Device.
	reqDeviceGetInfo         = iocDirNone | vfioType<<8 | (vfioBase + 7)  // VFIO_DEVICE_GET_INFO
	reqDeviceReset           = iocDirNone | vfioType<<8 | (vfioBase + 11) // VFIO_DEVICE_RESET
	reqDeviceFeature         = iocDirNone | vfioType<<8 | (vfioBase + 17) // VFIO_DEVICE_FEATURE
	reqDeviceBindIOMMUFD     = iocDirNone | vfioType<<8 | (vfioBase + 18) // VFIO_DEVICE_BIND_IOMMUFD
	reqDeviceAttachIOMMUFDPt = iocDirNone | vfioType<<8 | (vfioBase + 19) // VFIO_DEVICE_ATTACH_IOMMUFD_PT
	reqMigGetPrecopyInfo     = iocDirNone | vfioType<<8 | (vfioBase + 21) // VFIO_MIG_GET_PRECOPY_INFO, on the data_fd
	reqIOMMUIOASAlloc        = iocDirNone | vfioType<<8 | 0x81            // IOMMU_IOAS_ALLOC
)

const (
	vfioAPIVersion = 0 // VFIO_API_VERSION

	vfioGroupFlagsViable       = 1 << 0 // VFIO_GROUP_FLAGS_VIABLE
	vfioGroupFlagsContainerSet = 1 << 1 // VFIO_GROUP_FLAGS_CONTAINER_SET
)

// IOMMU types and extensions (VFIO_CHECK_EXTENSION, VFIO_SET_IOMMU).
const (
	vfioType1IOMMU   = 1 // VFIO_TYPE1_IOMMU
	vfioType1v2IOMMU = 3 // VFIO_TYPE1v2_IOMMU
	vfioNoIOMMU      = 8 // VFIO_NOIOMMU_IOMMU
)

// VFIO_DEVICE_FEATURE flags and feature indexes.
const (
	featureMask  = 0xffff  // VFIO_DEVICE_FEATURE_MASK
	featureGet   = 1 << 16 // VFIO_DEVICE_FEATURE_GET
	featureSet   = 1 << 17 // VFIO_DEVICE_FEATURE_SET
	featureProbe = 1 << 18 // VFIO_DEVICE_FEATURE_PROBE

	featureMigration      = 1 // VFIO_DEVICE_FEATURE_MIGRATION
	featureMigDeviceState = 2 // VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE
	featureMigDataSize    = 9 // VFIO_DEVICE_FEATURE_MIG_DATA_SIZE (6.2+)
	// VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2 (2026): a SET with no payload
	// opts in to vfio_precopy_info.flags as an output field.
	featureMigPrecopyInfoV2 = 12
)

// vfio_precopy_info.flags bits, valid only after the PRECOPY_INFOv2 opt-in
// (before it drivers echo the caller's flags back).
const vfioPrecopyInfoReinit = 1 << 0 // VFIO_PRECOPY_INFO_REINIT

// vfioGroupStatus is struct vfio_group_status (VFIO_GROUP_GET_STATUS).
type vfioGroupStatus struct {
	_     structs.HostLayout
	Argsz uint32
	Flags uint32 // vfioGroupFlags*
}

// vfioDeviceInfo is struct vfio_device_info (VFIO_DEVICE_GET_INFO).
type vfioDeviceInfo struct {
	_          structs.HostLayout
	Argsz      uint32
	Flags      uint32 // VFIO_DEVICE_FLAGS_*
	NumRegions uint32
	NumIRQs    uint32
	CapOffset  uint32 // offset within info struct of the first capability
	_          uint32 // pad
}

// vfioDeviceFeature is struct vfio_device_feature: the header of every
// VFIO_DEVICE_FEATURE argument. The C struct ends in a flexible array
// member, data[]; here each feature has its own struct that starts with
// this header and continues with the feature's payload.
type vfioDeviceFeature struct {
	_     structs.HostLayout
	Argsz uint32 // header plus payload
	Flags uint32 // feature index | featureGet/Set/Probe
}

// vfioDeviceFeatureMigration is struct vfio_device_feature_migration.
type vfioDeviceFeatureMigration struct {
	_     structs.HostLayout
	Flags uint64 // VFIO_MIGRATION_*; __aligned_u64
}

// vfioDeviceFeatureMigState is struct vfio_device_feature_mig_state.
type vfioDeviceFeatureMigState struct {
	_           structs.HostLayout
	DeviceState uint32 // enum vfio_device_mig_state
	DataFD      int32  // set by the kernel: a new data_fd or -1
}

// vfioDeviceFeatureMigDataSize is struct vfio_device_feature_mig_data_size
// (6.2+).
type vfioDeviceFeatureMigDataSize struct {
	_              structs.HostLayout
	StopCopyLength uint64 // __aligned_u64
}

// featureMigrationArg is the VFIO_DEVICE_FEATURE argument for
// VFIO_DEVICE_FEATURE_MIGRATION: header plus payload.
type featureMigrationArg struct {
	_   structs.HostLayout
	Hdr vfioDeviceFeature
	Mig vfioDeviceFeatureMigration
}

// featureMigStateArg is the VFIO_DEVICE_FEATURE argument for
// VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE.
type featureMigStateArg struct {
	_     structs.HostLayout
	Hdr   vfioDeviceFeature
	State vfioDeviceFeatureMigState
}

// featureMigDataSizeArg is the VFIO_DEVICE_FEATURE argument for
// VFIO_DEVICE_FEATURE_MIG_DATA_SIZE.
type featureMigDataSizeArg struct {
	_    structs.HostLayout
	Hdr  vfioDeviceFeature
	Size vfioDeviceFeatureMigDataSize
}

// vfioPrecopyInfo is struct vfio_precopy_info (VFIO_MIG_GET_PRECOPY_INFO,
// 6.2+).
type vfioPrecopyInfo struct {
	_            structs.HostLayout
	Argsz        uint32
	Flags        uint32
	InitialBytes uint64 // __aligned_u64
	DirtyBytes   uint64 // __aligned_u64
}

// vfioDeviceBindIOMMUFD is struct vfio_device_bind_iommufd in its original
// 16-byte form (6.6); later kernels append a token pointer and accept the
// short form because of argsz.
type vfioDeviceBindIOMMUFD struct {
	_        structs.HostLayout
	Argsz    uint32
	Flags    uint32
	IOMMUFD  int32
	OutDevID uint32 // set by the kernel
}

// vfioDeviceAttachIOMMUFDPt is struct vfio_device_attach_iommufd_pt in its
// original 12-byte form (6.6); later kernels append a pasid.
type vfioDeviceAttachIOMMUFDPt struct {
	_     structs.HostLayout
	Argsz uint32
	Flags uint32
	PtID  uint32 // in: the IOAS; out: the hardware page table used
}

// iommuIOASAlloc is struct iommu_ioas_alloc (IOMMU_IOAS_ALLOC).
type iommuIOASAlloc struct {
	_         structs.HostLayout
	Size      uint32
	Flags     uint32
	OutIOASID uint32 // set by the kernel
}
