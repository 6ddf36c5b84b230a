package main

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"net"
	"strings"
	"sync"
	"testing"

	collectortrace "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	"google.golang.org/grpc"
)

// collector is an OTLP/gRPC trace collector that keeps the names of the
// spans it receives, by trace id.
type collector struct {
	collectortrace.UnimplementedTraceServiceServer
	mu    sync.Mutex
	spans map[string][]string
}

func (c *collector) Export(_ context.Context, req *collectortrace.ExportTraceServiceRequest) (*collectortrace.ExportTraceServiceResponse, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, rs := range req.GetResourceSpans() {
		for _, ss := range rs.GetScopeSpans() {
			for _, s := range ss.GetSpans() {
				id := hex.EncodeToString(s.GetTraceId())
				c.spans[id] = append(c.spans[id], s.GetName())
			}
		}
	}
	return &collectortrace.ExportTraceServiceResponse{}, nil
}

// TestDemoTrace runs `ferry demo` with tracing turned on by the standard
// OTEL_* variables, against a collector of the test's own: the demo
// prints the trace id, and the collector has that trace, with the
// control plane's span, both agents' migration spans and the Transfer
// calls, by the time the command has exited.
func TestDemoTrace(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	col := &collector{spans: map[string][]string{}}
	srv := grpc.NewServer()
	collectortrace.RegisterTraceServiceServer(srv, col)
	go srv.Serve(lis)
	t.Cleanup(srv.Stop)
	t.Setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://"+lis.Addr().String())
	t.Setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
	t.Setenv("OTEL_TRACES_EXPORTER", "")
	t.Setenv("OTEL_SDK_DISABLED", "")

	code, out, errOut := runCLI(t, "demo", "--size", "8MiB", "--json")
	if code != 0 {
		t.Fatalf("demo: exit %d\n%s\n%s", code, out, errOut)
	}
	var r struct {
		TraceID string `json:"trace_id"`
	}
	if err := json.Unmarshal([]byte(out), &r); err != nil || len(r.TraceID) != 32 {
		t.Fatalf("no trace_id in the result: %v\n%s", err, out)
	}
	if !strings.Contains(errOut, "ferry demo: trace "+r.TraceID) {
		t.Errorf("the demo did not print its trace id:\n%s", errOut)
	}
	col.mu.Lock()
	got := strings.Join(col.spans[r.TraceID], "\n")
	col.mu.Unlock()
	for _, want := range []string{"ferry migrate", "migration", "phase STOPCOPY", "ferry.v1.SourceAgent/StartMigration", "ferry.v1.Transfer/Open", "ferry.v1.Transfer/Finish"} {
		if !strings.Contains(got, want) {
			t.Errorf("the collector's trace %s lacks %q; it has:\n%s", r.TraceID, want, got)
		}
	}
}
