package e2e

import (
	"fmt"
	"net"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/internal/loopback"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/services/wire"
)

// A destination device whose write never returns fails the migration one
// device timeout later, on both data lanes: the destination answers its
// channels with DEVICE_STUCK and the source rolls back then, its device
// RUNNING again, rather than at its switchover deadline (a minute, with
// the VM paused). The destination's healthy device is reset and freed;
// the stuck one is reported stuck and stays held.
func TestStuckDestinationWriteFailsTheMigration(t *testing.T) {
	for _, direct := range []bool{true, false} {
		t.Run(fmt.Sprintf("direct=%v", direct), func(t *testing.T) {
			cfg := loopback.Config{DestDevices: vfio.RegistryOptions{OpTimeout: 200 * time.Millisecond}}
			if direct {
				lis, err := net.Listen("tcp", "127.0.0.1:0")
				if err != nil {
					t.Fatal(err)
				}
				cfg.DataListener = lis
			}
			a := startLoopback(t, cfg)
			a.dest = ferryv1.NewDestAgentClient(dial(t, a.destAddr))
			a.source = ferryv1.NewSourceAgentClient(dial(t, a.sourceAddr))

			const healthy, stuck = "sim:size=8MiB,seed=51", "sim:size=8MiB,seed=52"
			src, dst := []string{healthy, stuck}, []string{healthy, stuck + ",hang=write@3MiB"}
			s, d := a.run(t, migration{id: "stuck-write", src: src, dst: dst, channels: 2, chunkSize: 256 << 10})
			if s.GetPhase() != failed || s.GetError().GetReason() != wire.ReasonDeviceStuck || codes.Code(s.GetError().GetCode()) != codes.Unavailable {
				t.Fatalf("source: %v, %v; want FAILED with UNAVAILABLE %s", s.GetPhase(), s.GetError(), wire.ReasonDeviceStuck)
			}
			for i, dev := range s.GetDevices() {
				if dev.GetState() != ferryv1.DeviceState_DEVICE_STATE_RUNNING {
					t.Errorf("source device %d in %v, want RUNNING", i, dev.GetState())
				}
			}
			if d.GetPhase() != failed || d.GetError().GetReason() != wire.ReasonDeviceStuck {
				t.Fatalf("destination: %v, %v; want FAILED with %s", d.GetPhase(), d.GetError(), wire.ReasonDeviceStuck)
			}
			if !d.GetDevices()[1].GetStuck() || d.GetDevices()[0].GetStuck() {
				t.Errorf("destination stuck: %v %v; want only device 1", d.GetDevices()[0].GetStuck(), d.GetDevices()[1].GetStuck())
			}
			if st := deviceState(t, a.destReg, healthy); st != vfio.StateRunning {
				t.Errorf("destination's healthy device in %v, want RUNNING", st)
			}
		})
	}
}
