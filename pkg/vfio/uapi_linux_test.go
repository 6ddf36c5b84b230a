//go:build linux

package vfio

import (
	"testing"
	"unsafe"
)

// TestIoctlNumbers pins every request number to the values the kernel's
// include/uapi/linux/vfio.h (and iommufd.h) define, as amd64 and arm64
// compute them; other architectures add their _IOC_NONE direction bits.
func TestIoctlNumbers(t *testing.T) {
	for _, tc := range []struct {
		name string
		got  uintptr
		want uintptr
	}{
		{"VFIO_GET_API_VERSION", reqGetAPIVersion, 0x3B64},
		{"VFIO_CHECK_EXTENSION", reqCheckExtension, 0x3B65},
		{"VFIO_SET_IOMMU", reqSetIOMMU, 0x3B66},
		{"VFIO_GROUP_GET_STATUS", reqGroupGetStatus, 0x3B67},
		{"VFIO_GROUP_SET_CONTAINER", reqGroupSetContainer, 0x3B68},
		{"VFIO_GROUP_GET_DEVICE_FD", reqGroupGetDeviceFD, 0x3B6A},
		{"VFIO_DEVICE_GET_INFO", reqDeviceGetInfo, 0x3B6B},
		{"VFIO_DEVICE_RESET", reqDeviceReset, 0x3B6F},
		{"VFIO_DEVICE_FEATURE", reqDeviceFeature, 0x3B75},
		{"VFIO_DEVICE_BIND_IOMMUFD", reqDeviceBindIOMMUFD, 0x3B76},
		{"VFIO_DEVICE_ATTACH_IOMMUFD_PT", reqDeviceAttachIOMMUFDPt, 0x3B77},
		{"VFIO_MIG_GET_PRECOPY_INFO", reqMigGetPrecopyInfo, 0x3B79},
		{"IOMMU_IOAS_ALLOC", reqIOMMUIOASAlloc, 0x3B81},
	} {
		if want := tc.want | iocDirNone; tc.got != want {
			t.Errorf("%s = %#x, want %#x", tc.name, tc.got, want)
		}
	}
}

// TestUAPIConstants pins flag and index values to vfio-uapi.md §2.1 and §3.
func TestUAPIConstants(t *testing.T) {
	for _, tc := range []struct {
		name      string
		got, want uint64
	}{
		{"VFIO_API_VERSION", vfioAPIVersion, 0},
		{"VFIO_GROUP_FLAGS_VIABLE", vfioGroupFlagsViable, 1},
		{"VFIO_GROUP_FLAGS_CONTAINER_SET", vfioGroupFlagsContainerSet, 2},
		{"VFIO_TYPE1_IOMMU", vfioType1IOMMU, 1},
		{"VFIO_TYPE1v2_IOMMU", vfioType1v2IOMMU, 3},
		{"VFIO_NOIOMMU_IOMMU", vfioNoIOMMU, 8},
		{"VFIO_DEVICE_FEATURE_MASK", featureMask, 0xffff},
		{"VFIO_DEVICE_FEATURE_GET", featureGet, 0x10000},
		{"VFIO_DEVICE_FEATURE_SET", featureSet, 0x20000},
		{"VFIO_DEVICE_FEATURE_PROBE", featureProbe, 0x40000},
		{"VFIO_DEVICE_FEATURE_MIGRATION", featureMigration, 1},
		{"VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE", featureMigDeviceState, 2},
		{"VFIO_DEVICE_FEATURE_MIG_DATA_SIZE", featureMigDataSize, 9},
		// §3.2's concrete buffers.
		{"GET MIGRATION flags", featureGet | featureMigration, 0x10001},
		{"GET MIG_DEVICE_STATE flags", featureGet | featureMigDeviceState, 0x10002},
		{"SET MIG_DEVICE_STATE flags", featureSet | featureMigDeviceState, 0x20002},
		{"GET MIG_DATA_SIZE flags", featureGet | featureMigDataSize, 0x10009},
		{"VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2", featureMigPrecopyInfoV2, 12},
		{"SET MIG_PRECOPY_INFOv2 flags", featureSet | featureMigPrecopyInfoV2, 0x2000c},
		{"VFIO_PRECOPY_INFO_REINIT", vfioPrecopyInfoReinit, 1},
	} {
		if tc.got != tc.want {
			t.Errorf("%s = %#x, want %#x", tc.name, tc.got, tc.want)
		}
	}
}

// TestUAPILayout pins the size of every mirrored struct and the offset of
// every field to the C layouts in vfio-uapi.md (§2.1, §2.2, §3).
func TestUAPILayout(t *testing.T) {
	type field struct {
		name   string
		offset uintptr
		want   uintptr
	}
	for _, tc := range []struct {
		name   string
		size   uintptr
		want   uintptr
		fields []field
	}{
		{"vfio_group_status", unsafe.Sizeof(vfioGroupStatus{}), 8, []field{
			{"argsz", unsafe.Offsetof(vfioGroupStatus{}.Argsz), 0},
			{"flags", unsafe.Offsetof(vfioGroupStatus{}.Flags), 4},
		}},
		{"vfio_device_info", unsafe.Sizeof(vfioDeviceInfo{}), 24, []field{
			{"argsz", unsafe.Offsetof(vfioDeviceInfo{}.Argsz), 0},
			{"flags", unsafe.Offsetof(vfioDeviceInfo{}.Flags), 4},
			{"num_regions", unsafe.Offsetof(vfioDeviceInfo{}.NumRegions), 8},
			{"num_irqs", unsafe.Offsetof(vfioDeviceInfo{}.NumIRQs), 12},
			{"cap_offset", unsafe.Offsetof(vfioDeviceInfo{}.CapOffset), 16},
		}},
		{"vfio_device_feature", unsafe.Sizeof(vfioDeviceFeature{}), 8, []field{
			{"argsz", unsafe.Offsetof(vfioDeviceFeature{}.Argsz), 0},
			{"flags", unsafe.Offsetof(vfioDeviceFeature{}.Flags), 4},
		}},
		{"vfio_device_feature_migration", unsafe.Sizeof(vfioDeviceFeatureMigration{}), 8, []field{
			{"flags", unsafe.Offsetof(vfioDeviceFeatureMigration{}.Flags), 0},
		}},
		{"vfio_device_feature_mig_state", unsafe.Sizeof(vfioDeviceFeatureMigState{}), 8, []field{
			{"device_state", unsafe.Offsetof(vfioDeviceFeatureMigState{}.DeviceState), 0},
			{"data_fd", unsafe.Offsetof(vfioDeviceFeatureMigState{}.DataFD), 4},
		}},
		{"vfio_device_feature_mig_data_size", unsafe.Sizeof(vfioDeviceFeatureMigDataSize{}), 8, []field{
			{"stop_copy_length", unsafe.Offsetof(vfioDeviceFeatureMigDataSize{}.StopCopyLength), 0},
		}},
		// §3.2: "Query migration caps: argsz 16, read u64 at offset 8".
		{"feature + migration", unsafe.Sizeof(featureMigrationArg{}), 16, []field{
			{"flags", unsafe.Offsetof(featureMigrationArg{}.Mig), 8},
		}},
		// §3.2: "device_state at offset 8, data_fd at offset 12".
		{"feature + mig_state", unsafe.Sizeof(featureMigStateArg{}), 16, []field{
			{"device_state", unsafe.Offsetof(featureMigStateArg{}.State) + unsafe.Offsetof(vfioDeviceFeatureMigState{}.DeviceState), 8},
			{"data_fd", unsafe.Offsetof(featureMigStateArg{}.State) + unsafe.Offsetof(vfioDeviceFeatureMigState{}.DataFD), 12},
		}},
		// §3.2: "Data size (6.2+): argsz 16, u64 at 8".
		{"feature + mig_data_size", unsafe.Sizeof(featureMigDataSizeArg{}), 16, []field{
			{"stop_copy_length", unsafe.Offsetof(featureMigDataSizeArg{}.Size), 8},
		}},
		{"vfio_precopy_info", unsafe.Sizeof(vfioPrecopyInfo{}), 24, []field{
			{"argsz", unsafe.Offsetof(vfioPrecopyInfo{}.Argsz), 0},
			{"flags", unsafe.Offsetof(vfioPrecopyInfo{}.Flags), 4},
			{"initial_bytes", unsafe.Offsetof(vfioPrecopyInfo{}.InitialBytes), 8},
			{"dirty_bytes", unsafe.Offsetof(vfioPrecopyInfo{}.DirtyBytes), 16},
		}},
		{"vfio_device_bind_iommufd", unsafe.Sizeof(vfioDeviceBindIOMMUFD{}), 16, []field{
			{"argsz", unsafe.Offsetof(vfioDeviceBindIOMMUFD{}.Argsz), 0},
			{"flags", unsafe.Offsetof(vfioDeviceBindIOMMUFD{}.Flags), 4},
			{"iommufd", unsafe.Offsetof(vfioDeviceBindIOMMUFD{}.IOMMUFD), 8},
			{"out_devid", unsafe.Offsetof(vfioDeviceBindIOMMUFD{}.OutDevID), 12},
		}},
		{"vfio_device_attach_iommufd_pt", unsafe.Sizeof(vfioDeviceAttachIOMMUFDPt{}), 12, []field{
			{"argsz", unsafe.Offsetof(vfioDeviceAttachIOMMUFDPt{}.Argsz), 0},
			{"flags", unsafe.Offsetof(vfioDeviceAttachIOMMUFDPt{}.Flags), 4},
			{"pt_id", unsafe.Offsetof(vfioDeviceAttachIOMMUFDPt{}.PtID), 8},
		}},
		{"iommu_ioas_alloc", unsafe.Sizeof(iommuIOASAlloc{}), 12, []field{
			{"size", unsafe.Offsetof(iommuIOASAlloc{}.Size), 0},
			{"flags", unsafe.Offsetof(iommuIOASAlloc{}.Flags), 4},
			{"out_ioas_id", unsafe.Offsetof(iommuIOASAlloc{}.OutIOASID), 8},
		}},
	} {
		if tc.size != tc.want {
			t.Errorf("sizeof(%s) = %d, want %d", tc.name, tc.size, tc.want)
		}
		for _, f := range tc.fields {
			if f.offset != f.want {
				t.Errorf("offsetof(%s.%s) = %d, want %d", tc.name, f.name, f.offset, f.want)
			}
		}
	}
}
