package source

import (
	"context"
	"sync"
	"time"

	"google.golang.org/grpc/codes"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/services/deviceapi"
	"github.com/vfio-ferry/ferry/services/wire"
)

// Pre-copy, as built so far: a migration in MIGRATION_MODE_PRECOPY moves
// each device that has PRE_COPY from RUNNING to PRE_COPY once every channel
// is up, and its reader streams what the device offers while the VM runs,
// under the same window and sequence as the stop-copy chunks that follow
// on the same data stream, over every channel. A read that finds nothing
// new (ENOMSG, or 0) waits a little and looks again. Devices without
// PRE_COPY stay RUNNING. The control plane's Switchover starts the
// switchover: SwitchoverStart (retried until the destination has written
// every chunk sent before it), then every device to STOP_COPY (through
// PRE_COPY_P2P / RUNNING_P2P when all have P2P), and the readers go on to
// the end of the state. A rollback returns PRE_COPY devices to RUNNING.
//
// Not built yet: READY and the destination's per-device
// acknowledgement of the initial data, the predicted downtime,
// downtime_limit, precopy_timeout and the convergence rule, REINIT.

// precopyPoll is how long a pre-copy reader waits after a read found
// nothing new.
const precopyPoll = 10 * time.Millisecond

// precopy is a pre-copy migration's switchover state.
type precopy struct {
	// asked is closed by Switchover; stopped once every device is in
	// STOP_COPY.
	asked, stopped       chan struct{}
	askOnce, stoppedOnce sync.Once
}

// precopyOf is the pre-copy state of a migration req asks for in
// pre-copy mode, nil otherwise.
func precopyOf(req *ferryv1.StartMigrationRequest) *precopy {
	if req.GetMode() != ferryv1.MigrationMode_MIGRATION_MODE_PRECOPY {
		return nil
	}
	return newPrecopy()
}

func newPrecopy() *precopy {
	return &precopy{asked: make(chan struct{}), stopped: make(chan struct{})}
}

// ask starts the switchover, once.
func (p *precopy) ask() { p.askOnce.Do(func() { close(p.asked) }) }

// idle waits after a pre-copy read found nothing: precopyPoll, or less
// when the devices stop.
func (p *precopy) idle(ctx context.Context) error {
	t := time.NewTimer(precopyPoll)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-p.stopped:
	case <-t.C:
	}
	return nil
}

// startPrecopy moves every device with PRE_COPY to PRE_COPY and keeps its
// data stream.
func (m *migration) startPrecopy() error {
	for _, d := range m.devs {
		if d.dev.Flags()&vfio.FlagPreCopy == 0 {
			continue
		}
		s, err := d.dev.SetState(vfio.StatePreCopy)
		if err != nil {
			return deviceapi.Error(d.spec, "enter PRE_COPY", err)
		}
		if s == nil {
			return wire.Errorf(codes.Internal, wire.ReasonDeviceState, "device %s: PRE_COPY opened no data stream", d.spec)
		}
		d.stream = s
		d.precopyDev = true
		d.inPrecopy.Store(true)
	}
	return nil
}

// switchoverStart asks the destination to accept the switchover, within
// the reconnect timeout, again on transport errors and while it has not
// yet written every chunk sent before it (pre-copy chunks are in flight as
// it is asked).
func (m *migration) switchoverStart(ctx context.Context, transfer ferryv1.TransferClient, session string) error {
	again := func(err error) bool { return retryable(err) || wire.Reason(err) == wire.ReasonNotReady }
	return retryLoop(ctx, time.Now().Add(m.a.cfg.ReconnectTimeout), again, func(ctx context.Context) error {
		ctx, cancel := context.WithTimeout(ctx, rpcTimeout)
		defer cancel()
		_, err := transfer.SwitchoverStart(ctx, &ferryv1.SwitchoverStartRequest{SessionId: session, SentChunks: m.sentChunks()})
		return err
	})
}

// Switchover asks a pre-copy migration to switch over.
func (m *migration) switchover() {
	if m.precopy != nil {
		m.precopy.ask()
	}
}
