package source

import (
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/services/deviceapi"
	"github.com/vfio-ferry/ferry/services/wire"
)

// FuzzStartMigration feeds StartMigrationRequests decoded from arbitrary
// bytes, as a control-plane client sends them, to the source agent's
// validation: it never panics, every refusal carries a code and an
// ErrorInfo reason, and what it accepts is what the migration is built
// from without further checks (newMigration and acquire ignore the errors
// they could not get).
func FuzzStartMigration(f *testing.F) {
	for _, r := range []*ferryv1.StartMigrationRequest{
		{MigrationId: "vm-42.nic0", DestAddress: "10.0.0.7:7100", Token: "0123456789abcdef",
			Devices: []*ferryv1.DevicePair{{SourceDevice: "pci:0000:3b:00.2", DestDevice: "pci:0000:5e:00.2"}}, Channels: 4, ChunkSize: 1 << 20},
		{MigrationId: "sim", DestAddress: "[::1]:7100", Token: "t",
			Devices: []*ferryv1.DevicePair{{SourceDevice: "sim:size=1GiB,seed=7", DestDevice: "sim:seed=7,size=1GiB"}, {SourceDevice: "mdev:c0ffee00-0000-4000-8000-000000000001", DestDevice: "mdev:c0ffee00-0000-4000-8000-000000000002"}},
			Mode:    ferryv1.MigrationMode_MIGRATION_MODE_STOP_COPY, Digest: ferryv1.DigestAlgorithm_DIGEST_ALGORITHM_SHA256},
		{MigrationId: "a/b", DestAddress: "nowhere", Channels: 1 << 30, ChunkSize: 1},
		{MigrationId: "pre", DestAddress: "h:1", Token: "t", Devices: []*ferryv1.DevicePair{{SourceDevice: "sim:size=1", DestDevice: "sim:size=1"}}, Mode: ferryv1.MigrationMode_MIGRATION_MODE_PRECOPY},
	} {
		b, err := proto.Marshal(r)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var req ferryv1.StartMigrationRequest
		if err := proto.Unmarshal(b, &req); err != nil {
			return
		}
		if err := validateStart(&req); err != nil {
			if c := wire.Code(err); c == codes.OK || c == codes.Unknown || wire.Reason(err) == "" {
				t.Fatalf("refusal without a code and reason: %v", err)
			}
			return
		}
		if err := wire.ValidateID(req.GetMigrationId()); err != nil {
			t.Fatalf("accepted id %q", req.GetMigrationId())
		}
		if n := len(req.GetDevices()); n < 1 || n > wire.MaxDevices {
			t.Fatalf("accepted %d devices", n)
		}
		seen := map[string]bool{}
		for _, p := range req.GetDevices() {
			src, err1 := deviceapi.CanonicalSpec(p.GetSourceDevice())
			_, err2 := deviceapi.CanonicalSpec(p.GetDestDevice())
			if err1 != nil || err2 != nil || seen[src] {
				t.Fatalf("accepted pair %v", p)
			}
			seen[src] = true
		}
		if _, err := wire.Channels(req.GetChannels()); err != nil {
			t.Fatalf("accepted channels %d", req.GetChannels())
		}
		if _, err := wire.ChunkSize(req.GetChunkSize()); err != nil {
			t.Fatalf("accepted chunk size %d", req.GetChunkSize())
		}
		if tok := req.GetToken(); tok == "" || len(tok) > wire.MaxTokenLength {
			t.Fatalf("accepted token %q", tok)
		}
	})
}

// The pre-copy fields are checked: durations within their bounds, the
// timeout action known, and none of them on a stop-copy migration.
func TestValidatePrecopy(t *testing.T) {
	pre := ferryv1.MigrationMode_MIGRATION_MODE_PRECOPY
	switchover := ferryv1.PrecopyTimeoutAction_PRECOPY_TIMEOUT_ACTION_SWITCHOVER
	for _, tc := range []struct {
		name string
		req  *ferryv1.StartMigrationRequest
		ok   bool
	}{
		{"pre-copy with all three", &ferryv1.StartMigrationRequest{Mode: pre, DowntimeLimit: durationpb.New(300 * time.Millisecond), PrecopyTimeout: durationpb.New(time.Minute), OnPrecopyTimeout: switchover}, true},
		{"pre-copy with none", &ferryv1.StartMigrationRequest{Mode: pre}, true},
		{"stop-copy with none", &ferryv1.StartMigrationRequest{}, true},
		{"stop-copy with a zero limit", &ferryv1.StartMigrationRequest{DowntimeLimit: durationpb.New(0)}, true},
		{"negative limit", &ferryv1.StartMigrationRequest{Mode: pre, DowntimeLimit: durationpb.New(-time.Second)}, false},
		{"limit over an hour", &ferryv1.StartMigrationRequest{Mode: pre, DowntimeLimit: durationpb.New(2 * time.Hour)}, false},
		{"timeout over a week", &ferryv1.StartMigrationRequest{Mode: pre, PrecopyTimeout: durationpb.New(8 * 24 * time.Hour)}, false},
		{"invalid duration", &ferryv1.StartMigrationRequest{Mode: pre, PrecopyTimeout: &durationpb.Duration{Seconds: 1, Nanos: -1}}, false},
		{"unknown action", &ferryv1.StartMigrationRequest{Mode: pre, OnPrecopyTimeout: 7}, false},
		{"limit on stop-copy", &ferryv1.StartMigrationRequest{DowntimeLimit: durationpb.New(time.Second)}, false},
		{"timeout on stop-copy", &ferryv1.StartMigrationRequest{PrecopyTimeout: durationpb.New(time.Second)}, false},
		{"action on stop-copy", &ferryv1.StartMigrationRequest{OnPrecopyTimeout: switchover}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := validatePrecopy(tc.req)
			if tc.ok != (err == nil) {
				t.Fatalf("validatePrecopy: %v, want ok %v", err, tc.ok)
			}
			if err != nil && (wire.Code(err) != codes.InvalidArgument || wire.Reason(err) != wire.ReasonInvalidArgument) {
				t.Errorf("refused with %v, want INVALID_ARGUMENT %s", err, wire.ReasonInvalidArgument)
			}
		})
	}
}
