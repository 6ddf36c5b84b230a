package grpcserver

import (
	"context"
	"errors"
	"io"
	"net"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"
	"google.golang.org/protobuf/proto"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/services/wire"
)

// destAgent answers PrepareIncoming (so a request that reaches it is
// told apart from one refused before).
type destAgent struct {
	ferryv1.UnimplementedDestAgentServer
}

func (destAgent) PrepareIncoming(context.Context, *ferryv1.PrepareIncomingRequest) (*ferryv1.PrepareIncomingResponse, error) {
	return &ferryv1.PrepareIncomingResponse{}, nil
}

// transfer's Channel returns the error of its first Recv, as a handler
// that passes a read error on does.
type transfer struct {
	ferryv1.UnimplementedTransferServer
}

func (transfer) Channel(s grpc.BidiStreamingServer[ferryv1.ChannelRequest, ferryv1.ChannelResponse]) error {
	_, err := s.Recv()
	if errors.Is(err, io.EOF) {
		return nil
	}
	return err
}

// rawCodec sends []byte as they are, so a test can send what no
// generated client would.
type rawCodec struct{}

func (rawCodec) Marshal(v any) (mem.BufferSlice, error) {
	return mem.BufferSlice{mem.SliceBuffer(*v.(*[]byte))}, nil
}
func (rawCodec) Unmarshal(data mem.BufferSlice, v any) error {
	*v.(*[]byte) = data.Materialize()
	return nil
}
func (rawCodec) Name() string { return "proto" }

func serve(t *testing.T) *grpc.ClientConn {
	t.Helper()
	lis := bufconn.Listen(1 << 20)
	srv := New(Config{Creds: insecure.NewCredentials()})
	ferryv1.RegisterDestAgentServer(srv, destAgent{})
	ferryv1.RegisterTransferServer(srv, transfer{})
	srv.Ready()
	done := make(chan error, 1)
	go func() { done <- srv.GRPC.Serve(lis) }()
	t.Cleanup(func() {
		srv.GRPC.Stop()
		<-done
	})
	conn, err := grpc.NewClient("passthrough:///bufconn",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallSendMsgSize(4*wire.MaxRecvMsgSize), grpc.ForceCodecV2(rawCodec{})))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func wantReason(t *testing.T, what string, err error, code codes.Code, reason string) {
	t.Helper()
	if status.Code(err) != code || wire.Reason(err) != reason {
		t.Errorf("%s: got %v (code %v, reason %q), want code %v, reason %s", what, err, status.Code(err), wire.Reason(err), code, reason)
	}
}

// A message gRPC refuses before Ferry reads it carries an ErrorInfo
// reason, on a unary method and on a stream; a good one still reaches the
// handler.
func TestRefusedMessagesCarryReasons(t *testing.T) {
	conn := serve(t)
	ctx := t.Context()
	const prepare = "/ferry.v1.DestAgent/PrepareIncoming"

	good := &ferryv1.PrepareIncomingRequest{MigrationId: "m"}
	goodBytes, err := protoMarshal(good)
	if err != nil {
		t.Fatal(err)
	}
	var out []byte
	if err := conn.Invoke(ctx, prepare, &goodBytes, &out); err != nil {
		t.Fatalf("a valid request: %v", err)
	}

	big := make([]byte, wire.MaxRecvMsgSize+1)
	wantReason(t, "unary, oversized", conn.Invoke(ctx, prepare, &big, &out), codes.ResourceExhausted, wire.ReasonMessageTooLarge)

	garbage := []byte{0xff, 0xff, 0xff, 0xff}
	wantReason(t, "unary, malformed", conn.Invoke(ctx, prepare, &garbage, &out), codes.InvalidArgument, wire.ReasonMalformedMessage)

	desc := &grpc.StreamDesc{StreamName: "Channel", ClientStreams: true, ServerStreams: true}
	for _, c := range []struct {
		name   string
		msg    []byte
		code   codes.Code
		reason string
	}{
		{"stream, oversized", big, codes.ResourceExhausted, wire.ReasonMessageTooLarge},
		{"stream, malformed", garbage, codes.InvalidArgument, wire.ReasonMalformedMessage},
	} {
		s, err := conn.NewStream(ctx, desc, "/ferry.v1.Transfer/Channel")
		if err != nil {
			t.Fatal(err)
		}
		msg := c.msg
		if err := s.SendMsg(&msg); err != nil && !errors.Is(err, io.EOF) {
			t.Fatalf("%s: send: %v", c.name, err)
		}
		var resp []byte
		wantReason(t, c.name, s.RecvMsg(&resp), c.code, c.reason)
	}
}

func protoMarshal(m *ferryv1.PrepareIncomingRequest) ([]byte, error) { return proto.Marshal(m) }
