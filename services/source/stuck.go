package source

import (
	"google.golang.org/grpc/codes"

	"github.com/vfio-ferry/ferry/pkg/vfio"

	"github.com/vfio-ferry/ferry/services/wire"
)

// A device that stops answering (a read, or a state change, that the
// kernel never returns from) must not hold the rest of the migration
// hostage: the healthy devices are rolled back at once, and the agent goes
// on serving. The device guard (pkg/vfio) bounds every device operation by
// the device timeout and closes its Stuck channel once one overruns it. A
// goroutine blocked in the stuck operation cannot be ended from outside:
// the migration stops waiting for it (await), the agent counts it as
// lingering, and it ends by itself if the operation ever returns.

// stuckDevice is what the migration needs of a device that can tell it
// stopped answering.
type stuckDevice interface {
	Stuck() <-chan struct{}
}

// answerer is what the rollback needs of a device that can be left to
// its guard while stuck (pkg/vfio's GuardedDevice).
type answerer interface {
	WhenAnswered(settle func(vfio.Device)) bool
}

// leaveToGuard is the rollback of a device that may be stuck: if it is,
// its guard returns it to RUNNING once its operation answers, however
// late, and leaveToGuard reports true. Before, such a device was left in
// whatever state the late answer gave it: STOP_COPY, with the VM's state
// in it and no owner.
func (m *migration) leaveToGuard(d *srcDevice) bool {
	g, ok := d.dev.(answerer)
	if !ok {
		return false
	}
	stream := d.stream
	return g.WhenAnswered(func(dev vfio.Device) {
		if stream != nil {
			stream.Close()
		}
		if msg := m.toRunning(d.spec, dev); msg != "" {
			d.errMsg.Store(&msg)
			return
		}
		m.log.Warn("stuck device answered at last: returned to RUNNING", "device", d.spec)
	})
}

// isStuck reports whether d has stopped answering.
func (d *srcDevice) isStuck() bool {
	s, ok := d.dev.(stuckDevice)
	if !ok {
		return false
	}
	select {
	case <-s.Stuck():
		return true
	default:
		return false
	}
}

// watchStuck closes m.stuck when a device of the migration stops
// answering, until the migration ends.
func (m *migration) watchStuck() {
	for _, d := range m.devs {
		s, ok := d.dev.(stuckDevice)
		if !ok {
			continue
		}
		m.a.wg.Go(func() {
			select {
			case <-s.Stuck():
				m.stuckDev.CompareAndSwap(nil, d)
				m.stuckOnce.Do(func() { close(m.stuck) })
				select {
				case m.stuckMore <- struct{}{}:
				default:
				}
			case <-m.ctx.Done():
			}
		})
	}
}

// await returns what wait returns, or, if a device stops answering first,
// the stuck device's error without waiting further: wait's goroutines may
// be blocked in the stuck device's operation. The agent counts the
// goroutine that goes on waiting as lingering.
func (m *migration) await(wait func() error) error {
	done := make(chan error, 1)
	a := m.a
	a.lingering.Add(1)
	go func() {
		defer a.lingering.Add(-1)
		done <- wait()
	}()
	select {
	case err := <-done:
		return err
	case <-m.stuck:
		return m.stuckError()
	}
}

// stuckError is the migration's error once a device stopped answering.
func (m *migration) stuckError() error {
	spec := "?"
	if d := m.stuckDev.Load(); d != nil {
		spec = d.spec
	}
	return wire.Errorf(codes.Unavailable, wire.ReasonDeviceStuck,
		"device %s did not answer within the device timeout; the other devices were rolled back, and the agent holds it until its operation returns", spec)
}
