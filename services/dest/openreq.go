package dest

import (
	"crypto/subtle"
	"time"

	"google.golang.org/grpc/codes"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/flow"
	"github.com/vfio-ferry/ferry/services/chunkwire"
	"github.com/vfio-ferry/ferry/services/deviceapi"
	"github.com/vfio-ferry/ferry/services/wire"
)

// prepared is what Open checks an OpenRequest against: what
// PrepareIncoming fixed. None of it changes once the migration is
// registered.
type prepared struct {
	id      string
	token   string
	expires time.Time
	devices []string // canonical specs, in order
	limits  flow.Limits
}

func (inc *incoming) prepared() prepared {
	p := prepared{id: inc.id, token: inc.token, expires: inc.tokenTTL, limits: inc.limits, devices: make([]string, len(inc.devs))}
	for i, d := range inc.devs {
		p.devices[i] = d.spec
	}
	return p
}

// openParams is what a valid OpenRequest asks for.
type openParams struct {
	chunkSize uint32
	channels  uint32
}

// checkToken refuses a token that is not want, the token of incoming
// migration id, comparing in constant time: PERMISSION_DENIED, BAD_TOKEN.
func checkToken(token, want, id string) error {
	if len(token) > wire.MaxTokenLength || subtle.ConstantTimeCompare([]byte(token), []byte(want)) != 1 {
		return wire.Errorf(codes.PermissionDenied, wire.ReasonBadToken, "wrong token for incoming migration %s", id)
	}
	return nil
}

// validateOpen checks an OpenRequest against the prepared migration at
// time now, before anything is allocated for it. The token is checked
// first, in constant time, so a caller without it learns nothing else;
// a token is refused from its expiry time on. Every error is a status with
// an ErrorInfo reason.
func validateOpen(req *ferryv1.OpenRequest, p prepared, now time.Time) (openParams, error) {
	if err := checkToken(req.GetToken(), p.token, p.id); err != nil {
		return openParams{}, err
	}
	if !now.Before(p.expires) {
		return openParams{}, wire.Errorf(codes.PermissionDenied, wire.ReasonBadToken, "the token of incoming migration %s expired", p.id)
	}
	chunkSize, err := wire.ChunkSize(req.GetChunkSize())
	if err != nil {
		return openParams{}, err
	}
	if err := p.limits.Validate(chunkSize); err != nil {
		return openParams{}, wire.Errorf(codes.InvalidArgument, wire.ReasonInvalidArgument, "chunk_size %d does not fit the window: %v", chunkSize, err)
	}
	channels, err := wire.Channels(req.GetChannels())
	if err != nil {
		return openParams{}, err
	}
	switch req.GetMode() {
	case ferryv1.MigrationMode_MIGRATION_MODE_UNSPECIFIED, ferryv1.MigrationMode_MIGRATION_MODE_STOP_COPY,
		ferryv1.MigrationMode_MIGRATION_MODE_PRECOPY:
		// Pre-copy chunks are the device's stream like any: the
		// destination writes them in order as they come.
	default:
		return openParams{}, wire.Errorf(codes.InvalidArgument, wire.ReasonInvalidArgument, "unknown mode %d", req.GetMode())
	}
	if len(req.GetDevices()) != len(p.devices) {
		return openParams{}, wire.Errorf(codes.InvalidArgument, wire.ReasonSpecMismatch, "the session names %d devices, %d were prepared", len(req.GetDevices()), len(p.devices))
	}
	for i, raw := range req.GetDevices() {
		spec, err := deviceapi.CanonicalSpec(raw)
		if err != nil {
			return openParams{}, err
		}
		if spec != p.devices[i] {
			return openParams{}, wire.Errorf(codes.InvalidArgument, wire.ReasonSpecMismatch, "device %d is %s, %s was prepared", i, spec, p.devices[i])
		}
	}
	if len(req.GetSourceDevices()) > wire.MaxDevices {
		return openParams{}, wire.Errorf(codes.InvalidArgument, wire.ReasonInvalidArgument, "too many source devices")
	}
	for _, s := range req.GetSourceDevices() {
		if err := wire.ValidateSpecLength(s); err != nil {
			return openParams{}, err
		}
	}
	if _, err := chunkwire.NewDigest(req.GetDigest()); err != nil {
		return openParams{}, wire.Errorf(codes.InvalidArgument, wire.ReasonInvalidArgument, "%v", err)
	}
	return openParams{chunkSize: chunkSize, channels: channels}, nil
}
