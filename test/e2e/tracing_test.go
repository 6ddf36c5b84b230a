package e2e

import (
	"context"
	"net"
	"slices"
	"strings"
	"testing"

	"go.opentelemetry.io/otel/attribute"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/internal/loopback"
	"github.com/vfio-ferry/ferry/internal/tracing"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/services/chunkwire"
	"github.com/vfio-ferry/ferry/services/grpcserver"
)

// TestMigrationTrace runs one migration between two agents and a control
// plane that all trace into the SDK's in-memory exporter, and checks the
// span tree: one trace; on each agent a migration span under the call
// that created it, with its phases in order beneath it; the source's
// calls to the destination as children of its migration span and the
// destination's server spans as their children; and no span or event per
// chunk.
func TestMigrationTrace(t *testing.T) {
	exp := tracetest.NewInMemoryExporter()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(exp))
	tr := tracing.New(tp)
	dataLis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l, err := loopback.Start(loopback.Config{
		DestDevices: vfio.RegistryOptions{AllowSim: true}, SourceDevices: vfio.RegistryOptions{AllowSim: true},
		DataListener: dataLis, Tracing: tr,
	})
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	t.Cleanup(func() {
		if !closed {
			l.Close(context.Background())
		}
	})
	dialOpts := append(grpcserver.DialOptions(insecure.NewCredentials(), chunkwire.NewPool()), tr.DialOptions()...)
	dconn, err := grpc.NewClient(l.DestAddr, dialOpts...)
	if err != nil {
		t.Fatal(err)
	}
	defer dconn.Close()
	sconn, err := grpc.NewClient(l.SourceAddr, dialOpts...)
	if err != nil {
		t.Fatal(err)
	}
	defer sconn.Close()
	dst, src := ferryv1.NewDestAgentClient(dconn), ferryv1.NewSourceAgentClient(sconn)

	// The control plane: one span for the whole migration.
	ctx, root := tp.Tracer("control-plane").Start(t.Context(), "ferry migrate")
	const chunks, channels = 64, 4
	dev := "sim:size=64MiB,seed=81"
	prep, err := dst.PrepareIncoming(ctx, &ferryv1.PrepareIncomingRequest{MigrationId: "traced", Devices: []string{dev}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := src.StartMigration(ctx, &ferryv1.StartMigrationRequest{MigrationId: "traced", DestAddress: l.DestAddr, Token: prep.GetToken(),
		Channels: channels, ChunkSize: 1 << 20, Devices: []*ferryv1.DevicePair{{SourceDevice: dev, DestDevice: dev}}}); err != nil {
		t.Fatal(err)
	}
	stream, err := src.WatchMigration(ctx, &ferryv1.WatchMigrationRequest{MigrationId: "traced"})
	if err != nil {
		t.Fatal(err)
	}
	if m := toFinal(t, stream.Recv); m.GetPhase() != succeeded {
		t.Fatalf("migration %v: %v", m.GetPhase(), m.GetError())
	}
	root.End()
	// Closing the agents waits for the migrations' ends, and so for their
	// spans.
	closed = true
	if err := l.Close(context.Background()); err != nil {
		t.Fatal(err)
	}

	spans := exp.GetSpans()
	traceID := root.SpanContext().TraceID()
	byID := map[trace.SpanID]tracetest.SpanStub{}
	for _, s := range spans {
		if s.SpanContext.TraceID() != traceID {
			t.Errorf("span %q is in trace %s, not the migration's %s", s.Name, s.SpanContext.TraceID(), traceID)
		}
		byID[s.SpanContext.SpanID()] = s
	}
	parentName := func(s tracetest.SpanStub) string { return byID[s.Parent.SpanID()].Name }
	find := func(name string, kind trace.SpanKind, role string) []tracetest.SpanStub {
		var out []tracetest.SpanStub
		for _, s := range spans {
			if s.Name == name && s.SpanKind == kind && (role == "" || hasAttr(s.Attributes, "ferry.role", role)) {
				out = append(out, s)
			}
		}
		return out
	}
	one := func(name string, kind trace.SpanKind, role string) tracetest.SpanStub {
		t.Helper()
		got := find(name, kind, role)
		if len(got) != 1 {
			t.Fatalf("%d spans %q (%v, role %q), want 1; all spans:\n%s", len(got), name, kind, role, names(spans))
		}
		return got[0]
	}

	// The control plane's calls are children of its span.
	for _, m := range []string{"ferry.v1.DestAgent/PrepareIncoming", "ferry.v1.SourceAgent/StartMigration"} {
		if c := one(m, trace.SpanKindClient, ""); c.Parent.SpanID() != root.SpanContext().SpanID() {
			t.Errorf("%s's parent is %q, not the control plane's span", m, parentName(c))
		}
	}
	// Each agent's migration span is under the call that created it.
	smig, dmig := one("migration", trace.SpanKindInternal, "source"), one("migration", trace.SpanKindInternal, "dest")
	if p := byID[smig.Parent.SpanID()]; p.Name != "ferry.v1.SourceAgent/StartMigration" || p.SpanKind != trace.SpanKindServer {
		t.Errorf("the source's migration span's parent is %q (%v)", p.Name, p.SpanKind)
	}
	if p := byID[dmig.Parent.SpanID()]; p.Name != "ferry.v1.DestAgent/PrepareIncoming" || p.SpanKind != trace.SpanKindServer {
		t.Errorf("the destination's migration span's parent is %q (%v)", p.Name, p.SpanKind)
	}
	// Phases in order, one after the other, under each migration span.
	for _, c := range []struct {
		mig  tracetest.SpanStub
		want []string
	}{
		{smig, []string{"phase PREPARING", "phase WAITING", "phase STOPCOPY", "phase FINISHING"}},
		{dmig, []string{"phase PREPARING", "phase WAITING", "phase STOPCOPY", "phase FINISHING", "phase VERIFIED"}},
	} {
		var phases []tracetest.SpanStub
		for _, s := range spans {
			if s.Parent.SpanID() == c.mig.SpanContext.SpanID() && strings.HasPrefix(s.Name, "phase ") {
				phases = append(phases, s)
			}
		}
		slices.SortFunc(phases, func(a, b tracetest.SpanStub) int { return a.StartTime.Compare(b.StartTime) })
		var got []string
		for i, p := range phases {
			got = append(got, p.Name)
			if i > 0 && p.StartTime.Before(phases[i-1].EndTime) {
				t.Errorf("%s starts before %s ended", p.Name, phases[i-1].Name)
			}
			if p.EndTime.After(c.mig.EndTime) {
				t.Errorf("%s ends after its migration span", p.Name)
			}
		}
		if !slices.Equal(got, c.want) {
			t.Errorf("%s phases %v, want %v", roleOf(c.mig), got, c.want)
		}
	}
	// The source's calls to the destination: children of its migration
	// span, each with the destination's server span beneath it.
	for _, c := range []struct {
		method string
		n      int
	}{{"ferry.v1.Transfer/Open", 1}, {"ferry.v1.Transfer/Channel", channels}, {"ferry.v1.Transfer/SwitchoverStart", 1}, {"ferry.v1.Transfer/Finish", 1}} {
		clients := find(c.method, trace.SpanKindClient, "")
		if len(clients) != c.n {
			t.Errorf("%d client spans %s, want %d", len(clients), c.method, c.n)
		}
		for _, cl := range clients {
			if cl.Parent.SpanID() != smig.SpanContext.SpanID() {
				t.Errorf("%s's parent is %q, not the source's migration span", c.method, parentName(cl))
			}
			served := false
			for _, s := range find(c.method, trace.SpanKindServer, "") {
				served = served || s.Parent.SpanID() == cl.SpanContext.SpanID()
			}
			if !served {
				t.Errorf("no destination server span under %s", c.method)
			}
		}
	}
	// Never per chunk: fewer spans than chunks, and no span with an event
	// per message.
	if len(spans) >= chunks {
		t.Errorf("%d spans for a migration of %d chunks", len(spans), chunks)
	}
	for _, s := range spans {
		if len(s.Events) > 16 {
			t.Errorf("span %q has %d events", s.Name, len(s.Events))
		}
		if strings.HasPrefix(s.Name, "grpc.health") {
			t.Errorf("a health check was traced: %s", s.Name)
		}
	}
}

func hasAttr(attrs []attribute.KeyValue, key, value string) bool {
	for _, a := range attrs {
		if string(a.Key) == key && a.Value.AsString() == value {
			return true
		}
	}
	return false
}

func roleOf(s tracetest.SpanStub) string {
	for _, a := range s.Attributes {
		if a.Key == "ferry.role" {
			return a.Value.AsString()
		}
	}
	return "?"
}

func names(spans tracetest.SpanStubs) string {
	var b strings.Builder
	for _, s := range spans {
		b.WriteString("  " + s.Name + " " + s.SpanKind.String() + " " + roleOf(s) + "\n")
	}
	return b.String()
}
