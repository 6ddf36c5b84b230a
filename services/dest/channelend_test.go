package dest

import (
	"context"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/services/wire"
)

// endedStream is a Channel stream whose source goes away once it has the
// first window update, as a source's channels do once its migration has
// ended: its context is cancelled, and its RecvMsg blocks until the
// handler has returned, as gRPC's does.
type endedStream struct {
	grpc.ServerStream
	ctx      context.Context
	cancel   context.CancelFunc
	returned chan struct{}
}

func (s *endedStream) Context() context.Context { return s.ctx }

func (s *endedStream) Send(*ferryv1.ChannelResponse) error {
	s.cancel()
	return nil
}

func (s *endedStream) Recv() (*ferryv1.ChannelRequest, error) { return nil, s.RecvMsg(nil) }

func (s *endedStream) RecvMsg(any) error {
	<-s.returned
	return status.FromContextError(s.ctx.Err()).Err()
}

// A stream whose source went away ends with a gRPC status (CANCELED), not
// with the bare context error: the interceptors around the handler (the
// access log, the grpc_server_handled_total metric) read the handler's
// error as it is, and a bare one is UNKNOWN to them, logged at ERROR for
// every channel of every migration. The soak found hundreds of them.
func TestChannelOfAGoneSourceEndsWithAStatus(t *testing.T) {
	h := newHarness(t)
	session := h.open("gone", 1)
	ctx, cancel := context.WithCancel(metadata.NewIncomingContext(t.Context(),
		metadata.Pairs(wire.HeaderSession, session, wire.HeaderChannel, "0")))
	defer cancel()
	st := &endedStream{ctx: ctx, cancel: cancel, returned: make(chan struct{})}
	err := (&transferServer{a: h.agent}).Channel(st)
	close(st.returned)
	s, ok := status.FromError(err)
	if !ok || s.Code() != codes.Canceled {
		t.Fatalf("the handler returned %#v (a status: %v); want a CANCELED status", err, ok)
	}
}
