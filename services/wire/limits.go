package wire

import (
	"google.golang.org/grpc/codes"
)

// Limits every agent enforces on what a peer or a control plane asks for.
// They are checked before anything is allocated for a request.
const (
	// DefaultChunkSize is the chunk size when a request gives none. 256 KiB
	// to 1 MiB messages are where gRPC costs least per byte; 64 KiB costs
	// 10-40% more, 4 MiB a little more at 4 channels and above.
	DefaultChunkSize = 1 << 20
	// MinChunkSize and MaxChunkSize bound the chunk size.
	MinChunkSize = 4 << 10
	MaxChunkSize = 16 << 20
	// DefaultChannels is the channel count when a request gives none.
	DefaultChannels = 4
	// MaxChannels bounds the channels of one session.
	MaxChannels = 64
	// MaxDevices bounds the device streams of one migration.
	MaxDevices = 64
	// MaxIDLength bounds migration ids.
	MaxIDLength = 128
	// MaxSpecLength bounds device specs.
	MaxSpecLength = 512
	// MaxTokenLength bounds tokens and session ids.
	MaxTokenLength = 128
	// MaxDigestLength bounds an END chunk's digest.
	MaxDigestLength = 64
	// MaxRecvMsgSize is the largest message an agent accepts: a chunk of
	// MaxChunkSize and its header. gRPC's default of 4 MiB would refuse
	// larger chunks with RESOURCE_EXHAUSTED.
	MaxRecvMsgSize = MaxChunkSize + 64<<10
)

// ValidateID checks a migration id: 1 to MaxIDLength characters of
// [A-Za-z0-9._-].
func ValidateID(id string) error {
	if id == "" || len(id) > MaxIDLength {
		return Errorf(codes.InvalidArgument, ReasonInvalidArgument, "migration_id must be 1 to %d characters, got %d", MaxIDLength, len(id))
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			return Errorf(codes.InvalidArgument, ReasonInvalidArgument, "migration_id %q: character %q is not one of [A-Za-z0-9._-]", id, c)
		}
	}
	return nil
}

// ValidateDeviceCount checks the number of device streams.
func ValidateDeviceCount(n int) error {
	if n < 1 || n > MaxDevices {
		return Errorf(codes.InvalidArgument, ReasonInvalidArgument, "a migration has 1 to %d devices, got %d", MaxDevices, n)
	}
	return nil
}

// ValidateSpecLength checks one device spec's length before it is parsed.
func ValidateSpecLength(spec string) error {
	if spec == "" || len(spec) > MaxSpecLength {
		return Errorf(codes.InvalidArgument, ReasonInvalidArgument, "device spec must be 1 to %d characters, got %d", MaxSpecLength, len(spec))
	}
	return nil
}

// Channels returns the channel count a request asks for (0 means
// DefaultChannels) or an INVALID_ARGUMENT error.
func Channels(n uint32) (uint32, error) {
	if n == 0 {
		return DefaultChannels, nil
	}
	if n > MaxChannels {
		return 0, Errorf(codes.InvalidArgument, ReasonInvalidArgument, "channels must be 1 to %d, got %d", MaxChannels, n)
	}
	return n, nil
}

// ChunkSize returns the chunk size a request asks for (0 means
// DefaultChunkSize) or an INVALID_ARGUMENT error.
func ChunkSize(n uint32) (uint32, error) {
	if n == 0 {
		return DefaultChunkSize, nil
	}
	if n < MinChunkSize || n > MaxChunkSize {
		return 0, Errorf(codes.InvalidArgument, ReasonInvalidArgument, "chunk_size must be %d to %d bytes, got %d", MinChunkSize, MaxChunkSize, n)
	}
	return n, nil
}
