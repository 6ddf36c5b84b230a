package dest

import (
	"context"
	"strings"

	"google.golang.org/grpc/codes"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/services/deviceapi"
	"github.com/vfio-ferry/ferry/services/wire"
)

// Evict fails the incoming migration owner (its id) because the VMM
// that lent the device spec withdrew it, or went away
// (vfio.RegistryOptions.Evict): the migration fails with
// DEVICE_WITHDRAWN, its devices are reset and released, and the source
// learns it on its next call. A VERIFIED migration is not failed: its
// source may have committed, so the device, loaded and in STOP, is
// released when the source commits or aborts. It reports whether owner
// is one of this agent's migrations; it never blocks.
func (a *Agent) Evict(owner, spec string, why error) bool {
	a.mu.Lock()
	inc, ok := a.incoming[owner]
	a.mu.Unlock()
	if !ok {
		return false
	}
	err := wire.Errorf(codes.Aborted, wire.ReasonWithdrawn, "incoming migration %s: device %s: %v", owner, spec, why)
	inc.fail(err, ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED, failFound)
	return true
}

// configStates are the config states the verified devices received.
func (inc *incoming) configStates() []*ferryv1.DeviceConfigState {
	var out []*ferryv1.DeviceConfigState
	for _, d := range inc.devs {
		if d.verified.Load() && d.config != nil { // complete once verified
			out = append(out, &ferryv1.DeviceConfigState{Device: d.spec, ConfigState: d.config})
		}
	}
	return out
}

// ReleaseDevice implements DestAgent: it lets go of an idle device the
// agent opened by spec (vfio.Registry.LetGo), resetting it first when
// asked.
func (s *controlServer) ReleaseDevice(ctx context.Context, req *ferryv1.ReleaseDeviceRequest) (*ferryv1.ReleaseDeviceResponse, error) {
	spec, err := deviceapi.CanonicalSpec(req.GetDevice())
	if err != nil {
		return nil, err
	}
	if strings.HasPrefix(spec, "vmm:") {
		return nil, wire.Errorf(codes.FailedPrecondition, wire.ReasonDeviceNotAllowed, "device %s is lent by its VMM: the VMM detaches it, the agent never resets or closes it", spec)
	}
	reg := s.a.cfg.Registry
	info := vfio.DeviceInfo{Spec: spec}
	for _, d := range reg.List() {
		if d.Spec == spec {
			info = d
		}
	}
	if req.GetReset_() {
		if info, err = reg.Recover(spec, true); err != nil {
			return nil, deviceapi.Error(spec, "reset", err)
		}
	}
	if err := reg.LetGo(spec); err != nil {
		return nil, deviceapi.Error(spec, "let go of", err)
	}
	s.a.cfg.Logger.Info("device let go", "device", spec, "reset", req.GetReset_(), "state", info.State.String())
	return &ferryv1.ReleaseDeviceResponse{Device: deviceapi.ToProto(info), LetGo: true}, nil
}
