package vfio

import (
	"bytes"
	"encoding/hex"
	"math/rand/v2"
	"slices"
	"testing"
)

// TestAESRound checks the Go round against the AESENC example of Intel's
// AES-NI white paper (registers written most significant byte first).
func TestAESRound(t *testing.T) {
	reg := func(s string) (r [16]byte) {
		b, err := hex.DecodeString(s)
		if err != nil {
			t.Fatal(err)
		}
		slices.Reverse(b)
		copy(r[:], b)
		return r
	}
	got := aesRound(reg("7b5b54657374566563746f725d53475d"), reg("48692853686179295b477565726f6e5d"))
	if want := reg("a8311c2f9fdba3c58b104b58ded7e595"); got != want {
		t.Fatalf("aesRound = %x, want %x", got, want)
	}
	if sb := sbox(); sb[0] != 0x63 || sb[1] != 0x7c || sb[0x53] != 0xed || sb[0xff] != 0x16 {
		t.Fatalf("S-box: %#x %#x %#x %#x", sb[0], sb[1], sb[0x53], sb[0xff])
	}
}

// TestBlocksMatchTheReference holds genBlocks and diffBlocks (the
// assembly, where the CPU runs it) to the Go reference for every length
// around the four-block rounds, from random states and keys.
func TestBlocksMatchTheReference(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 6))
	for _, n := range []int{0, 16, 32, 48, 64, 80, 112, 128, 144, 4096, 4096 + 48} {
		for range 8 {
			z := r.Uint64()
			k := blockKeys{r.Uint64(), r.Uint64(), r.Uint64(), r.Uint64()}
			got, want := make([]byte, n), make([]byte, n)
			genBlocks(got, z, &k)
			genBlocksGo(want, z, &k)
			if !bytes.Equal(got, want) {
				t.Fatalf("%d bytes from z %#x: genBlocks differs from the reference", n, z)
			}
			if diffBlocks(got, z, &k) || diffBlocksGo(got, z, &k) {
				t.Fatalf("%d bytes: the blocks differ from themselves", n)
			}
			for _, i := range []int{0, n / 2, n - 1} {
				if n == 0 {
					break
				}
				got[i] ^= 0x10
				if !diffBlocks(got, z, &k) || !diffBlocksGo(got, z, &k) {
					t.Fatalf("%d bytes, byte %d changed: no difference found", n, i)
				}
				got[i] ^= 0x10
			}
		}
	}
}
