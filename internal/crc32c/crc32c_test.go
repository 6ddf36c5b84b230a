package crc32c

import (
	"hash/crc32"
	"math/rand/v2"
	"testing"
)

// widths are the fold widths this CPU runs, for the tests to hold each
// to hash/crc32: every CPU with AVX-512's VPCLMULQDQ has AVX2's.
func widths() []width {
	var ws []width
	for w := noFold; w <= widest; w++ {
		ws = append(ws, w)
	}
	return ws
}

// TestUpdateIsCRC32C checks each fold width against hash/crc32 for
// lengths on both sides of every threshold of the folding path, at every
// alignment of a 16-byte block, from several starting CRCs.
func TestUpdateIsCRC32C(t *testing.T) {
	t.Logf("widths here: %v", widths())
	r := rand.New(rand.NewPCG(1, 2))
	buf := make([]byte, 2<<20+64)
	for i := range buf {
		buf[i] = byte(r.Uint32())
	}
	lengths := []int{0, 1, 15, 16, 17, 255, 256, 257, 511, 512, 1023, 1024, 1025, 1040, 1279, 1280, 1296, 2047, 2048, 4095, 4096, 4097, 65535, 65536}
	// The mixed fold's calls end where their rounds do, at most 2048 of
	// them a call.
	for _, rounds := range []int{9, 10, 11, 146, maxMixedRounds} {
		n := mixedBytes(rounds)
		lengths = append(lengths, n-16, n, n+16, n+256, n+272)
	}
	lengths = append(lengths, minMixed-16, minMixed, 1<<20, 2<<20)
	for range 64 {
		lengths = append(lengths, r.IntN(64<<10))
	}
	for _, n := range lengths {
		for _, align := range []int{0, 1, 7, 8, 15, 33} {
			for _, init := range []uint32{0, 1, 0xffffffff, r.Uint32()} {
				p := buf[align : align+n]
				want := crc32.Update(init, table, p)
				for _, w := range widths() {
					if got := update(init, p, w); got != want {
						t.Fatalf("%v: update(%#x, %d bytes at +%d) = %#x, want %#x", w, init, n, align, got, want)
					}
				}
			}
		}
	}
}

// TestChunked checks that a CRC built piece by piece, as the agents
// build a chunk's as its bytes arrive, is the whole's.
func TestChunked(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	buf := make([]byte, 1<<20)
	for i := range buf {
		buf[i] = byte(r.Uint32())
	}
	want := crc32.Checksum(buf, table)
	for _, w := range widths() {
		for _, piece := range []int{1000, 4096, 64 << 10, 100000} {
			var crc uint32
			for off := 0; off < len(buf); off += piece {
				crc = update(crc, buf[off:min(off+piece, len(buf))], w)
			}
			if crc != want {
				t.Errorf("%v, in pieces of %d: %#x, want %#x", w, piece, crc, want)
			}
		}
	}
	if got := Checksum(buf); got != want {
		t.Errorf("Checksum = %#x, want %#x", got, want)
	}
}

// TestConstants recomputes the folding constants crc32c_amd64.s holds.
func TestConstants(t *testing.T) {
	const p = poly
	k := func(n uint) uint64 { return reflect(xPowMod(n), 32) << 1 }
	for _, c := range []struct {
		name string
		got  uint64
		want uint64
	}{
		{"k2048 low", k(2048 + 32), 0xdcb17aa4},
		{"k2048 high", k(2048 - 32), 0xb9e02b86},
		{"k512 low", k(512 + 32), 0x740eef02},
		{"k512 high", k(512 - 32), 0x9e4addf8},
		{"k128 low", k(128 + 32), 0xf20c0dfe},
		{"k128 high", k(128 - 32), 0x14cd00bd6},
		{"k64", k(64), 0xdd45aab8},
		{"P", reflect(p, 33), 0x105ec76f1},
		{"mu", reflect(x64Div(p), 33), 0xdea713f1},
	} {
		if c.got != c.want {
			t.Errorf("%s = %#x, the assembly has %#x", c.name, c.got, c.want)
		}
	}
}

// x64Div is floor(x^64 / p) over GF(2), p of degree 32.
func x64Div(p uint64) uint64 {
	var q uint64
	rem := [2]uint64{0, 1} // x^64: bit 64 set
	for bit := 64; bit >= 32; bit-- {
		var set bool
		if bit == 64 {
			set = rem[1]&1 != 0
		} else {
			set = rem[0]&(1<<uint(bit)) != 0
		}
		if set {
			q |= 1 << uint(bit-32)
			s := uint(bit - 32)
			if bit == 64 {
				rem[1] ^= 1
				rem[0] ^= (p &^ (1 << 32)) << s
			} else {
				rem[0] ^= p << s
			}
		}
	}
	return q
}

func FuzzUpdate(f *testing.F) {
	f.Add(uint32(0), make([]byte, 2048))
	f.Fuzz(func(t *testing.T, init uint32, p []byte) {
		want := crc32.Update(init, table, p)
		for _, w := range widths() {
			if got := update(init, p, w); got != want {
				t.Fatalf("%v: update(%#x, %d bytes) = %#x, want %#x", w, init, len(p), got, want)
			}
		}
	})
}

func BenchmarkUpdate(b *testing.B) {
	for _, n := range []int{4 << 10, 64 << 10, 1 << 20} {
		buf := make([]byte, n)
		for _, w := range widths() {
			b.Run(sizeName(n)+"/"+[...]string{"hash-crc32", "ymm", "mixed", "zmm"}[w], func(b *testing.B) {
				b.SetBytes(int64(n))
				for b.Loop() {
					update(0, buf, w)
				}
			})
		}
	}
}

func sizeName(n int) string {
	if n >= 1<<20 {
		return "1MiB"
	}
	return map[int]string{4 << 10: "4KiB", 64 << 10: "64KiB"}[n]
}
