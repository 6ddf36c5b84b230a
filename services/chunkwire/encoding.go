package chunkwire

import (
	"bytes"

	"github.com/klauspost/compress/zstd"
	"google.golang.org/grpc/codes"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/services/wire"
)

// Chunk encodings (ferryv1.ChunkEncoding). A DATA chunk's bytes travel
// as they are, or, where Open granted the feature, as nothing when every
// byte is zero (ZERO: the header's length says how many), or as one zstd
// frame (ZSTD) when that is smaller. The CRC32C in the header and the
// stream digest are over the bytes the device produced, at both ends, so
// an encoding changes nothing of what is verified. The destination
// checks the declared length against the session's chunk size before it
// allocates anything, and decodes into a pooled buffer of exactly that
// size: a frame that would decode to more is refused, not followed (no
// decompression bomb).

// PageSize is the unit of CHUNK_ENCODING_ZERO_PAGES.
const PageSize = 4096

// ZeroPages finds the all-zero pages of b: the page map the header
// carries (nil when there are none) and how many there are. A page of
// other data is told at its first non-zero word, so data without zeros
// costs next to nothing.
func ZeroPages(b []byte) (pageMap []byte, zeros int) {
	pages := (len(b) + PageSize - 1) / PageSize
	for i := range pages {
		if IsZero(b[i*PageSize : min((i+1)*PageSize, len(b))]) {
			if pageMap == nil {
				pageMap = make([]byte, (pages+7)/8)
			}
			pageMap[i/8] |= 1 << (i % 8)
			zeros++
		}
	}
	return pageMap, zeros
}

// PackPages appends to dst[:0] the pages of b that pageMap does not mark
// zero, in order: a ZERO_PAGES chunk's data. dst may be b[:0]: each page
// moves down, never over one not yet moved.
func PackPages(dst, b, pageMap []byte) []byte {
	dst = dst[:0]
	for i := 0; i*PageSize < len(b); i++ {
		if i/8 >= len(pageMap) || pageMap[i/8]&(1<<(i%8)) == 0 {
			dst = append(dst, b[i*PageSize:min((i+1)*PageSize, len(b))]...)
		}
	}
	return dst
}

// unpackPages fills dst, a chunk of len(dst) bytes, from its page map
// and its packed non-zero pages, which must be exactly as long as those
// pages; it reports whether they were.
func unpackPages(dst, packed, pageMap []byte) bool {
	pages := (len(dst) + PageSize - 1) / PageSize
	if len(pageMap) != (pages+7)/8 {
		return false
	}
	for i := range pages {
		page := dst[i*PageSize : min((i+1)*PageSize, len(dst))]
		if pageMap[i/8]&(1<<(i%8)) != 0 {
			clear(page)
			continue
		}
		if len(packed) < len(page) {
			return false
		}
		copy(page, packed)
		packed = packed[len(page):]
	}
	return len(packed) == 0
}

// ReasonBadEncoding: a chunk's encoded bytes do not decode to what its
// header declares.
const ReasonBadEncoding = "CHUNK_ENCODING_INVALID"

// zeroBlock is what IsZero compares with, a block at a time:
// bytes.Equal is vectorised. Never written.
var zeroBlock [64 << 10]byte

// IsZero reports whether every byte of b is zero.
func IsZero(b []byte) bool {
	for len(b) > 0 {
		n := min(len(b), len(zeroBlock))
		if !bytes.Equal(b[:n], zeroBlock[:n]) {
			return false
		}
		b = b[n:]
	}
	return true
}

// Compressor compresses chunks with zstd at its fastest level. It is safe
// for concurrent use.
type Compressor struct{ enc *zstd.Encoder }

// NewCompressor returns a compressor.
func NewCompressor() (*Compressor, error) {
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1),
		zstd.WithEncoderCRC(false), zstd.WithZeroFrames(true))
	if err != nil {
		return nil, err
	}
	return &Compressor{enc: enc}, nil
}

// Compress appends src's zstd frame to dst[:0] and returns it; the
// caller sends it only when it is shorter than src.
func (c *Compressor) Compress(dst, src []byte) []byte { return c.enc.EncodeAll(src, dst[:0]) }

// Decompressor decodes zstd chunks of at most a chunk size. It is safe
// for concurrent use.
type Decompressor struct{ dec *zstd.Decoder }

// NewDecompressor returns a decompressor whose frames may decode to at
// most maxLen bytes.
func NewDecompressor(maxLen int) (*Decompressor, error) {
	dec, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(0), zstd.WithDecoderMaxMemory(uint64(maxLen)),
		zstd.WithDecoderMaxWindow(uint64(max(maxLen, zstd.MinWindowSize))))
	if err != nil {
		return nil, err
	}
	return &Decompressor{dec: dec}, nil
}

// Close releases the decoder's goroutines.
func (d *Decompressor) Close() { d.dec.Close() }

// Decode replaces in.Data with the bytes of a DATA chunk as the device
// produced them when its header says they travelled encoded, with its
// CRC32C computed over them; maxLen is the session's chunk size and
// allowed the encodings Open granted. A chunk without encoding is left
// as it is. Errors are statuses with a reason; in.Data is then the
// caller's to free, as always.
func (p *Pool) Decode(in *InChunk, maxLen int, allowed wire.Features, dec *Decompressor) error {
	m := &in.Msg
	enc := m.GetEncoding()
	if enc != ferryv1.ChunkEncoding_CHUNK_ENCODING_ZERO_PAGES && len(m.GetZeroPages()) != 0 {
		return wire.Errorf(codes.InvalidArgument, wire.ReasonBadChunk, "device %d chunk %d: a page map without ZERO_PAGES", m.GetDevice(), m.GetSeq())
	}
	if enc == ferryv1.ChunkEncoding_CHUNK_ENCODING_UNSPECIFIED {
		if m.GetLength() != 0 {
			return wire.Errorf(codes.InvalidArgument, wire.ReasonBadChunk, "device %d chunk %d: a length without an encoding", m.GetDevice(), m.GetSeq())
		}
		return nil
	}
	n := int(m.GetLength())
	if n <= 0 || n > maxLen {
		return wire.Errorf(codes.InvalidArgument, wire.ReasonBadChunk, "device %d chunk %d: declared length %d, a chunk has 1 to %d", m.GetDevice(), m.GetSeq(), m.GetLength(), maxLen)
	}
	var bp *[]byte
	switch enc {
	case ferryv1.ChunkEncoding_CHUNK_ENCODING_ZERO:
		if !allowed.Has(ferryv1.Feature_FEATURE_ZERO_CHUNKS) {
			return notGranted(m, "zero chunks")
		}
		if in.Data.Len() != 0 {
			return wire.Errorf(codes.InvalidArgument, wire.ReasonBadChunk, "device %d chunk %d: a zero chunk carries %d bytes", m.GetDevice(), m.GetSeq(), in.Data.Len())
		}
		bp = p.Get(n)
		*bp = (*bp)[:n]
		clear(*bp)
	case ferryv1.ChunkEncoding_CHUNK_ENCODING_ZERO_PAGES:
		if !allowed.Has(ferryv1.Feature_FEATURE_ZERO_CHUNKS) {
			return notGranted(m, "zero pages")
		}
		if in.Data.Len() >= n {
			return wire.Errorf(codes.InvalidArgument, wire.ReasonBadChunk, "device %d chunk %d: %d bytes of pages for %d", m.GetDevice(), m.GetSeq(), in.Data.Len(), n)
		}
		var src []byte
		var scratch *[]byte
		if in.Data.Len() > 0 {
			src, scratch = p.contiguous(in.Data)
		}
		bp = p.Get(n)
		*bp = (*bp)[:n]
		ok := unpackPages(*bp, src, m.GetZeroPages())
		if scratch != nil {
			p.Put(scratch)
		}
		if !ok {
			p.Put(bp)
			return wire.Errorf(codes.InvalidArgument, ReasonBadEncoding, "device %d chunk %d: the page map does not match the %d bytes of pages for a %d-byte chunk", m.GetDevice(), m.GetSeq(), in.Data.Len(), n)
		}
	case ferryv1.ChunkEncoding_CHUNK_ENCODING_ZSTD:
		if !allowed.Has(ferryv1.Feature_FEATURE_COMPRESSION_ZSTD) || dec == nil {
			return notGranted(m, "zstd compression")
		}
		if in.Data.Len() == 0 || in.Data.Len() >= n {
			return wire.Errorf(codes.InvalidArgument, wire.ReasonBadChunk, "device %d chunk %d: %d compressed bytes for %d", m.GetDevice(), m.GetSeq(), in.Data.Len(), n)
		}
		src, scratch := p.contiguous(in.Data)
		bp = p.Get(n)
		out, err := dec.dec.DecodeAll(src, (*bp)[:0])
		if scratch != nil {
			p.Put(scratch)
		}
		if err != nil || len(out) != n || &out[0] != &(*bp)[:1][0] {
			p.Put(bp)
			why := "decoded to another length"
			if err != nil {
				why = err.Error()
			}
			return wire.Errorf(codes.DataLoss, ReasonBadEncoding, "device %d chunk %d: zstd frame does not decode to its %d bytes: %s", m.GetDevice(), m.GetSeq(), n, why)
		}
		*bp = out
	default:
		return wire.Errorf(codes.InvalidArgument, wire.ReasonBadChunk, "device %d chunk %d: unknown encoding %d", m.GetDevice(), m.GetSeq(), enc)
	}
	in.Data.Free()
	in.Data = p.ownPayload(bp, CRC32C(*bp))
	return nil
}

// contiguous returns pl's bytes in one slice: its only buffer, or a copy
// in a pooled buffer (returned as scratch, for the caller to Put).
func (p *Pool) contiguous(pl *Payload) (b []byte, scratch *[]byte) {
	bufs := pl.Buffers()
	if len(bufs) == 1 {
		return bufs[0].ReadOnlyData(), nil
	}
	scratch = p.Get(pl.Len())
	*scratch = (*scratch)[:0]
	for _, b := range bufs {
		*scratch = append(*scratch, b.ReadOnlyData()...)
	}
	return *scratch, scratch
}

func notGranted(m *ferryv1.ChannelRequest, what string) error {
	return wire.Errorf(codes.InvalidArgument, wire.ReasonBadChunk, "device %d chunk %d: %s was not negotiated in Open", m.GetDevice(), m.GetSeq(), what)
}
