package source

import (
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/services/wire"
)

// A destination that ends the channels with a status of its own while
// the device streams (CancelIncoming there ends them with CANCELLED /
// MIGRATION_CANCELLED) fails the migration with that status: its reason
// and message, not the "context canceled" the source's own readers saw
// once the channels' group ended. The soak found the migration ending
// FAILED with no ErrorInfo reason.
func TestDestinationCancelKeepsItsReason(t *testing.T) {
	const spec = "sim:size=16MiB,seed=9"
	f := &fakeDest{windows: openWindow}
	f.channel = func(_ int, st grpc.BidiStreamingServer[ferryv1.ChannelRequest, ferryv1.ChannelResponse]) error {
		if err := st.Send(&ferryv1.ChannelResponse{}); err != nil {
			return err
		}
		for range 4 {
			if _, err := st.Recv(); err != nil {
				return err
			}
		}
		return wire.Errorf(codes.Canceled, wire.ReasonCancelled, "incoming migration peer-cancel cancelled by the control plane")
	}
	a, reg := sourceAgent(t, Config{ReconnectTimeout: time.Hour, ProgressTimeout: time.Hour})
	start(t, a, "peer-cancel", serveFake(t, f), spec, 64<<10, time.Hour)
	m := waitEnd(t, a, "peer-cancel")
	if m.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED {
		t.Errorf("phase %v, want FAILED", m.GetPhase())
	}
	if r := m.GetError().GetReason(); r != wire.ReasonCancelled {
		t.Errorf("error %q, reason %q; want the destination's reason %s", m.GetError().GetMessage(), r, wire.ReasonCancelled)
	}
	if st := deviceState(t, reg, spec); st != vfio.StateRunning {
		t.Errorf("device in %v after the rollback, want RUNNING", st)
	}
}
