package crc32c

import (
	"hash/crc32"
	"math/rand/v2"
	"testing"
)

// TestUpdateIsCRC32C checks Update against hash/crc32 for lengths on
// both sides of every threshold of the folding path, at every alignment
// of a 16-byte block, from several starting CRCs.
func TestUpdateIsCRC32C(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	buf := make([]byte, 64<<10+64)
	for i := range buf {
		buf[i] = byte(r.Uint32())
	}
	lengths := []int{0, 1, 15, 16, 17, 255, 256, 257, 511, 512, 1023, 1024, 1025, 1040, 1279, 1280, 1296, 2047, 2048, 4095, 4096, 4097, 65535, 65536}
	for range 64 {
		lengths = append(lengths, r.IntN(64<<10))
	}
	for _, n := range lengths {
		for _, align := range []int{0, 1, 7, 8, 15, 33} {
			for _, init := range []uint32{0, 1, 0xffffffff, r.Uint32()} {
				p := buf[align : align+n]
				if got, want := Update(init, p), crc32.Update(init, table, p); got != want {
					t.Fatalf("Update(%#x, %d bytes at +%d) = %#x, want %#x", init, n, align, got, want)
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
	for _, piece := range []int{1000, 4096, 64 << 10, 100000} {
		var crc uint32
		for off := 0; off < len(buf); off += piece {
			crc = Update(crc, buf[off:min(off+piece, len(buf))])
		}
		if crc != want {
			t.Errorf("in pieces of %d: %#x, want %#x", piece, crc, want)
		}
	}
	if got := Checksum(buf); got != want {
		t.Errorf("Checksum = %#x, want %#x", got, want)
	}
}

// TestConstants recomputes the folding constants crc32c_amd64.s holds.
func TestConstants(t *testing.T) {
	const p = 0x11EDC6F41
	k := func(n uint) uint64 { return uint64(reflect(xPowMod(n, p), 32)) << 1 }
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

// xPowMod is x^n mod p over GF(2), p of degree 32.
func xPowMod(n uint, p uint64) uint64 {
	r := uint64(1)
	for range n {
		r <<= 1
		if r&(1<<32) != 0 {
			r ^= p
		}
	}
	return r
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

func reflect(v uint64, n int) uint64 {
	var r uint64
	for i := range n {
		if v>>uint(i)&1 != 0 {
			r |= 1 << uint(n-1-i)
		}
	}
	return r
}

func FuzzUpdate(f *testing.F) {
	f.Add(uint32(0), make([]byte, 2048))
	f.Fuzz(func(t *testing.T, init uint32, p []byte) {
		if got, want := Update(init, p), crc32.Update(init, table, p); got != want {
			t.Fatalf("Update(%#x, %d bytes) = %#x, want %#x", init, len(p), got, want)
		}
	})
}

func BenchmarkUpdate(b *testing.B) {
	for _, n := range []int{4 << 10, 64 << 10, 1 << 20} {
		buf := make([]byte, n)
		b.Run(sizeName(n)+"/crc32c", func(b *testing.B) {
			b.SetBytes(int64(n))
			for b.Loop() {
				Update(0, buf)
			}
		})
		b.Run(sizeName(n)+"/hash-crc32", func(b *testing.B) {
			b.SetBytes(int64(n))
			for b.Loop() {
				crc32.Update(0, table, buf)
			}
		})
	}
}

func sizeName(n int) string {
	if n >= 1<<20 {
		return "1MiB"
	}
	return map[int]string{4 << 10: "4KiB", 64 << 10: "64KiB"}[n]
}
