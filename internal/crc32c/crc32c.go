// Package crc32c computes CRC-32C (Castagnoli), the checksum of every
// chunk Ferry sends, as hash/crc32 does, only faster where the CPU has
// vector carry-less multiplication (VPCLMULQDQ).
//
// hash/crc32 computes CRC-32C with SSE4.2's CRC32 instruction, three
// streams at once: 22-26 GB/s on a core of the project's machine with
// AVX-512, 17 on its Zen 3 without, about one byte in nine of what a
// 1-channel migration costs at each end (docs/performance.md). On amd64
// with AVX-512's VPCLMULQDQ, Update instead folds the bytes 256 at a
// time into four 512-bit accumulators by carry-less multiplication
// (Intel's "Fast CRC Computation for Generic Polynomials Using
// PCLMULQDQ", with the constants for the Castagnoli polynomial,
// crc32c_amd64.s), reduces them to 128 bits, then to the CRC by Barrett
// reduction: 48-50 GB/s. With AVX2's VPCLMULQDQ alone a 256-bit fold is
// hardly faster than the CRC32 instruction, so it runs beside it: each
// call's bytes split into three runs through the instruction and one
// folded in eight 256-bit accumulators, whose CRCs are then joined by
// carry-less multiplication (23-24 GB/s). Short inputs and other CPUs
// use hash/crc32.
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

// A width is the register width a fold runs in.
type width int

const (
	noFold width = iota // hash/crc32 alone
	ymm                 // 256 bits: AVX2 with VPCLMULQDQ
	mixed               // ymm beside SSE4.2's CRC32 instruction
	zmm                 // 512 bits: AVX-512 with VPCLMULQDQ
)

func (w width) String() string {
	return [...]string{"hash/crc32", "AVX2 fold", "AVX2 fold beside the CRC32 instruction", "AVX-512 fold"}[w]
}

// Method names how Update computes on this CPU, for `ferry bench` to
// print beside its figures: the checksum is a tenth of what each agent
// spends, and each method runs at a different speed (docs/performance.md).
func Method() string { return widest.String() }

// The mixed fold's rounds: each takes mixedRun bytes from each of three
// runs through the CRC32 instruction and 256 from the folded run, and a
// call of r rounds covers mixedBytes(r) bytes (the folded run has one
// round more, which starts it). A call takes at most maxMixedRounds,
// for the constants' table; shorter inputs than minMixed fold alone, the
// join costing more than it saves.
const (
	mixedRun       = 64
	maxMixedRounds = 2048
	minMixed       = 4096
)

func mixedBytes(rounds int) int { return (3*mixedRun+256)*rounds - 3*mixedRun }

// Update returns the CRC-32C of p appended to data whose CRC-32C is crc.
func Update(crc uint32, p []byte) uint32 { return update(crc, p, widest) }

// update is Update folding in w's registers, which the CPU must have.
func update(crc uint32, p []byte, w width) uint32 {
	if w != noFold && len(p) >= minFold {
		n := len(p) &^ 15
		crc = ^foldWidth(^crc, p[:n], w)
		p = p[n:]
	}
	if len(p) == 0 {
		return crc
	}
	return crc32.Update(crc, table, p)
}

// Checksum returns the CRC-32C of p.
func Checksum(p []byte) uint32 { return Update(0, p) }

// poly is the Castagnoli polynomial, x^32 included.
const poly = 0x11EDC6F41

// xPowMod is x^n mod P over GF(2).
func xPowMod(n uint) uint64 {
	r := uint64(1)
	for range n {
		r <<= 1
		if r&(1<<32) != 0 {
			r ^= poly
		}
	}
	return r
}

// mulMod is a*b mod P over GF(2), a and b of degree below 32.
func mulMod(a, b uint64) uint64 {
	var r uint64
	for i := 31; i >= 0; i-- {
		r <<= 1
		if r&(1<<32) != 0 {
			r ^= poly
		}
		if b>>uint(i)&1 != 0 {
			r ^= a
		}
	}
	return r
}

// reflect reverses the low n bits of v.
func reflect(v uint64, n int) uint64 {
	var r uint64
	for i := range n {
		if v>>uint(i)&1 != 0 {
			r |= 1 << uint(n-1-i)
		}
	}
	return r
}
