package dest

import (
	"context"
	"fmt"

	"google.golang.org/grpc/codes"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/internal/buildinfo"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/services/deviceapi"
	"github.com/vfio-ferry/ferry/services/wire"
)

// Version skew and compatibility. A DaemonSet rolls out one node at a
// time, so for hours a source and a destination may run different
// builds: Open negotiates. The source lists the features it wants
// (ferryv1.Feature) and the destination grants those it speaks; each
// side then uses only the granted ones, and a source that asks for none
// and sends no agent_version is a 0.1.0 one, spoken to as 0.1.0 spoke:
// its verified verdict is the commit, no pre-copy, no config state.
//
// The source also describes its devices (vfio.Description: kind, PCI
// ids, driver and version, mdev type, migration flags). With
// FEATURE_DEVICE_CHECK the destination compares each with its own device
// in Open (vfio.Compatible) and refuses an incompatible pair before the
// source stops anything; Preflight answers the same question to a
// control plane before a migration is even prepared.

// needsOf is what a migration of the described source devices asks of
// the destination devices: P2P when every source device has it (the
// source stops them all through RUNNING_P2P then), PRE_COPY for a
// pre-copy migration's devices that have it.
func needsOf(src []vfio.Description, mode ferryv1.MigrationMode) []vfio.Needs {
	allP2P := len(src) > 0
	for _, d := range src {
		allP2P = allP2P && d.Flags&vfio.FlagP2P != 0
	}
	out := make([]vfio.Needs, len(src))
	for i, d := range src {
		out[i] = vfio.Needs{P2P: allP2P, PreCopy: mode == ferryv1.MigrationMode_MIGRATION_MODE_PRECOPY && d.Flags&vfio.FlagPreCopy != 0}
	}
	return out
}

// incompatible is the status of a pair that cannot carry state:
// FAILED_PRECONDITION, INCOMPATIBLE_DEVICE, naming the field.
func incompatible(i int, src, dst string, m vfio.Mismatch) error {
	return wire.Errorf(codes.FailedPrecondition, wire.ReasonIncompatibleDevice,
		"device %d: %s cannot take the state of %s: %s (field %s)", i, dst, src, m.Message, m.Field)
}

// checkOpen compares the source's descriptions with the session's
// devices when the source asked for the check; a source that sent fewer
// descriptions than devices is checked on those it sent.
func (inc *incoming) checkOpen(req *ferryv1.OpenRequest, granted wire.Features) error {
	if !granted.Has(ferryv1.Feature_FEATURE_DEVICE_CHECK) {
		return nil
	}
	descs := req.GetSourceDescriptions()
	if len(descs) > len(inc.devs) {
		return wire.Errorf(codes.InvalidArgument, wire.ReasonInvalidArgument, "%d source descriptions for %d devices", len(descs), len(inc.devs))
	}
	src := make([]vfio.Description, len(descs))
	for i, p := range descs {
		src[i] = deviceapi.DescriptionFromProto(p)
	}
	needs := needsOf(src, req.GetMode())
	for i := range src {
		if m, ok := vfio.Compatible(src[i], vfio.Describe(inc.devs[i].dev), needs[i]); !ok {
			return incompatible(i, src[i].Spec, inc.devs[i].spec, m)
		}
	}
	return nil
}

// preflightOwner holds a device while Preflight describes it.
const preflightOwner = "(preflight)"

// Preflight implements DestAgent.
func (s *controlServer) Preflight(ctx context.Context, req *ferryv1.PreflightRequest) (*ferryv1.PreflightResponse, error) {
	if err := wire.ValidateDeviceCount(len(req.GetDevices())); err != nil {
		return nil, err
	}
	a := s.a
	resp := &ferryv1.PreflightResponse{Compatible: true, AgentVersion: buildinfo.Read().Version, Features: wire.Supported.List()}
	fail := func(err error) {
		if resp.Error == nil {
			resp.Error = migrationError(err)
		}
		resp.Compatible = false
	}
	if missing := wire.FeaturesOf(req.GetFeatures()); len(req.GetFeatures()) != len(missing.List()) {
		fail(wire.Errorf(codes.FailedPrecondition, wire.ReasonFeatureNotSupported,
			"this destination (Ferry %s) speaks %v; the migration asks for %v", resp.AgentVersion, wire.Supported, req.GetFeatures()))
	}
	src := make([]vfio.Description, len(req.GetDevices()))
	for i, p := range req.GetDevices() {
		src[i] = deviceapi.DescriptionFromProto(p.GetSource())
	}
	needs := needsOf(src, req.GetMode())
	for i, p := range req.GetDevices() {
		v := &ferryv1.PreflightVerdict{DestDevice: p.GetDestDevice(), Compatible: true}
		resp.Devices = append(resp.Devices, v)
		spec, err := deviceapi.CanonicalSpec(p.GetDestDevice())
		if err == nil {
			v.DestDevice = spec
			var dst vfio.Description
			dst, err = a.describe(spec)
			v.Dest = deviceapi.DescriptionToProto(dst)
			if err == nil {
				if m, ok := vfio.Compatible(src[i], dst, needs[i]); !ok {
					err = incompatible(i, src[i].Spec, spec, m)
					v.Field = m.Field
				}
			}
		}
		if err != nil {
			v.Compatible, v.Error = false, migrationError(err)
			resp.Compatible = false
		}
	}
	// The budget: a migration needs a window for each device.
	if want := WindowCost(a.cfg.MaxChunks, a.cfg.MaxBytes) * uint64(len(req.GetDevices())); a.BudgetInUse()+want > a.cfg.MemoryBudget {
		fail(wire.Errorf(codes.ResourceExhausted, wire.ReasonBudgetExhausted,
			"%d devices need %d bytes of window; %d of the %d-byte memory budget are in use", len(req.GetDevices()), want, a.BudgetInUse(), a.cfg.MemoryBudget))
	}
	return resp, nil
}

// describe describes a destination device, opening it if the registry
// has not (as PrepareIncoming would) without changing its state.
func (a *Agent) describe(spec string) (vfio.Description, error) {
	dev, release, err := a.acquire(spec, preflightOwner)
	if err != nil {
		return vfio.Description{Spec: spec}, deviceapi.Error(spec, "open", err)
	}
	defer release()
	return vfio.Describe(dev), nil
}

// migrationError is a status error as the API's MigrationError.
func migrationError(err error) *ferryv1.MigrationError {
	return &ferryv1.MigrationError{Code: int32(wire.Code(err)), Reason: wire.Reason(err), Message: fmt.Sprint(wire.Message(err))}
}
