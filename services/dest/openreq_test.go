package dest

import (
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/flow"
	"github.com/vfio-ferry/ferry/services/chunkwire"
	"github.com/vfio-ferry/ferry/services/wire"
)

// testLimits is the window of the prepared migrations in these tests.
var testLimits = flow.Limits{MaxChunks: 8, MaxBytes: 128 << 10}

// fuzzPrepared is the migration FuzzOpenRequest opens: two devices.
var fuzzPrepared = prepared{
	id:      "fuzz",
	token:   "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
	expires: time.Unix(2e9, 0),
	devices: []string{"sim:size=64KiB,seed=1", "pci:0000:3b:00.2"},
	limits:  testLimits,
}

func TestValidateOpen(t *testing.T) {
	now := time.Unix(1e9, 0)
	ok := func() *ferryv1.OpenRequest {
		return &ferryv1.OpenRequest{MigrationId: "fuzz", Token: fuzzPrepared.token, Devices: []string{"sim:seed=1,size=64KiB", "pci:0000:3B:00.2"},
			SourceDevices: []string{"pci:0000:af:00.1", "pci:0000:af:00.2"}, ChunkSize: 64 << 10, Channels: 4}
	}
	if p, err := validateOpen(ok(), fuzzPrepared, now); err != nil || p.chunkSize != 64<<10 || p.channels != 4 {
		t.Fatalf("a good request: %+v, %v", p, err)
	}
	if p, _ := validateOpen(&ferryv1.OpenRequest{Token: fuzzPrepared.token, Devices: ok().Devices, ChunkSize: 64 << 10}, fuzzPrepared, now); p.channels != wire.DefaultChannels {
		t.Fatalf("default channels: %d", p.channels)
	}
	cases := []struct {
		name   string
		mutate func(*ferryv1.OpenRequest)
		code   codes.Code
		reason string
	}{
		{"expired", func(*ferryv1.OpenRequest) {}, codes.PermissionDenied, wire.ReasonBadToken},
		{"chunk size below the minimum", func(r *ferryv1.OpenRequest) { r.ChunkSize = 1 }, codes.InvalidArgument, wire.ReasonInvalidArgument},
		{"chunk size beyond the window", func(r *ferryv1.OpenRequest) { r.ChunkSize = 1 << 20 }, codes.InvalidArgument, wire.ReasonInvalidArgument},
		{"default chunk size beyond the window", func(r *ferryv1.OpenRequest) { r.ChunkSize = 0 }, codes.InvalidArgument, wire.ReasonInvalidArgument},
		{"absurd channels", func(r *ferryv1.OpenRequest) { r.Channels = 1 << 31 }, codes.InvalidArgument, wire.ReasonInvalidArgument},
		{"unknown mode", func(r *ferryv1.OpenRequest) { r.Mode = 99 }, codes.InvalidArgument, wire.ReasonInvalidArgument},
		{"fewer devices", func(r *ferryv1.OpenRequest) { r.Devices = r.Devices[:1] }, codes.InvalidArgument, wire.ReasonSpecMismatch},
		{"devices swapped", func(r *ferryv1.OpenRequest) { r.Devices[0], r.Devices[1] = r.Devices[1], r.Devices[0] }, codes.InvalidArgument, wire.ReasonSpecMismatch},
		{"a malformed device", func(r *ferryv1.OpenRequest) { r.Devices[1] = "pci:zz" }, codes.InvalidArgument, wire.ReasonInvalidArgument},
		{"a huge device spec", func(r *ferryv1.OpenRequest) { r.Devices[1] = string(make([]byte, 1<<20)) }, codes.InvalidArgument, wire.ReasonInvalidArgument},
		{"too many source devices", func(r *ferryv1.OpenRequest) { r.SourceDevices = make([]string, wire.MaxDevices+1) }, codes.InvalidArgument, wire.ReasonInvalidArgument},
		{"an empty source device", func(r *ferryv1.OpenRequest) { r.SourceDevices[0] = "" }, codes.InvalidArgument, wire.ReasonInvalidArgument},
		{"unknown digest", func(r *ferryv1.OpenRequest) { r.Digest = 42 }, codes.InvalidArgument, wire.ReasonInvalidArgument},
	}
	for _, tc := range cases {
		r := ok()
		tc.mutate(r)
		at := now
		if tc.name == "expired" {
			at = fuzzPrepared.expires
		}
		_, err := validateOpen(r, fuzzPrepared, at)
		if wire.Code(err) != tc.code || wire.Reason(err) != tc.reason {
			t.Errorf("%s: %v (reason %q), want %v %s", tc.name, err, wire.Reason(err), tc.code, tc.reason)
		}
	}
}

// FuzzOpenRequest feeds OpenRequests decoded from arbitrary bytes, as the
// Transfer service receives them, to Open's validation: it never panics,
// every refusal carries a code and an ErrorInfo reason, and whatever it
// accepts is within the limits the session is then built with.
func FuzzOpenRequest(f *testing.F) {
	good := &ferryv1.OpenRequest{MigrationId: "fuzz", Token: fuzzPrepared.token, Devices: []string{"sim:size=64KiB,seed=1", "pci:0000:3b:00.2"},
		SourceDevices: []string{"pci:0000:af:00.1", "mdev:c0ffee00-0000-4000-8000-000000000001"}, ChunkSize: 64 << 10, Channels: 4}
	for _, r := range []*ferryv1.OpenRequest{
		good,
		{Token: fuzzPrepared.token, Devices: good.Devices, ChunkSize: 4 << 10, Channels: 64, Digest: ferryv1.DigestAlgorithm_DIGEST_ALGORITHM_SHA256},
		{Token: fuzzPrepared.token, Devices: good.Devices, ChunkSize: 1 << 20},
		{Token: "wrong", Devices: good.Devices},
		{Token: fuzzPrepared.token, Devices: []string{"sim:size=64KiB,seed=1"}},
		{Token: fuzzPrepared.token, Devices: good.Devices, ChunkSize: 64 << 10, Mode: ferryv1.MigrationMode_MIGRATION_MODE_PRECOPY},
	} {
		b, err := proto.Marshal(r)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	now := time.Unix(1e9, 0)
	f.Fuzz(func(t *testing.T, b []byte) {
		var req ferryv1.OpenRequest
		if err := proto.Unmarshal(b, &req); err != nil {
			return // gRPC refuses what does not decode
		}
		p, err := validateOpen(&req, fuzzPrepared, now)
		if err != nil {
			if wire.Code(err) == codes.OK || wire.Code(err) == codes.Unknown || wire.Reason(err) == "" {
				t.Fatalf("refusal without a code and reason: %v", err)
			}
			return
		}
		if req.GetToken() != fuzzPrepared.token {
			t.Fatalf("accepted token %q", req.GetToken())
		}
		if p.chunkSize < wire.MinChunkSize || p.chunkSize > wire.MaxChunkSize || uint64(p.chunkSize) > fuzzPrepared.limits.MaxBytes {
			t.Fatalf("accepted chunk size %d", p.chunkSize)
		}
		if p.channels < 1 || p.channels > wire.MaxChannels {
			t.Fatalf("accepted %d channels", p.channels)
		}
		if len(req.GetDevices()) != len(fuzzPrepared.devices) || len(req.GetSourceDevices()) > wire.MaxDevices {
			t.Fatalf("accepted %d devices, %d source devices", len(req.GetDevices()), len(req.GetSourceDevices()))
		}
		if _, err := chunkwire.NewDigest(req.GetDigest()); err != nil {
			t.Fatalf("accepted digest %v", req.GetDigest())
		}
	})
}
