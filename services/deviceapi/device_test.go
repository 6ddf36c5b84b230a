package deviceapi

import (
	"fmt"
	"github.com/vfio-ferry/ferry/services/wire"
	"testing"
	"testing/synctest"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/vfio"
)

// hostDevice is a device of a fake host whose SET_STATE never answers
// until hang is closed.
type hostDevice struct {
	spec string
	hang chan struct{}
}

func (d *hostDevice) Spec() string               { return d.spec }
func (d *hostDevice) Flags() vfio.Flags          { return vfio.FlagStopCopy }
func (d *hostDevice) State() (vfio.State, error) { return vfio.StateRunning, nil }
func (d *hostDevice) DataSize() (uint64, error)  { return 4096, nil }
func (d *hostDevice) Reset() error               { return nil }
func (d *hostDevice) Close() error               { return nil }
func (d *hostDevice) SetState(vfio.State) (vfio.DataStream, error) {
	<-d.hang
	return nil, nil
}

// TestListOpensNothing lists a host whose sysfs shows three VFIO
// devices, one of which the agent holds and is stuck: the listing goes
// through the registry's opener, which it never calls, shows the idle
// devices the allowlist admits with their spec alone (flags 0, state
// UNSPECIFIED), and the stuck one as stuck, without waiting for it.
func TestListOpensNothing(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		hang := make(chan struct{})
		defer close(hang)
		opens := 0
		reg := vfio.NewRegistry(vfio.RegistryOptions{
			Devices:   []string{"pci:0000:3b:*"},
			OpTimeout: time.Second,
			Open: func(s vfio.Spec) (vfio.Device, error) {
				opens++
				return &hostDevice{spec: s.String(), hang: hang}, nil
			},
			ListHost: func() ([]vfio.Spec, error) {
				var specs []vfio.Spec
				for _, s := range []string{"pci:0000:3b:00.2", "pci:0000:3b:00.3", "pci:0000:5e:00.0"} {
					spec, err := vfio.ParseSpec(s)
					if err != nil {
						t.Fatal(err)
					}
					specs = append(specs, spec)
				}
				return specs, nil
			},
		})
		defer reg.Close()
		dev, _, err := reg.Acquire("pci:0000:3b:00.3", "m1")
		if err != nil {
			t.Fatal(err)
		}
		if _, err := dev.SetState(vfio.StateStop); err == nil {
			t.Fatal("SetState answered")
		}
		opens = 0
		before := time.Now()
		got := List(reg).GetDevices()
		if time.Since(before) != 0 {
			t.Errorf("List waited %v on a stuck device", time.Since(before))
		}
		if opens != 0 {
			t.Errorf("List opened %d devices", opens)
		}
		if len(got) != 2 {
			t.Fatalf("List = %v, want the two devices the allowlist admits", got)
		}
		idle, held := got[0], got[1]
		if idle.GetSpec() != "pci:0000:3b:00.2" || idle.GetMigrationFlags() != 0 ||
			idle.GetState() != ferryv1.DeviceState_DEVICE_STATE_UNSPECIFIED || idle.GetStuck() {
			t.Errorf("idle host device = %v, want its spec alone", idle)
		}
		if held.GetSpec() != "pci:0000:3b:00.3" || held.GetOwner() != "m1" || !held.GetStuck() || held.GetError() == "" ||
			held.GetState() != ferryv1.DeviceState_DEVICE_STATE_RUNNING || held.GetEstimatedStateBytes() != 4096 {
			t.Errorf("held device = %v, want m1's, RUNNING, stuck with an error", held)
		}
	})
}

// TestErrorStuck checks that a stuck device's error reads as
// DEVICE_STUCK, also when it is the reason a device is busy.
func TestErrorStuck(t *testing.T) {
	for _, err := range []error{vfio.ErrStuck, fmt.Errorf("held: %w: %w", vfio.ErrBusy, vfio.ErrStuck)} {
		got := Error("pci:0000:3b:00.2", "acquire", err)
		if wire.Reason(got) != wire.ReasonDeviceStuck || status.Code(got) != codes.Unavailable {
			t.Errorf("Error(%v) = %v, reason %q; want UNAVAILABLE, DEVICE_STUCK", err, got, wire.Reason(got))
		}
	}
}
