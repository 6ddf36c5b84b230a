package chunkwire

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/internal/crc32c"
	"github.com/vfio-ferry/ferry/services/wire"
)

// Direct data connections carry a channel's chunks without HTTP/2.
//
// grpc-go cuts every message into HTTP/2 DATA frames of 16 KiB (a fixed
// size), copies each frame into its write buffer at the sender and out of
// its read buffer at the receiver, and hands each one from the
// connection's reader goroutine to the stream's. On a host where the
// transfer is CPU-bound that is most of what Ferry costs beyond plain TCP
// (docs/performance.md). A direct data connection is a TCP connection, with
// the same TLS as the agent's gRPC connections, that carries only the
// source-to-destination half of one Channel stream: the same
// ChannelRequest header, then the chunk's bytes, written with one vectored
// write from the device's buffer and read at the destination straight into
// a pooled chunk buffer. Window updates and acknowledgements, the
// handshake, the session and every control call stay on gRPC.
//
// The connection opens with a preamble, DirectMagic and the 16-byte key
// the destination sent in the stream's first ChannelResponse. Then come
// frames, each:
//
//	uint32 header length H (big-endian, at most MaxDirectHeader)
//	uint32 payload length P (big-endian, 0 to the session's chunk size)
//	H bytes: a ChannelRequest without data (protobuf)
//	P bytes: the chunk's bytes (ChannelRequest.data)
//
// The destination writes nothing back; it closes the connection when the
// stream ends or the connection breaks the protocol.

// DirectMagic opens a direct data connection.
const DirectMagic = "FERRYDT1"

// DataKeyLen is the length of ChannelResponse.data_key.
const DataKeyLen = 16

// MaxDirectHeader bounds a frame's ChannelRequest header: every field but
// data fits in far less (the digest is at most MaxDigestLength bytes).
const MaxDirectHeader = maxHeader

// WriteDirectPreamble writes the preamble that attaches a connection to
// the stream that handed out key.
func WriteDirectPreamble(w io.Writer, key []byte) error {
	if len(key) != DataKeyLen {
		return fmt.Errorf("wire: data key of %d bytes, want %d", len(key), DataKeyLen)
	}
	var b [len(DirectMagic) + DataKeyLen]byte
	copy(b[:], DirectMagic)
	copy(b[len(DirectMagic):], key)
	_, err := w.Write(b[:])
	return err
}

// ReadDirectPreamble reads the preamble and returns the key it presents.
func ReadDirectPreamble(r io.Reader) ([DataKeyLen]byte, error) {
	var b [len(DirectMagic) + DataKeyLen]byte
	var key [DataKeyLen]byte
	if _, err := io.ReadFull(r, b[:]); err != nil {
		return key, fmt.Errorf("wire: direct data preamble: %w", err)
	}
	if string(b[:len(DirectMagic)]) != DirectMagic {
		return key, errors.New("wire: not a Ferry direct data connection")
	}
	copy(key[:], b[len(DirectMagic):])
	return key, nil
}

// DirectWriter writes chunks on a direct data connection. It is not safe
// for concurrent use; a channel's sender owns it.
type DirectWriter struct {
	w   io.Writer
	hdr []byte
	vec [2][]byte
	out net.Buffers
}

// NewDirectWriter returns a writer on w (the connection, after the
// preamble). When w has a Flush method (a BufferedConn), each chunk is
// flushed once written.
func NewDirectWriter(w io.Writer) *DirectWriter {
	return &DirectWriter{w: w, hdr: make([]byte, 8, 8+MaxDirectHeader)}
}

// Write sends one chunk: h (whose Data must be nil) and its bytes. On a
// *net.TCPConn the frame header and the payload go out in one writev,
// from payload itself: nothing is copied in user space.
func (dw *DirectWriter) Write(h *ferryv1.ChannelRequest, payload []byte) error {
	if h.Data != nil {
		return errors.New("wire: direct chunk header must carry no data")
	}
	b, err := proto.MarshalOptions{}.MarshalAppend(dw.hdr[:8], h)
	if err != nil {
		return fmt.Errorf("wire: marshal chunk header: %w", err)
	}
	if n := len(b) - 8; n > MaxDirectHeader {
		return fmt.Errorf("wire: chunk header of %d bytes, want at most %d", n, MaxDirectHeader)
	}
	binary.BigEndian.PutUint32(b[0:4], uint32(len(b)-8))
	binary.BigEndian.PutUint32(b[4:8], uint32(len(payload)))
	dw.hdr = b
	dw.vec[0], dw.vec[1] = b, payload
	dw.out = dw.vec[:]
	if len(payload) == 0 {
		dw.out = dw.vec[:1]
	}
	_, err = dw.out.WriteTo(dw.w)
	dw.vec[1] = nil
	if f, ok := dw.w.(interface{ Flush() error }); ok && err == nil {
		err = f.Flush()
	}
	return err
}

// DirectReader reads chunks from a direct data connection. It is not
// safe for concurrent use.
type DirectReader struct {
	r          *bufio.Reader
	lowat      *lowatConn // the TCP socket under r; nil for TLS
	pool       *Pool
	maxPayload int
	lens       [8]byte
	hdr        [MaxDirectHeader]byte
}

// directReadBuffer is the reader's buffer. Payloads larger than it are
// read from the socket straight into their chunk buffer (bufio hands a
// read at least this large to the connection when it holds nothing), so
// only frame headers and the few payload bytes that arrived with them
// are copied.
const directReadBuffer = 16 << 10

// NewDirectReader returns a reader on r (the connection, after the
// preamble) that refuses payloads over maxPayload bytes and reads
// payloads into buffers from pool.
func NewDirectReader(r io.Reader, pool *Pool, maxPayload int) *DirectReader {
	dr := &DirectReader{pool: pool, maxPayload: maxPayload}
	if dr.lowat = newLowatConn(r); dr.lowat != nil {
		r = dr.lowat
	}
	dr.r = bufio.NewReaderSize(r, directReadBuffer)
	return dr
}

// Read reads the next chunk into in: in.Msg gets its header and in.Data
// its bytes (nil when it has none; the caller owns and frees it). It
// returns io.EOF when the connection ends cleanly between chunks, a
// BAD_CHUNK status error for a frame that breaks the protocol, and the
// connection's error otherwise. It never allocates more than the
// announced payload, and only once the lengths are checked.
func (dr *DirectReader) Read(in *InChunk) error {
	in.Data, in.Err = nil, nil
	if _, err := io.ReadFull(dr.r, dr.lens[:]); err != nil {
		return err
	}
	h := binary.BigEndian.Uint32(dr.lens[0:4])
	p := binary.BigEndian.Uint32(dr.lens[4:8])
	if h > MaxDirectHeader {
		return wire.Errorf(codes.InvalidArgument, wire.ReasonBadChunk, "direct data frame with a header of %d bytes, want at most %d", h, MaxDirectHeader)
	}
	if uint64(p) > uint64(dr.maxPayload) {
		return wire.Errorf(codes.InvalidArgument, wire.ReasonBadChunk, "direct data frame with %d bytes of data, the session's chunk size is %d", p, dr.maxPayload)
	}
	if _, err := io.ReadFull(dr.r, dr.hdr[:h]); err != nil {
		return unexpected(err)
	}
	if err := proto.Unmarshal(dr.hdr[:h], &in.Msg); err != nil {
		return wire.Errorf(codes.InvalidArgument, wire.ReasonBadChunk, "direct data frame header: %v", err)
	}
	if in.Msg.Data != nil {
		in.Msg.Data = nil
		return wire.Errorf(codes.InvalidArgument, wire.ReasonBadChunk, "direct data frame header carries data; the bytes follow the header")
	}
	if p == 0 {
		return nil
	}
	bp := dr.pool.Get(int(p))
	if dr.lowat != nil {
		dr.lowat.expect(int(p) - dr.r.Buffered())
	}
	_, crc, err := ReadCRC32C(dr.r, *bp, 0)
	if dr.lowat != nil {
		dr.lowat.expect(0)
	}
	if err != nil {
		dr.pool.Put(bp)
		return unexpected(err)
	}
	in.Data = dr.pool.ownPayload(bp, crc)
	return nil
}

// DevicePiece is how much the source reads from a device before it
// checksums: small enough that the bytes are still in the core's cache
// when the CRC reads them. Checksumming a whole 1 MiB chunk after reading
// it ran at the speed of memory, 2-3 times slower (docs/performance.md).
const DevicePiece = 64 << 10

// ReadCRC32C fills b from r, as io.ReadFull does (n bytes read, io.EOF if
// none, io.ErrUnexpectedEOF if some), and returns the CRC32C of the n
// bytes, computed read by read as they arrive. Each read asks for at most
// piece bytes; 0 asks for the rest of b.
//
// The destination reads a data connection with piece 0: one read takes
// all that has arrived, as a plain TCP receiver's does, and the CRC still
// finds those bytes in cache. Reading the socket 64 KiB at a time instead
// cost 0.04-0.08 CPU-s/GiB more in the kernel in perf-sampled runs (a
// read call each, each taking the socket's lock and sending its window
// update; within the noise of whole runs) and saved nothing in the CRC.
func ReadCRC32C(r io.Reader, b []byte, piece int) (n int, crc uint32, err error) {
	if piece <= 0 {
		piece = len(b)
	}
	for n < len(b) {
		end := min(n+piece, len(b))
		k, err := r.Read(b[n:end])
		crc = crc32c.Update(crc, b[n:n+k])
		n += k
		switch {
		case err == nil || n == len(b) && errors.Is(err, io.EOF):
			continue
		case n > 0 && errors.Is(err, io.EOF):
			return n, crc, io.ErrUnexpectedEOF
		default:
			return n, crc, err
		}
	}
	return n, crc, nil
}

// unexpected turns an EOF inside a frame into io.ErrUnexpectedEOF.
func unexpected(err error) error {
	if errors.Is(err, io.EOF) {
		return io.ErrUnexpectedEOF
	}
	return err
}
