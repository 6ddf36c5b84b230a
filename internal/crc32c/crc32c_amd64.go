package crc32c

import "golang.org/x/sys/cpu"

// haveFold reports whether fold can run: AVX-512 with VPCLMULQDQ (which
// x/sys/cpu reports only when the OS saves the AVX-512 state), and
// SSE4.1 for the final extraction.
var haveFold = cpu.X86.HasAVX512F && cpu.X86.HasAVX512VPCLMULQDQ && cpu.X86.HasPCLMULQDQ && cpu.X86.HasSSE41

// fold returns the CRC-32C state after p, starting from state crc (the
// ones' complement of a CRC, as hash/crc32 keeps it internally). len(p)
// must be at least 256 and a multiple of 16.
//
//go:noescape
func fold(crc uint32, p []byte) uint32
