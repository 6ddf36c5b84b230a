// Package tracing is Ferry's OpenTelemetry tracing: off by default, on
// with the standard OTEL_* environment variables, and then one trace per
// migration across the control plane and both agents.
//
// What is traced:
//
//   - every gRPC call, client and server side, by otelgrpc's stats
//     handlers (ServerOptions, DialOptions), which carry the W3C trace
//     context in the call's metadata; health and reflection calls are
//     left out. A Channel stream is one span for its whole life, and no
//     event is recorded per message: chunk-level work is never traced per
//     chunk (direct data connections are not gRPC and have no spans).
//   - each migration on each agent (StartMigration), a span "migration"
//     that is a child of the call that created it (StartMigration at the
//     source, PrepareIncoming at the destination), with one child span
//     per phase ("phase WAITING", "phase STOPCOPY", ...), opened when the
//     migration enters the phase and ended when it leaves it. The source
//     makes its calls to the destination (Open, the channels,
//     SwitchoverStart, Finish, Commit, Abort) in the migration's context,
//     so they are children of its migration span, and the destination's
//     server spans children of those.
//
// So a control plane that calls PrepareIncoming and StartMigration in one
// trace (ferry migrate does) sees the whole migration as one trace.
//
// Turning it on ([FromEnv]): OTEL_TRACES_EXPORTER=otlp, or an OTLP
// endpoint (OTEL_EXPORTER_OTLP_ENDPOINT or
// OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) without OTEL_TRACES_EXPORTER, turns
// the OTLP/gRPC exporter on; OTEL_SDK_DISABLED=true or
// OTEL_TRACES_EXPORTER=none keeps it off. The exporter, the sampler
// (OTEL_TRACES_SAMPLER, default parentbased_always_on) and the resource
// (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES) read the rest of the
// standard variables. Only the gRPC protocol is built in:
// OTEL_EXPORTER_OTLP_PROTOCOL (or its _TRACES_ form) set to anything else
// is an error at start, not a silent fallback.
//
// Nothing here is global: the TracerProvider and the propagator are
// handed to the agents and to the gRPC options by main. A nil
// *Tracing is valid and traces nothing.
package tracing

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"

	"go.opentelemetry.io/contrib/instrumentation/google.golang.org/grpc/otelgrpc"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	metricnoop "go.opentelemetry.io/otel/metric/noop"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/stats"
)

// Tracing is the tracer provider of one process, and how its gRPC calls
// carry trace context.
type Tracing struct {
	tp       trace.TracerProvider
	prop     propagation.TextMapPropagator
	shutdown func(context.Context) error
}

// New traces with tp (for example an SDK TracerProvider with an
// in-memory exporter, in tests). Shutdown does nothing.
func New(tp trace.TracerProvider) *Tracing {
	return &Tracing{tp: tp, prop: propagation.TraceContext{}, shutdown: func(context.Context) error { return nil }}
}

// FromEnv returns the process's tracing as the OTEL_* environment
// variables ask, with service as the default service.name; nil when
// tracing is off. Call Shutdown before the process exits: it sends what is
// still buffered.
func FromEnv(ctx context.Context, service string) (*Tracing, error) {
	if !enabled(os.Getenv) {
		return nil, nil
	}
	for _, v := range []string{"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"} {
		if p := os.Getenv(v); p != "" {
			if p != "grpc" {
				return nil, fmt.Errorf("%s=%s: this build exports traces over OTLP/gRPC only (set it to grpc or unset it)", v, p)
			}
			break
		}
	}
	exp, err := otlptracegrpc.New(ctx)
	if err != nil {
		return nil, fmt.Errorf("OTLP trace exporter: %w", err)
	}
	res, err := resource.New(ctx,
		resource.WithAttributes(semconvServiceName(service)),
		resource.WithFromEnv(), // OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win
		resource.WithTelemetrySDK(),
		resource.WithHost(),
		resource.WithProcessPID(),
	)
	if err != nil && !errors.Is(err, resource.ErrPartialResource) {
		return nil, fmt.Errorf("trace resource: %w", err)
	}
	tp := sdktrace.NewTracerProvider(sdktrace.WithBatcher(exp), sdktrace.WithResource(res))
	return &Tracing{tp: tp, prop: propagation.TraceContext{}, shutdown: tp.Shutdown}, nil
}

// enabled reports whether the environment getenv reads turns tracing on.
func enabled(getenv func(string) string) bool {
	if strings.EqualFold(getenv("OTEL_SDK_DISABLED"), "true") {
		return false
	}
	switch e := strings.ToLower(getenv("OTEL_TRACES_EXPORTER")); e {
	case "otlp":
		return true
	case "":
		return getenv("OTEL_EXPORTER_OTLP_ENDPOINT") != "" || getenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") != ""
	default:
		// "none", or an exporter this build does not have.
		return false
	}
}

// Shutdown flushes and stops the exporter.
func (t *Tracing) Shutdown(ctx context.Context) error {
	if t == nil {
		return nil
	}
	return t.shutdown(ctx)
}

// TracerProvider is the provider the agents' migration spans use: a
// no-op one when t is nil.
func (t *Tracing) TracerProvider() trace.TracerProvider {
	if t == nil {
		return nooptp
	}
	return t.tp
}

// traced reports whether a call is traced: not health checks nor
// reflection.
func traced(info *stats.RPCTagInfo) bool {
	name := strings.TrimPrefix(info.FullMethodName, "/")
	return !strings.HasPrefix(name, healthpb.Health_ServiceDesc.ServiceName+"/") && !strings.HasPrefix(name, "grpc.reflection.")
}

func (t *Tracing) options() []otelgrpc.Option {
	return []otelgrpc.Option{
		otelgrpc.WithTracerProvider(t.tp),
		otelgrpc.WithPropagators(t.prop),
		// gRPC metrics are the Prometheus ones (services/telemetry).
		otelgrpc.WithMeterProvider(metricnoop.NewMeterProvider()),
		otelgrpc.WithFilter(traced),
	}
}

// ServerHandler is the stats handler of an agent's gRPC server; nil when
// t is nil.
func (t *Tracing) ServerHandler() stats.Handler {
	if t == nil {
		return nil
	}
	return otelgrpc.NewServerHandler(t.options()...)
}

// DialOptions trace the calls on a client connection; none when t is nil.
func (t *Tracing) DialOptions() []grpc.DialOption {
	if t == nil {
		return nil
	}
	return []grpc.DialOption{grpc.WithStatsHandler(otelgrpc.NewClientHandler(t.options()...))}
}

// TraceID is the id of the trace ctx's span belongs to, "" when it has
// none (tracing off).
func TraceID(ctx context.Context) string {
	sc := trace.SpanContextFromContext(ctx)
	if !sc.HasTraceID() {
		return ""
	}
	return sc.TraceID().String()
}

func semconvServiceName(name string) attribute.KeyValue {
	return attribute.String("service.name", name)
}

// StartMigrate starts the control plane's span of one migration, id,
// under which its calls to both agents go (ferry migrate, ferry demo). It
// returns ctx as it is and a no-op end when t is nil.
func (t *Tracing) StartMigrate(ctx context.Context, id string) (context.Context, func()) {
	if t == nil {
		return ctx, func() {}
	}
	ctx, span := t.tp.Tracer(instrumentation).Start(ctx, "ferry migrate", trace.WithAttributes(attribute.String("ferry.migration.id", id)))
	return ctx, func() { span.End() }
}
