package source

import (
	"context"

	"google.golang.org/grpc/codes"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/internal/buildinfo"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/services/chunkwire"
	"github.com/vfio-ferry/ferry/services/deviceapi"
	"github.com/vfio-ferry/ferry/services/wire"
)

// Version skew (services/dest/compat.go has the whole story): the source
// asks for the features it may use in Open, and uses only what the
// destination grants. A destination that answers no agent_version is a
// 0.1.0 one: it grants nothing, and is spoken to as 0.1.0 spoke.

// wanted is what this migration asks of the destination.
func (m *migration) wanted() wire.Features {
	f := wire.Features(0).With(ferryv1.Feature_FEATURE_COMMIT).
		With(ferryv1.Feature_FEATURE_CONFIG_STATE).
		With(ferryv1.Feature_FEATURE_DEVICE_CHECK).
		With(ferryv1.Feature_FEATURE_ZERO_CHUNKS).
		With(ferryv1.Feature_FEATURE_PROMPT_FEEDBACK)
	if m.req.GetMode() == ferryv1.MigrationMode_MIGRATION_MODE_PRECOPY {
		f = f.With(ferryv1.Feature_FEATURE_PRECOPY)
	}
	if m.req.GetCompression() == ferryv1.ChunkCompression_CHUNK_COMPRESSION_ZSTD {
		f = f.With(ferryv1.Feature_FEATURE_COMPRESSION_ZSTD)
	}
	return f
}

// negotiated takes what the destination granted, and refuses a
// destination that lacks what the migration cannot go without: pre-copy
// for a pre-copy migration, the device check when the request asks for a
// preflight. Nothing has stopped yet.
func (m *migration) negotiated(opened *ferryv1.OpenResponse) error {
	var granted wire.Features
	if opened.GetAgentVersion() != "" {
		granted = wire.FeaturesOf(opened.GetGrantedFeatures()) & m.wanted()
	}
	m.mu.Lock()
	m.features, m.destVersion = granted, opened.GetAgentVersion()
	m.mu.Unlock()
	if granted.Has(ferryv1.Feature_FEATURE_COMPRESSION_ZSTD) {
		c, err := chunkwire.NewCompressor()
		if err != nil {
			return wire.Errorf(codes.Internal, wire.ReasonInternal, "zstd: %v", err)
		}
		m.compressor = c
	} else if m.req.GetCompression() == ferryv1.ChunkCompression_CHUNK_COMPRESSION_ZSTD {
		m.log.Warn("the destination does not take compressed chunks: they travel as they are", "destination_version", m.peerVersion())
	}
	m.log.Info("session features", "destination_version", m.peerVersion(), "granted", granted.String())
	if m.req.GetMode() == ferryv1.MigrationMode_MIGRATION_MODE_PRECOPY && !granted.Has(ferryv1.Feature_FEATURE_PRECOPY) {
		return wire.Errorf(codes.FailedPrecondition, wire.ReasonFeatureNotSupported,
			"the destination (%s) does not speak pre-copy; migrate in stop-copy mode, or to an upgraded destination", m.peerVersion())
	}
	if m.req.GetPreflight() && !granted.Has(ferryv1.Feature_FEATURE_DEVICE_CHECK) {
		return wire.Errorf(codes.FailedPrecondition, wire.ReasonFeatureNotSupported,
			"the request asks for a preflight, and the destination (%s) cannot check device compatibility", m.peerVersion())
	}
	return nil
}

// peerVersion names the destination's build for messages.
func (m *migration) peerVersion() string {
	m.mu.Lock()
	v := m.destVersion
	m.mu.Unlock()
	if v == "" {
		return "Ferry 0.1.0"
	}
	return "Ferry " + v
}

// describeOwner holds a device while DescribeDevices describes it.
const describeOwner = "(describe)"

// DescribeDevices implements SourceAgent.
func (a *Agent) DescribeDevices(ctx context.Context, req *ferryv1.DescribeDevicesRequest) (*ferryv1.DescribeDevicesResponse, error) {
	if err := wire.ValidateDeviceCount(len(req.GetDevices())); err != nil {
		return nil, err
	}
	resp := &ferryv1.DescribeDevicesResponse{AgentVersion: buildinfo.Read().Version}
	for _, raw := range req.GetDevices() {
		spec, err := deviceapi.CanonicalSpec(raw)
		if err != nil {
			return nil, err
		}
		dev, release, err := a.cfg.Registry.Acquire(spec, describeOwner)
		if err != nil {
			return nil, deviceapi.Error(spec, "open", err)
		}
		resp.Devices = append(resp.Devices, deviceapi.DescriptionToProto(vfio.Describe(dev)))
		release()
	}
	return resp, nil
}
