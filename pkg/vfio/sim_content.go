package vfio

import "encoding/binary"

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

// The blocks are two rounds of AES encryption (x86's AESENC, one
// instruction a round) of the Weyl sequence z, in both halves of a
// 128-bit state, under two round keys mixed from the key. With AES-NI a
// core of the project's Zen 3 generates them at 22-24 GB/s and checks
// them at 18-22 (BenchmarkSimContent), where a 64x64->128-bit multiply
// per block ran at 8-11 and 7-8 and hid the transport behind the device. Every block differs (each round is a
// bijection of the state), and two rounds leave no structure a
// compressor finds. Without AES-NI, aesRound computes the same bytes,
// slowly.
//
// blockKeys are the two round keys, each as two 64-bit halves.
type blockKeys [4]uint64

// keys returns the content's round keys.
func (c *content) keys() blockKeys {
	return blockKeys{mix(c.key ^ 0x243f6a8885a308d3), mix(c.key ^ 0x13198a2e03707344),
		mix(c.key ^ 0xa4093822299f31d0), mix(c.key ^ 0x082efa98ec4e6c89)}
}

// putBlock writes block(z) into p[:16].
func putBlock(p []byte, z uint64, k *blockKeys) { genBlocks(p[:16], z-gamma, k) }

// zeroPage reports whether the page with this index is all zero.
func (c *content) zeroPage(page uint64) bool {
	return c.allZero || c.zeroBelow != 0 && mix(c.pageKey+page*gamma) < c.zeroBelow
}

// fill writes the content of bytes [off, off+len(p)) into p.
func (c *content) fill(p []byte, off uint64) {
	k := c.keys()
	for len(p) > 0 {
		n := min(uint64(len(p)), simPageSize-off%simPageSize)
		if c.zeroPage(off / simPageSize) {
			clear(p[:n])
		} else {
			c.fillWords(p[:n], off, &k)
		}
		p, off = p[n:], off+n
	}
}

// fillWords writes the generated blocks for bytes [off, off+len(p)): a
// partial block at each end, whole blocks in between.
func (c *content) fillWords(p []byte, off uint64, k *blockKeys) {
	z := c.key + off/16*gamma // block i is block(z) after i+1 increments
	var w [16]byte
	if r := off % 16; r != 0 {
		z += gamma
		putBlock(w[:], z, k)
		p = p[copy(p, w[r:]):]
	}
	n := len(p) &^ 15
	genBlocks(p[:n], z, k)
	z += uint64(n/16) * gamma
	if p = p[n:]; len(p) > 0 {
		z += gamma
		putBlock(w[:], z, k)
		copy(p, w[:])
	}
}

// mismatch returns the index in p of the first byte that differs from the
// content at [off, off+len(p)), or -1 when p is the content.
func (c *content) mismatch(p []byte, off uint64) int {
	k := c.keys()
	done := 0
	for done < len(p) {
		n := int(min(uint64(len(p)-done), simPageSize-off%simPageSize))
		seg := p[done : done+n]
		var i int
		if c.zeroPage(off / simPageSize) {
			i = firstNonZero(seg)
		} else {
			i = c.wordsMismatch(seg, off, &k)
		}
		if i >= 0 {
			return done + i
		}
		done, off = done+n, off+uint64(n)
	}
	return -1
}

// wordsMismatch is mismatch within one generated page.
func (c *content) wordsMismatch(p []byte, off uint64, k *blockKeys) int {
	z := c.key + off/16*gamma
	i := 0
	var w [16]byte
	if r := int(off % 16); r != 0 {
		z += gamma
		putBlock(w[:], z, k)
		i = min(len(p), 16-r)
		if j := firstDiff(p[:i], w[r:]); j >= 0 {
			return j
		}
	}
	// The whole blocks at once, without a branch; if they differ, block
	// by block to find where.
	if n := (len(p) - i) &^ 15; n > 0 && !diffBlocks(p[i:i+n], z, k) {
		i += n
		z += uint64(n/16) * gamma
	}
	for ; i < len(p); i += 16 {
		z += gamma
		putBlock(w[:], z, k)
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
