package loopback_test

import (
	"errors"
	"net"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/vfio-ferry/ferry/internal/loopback"
	"github.com/vfio-ferry/ferry/pkg/flow"
	"github.com/vfio-ferry/ferry/services/dest"
)

func TestStartServesBothAgents(t *testing.T) {
	data, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	a, err := loopback.Start(loopback.Config{DataListener: data})
	if err != nil {
		t.Fatal(err)
	}
	for _, addr := range []string{a.DestAddr, a.SourceAddr} {
		conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		resp, err := healthpb.NewHealthClient(conn).Check(t.Context(), &healthpb.HealthCheckRequest{})
		conn.Close()
		if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			t.Errorf("%s: %v %v, want SERVING", addr, resp.GetStatus(), err)
		}
	}
	if err := a.Close(t.Context()); err != nil {
		t.Fatal(err)
	}
	if _, err := data.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Errorf("the data listener after Close: %v, want it closed", err)
	}
}

func TestFailedStartClosesTheDataListener(t *testing.T) {
	data, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	_, err = loopback.Start(loopback.Config{DataListener: data, Dest: dest.Config{MaxChunks: flow.MaxWindowChunks + 1}})
	if err == nil {
		t.Fatal("Start accepted a destination window beyond the limit")
	}
	if _, err := data.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Errorf("the data listener after a failed Start: %v, want it closed", err)
	}
}
