// Package wire is what both Ferry agents need on the wire, kept in one
// place so the source and the destination meet only through it: the chunk
// codec, the direct data framing, the chunk buffer pool, the stream
// digest, message limits and validation, error translation with
// google.rpc.ErrorInfo, and the server and dial options.
//
// # The chunk codec
//
// A ChannelRequest carries up to 16 MiB of device state. Marshalled as a
// plain protobuf message, its bytes field is copied by the protobuf library
// on both sides, which costs 4-5 times the CPU of the TCP transfer itself.
// [Codec] instead writes the small header fields with protobuf and puts
// the payload beside them as its own buffer, with the data field's tag and
// length between: the bytes on the wire are an ordinary ChannelRequest
// (data is field 15 and comes last), so grpcurl and any protobuf decoder
// read them, but the payload is never copied on the way out. On the way in
// it is not copied either: the [Payload] of an [InChunk] holds references
// to the 16 KiB buffers gRPC read the frames into (from the [Pool], which
// gRPC is given as its buffer pool), and the destination writes those
// pieces into the device and frees them.
//
// Senders use [OutChunk] with a reference-counted mem.Buffer payload that
// gRPC frees once written, receivers [InChunk]; any other message goes
// through the standard protobuf codec.
//
// # Direct data connections
//
// Even without copies in Ferry's code, grpc-go cuts each message into
// 16 KiB HTTP/2 frames and copies them on both sides. A destination that
// serves direct data connections takes a channel's chunks on a TCP
// connection beside its Channel stream instead: [WriteDirectPreamble] and
// [ReadDirectPreamble] attach it to the stream with the stream's key,
// [DirectWriter] sends each chunk's ChannelRequest header and bytes with
// one vectored write, [DirectReader] reads them into a pooled buffer,
// refusing what breaks the framing before it allocates, and
// [ReadCRC32C] checksums the bytes as they arrive.
// direct.go documents the framing.
//
// # Errors
//
// [Errorf] builds a status with a code and a google.rpc.ErrorInfo reason;
// [Reason] reads the reason back. Each agent translates its domain errors
// once, at its gRPC edge.
package wire
