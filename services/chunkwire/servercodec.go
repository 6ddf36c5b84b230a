package chunkwire

import (
	"github.com/vfio-ferry/ferry/services/wire"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/mem"
)

// ServerCodec is the codec agents serve with. A ChannelRequest that does
// not decode (a data field that declares more bytes than the message
// carries, a truncated field, a wrong wire type) does not fail RecvMsg:
// gRPC would answer the stream at once with a bare INTERNAL status, before
// the handler could give a reason. It is delivered as an InChunk with Err
// set to INVALID_ARGUMENT and BAD_CHUNK, for the handler to answer with.
// Nothing is allocated for what a message only declares (see Codec).
type ServerCodec struct{ *Codec }

func (c ServerCodec) Unmarshal(data mem.BufferSlice, v any) error {
	err := c.Codec.Unmarshal(data, v)
	in, ok := v.(*InChunk)
	if !ok {
		return err
	}
	in.Err = nil
	if err != nil {
		in.Data.Free()
		in.Msg.Reset()
		in.Data = nil
		in.Err = wire.Errorf(codes.InvalidArgument, wire.ReasonBadChunk, "malformed chunk message (%d bytes): %v", data.Len(), err)
	}
	return nil
}
