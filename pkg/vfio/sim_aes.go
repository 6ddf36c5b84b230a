package vfio

import "sync"

// The simulated device's blocks in Go: two rounds of AES encryption of
// [z, z], bit for bit what sim_aes_amd64.s computes with AESENC. It is
// the reference the assembly is tested against, and the generator on
// CPUs without AES-NI and on other architectures, at a small fraction of
// the speed.

// genBlocksGo writes block(z + (j+1)*gamma) at p[16j:16j+16] for each
// whole block of p.
func genBlocksGo(p []byte, z uint64, k *blockKeys) {
	for ; len(p) >= 16; p = p[16:] {
		z += gamma
		b := aesBlock(z, k)
		copy(p, b[:])
	}
}

// diffBlocksGo reports whether the whole blocks of p differ from those
// genBlocksGo writes.
func diffBlocksGo(p []byte, z uint64, k *blockKeys) bool {
	var diff byte
	for ; len(p) >= 16; p = p[16:] {
		z += gamma
		b := aesBlock(z, k)
		for i := range b {
			diff |= p[i] ^ b[i]
		}
	}
	return diff != 0
}

// aesBlock is one block: z in both halves of the state, little-endian,
// through two rounds.
func aesBlock(z uint64, k *blockKeys) [16]byte {
	var s, k1, k2 [16]byte
	for i := range 8 {
		s[i], s[8+i] = byte(z>>(8*i)), byte(z>>(8*i))
		k1[i], k1[8+i] = byte(k[0]>>(8*i)), byte(k[1]>>(8*i))
		k2[i], k2[8+i] = byte(k[2]>>(8*i)), byte(k[3]>>(8*i))
	}
	return aesRound(aesRound(s, k1), k2)
}

// aesRound is one round of AES encryption as AESENC computes it: the
// state's SubBytes, ShiftRows and MixColumns (FIPS 197), then the round
// key added; byte i of each is byte i of the 128-bit register, the state
// in columns of four bytes.
func aesRound(s, k [16]byte) [16]byte {
	sb := sbox()
	var t [16]byte
	for c := range 4 {
		for r := range 4 {
			t[4*c+r] = sb[s[4*((c+r)%4)+r]] // row r moves r columns left
		}
	}
	var out [16]byte
	for c := range 4 {
		a0, a1, a2, a3 := t[4*c], t[4*c+1], t[4*c+2], t[4*c+3]
		out[4*c] = xtime(a0) ^ xtime(a1) ^ a1 ^ a2 ^ a3
		out[4*c+1] = a0 ^ xtime(a1) ^ xtime(a2) ^ a2 ^ a3
		out[4*c+2] = a0 ^ a1 ^ xtime(a2) ^ xtime(a3) ^ a3
		out[4*c+3] = xtime(a0) ^ a0 ^ a1 ^ a2 ^ xtime(a3)
	}
	for i := range out {
		out[i] ^= k[i]
	}
	return out
}

// xtime multiplies by x in AES's field, GF(2^8) modulo x^8+x^4+x^3+x+1.
func xtime(b byte) byte { return b<<1 ^ (b>>7)*0x1b }

// sbox is AES's S-box: the inverse in GF(2^8) (0 for 0), then the affine
// map. It is built when first needed (by brute force, a millisecond), not
// in every process that links pkg/vfio.
var sbox = sync.OnceValue(func() (t *[256]byte) {
	t = new([256]byte)
	mul := func(a, b byte) (p byte) {
		for ; b != 0; b >>= 1 {
			if b&1 != 0 {
				p ^= a
			}
			a = xtime(a)
		}
		return p
	}
	rotl := func(b byte, n int) byte { return b<<n | b>>(8-n) }
	for x := range 256 {
		inv := byte(0)
		for y := 1; y < 256 && x != 0; y++ {
			if mul(byte(x), byte(y)) == 1 {
				inv = byte(y)
				break
			}
		}
		t[x] = inv ^ rotl(inv, 1) ^ rotl(inv, 2) ^ rotl(inv, 3) ^ rotl(inv, 4) ^ 0x63
	}
	return t
})
