package wire

import (
	"errors"
	"io/fs"

	"google.golang.org/grpc/codes"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/vfio"
)

// DeviceError translates an error from pkg/vfio into a status error whose
// message names the device spec and the operation.
func DeviceError(spec, op string, err error) error {
	code, reason := codes.FailedPrecondition, ReasonDeviceState
	switch {
	case errors.Is(err, vfio.ErrBadSpec):
		code, reason = codes.InvalidArgument, ReasonInvalidArgument
	case errors.Is(err, vfio.ErrNotAllowed):
		code, reason = codes.PermissionDenied, ReasonDeviceNotAllowed
	case errors.Is(err, vfio.ErrBusy):
		code, reason = codes.FailedPrecondition, ReasonDeviceBusy
	case errors.Is(err, vfio.ErrNotSupported):
		code, reason = codes.FailedPrecondition, ReasonDeviceUnsupported
	case errors.Is(err, vfio.ErrVerify):
		code, reason = codes.DataLoss, ReasonVerifyFailed
	case errors.Is(err, vfio.ErrInjectedFault):
		code, reason = codes.Internal, ReasonSourceDeviceFailed
	case errors.Is(err, fs.ErrNotExist):
		code, reason = codes.NotFound, ReasonDeviceNotFound
	}
	return Errorf(code, reason, "device %s: %s: %v", spec, op, err)
}

// DeviceStateToProto converts a kernel state (ERROR = 0) to the API's enum
// (ERROR = 1, UNSPECIFIED = 0).
func DeviceStateToProto(s vfio.State) ferryv1.DeviceState {
	if s > vfio.StatePreCopyP2P {
		return ferryv1.DeviceState_DEVICE_STATE_UNSPECIFIED
	}
	return ferryv1.DeviceState(s + 1)
}

// DeviceInfoToProto converts a registry entry.
func DeviceInfoToProto(d vfio.DeviceInfo) *ferryv1.Device {
	return &ferryv1.Device{
		Spec:                d.Spec,
		MigrationFlags:      uint64(d.Flags),
		MigrationFlagsText:  d.Flags.String(),
		State:               DeviceStateToProto(d.State),
		Owner:               d.Owner,
		EstimatedStateBytes: d.DataSize,
	}
}

// ListDevices answers ListDevices: the devices the registry holds (the
// simulated ones among them), then the host's VFIO devices found in sysfs
// that it has not opened yet and that its allowlist admits, each probed for
// its migration flags. A device that cannot be opened now (a VMM holds its
// group) is listed without them. Devices outside the allowlist are neither
// opened nor listed.
func ListDevices(r *vfio.Registry) *ferryv1.ListDevicesResponse {
	infos := r.List()
	out := &ferryv1.ListDevicesResponse{Devices: make([]*ferryv1.Device, 0, len(infos))}
	known := make(map[string]bool, len(infos))
	for _, d := range infos {
		known[d.Spec] = true
		out.Devices = append(out.Devices, DeviceInfoToProto(d))
	}
	host, err := vfio.ListKernelDevices()
	if err != nil {
		return out
	}
	for _, s := range host {
		if known[s.String()] || r.Allowed(s) != nil {
			continue
		}
		out.Devices = append(out.Devices, probe(s))
	}
	return out
}

// probe opens a host device briefly to read its migration flags and state.
func probe(s vfio.Spec) *ferryv1.Device {
	d := &ferryv1.Device{Spec: s.String()}
	dev, err := vfio.Open(s)
	if err != nil {
		return d
	}
	defer dev.Close()
	d.MigrationFlags, d.MigrationFlagsText = uint64(dev.Flags()), dev.Flags().String()
	if st, err := dev.State(); err == nil {
		d.State = DeviceStateToProto(st)
	}
	if n, err := dev.DataSize(); err == nil {
		d.EstimatedStateBytes = n
	}
	return d
}

// CanonicalSpec parses a device spec and returns its canonical form, or an
// INVALID_ARGUMENT error.
func CanonicalSpec(spec string) (string, error) {
	if err := ValidateSpecLength(spec); err != nil {
		return "", err
	}
	s, err := vfio.ParseSpec(spec)
	if err != nil {
		return "", Errorf(codes.InvalidArgument, ReasonInvalidArgument, "device spec %q: %v", spec, err)
	}
	return s.String(), nil
}
