package tracing

import (
	"context"
	"testing"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
)

func TestEnabled(t *testing.T) {
	for _, c := range []struct {
		env  map[string]string
		want bool
	}{
		{nil, false},
		{map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, true},
		{map[string]string{"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4317"}, true},
		{map[string]string{"OTEL_TRACES_EXPORTER": "otlp"}, true},
		{map[string]string{"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, false},
		{map[string]string{"OTEL_TRACES_EXPORTER": "zipkin"}, false},
		{map[string]string{"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, false},
	} {
		if got := enabled(func(k string) string { return c.env[k] }); got != c.want {
			t.Errorf("%v: enabled %v, want %v", c.env, got, c.want)
		}
	}
}

func TestFromEnvRefusesAnotherProtocol(t *testing.T) {
	t.Setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
	t.Setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
	if tr, err := FromEnv(t.Context(), "ferry"); err == nil || tr != nil {
		t.Fatalf("http/protobuf: %v, %v", tr, err)
	}
}

func TestOffByDefault(t *testing.T) {
	for _, k := range []string{"OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_EXPORTER", "OTEL_SDK_DISABLED"} {
		t.Setenv(k, "")
	}
	tr, err := FromEnv(t.Context(), "ferry")
	if err != nil || tr != nil {
		t.Fatalf("FromEnv with no OTEL_*: %v, %v", tr, err)
	}
	// A nil Tracing adds nothing and traces nothing.
	if tr.ServerHandler() != nil || tr.DialOptions() != nil {
		t.Error("nil tracing adds a handler")
	}
	ctx, end := tr.StartMigrate(t.Context(), "m")
	end()
	if TraceID(ctx) != "" {
		t.Error("nil tracing started a trace")
	}
	_, m := StartMigration(tr.TracerProvider(), context.Background(), ctx, "source", "m", ferryv1.MigrationPhase_MIGRATION_PHASE_PREPARING)
	m.Phase(ferryv1.MigrationPhase_MIGRATION_PHASE_WAITING)
	m.End(ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED, "", "")
	var none *Migration
	none.Phase(ferryv1.MigrationPhase_MIGRATION_PHASE_WAITING)
	none.End(ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED, "X", "y")
	if err := tr.Shutdown(t.Context()); err != nil {
		t.Error(err)
	}
}

// A migration's span is a child of the call that made it, lives in the
// base context's lifetime, and has one span per phase, ended as the next
// begins; a phase entered again is not a new span; the end records the
// failure.
func TestMigrationSpans(t *testing.T) {
	exp := tracetest.NewInMemoryExporter()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(exp))
	rpc, call := tp.Tracer("test").Start(t.Context(), "StartMigration")
	base, cancel := context.WithCancel(context.Background())
	ctx, m := StartMigration(tp, base, rpc, "source", "m1", ferryv1.MigrationPhase_MIGRATION_PHASE_PREPARING)
	call.End()
	if cancel(); ctx.Err() == nil {
		t.Error("the migration's context does not end with its base")
	}
	m.Phase(ferryv1.MigrationPhase_MIGRATION_PHASE_WAITING)
	m.Phase(ferryv1.MigrationPhase_MIGRATION_PHASE_WAITING)
	m.Phase(ferryv1.MigrationPhase_MIGRATION_PHASE_STOPCOPY)
	m.Phase(ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED)
	m.End(ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED, "DEVICE_VERIFY_FAILED", "byte 7")

	spans := exp.GetSpans()
	var mig tracetest.SpanStub
	var phases []string
	for _, s := range spans {
		switch {
		case s.Name == "migration":
			mig = s
		case s.Name != "StartMigration":
			phases = append(phases, s.Name)
			if s.Parent.SpanID() != trace.SpanContextFromContext(ctx).SpanID() {
				t.Errorf("%s is not a child of the migration span", s.Name)
			}
		}
	}
	if mig.Parent.SpanID() != call.SpanContext().SpanID() {
		t.Error("the migration span is not a child of its call")
	}
	want := []string{"phase PREPARING", "phase WAITING", "phase STOPCOPY"}
	if len(phases) != len(want) {
		t.Fatalf("phase spans %v, want %v", phases, want)
	}
	for i := range want {
		if phases[i] != want[i] {
			t.Fatalf("phase spans %v, want %v", phases, want)
		}
	}
	if mig.Status.Description != "byte 7" || mig.Status.Code.String() != "Error" {
		t.Errorf("status %+v", mig.Status)
	}
}
