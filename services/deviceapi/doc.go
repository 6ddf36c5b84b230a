// Package deviceapi is a VFIO device as both agents show it at their gRPC
// edge: the conversions from pkg/vfio to the API's messages, and back from
// its errors to statuses.
//
// [List] answers ListDevices from a vfio.Registry without opening or
// waiting on any device: the devices the registry holds with their state
// as last read or set (stuck or not), then the idle host devices its
// allowlist admits, by spec alone. [ToProto] and [StateToProto] convert a
// registry entry and a kernel state (the API's enum counts from ERROR = 1).
// [Error] translates a pkg/vfio error into a status with the code and
// ErrorInfo reason of its kind (DEVICE_STUCK, DEVICE_BUSY,
// DEVICE_NOT_ALLOWED, ...), naming the device and the operation.
// [CanonicalSpec] parses a spec a client sent into its canonical form, or
// refuses it with INVALID_ARGUMENT.
package deviceapi
