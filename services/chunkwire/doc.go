// Package chunkwire is how a migration's chunk bytes travel between the
// agents without copies: the gRPC codec of ChannelRequest, the buffer
// pool gRPC reads frames into, the payload that holds those buffers, the
// framing of direct data connections, and the CRC32C and stream digest
// computed over the bytes as they pass.
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
// # Checksums
//
// [CRC32C] is a chunk's checksum (Castagnoli). [Digest] is the
// end-to-end digest of one device stream, carried by its END chunk: the
// source feeds it every chunk it read, the destination every chunk it
// wrote, both in stream order ([Digest.AddPayload] takes a received
// [Payload] without joining its pieces).
package chunkwire
