package grpcserver

import (
	"context"
	"errors"
	"io"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"

	"github.com/vfio-ferry/ferry/services/wire"
)

// gRPC reads a request message before any handler or interceptor sees
// it, and when the read fails it writes the call's status itself, at
// once, without an ErrorInfo: RESOURCE_EXHAUSTED for a message over its
// limit, INTERNAL for one the codec cannot decode. A control plane could
// not tell those from Ferry's own errors. So the server takes both
// decisions out of gRPC's hands:
//
//   - gRPC's own limit is grpcRecvLimit, twice wire.MaxRecvMsgSize, and
//     the codec refuses a message over wire.MaxRecvMsgSize itself: it
//     arrives as MESSAGE_TOO_LARGE (RESOURCE_EXHAUSTED). Only a message
//     over twice the limit is still refused by gRPC at its length prefix,
//     before it is read, without a reason: to give it one gRPC would have
//     to read it whole.
//   - A message that does not decode arrives as MALFORMED_MESSAGE
//     (INVALID_ARGUMENT: the caller sent it; the server did not fail).
//
// Every method registered on the Server (RegisterService) reads through
// a recvTarget: the unary handler's decode function and the stream's
// RecvMsg hand gRPC the target instead of the message, the codec decodes
// into the message and keeps its own error in the target instead of
// failing the read, and the read returns that error to the handler,
// which answers with it. Reads of other services (reflection) go to the
// codec as they are.

// grpcRecvLimit is the limit given to gRPC (grpc.MaxRecvMsgSize): above
// wire.MaxRecvMsgSize, so that the codec sees what is over Ferry's limit
// and refuses it with a reason.
const grpcRecvLimit = 2 * wire.MaxRecvMsgSize

// RegisterService registers a service on the server with its message
// reads translated as above. Server is a grpc.ServiceRegistrar: pass it
// to the generated RegisterXServer functions.
func (s *Server) RegisterService(desc *grpc.ServiceDesc, impl any) {
	s.GRPC.RegisterService(targetedDesc(desc), impl)
}

// targetedDesc is desc with every handler reading through a recvTarget.
func targetedDesc(desc *grpc.ServiceDesc) *grpc.ServiceDesc {
	d := *desc
	d.Methods = make([]grpc.MethodDesc, len(desc.Methods))
	for i, m := range desc.Methods {
		h := m.Handler
		m.Handler = func(srv any, ctx context.Context, dec func(any) error, in grpc.UnaryServerInterceptor) (any, error) {
			return h(srv, ctx, func(v any) error { return recvInto(dec, v) }, in)
		}
		d.Methods[i] = m
	}
	d.Streams = make([]grpc.StreamDesc, len(desc.Streams))
	for i, st := range desc.Streams {
		h := st.Handler
		st.Handler = func(srv any, ss grpc.ServerStream) error { return h(srv, targetedStream{ss}) }
		d.Streams[i] = st
	}
	return &d
}

// targetedStream reads every message through a recvTarget.
type targetedStream struct{ grpc.ServerStream }

func (s targetedStream) RecvMsg(m any) error { return recvInto(s.ServerStream.RecvMsg, m) }

// recvTarget is what gRPC is given to decode into: the message, and the
// codec's verdict on it.
type recvTarget struct {
	msg any
	err error
}

// recvInto reads one message into m with read (gRPC's RecvMsg or decode
// function), and returns the codec's error, or gRPC's own, with a reason.
func recvInto(read func(any) error, m any) error {
	t := recvTarget{msg: m}
	if err := read(&t); err != nil {
		return withReason(err)
	}
	return t.err
}

// withReason gives a read error of gRPC's own an ErrorInfo reason (the
// client will not see it: gRPC has answered already; the handler's log
// and metrics do). It leaves alone the end of a stream, a cancelled or
// expired call, and an error that carries a reason.
func withReason(err error) error {
	if errors.Is(err, io.EOF) || wire.Reason(err) != "" {
		return err
	}
	st, ok := status.FromError(err)
	if !ok {
		return err
	}
	switch st.Code() {
	case codes.ResourceExhausted:
		return wire.Errorf(codes.ResourceExhausted, wire.ReasonMessageTooLarge, "%s", st.Message())
	case codes.Internal:
		return wire.Errorf(codes.InvalidArgument, wire.ReasonMalformedMessage, "%s", st.Message())
	}
	return err
}

// targetCodec decodes into a recvTarget's message and keeps the verdict
// in the target; anything else goes to the codec it wraps as it is.
type targetCodec struct{ encoding.CodecV2 }

func (c targetCodec) Unmarshal(data mem.BufferSlice, v any) error {
	t, ok := v.(*recvTarget)
	if !ok {
		return c.CodecV2.Unmarshal(data, v)
	}
	if n := data.Len(); n > wire.MaxRecvMsgSize {
		t.err = wire.Errorf(codes.ResourceExhausted, wire.ReasonMessageTooLarge, "message of %d bytes: the limit is %d", n, wire.MaxRecvMsgSize)
		return nil
	}
	if err := c.CodecV2.Unmarshal(data, t.msg); err != nil {
		t.err = wire.Errorf(codes.InvalidArgument, wire.ReasonMalformedMessage, "message of %d bytes does not decode as %T: %v", data.Len(), t.msg, err)
	}
	return nil
}
