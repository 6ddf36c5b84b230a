package vfio

import (
	"bytes"
	"encoding/binary"
	"math/bits"
)

// content is the state of a simulated device, a pure function of the seed
// and the offset: the 16-byte blocks block(key + (i+1)*gamma) for block
// index i (a Weyl sequence from a mixed seed as key), except in the
// 4 KiB pages a hash of (seed, page) picks to be all zero.
type content struct {
	key       uint64 // mixed seed: the words' stream
	pageKey   uint64 // a second mixed seed: the pages' hashes
	zeroBelow uint64 // a page is zero when its hash is below this
	allZero   bool   // zero fraction 1: every page is
}

func newContent(c SimConfig) content {
	ct := content{key: mix(c.Seed), pageKey: mix(c.Seed ^ 0x5bd1e9955bd1e995)}
	if c.ZeroFraction >= 1 {
		ct.allZero = true
	} else {
		ct.zeroBelow = uint64(c.ZeroFraction * (1 << 64))
	}
	return ct
}

// mix is splitmix64's finalizer.
func mix(z uint64) uint64 {
	z = (z ^ z>>30) * 0xbf58476d1ce4e5b9
	z = (z ^ z>>27) * 0x94d049bb133111eb
	return z ^ z>>31
}

// block is a content block, 16 bytes: the Weyl sequence z folded by
// one full 64x64->128-bit multiply of z with itself xor a constant
// (wyrand's mix); the first word is the high half, the second the high
// half xor the low. One multiply instruction for two words, where a
// multiply between two xor-shifts per word ran at 8-9 GB/s on a core
// (BenchmarkSimRead), and still no repeats a compressor could find.
func block(z uint64) (w0, w1 uint64) {
	hi, lo := bits.Mul64(z^0xe7037ed1a0b428db, z)
	return hi, hi ^ lo
}

// putBlock writes block(z) into p[:16].
func putBlock(p []byte, z uint64) {
	w0, w1 := block(z)
	binary.LittleEndian.PutUint64(p[0:8], w0)
	binary.LittleEndian.PutUint64(p[8:16], w1)
}

// zeroPage reports whether the page with this index is all zero.
func (c *content) zeroPage(page uint64) bool {
	return c.allZero || c.zeroBelow != 0 && mix(c.pageKey+page*gamma) < c.zeroBelow
}

// fill writes the content of bytes [off, off+len(p)) into p.
func (c *content) fill(p []byte, off uint64) {
	for len(p) > 0 {
		n := min(uint64(len(p)), simPageSize-off%simPageSize)
		if c.zeroPage(off / simPageSize) {
			clear(p[:n])
		} else {
			c.fillWords(p[:n], off)
		}
		p, off = p[n:], off+n
	}
}

// fillWords writes the generated blocks for bytes [off, off+len(p)): a
// partial block at each end, whole blocks in between.
func (c *content) fillWords(p []byte, off uint64) {
	z := c.key + off/16*gamma // block i is block(z) after i+1 increments
	var w [16]byte
	if r := off % 16; r != 0 {
		z += gamma
		putBlock(w[:], z)
		p = p[copy(p, w[r:]):]
	}
	// Two independent blocks per round keep the multiplier busy. (g is
	// a variable because 2*gamma overflows as a constant.)
	g := uint64(gamma)
	for ; len(p) >= 32; p = p[32:] {
		q := (*[32]byte)(p)
		z1, z2 := z+g, z+2*g
		putBlock(q[0:16], z1)
		putBlock(q[16:32], z2)
		z = z2
	}
	for ; len(p) >= 16; p = p[16:] {
		z += gamma
		putBlock(p, z)
	}
	if len(p) > 0 {
		z += gamma
		putBlock(w[:], z)
		copy(p, w[:])
	}
}

// mismatch returns the index in p of the first byte that differs from the
// content at [off, off+len(p)), or -1 when p is the content.
func (c *content) mismatch(p []byte, off uint64) int {
	done := 0
	for done < len(p) {
		n := int(min(uint64(len(p)-done), simPageSize-off%simPageSize))
		seg := p[done : done+n]
		var i int
		if c.zeroPage(off / simPageSize) {
			i = firstNonZero(seg)
		} else {
			i = c.wordsMismatch(seg, off)
		}
		if i >= 0 {
			return done + i
		}
		done, off = done+n, off+uint64(n)
	}
	return -1
}

// wordsMismatch is mismatch within one generated page.
func (c *content) wordsMismatch(p []byte, off uint64) int {
	z := c.key + off/16*gamma
	i := 0
	var w [16]byte
	if r := int(off % 16); r != 0 {
		z += gamma
		putBlock(w[:], z)
		i = min(len(p), 16-r)
		if j := firstDiff(p[:i], w[r:]); j >= 0 {
			return j
		}
	}
	// Two blocks per round, as in fillWords, their differences gathered
	// without a branch over the whole page; a page with a difference is
	// searched again block by block below.
	g := uint64(gamma)
	var want [512]byte
	for i+len(want) <= len(p) {
		c.fillWords(want[:], off+uint64(i))
		if !bytes.Equal(p[i:i+len(want)], want[:]) {
			break
		}
		i += len(want)
		z += uint64(len(want)/16) * g
	}
	for ; i < len(p); i += 16 {
		z += gamma
		putBlock(w[:], z)
		n := min(16, len(p)-i)
		if j := firstDiff(p[i:i+n], w[:n]); j >= 0 {
			return i + j
		}
	}
	return -1
}

// firstDiff returns the first index where a differs from b (b may be
// longer), or -1.
func firstDiff(a, b []byte) int {
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}

// firstNonZero returns the index of the first non-zero byte of p, or -1.
func firstNonZero(p []byte) int {
	i := 0
	for ; i+8 <= len(p); i += 8 {
		if binary.LittleEndian.Uint64(p[i:]) != 0 {
			break
		}
	}
	for ; i < len(p); i++ {
		if p[i] != 0 {
			return i
		}
	}
	return -1
}
