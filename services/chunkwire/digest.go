package chunkwire

import (
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"hash"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/internal/crc32c"
)

// CRC32C returns the Castagnoli CRC of b, as carried in every chunk.
func CRC32C(b []byte) uint32 { return crc32c.Checksum(b) }

// Digest is the end-to-end digest of one device stream. The source feeds
// it every chunk it read, the destination every chunk it wrote, both in
// stream order; the two sums must match before the destination device
// leaves RESUMING.
//
// CRC32C_CHAIN hashes, with SHA-256, the record (offset, length, CRC32C)
// of each chunk: one 16-byte record per chunk, so it costs nothing per
// byte beyond the chunk CRC both sides compute anyway, and any reordered,
// missing, repeated or altered chunk changes it. SHA256 hashes every byte
// (about 1.8 GB/s a core with SHA instructions, far less without).
type Digest struct {
	alg ferryv1.DigestAlgorithm
	h   hash.Hash
	rec [16]byte
}

// NewDigest returns a digest for alg (UNSPECIFIED means CRC32C_CHAIN).
func NewDigest(alg ferryv1.DigestAlgorithm) (*Digest, error) {
	switch alg {
	case ferryv1.DigestAlgorithm_DIGEST_ALGORITHM_UNSPECIFIED, ferryv1.DigestAlgorithm_DIGEST_ALGORITHM_CRC32C_CHAIN:
		return &Digest{alg: ferryv1.DigestAlgorithm_DIGEST_ALGORITHM_CRC32C_CHAIN, h: sha256.New()}, nil
	case ferryv1.DigestAlgorithm_DIGEST_ALGORITHM_SHA256:
		return &Digest{alg: alg, h: sha256.New()}, nil
	}
	return nil, fmt.Errorf("unknown digest algorithm %d", alg)
}

// Add feeds one chunk: its offset, bytes and CRC32C.
func (d *Digest) Add(offset uint64, data []byte, crc uint32) {
	if d.alg == ferryv1.DigestAlgorithm_DIGEST_ALGORITHM_SHA256 {
		d.h.Write(data)
		return
	}
	d.addRecord(offset, len(data), crc)
}

// AddPayload is Add for a chunk received in pieces.
func (d *Digest) AddPayload(offset uint64, p *Payload, crc uint32) {
	if d.alg == ferryv1.DigestAlgorithm_DIGEST_ALGORITHM_SHA256 {
		for _, b := range p.Buffers() {
			d.h.Write(b.ReadOnlyData())
		}
		return
	}
	d.addRecord(offset, p.Len(), crc)
}

func (d *Digest) addRecord(offset uint64, n int, crc uint32) {
	binary.LittleEndian.PutUint64(d.rec[0:8], offset)
	binary.LittleEndian.PutUint32(d.rec[8:12], uint32(n))
	binary.LittleEndian.PutUint32(d.rec[12:16], crc)
	d.h.Write(d.rec[:])
}

// Sum returns the digest of everything added so far.
func (d *Digest) Sum() []byte { return d.h.Sum(nil) }
