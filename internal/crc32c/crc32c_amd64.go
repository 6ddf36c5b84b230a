package crc32c

import (
	"hash/crc32"
	"sync"

	"golang.org/x/sys/cpu"
)

// widest is the widest fold the CPU can run. AVX-512 with VPCLMULQDQ
// (which x/sys/cpu reports only when the OS saves the AVX-512 state)
// folds in 512-bit registers; AVX2 with VPCLMULQDQ (CPUID leaf 7, ECX
// bit 10, which x/sys/cpu names only with AVX-512) in 256-bit ones,
// beside SSE4.2's CRC32 instruction. All need PCLMULQDQ and SSE4.1 for
// the final reduction.
var widest = detect()

func detect() width {
	switch {
	case !cpu.X86.HasPCLMULQDQ || !cpu.X86.HasSSE41:
		return noFold
	case cpu.X86.HasAVX512F && cpu.X86.HasAVX512VPCLMULQDQ:
		return zmm
	case cpu.X86.HasAVX2 && cpu.X86.HasSSE42 && cpuid7ecx()&(1<<10) != 0:
		return mixed
	}
	return noFold
}

// joinConstants holds, for each round count r, the constants foldMixed
// moves the runs' states on by: x^(8n-32) mod P for the s = 64(r-1)
// bytes of a run and for the b = 256r of the folded one, as the
// assembly's constants are kept.
type joinConstants struct{ run, folded [maxMixedRounds + 1]uint64 }

var joins = sync.OnceValue(func() *joinConstants {
	j := new(joinConstants)
	run, folded := xPowMod(8*mixedRun-32), xPowMod(8*256-32) // r = 2, r = 1
	stepRun, stepFolded := xPowMod(8*mixedRun), xPowMod(8*256)
	for r := 1; r <= maxMixedRounds; r++ {
		if r >= 2 {
			j.run[r] = reflect(run, 32) << 1
			run = mulMod(run, stepRun)
		}
		j.folded[r] = reflect(folded, 32) << 1
		folded = mulMod(folded, stepFolded)
	}
	return j
})

// foldWidth returns the CRC-32C state after p, starting from state crc
// (the ones' complement of a CRC, as hash/crc32 keeps it internally),
// folding in w's registers. len(p) must be at least 256 and a multiple
// of 16.
func foldWidth(crc uint32, p []byte, w width) uint32 {
	if w != mixed {
		return fold(crc, p, w == zmm)
	}
	j := joins()
	for len(p) >= minMixed {
		r := min((len(p)+3*mixedRun)/(3*mixedRun+256), maxMixedRounds)
		n := mixedBytes(r)
		crc = foldMixed(crc, p[:n], r, j.run[r], j.folded[r])
		p = p[n:]
	}
	switch {
	case len(p) >= 256:
		return fold(crc, p, false)
	case len(p) > 0:
		return ^crc32.Update(^crc, table, p)
	}
	return crc
}

//go:noescape
func fold(crc uint32, p []byte, zmm bool) uint32

//go:noescape
func foldMixed(crc uint32, p []byte, rounds int, ks, kb uint64) uint32

func cpuid7ecx() uint32
