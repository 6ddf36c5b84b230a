#include "textflag.h"

// Folding constants for CRC-32C, the Castagnoli polynomial P (0x1EDC6F41),
// in the reflected bit order the CRC uses: each is x^n mod P, bit-reversed
// and shifted left by one (Intel's PCLMULQDQ paper; internal/crc32c's
// tests recompute them). A 128-bit lane is moved forward by D bits by
// multiplying its low half by (x^(D+32) mod P) and its high half by
// (x^(D-32) mod P). The 512-bit constants hold the pair once per lane.

// By 256 bytes (D = 2048): each of the four accumulators.
DATA k2048<>+0(SB)/8, $0xdcb17aa4
DATA k2048<>+8(SB)/8, $0xb9e02b86
DATA k2048<>+16(SB)/8, $0xdcb17aa4
DATA k2048<>+24(SB)/8, $0xb9e02b86
DATA k2048<>+32(SB)/8, $0xdcb17aa4
DATA k2048<>+40(SB)/8, $0xb9e02b86
DATA k2048<>+48(SB)/8, $0xdcb17aa4
DATA k2048<>+56(SB)/8, $0xb9e02b86
GLOBL k2048<>(SB), RODATA|NOPTR, $64

// By 64 bytes (D = 512): one accumulator into the next.
DATA k512<>+0(SB)/8, $0x740eef02
DATA k512<>+8(SB)/8, $0x9e4addf8
DATA k512<>+16(SB)/8, $0x740eef02
DATA k512<>+24(SB)/8, $0x9e4addf8
DATA k512<>+32(SB)/8, $0x740eef02
DATA k512<>+40(SB)/8, $0x9e4addf8
DATA k512<>+48(SB)/8, $0x740eef02
DATA k512<>+56(SB)/8, $0x9e4addf8
GLOBL k512<>(SB), RODATA|NOPTR, $64

// By 16 bytes (D = 128), then the last 128 bits to 64 (x^64 mod P), and
// Barrett's reduction to 32: P itself and mu = floor(x^64 / P), both
// bit-reversed over 33 bits.
DATA k128<>+0(SB)/8, $0xf20c0dfe
DATA k128<>+8(SB)/8, $0x14cd00bd6
GLOBL k128<>(SB), RODATA|NOPTR, $16
DATA k64<>+0(SB)/8, $0xdd45aab8
GLOBL k64<>(SB), RODATA|NOPTR, $8
DATA barrett<>+0(SB)/8, $0x105ec76f1
DATA barrett<>+8(SB)/8, $0xdea713f1
GLOBL barrett<>(SB), RODATA|NOPTR, $16

// func fold(crc uint32, p []byte) uint32
//
// len(p) >= 256 and a multiple of 16.
TEXT ·fold(SB), NOSPLIT, $0-36
	MOVL crc+0(FP), X0
	MOVQ p_base+8(FP), SI
	MOVQ p_len+16(FP), CX

	// The first 256 bytes in four accumulators, the state xored into
	// the first four bytes.
	VPXORQ    Z10, Z10, Z10
	VMOVAPS   X0, X10
	VMOVDQU64 (SI), Z1
	VMOVDQU64 64(SI), Z2
	VMOVDQU64 128(SI), Z3
	VMOVDQU64 192(SI), Z4
	VPXORQ    Z10, Z1, Z1
	ADDQ      $256, SI
	SUBQ      $256, CX
	VMOVDQU64 k2048<>+0(SB), Z0
	CMPQ      CX, $256
	JB        combine

	// Four independent folds per 256 bytes: no accumulator waits for
	// another's multiply.
loop256:
	VMOVDQU64  (SI), Z11
	VMOVDQU64  64(SI), Z12
	VMOVDQU64  128(SI), Z13
	VMOVDQU64  192(SI), Z14
	VPCLMULQDQ $0x11, Z0, Z1, Z5
	VPCLMULQDQ $0x00, Z0, Z1, Z1
	VPCLMULQDQ $0x11, Z0, Z2, Z6
	VPCLMULQDQ $0x00, Z0, Z2, Z2
	VPCLMULQDQ $0x11, Z0, Z3, Z7
	VPCLMULQDQ $0x00, Z0, Z3, Z3
	VPCLMULQDQ $0x11, Z0, Z4, Z8
	VPCLMULQDQ $0x00, Z0, Z4, Z4
	VPTERNLOGD $0x96, Z11, Z5, Z1
	VPTERNLOGD $0x96, Z12, Z6, Z2
	VPTERNLOGD $0x96, Z13, Z7, Z3
	VPTERNLOGD $0x96, Z14, Z8, Z4
	ADDQ       $256, SI
	SUBQ       $256, CX
	CMPQ       CX, $256
	JAE        loop256

	// Each accumulator into the next, 64 bytes on: one left, in Z4.
combine:
	VMOVDQU64  k512<>+0(SB), Z0
	VPCLMULQDQ $0x11, Z0, Z1, Z5
	VPCLMULQDQ $0x00, Z0, Z1, Z1
	VPTERNLOGD $0x96, Z5, Z1, Z2
	VPCLMULQDQ $0x11, Z0, Z2, Z6
	VPCLMULQDQ $0x00, Z0, Z2, Z2
	VPTERNLOGD $0x96, Z6, Z2, Z3
	VPCLMULQDQ $0x11, Z0, Z3, Z7
	VPCLMULQDQ $0x00, Z0, Z3, Z3
	VPTERNLOGD $0x96, Z7, Z3, Z4
	CMPQ       CX, $64
	JB         lanes

loop64:
	VMOVDQU64  (SI), Z11
	VPCLMULQDQ $0x11, Z0, Z4, Z5
	VPCLMULQDQ $0x00, Z0, Z4, Z4
	VPTERNLOGD $0x96, Z11, Z5, Z4
	ADDQ       $64, SI
	SUBQ       $64, CX
	CMPQ       CX, $64
	JAE        loop64

	// The accumulator's four 128-bit lanes into X1-X4.
lanes:
	VEXTRACTI32X4 $1, Z4, X2
	VEXTRACTI32X4 $2, Z4, X3
	VEXTRACTI32X4 $0, Z4, X1
	VEXTRACTI32X4 $3, Z4, X4
	VZEROUPPER

	// The lanes into one, 16 bytes apart, then the rest of p 16 bytes
	// at a time.
	MOVOU     k128<>+0(SB), X0
	MOVO      X1, X5
	PCLMULQDQ $0x00, X0, X1
	PCLMULQDQ $0x11, X0, X5
	PXOR      X5, X1
	PXOR      X2, X1
	MOVO      X1, X5
	PCLMULQDQ $0x00, X0, X1
	PCLMULQDQ $0x11, X0, X5
	PXOR      X5, X1
	PXOR      X3, X1
	MOVO      X1, X5
	PCLMULQDQ $0x00, X0, X1
	PCLMULQDQ $0x11, X0, X5
	PXOR      X5, X1
	PXOR      X4, X1
	CMPQ      CX, $16
	JB        reduce

loop16:
	MOVOU     (SI), X10
	MOVO      X1, X5
	PCLMULQDQ $0x00, X0, X1
	PCLMULQDQ $0x11, X0, X5
	PXOR      X5, X1
	PXOR      X10, X1
	ADDQ      $16, SI
	SUBQ      $16, CX
	CMPQ      CX, $16
	JAE       loop16

	// 128 bits to 64: the low half moved on by 64 bits onto the high.
reduce:
	PCMPEQB   X3, X3
	PCLMULQDQ $0x01, X1, X0
	PSRLDQ    $8, X1
	PXOR      X0, X1

	// 64 to 32, then Barrett's reduction to the CRC, in bits 32-63.
	MOVO      X1, X2
	MOVQ      k64<>+0(SB), X0
	PSRLQ     $32, X3
	PSRLDQ    $4, X2
	PAND      X3, X1
	PCLMULQDQ $0x00, X0, X1
	PXOR      X2, X1
	MOVOU     barrett<>+0(SB), X0
	MOVO      X1, X2
	PAND      X3, X1
	PCLMULQDQ $0x10, X0, X1
	PAND      X3, X1
	PCLMULQDQ $0x00, X0, X1
	PXOR      X2, X1
	PEXTRD    $1, X1, AX
	MOVL      AX, ret+32(FP)
	RET
