package tracing

import (
	"context"
	"strings"
	"sync"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
)

var nooptp = noop.NewTracerProvider()

// instrumentation is the tracer's name.
const instrumentation = "github.com/vfio-ferry/ferry"

// Migration is the spans of one migration on one agent: its own span and
// the span of the phase it is in. A nil *Migration is valid and records
// nothing.
type Migration struct {
	tracer trace.Tracer
	span   trace.Span
	ctx    context.Context // the migration span's context, parent of the phase spans

	mu      sync.Mutex
	phase   trace.Span // the current phase's span, nil in none
	last    ferryv1.MigrationPhase
	entered bool // last is set
}

// StartMigration starts the span of migration id on the agent of role
// ("source" or "dest"), as a child of the span in parent (the call that
// created the migration), and in phase. It returns base, carrying the
// migration span, for the migration's own work and outgoing calls: base
// keeps its deadline and cancellation, parent only lends the trace.
func StartMigration(tp trace.TracerProvider, base, parent context.Context, role, id string, phase ferryv1.MigrationPhase) (context.Context, *Migration) {
	if tp == nil {
		tp = nooptp
	}
	tracer := tp.Tracer(instrumentation)
	pctx := trace.ContextWithSpanContext(base, trace.SpanContextFromContext(parent))
	ctx, span := tracer.Start(pctx, "migration", trace.WithAttributes(
		attribute.String("ferry.migration.id", id),
		attribute.String("ferry.role", role),
	))
	m := &Migration{tracer: tracer, span: span, ctx: ctx}
	m.Phase(phase)
	return ctx, m
}

// PhaseName is a phase as the spans name it: "STOPCOPY".
func PhaseName(p ferryv1.MigrationPhase) string {
	return strings.TrimPrefix(p.String(), "MIGRATION_PHASE_")
}

func final(p ferryv1.MigrationPhase) bool {
	switch p {
	case ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED, ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED, ferryv1.MigrationPhase_MIGRATION_PHASE_CANCELLED:
		return true
	}
	return false
}

// Phase records that the migration entered p: the span of the phase it
// was in ends, and one for p starts unless p is final.
func (m *Migration) Phase(p ferryv1.MigrationPhase) {
	if m == nil {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.entered && p == m.last {
		return
	}
	m.entered = true
	if m.phase != nil {
		m.phase.End()
		m.phase = nil
	}
	m.last = p
	m.span.AddEvent("phase", trace.WithAttributes(attribute.String("ferry.phase", PhaseName(p))))
	if !final(p) {
		_, m.phase = m.tracer.Start(m.ctx, "phase "+PhaseName(p), trace.WithAttributes(attribute.String("ferry.phase", PhaseName(p))))
	}
}

// End ends the migration's spans with its final phase and, when it did
// not succeed, its error's reason and message.
func (m *Migration) End(p ferryv1.MigrationPhase, reason, message string) {
	if m == nil {
		return
	}
	m.Phase(p)
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.phase != nil {
		m.phase.End()
		m.phase = nil
	}
	m.span.SetAttributes(attribute.String("ferry.phase", PhaseName(p)))
	if p != ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED {
		if reason != "" {
			m.span.SetAttributes(attribute.String("ferry.error.reason", reason))
		}
		m.span.SetStatus(codes.Error, message)
	}
	m.span.End()
}
