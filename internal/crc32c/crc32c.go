// Package crc32c computes CRC-32C (Castagnoli), the checksum of every
// chunk Ferry sends, as hash/crc32 does, only faster where the CPU has
// AVX-512 carry-less multiplication.
//
// hash/crc32 computes CRC-32C with SSE4.2's CRC32 instruction, three
// streams at once: 22-26 GB/s on a core of the project's machine, about
// one byte in nine of what a 1-channel migration costs at each end
// (docs/performance.md). On amd64 with VPCLMULQDQ, Update instead folds
// the bytes 256 at a time into four 512-bit accumulators by carry-less
// multiplication (Intel's "Fast CRC Computation for Generic Polynomials
// Using PCLMULQDQ", with the constants for the Castagnoli polynomial,
// crc32c_amd64.s), reduces them to 128 bits, then to the CRC by Barrett
// reduction. Short inputs and other CPUs use hash/crc32.
//
// Update(crc, p) is hash/crc32.Update(crc, crc32.MakeTable(crc32.Castagnoli), p)
// bit for bit; the tests hold it to that for every length and alignment
// they try and for any input the fuzzer finds.
package crc32c

import "hash/crc32"

var table = crc32.MakeTable(crc32.Castagnoli)

// minFold is the shortest input folded: below it the set-up and the
// reduction cost more than hash/crc32's SSE4.2 loop.
const minFold = 1024

// Update returns the CRC-32C of p appended to data whose CRC-32C is crc.
func Update(crc uint32, p []byte) uint32 {
	if haveFold && len(p) >= minFold {
		n := len(p) &^ 15
		crc = ^fold(^crc, p[:n])
		p = p[n:]
	}
	if len(p) == 0 {
		return crc
	}
	return crc32.Update(crc, table, p)
}

// Checksum returns the CRC-32C of p.
func Checksum(p []byte) uint32 { return Update(0, p) }
