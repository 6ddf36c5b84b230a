package dest

import (
	"sync/atomic"
	"time"

	"google.golang.org/grpc/codes"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/services/wire"
)

// A device that stops answering (a write, or a state change, that the
// kernel never returns from) ends its migration as soon as its guard
// declares it stuck, one device timeout after the operation began: the
// destination fails the migration with UNAVAILABLE, DEVICE_STUCK, its
// channels end with that status, and the source rolls back at once
// instead of waiting out its switchover deadline with the VM paused. The
// clean-up then leaves the stuck device to its guard (closeDevice,
// finishDevice) and resets the others.

// stuckDevice is what a guarded device offers (pkg/vfio's device
// guard): a channel closed once an operation on it did not return within
// the guard's deadline. The device is then its guard's until the
// operation returns.
type stuckDevice interface {
	Stuck() <-chan struct{}
}

// stuckNamer is what a guard may add: the operation that has not
// answered.
type stuckNamer interface {
	StuckInfo() (op string, since time.Time, stuck bool)
}

// stuckSignal is dev's stuck channel, nil (never ready) for a device
// without a guard.
func stuckSignal(dev vfio.Device) <-chan struct{} {
	if g, ok := dev.(stuckDevice); ok {
		return g.Stuck()
	}
	return nil
}

// answerer is what the clean-up needs of a device that can be left to its
// guard while stuck (pkg/vfio's GuardedDevice): a settle that runs once
// the stuck operation answers.
type answerer interface {
	WhenAnswered(settle func(vfio.Device)) bool
}

// isStuck reports whether dev's guard declared it stuck.
func isStuck(dev vfio.Device) bool {
	ch := stuckSignal(dev)
	return ch != nil && isClosed(ch)
}

// watchStuck fails the migration when one of its devices is declared
// stuck before the migration ends. A VERIFIED migration is not failed by
// it (fail ignores what the destination finds once verified): the source
// or the control plane decides from there.
func (inc *incoming) watchStuck() {
	for _, d := range inc.devs {
		stuck := stuckSignal(d.dev)
		if stuck == nil {
			continue
		}
		inc.a.crew.Go(func() {
			select {
			case <-stuck:
				inc.fail(stuckError(d), ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED, failFound)
			case <-inc.ctx.Done():
			}
		})
	}
}

// stuckError is the migration's error once d stopped answering.
func stuckError(d *devStream) error {
	op := "an operation"
	if n, ok := d.dev.(stuckNamer); ok {
		if name, _, stuck := n.StuckInfo(); stuck && name != "" {
			op = name
		}
	}
	return wire.Errorf(codes.Unavailable, wire.ReasonDeviceStuck,
		"device %s did not answer %s within the device timeout: the migration failed, the other devices were reset, and the agent holds %s until its operation returns, then resets it", d.spec, op, d.spec)
}

// crew owns the agent's goroutines. Close waits for all of them but
// those left blocked in a stuck device's operation: a write the kernel
// never returns from would otherwise hold the agent's shutdown, and the
// process's, for good. The clean-up counts such a goroutine as lingering
// when it leaves the device to it (closeDevice), and uncounts it when
// the operation returns and it gives the device's turn back (putTurn).
type crew struct {
	running   atomic.Int64
	lingering atomic.Int64
	changed   chan struct{} // 1-buffered: running or lingering moved
}

func (c *crew) poke() {
	select {
	case c.changed <- struct{}{}:
	default:
	}
}

// Go runs f on a goroutine of the crew.
func (c *crew) Go(f func()) {
	c.running.Add(1)
	go func() {
		defer func() {
			c.running.Add(-1)
			c.poke()
		}()
		f()
	}()
}

// linger counts n more (or, negative, fewer) goroutines blocked in a
// stuck device.
func (c *crew) linger(n int64) {
	c.lingering.Add(n)
	c.poke()
}

// wait returns once every goroutine of the crew has ended or lingers,
// and how many linger.
func (c *crew) wait() int64 {
	for {
		l := c.lingering.Load()
		if r := c.running.Load(); r == 0 || r <= l {
			return r
		}
		<-c.changed
	}
}
