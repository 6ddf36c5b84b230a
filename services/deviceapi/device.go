package deviceapi

import (
	"errors"
	"github.com/vfio-ferry/ferry/services/wire"
	"io/fs"

	"google.golang.org/grpc/codes"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/internal/buildinfo"
	"github.com/vfio-ferry/ferry/pkg/vfio"
)

// Error translates an error from pkg/vfio into a status error whose
// message names the device spec and the operation.
func Error(spec, op string, err error) error {
	code, reason := codes.FailedPrecondition, wire.ReasonDeviceState
	switch {
	case errors.Is(err, vfio.ErrStuck):
		// Before ErrBusy: a device released while stuck wraps both.
		code, reason = codes.Unavailable, wire.ReasonDeviceStuck
	case errors.Is(err, vfio.ErrBadSpec):
		code, reason = codes.InvalidArgument, wire.ReasonInvalidArgument
	case errors.Is(err, vfio.ErrNotAllowed):
		code, reason = codes.PermissionDenied, wire.ReasonDeviceNotAllowed
	case errors.Is(err, vfio.ErrBusy):
		code, reason = codes.FailedPrecondition, wire.ReasonDeviceBusy
	case errors.Is(err, vfio.ErrNotSupported):
		code, reason = codes.FailedPrecondition, wire.ReasonDeviceUnsupported
	case errors.Is(err, vfio.ErrVerify):
		code, reason = codes.DataLoss, wire.ReasonVerifyFailed
	case errors.Is(err, vfio.ErrInjectedFault):
		code, reason = codes.Internal, wire.ReasonSourceDeviceFailed
	case errors.Is(err, fs.ErrNotExist):
		code, reason = codes.NotFound, wire.ReasonDeviceNotFound
	}
	return wire.Errorf(code, reason, "device %s: %s: %v", spec, op, err)
}

// StateToProto converts a kernel state (ERROR = 0) to the API's enum
// (ERROR = 1, UNSPECIFIED = 0).
func StateToProto(s vfio.State) ferryv1.DeviceState {
	if s > vfio.StatePreCopyP2P {
		return ferryv1.DeviceState_DEVICE_STATE_UNSPECIFIED
	}
	return ferryv1.DeviceState(s + 1)
}

// ToProto converts a registry entry. A host device the
// registry has not opened has unknown flags and state: 0 and UNSPECIFIED.
func ToProto(d vfio.DeviceInfo) *ferryv1.Device {
	out := &ferryv1.Device{
		Spec:  d.Spec,
		Owner: d.Owner,
		Stuck: d.Stuck,
		Error: d.Error,
		// sysfs reads only: listing touches no device.
		Description: DescriptionToProto(vfio.DescribeInfo(d)),
	}
	if d.Opened {
		out.MigrationFlags, out.MigrationFlagsText = uint64(d.Flags), d.Flags.String()
		out.State = StateToProto(d.State)
		out.EstimatedStateBytes = d.DataSize
	}
	return out
}

// List answers ListDevices: the devices the registry has open (the
// simulated ones among them) with their state as last read or set, stuck
// or not, then the host's VFIO devices found in sysfs that it has not
// opened and that its allowlist admits, with their spec alone. Listing
// opens no device (opening a vfio-pci function resets it, and races a
// VMM's open) and waits on none. Devices outside the allowlist are
// neither opened nor listed.
func List(r *vfio.Registry) *ferryv1.ListDevicesResponse {
	infos := r.ListAll()
	out := &ferryv1.ListDevicesResponse{Devices: make([]*ferryv1.Device, 0, len(infos)), AgentVersion: buildinfo.Read().Version}
	for _, d := range infos {
		out.Devices = append(out.Devices, ToProto(d))
	}
	return out
}

// CanonicalSpec parses a device spec and returns its canonical form, or an
// INVALID_ARGUMENT error.
func CanonicalSpec(spec string) (string, error) {
	if err := wire.ValidateSpecLength(spec); err != nil {
		return "", err
	}
	s, err := vfio.ParseSpec(spec)
	if err != nil {
		return "", wire.Errorf(codes.InvalidArgument, wire.ReasonInvalidArgument, "device spec %q: %v", spec, err)
	}
	return s.String(), nil
}
