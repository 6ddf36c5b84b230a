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

// FOLD_Y moves the 256-bit accumulator acc on by 256 bytes (the
// constants in Y0) and adds the 32 bytes at off(SI); tmp is clobbered.
#define FOLD_Y(acc, tmp, off) \
	VPCLMULQDQ $0x11, Y0, acc, tmp; \
	VPCLMULQDQ $0x00, Y0, acc, acc; \
	VPXOR      off(SI), tmp, tmp; \
	VPXOR      tmp, acc, acc

// FOLD_INTO_Y moves src on by the distance Y0's constants are for and
// adds it into dst; src and tmp are clobbered.
#define FOLD_INTO_Y(src, dst, tmp) \
	VPCLMULQDQ $0x11, Y0, src, tmp; \
	VPCLMULQDQ $0x00, Y0, src, src; \
	VPXOR      tmp, dst, dst; \
	VPXOR      src, dst, dst

// LOAD_Y loads the 256 bytes at SI into the eight accumulators, Y1-Y8.
#define LOAD_Y \
	VMOVDQU (SI), Y1; \
	VMOVDQU 32(SI), Y2; \
	VMOVDQU 64(SI), Y3; \
	VMOVDQU 96(SI), Y4; \
	VMOVDQU 128(SI), Y5; \
	VMOVDQU 160(SI), Y6; \
	VMOVDQU 192(SI), Y7; \
	VMOVDQU 224(SI), Y8

// COMBINE_Y folds the eight 256-bit accumulators of the AVX2 loops,
// 32 bytes apart, each pair into the next 64 bytes on, leaving one pair
// in Y7 and Y8. It clobbers Y0-Y6, Y9 and Y10.
#define COMBINE_Y \
	VMOVDQU k512<>+0(SB), Y0; \
	FOLD_INTO_Y(Y1, Y3, Y9); \
	FOLD_INTO_Y(Y2, Y4, Y10); \
	FOLD_INTO_Y(Y3, Y5, Y9); \
	FOLD_INTO_Y(Y4, Y6, Y10); \
	FOLD_INTO_Y(Y5, Y7, Y9); \
	FOLD_INTO_Y(Y6, Y8, Y10)

// CRC3 takes the 8 bytes at off in each of the mixed fold's three runs
// through the CRC32 instruction.
#define CRC3(off) \
	CRC32Q off(R8), R11; \
	CRC32Q off(R9), R12; \
	CRC32Q off(R10), R13

// LANES_Y splits the pair Y7, Y8 into its four 128-bit lanes, X1-X4 in
// the order of their bytes, and leaves the AVX state.
#define LANES_Y \
	VEXTRACTI128 $1, Y7, X2; \
	VEXTRACTI128 $1, Y8, X4; \
	VMOVDQA      X7, X1; \
	VMOVDQA      X8, X3; \
	VZEROUPPER

// FOLD16 moves X1 on by 16 bytes (the constants in X0) and adds x.
#define FOLD16(x) \
	MOVO      X1, X5; \
	PCLMULQDQ $0x00, X0, X1; \
	PCLMULQDQ $0x11, X0, X5; \
	PXOR      X5, X1; \
	PXOR      x, X1

// REDUCE takes the 128 bits in X1 to the CRC state, in AX: the low half
// moved on by 64 bits onto the high, 64 bits to 32, then Barrett's
// reduction, which leaves the CRC in bits 32-63. It clobbers X0-X3.
#define REDUCE \
	MOVOU     k128<>+0(SB), X0; \
	PCMPEQB   X3, X3; \
	PCLMULQDQ $0x01, X1, X0; \
	PSRLDQ    $8, X1; \
	PXOR      X0, X1; \
	MOVO      X1, X2; \
	MOVQ      k64<>+0(SB), X0; \
	PSRLQ     $32, X3; \
	PSRLDQ    $4, X2; \
	PAND      X3, X1; \
	PCLMULQDQ $0x00, X0, X1; \
	PXOR      X2, X1; \
	MOVOU     barrett<>+0(SB), X0; \
	MOVO      X1, X2; \
	PAND      X3, X1; \
	PCLMULQDQ $0x10, X0, X1; \
	PAND      X3, X1; \
	PCLMULQDQ $0x00, X0, X1; \
	PXOR      X2, X1; \
	PEXTRD    $1, X1, AX

// SHIFT moves the CRC state in r on by the bytes whose constant k
// (x^(8n-32) mod P, as the others are kept) is in X6: the product of the
// two, 64 bits, through the CRC32 instruction from a zero state, which
// multiplies by x^32. It clobbers X7 and DI.
#define SHIFT(r) \
	MOVL      r, X7; \
	PCLMULQDQ $0x00, X6, X7; \
	MOVQ      X7, DI; \
	XORL      r, r; \
	CRC32Q    DI, r

// func fold(crc uint32, p []byte, zmm bool) uint32
//
// len(p) >= 256 and a multiple of 16. With zmm, the bytes are folded in
// 512-bit registers (AVX-512); without, in pairs of 256-bit ones (AVX2
// with VPCLMULQDQ), Y(2i-1) and Y(2i) the low and high halves of what
// Zi is in the 512-bit loop, so both use the same constants and meet in
// X1-X4.
TEXT ·fold(SB), NOSPLIT, $0-44
	MOVL    crc+0(FP), X0
	MOVQ    p_base+8(FP), SI
	MOVQ    p_len+16(FP), CX
	MOVBLZX zmm+32(FP), AX
	TESTL   AX, AX
	JZ      ymm

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
	JMP           tail

	// The same in 256-bit registers: eight accumulators, Y1-Y8.
ymm:
	VMOVDQA X0, X10
	LOAD_Y
	VPXOR   Y10, Y1, Y1
	ADDQ    $256, SI
	SUBQ    $256, CX
	VMOVDQU k2048<>+0(SB), Y0
	CMPQ    CX, $256
	JB      combineY

loop256Y:
	FOLD_Y(Y1, Y9, 0)
	FOLD_Y(Y2, Y10, 32)
	FOLD_Y(Y3, Y11, 64)
	FOLD_Y(Y4, Y12, 96)
	FOLD_Y(Y5, Y13, 128)
	FOLD_Y(Y6, Y14, 160)
	FOLD_Y(Y7, Y15, 192)
	FOLD_Y(Y8, Y9, 224)
	ADDQ $256, SI
	SUBQ $256, CX
	CMPQ CX, $256
	JAE  loop256Y

combineY:
	COMBINE_Y
	CMPQ CX, $64
	JB   lanesY

loop64Y:
	FOLD_Y(Y7, Y9, 0)
	FOLD_Y(Y8, Y10, 32)
	ADDQ $64, SI
	SUBQ $64, CX
	CMPQ CX, $64
	JAE  loop64Y

lanesY:
	LANES_Y

	// The lanes into one, 16 bytes apart, then the rest of p 16 bytes
	// at a time.
tail:
	MOVOU k128<>+0(SB), X0
	FOLD16(X2)
	FOLD16(X3)
	FOLD16(X4)
	CMPQ  CX, $16
	JB    reduce

loop16:
	MOVOU (SI), X10
	FOLD16(X10)
	ADDQ  $16, SI
	SUBQ  $16, CX
	CMPQ  CX, $16
	JAE   loop16

reduce:
	REDUCE
	MOVL AX, ret+40(FP)
	RET

// func foldMixed(crc uint32, p []byte, rounds int, ks, kb uint64) uint32
//
// The CRC32 instruction (integer units) and VPCLMULQDQ (vector units) at
// once, for CPUs whose 256-bit carry-less multiply is no faster than
// hash/crc32 alone. p is four runs: three of s = 64*(rounds-1) bytes,
// each through the CRC32 instruction, 8 bytes at a time, the first from
// crc and the others from zero, then b = 256*rounds bytes folded from zero
// as fold's AVX2 loop does, 64 bytes of each run and 256 of the last per
// round. Then the states are joined, each moved on by the bytes after it:
// ((c0*x^8s + c1)*x^8s + c2)*x^8b + v, with ks and kb the constants for s
// and b bytes (x^(8n-32) mod P). rounds >= 2.
TEXT ·foldMixed(SB), NOSPLIT, $0-60
	MOVL crc+0(FP), R11
	MOVQ p_base+8(FP), R8
	MOVQ rounds+32(FP), CX
	LEAQ -1(CX), DX
	SHLQ $6, DX
	LEAQ (R8)(DX*1), R9
	LEAQ (R9)(DX*1), R10
	LEAQ (R10)(DX*1), SI
	XORL R12, R12
	XORL R13, R13
	LOAD_Y
	ADDQ    $256, SI
	VMOVDQU k2048<>+0(SB), Y0
	DECQ    CX

loopMixed:
	FOLD_Y(Y1, Y9, 0)
	CRC3(0)
	FOLD_Y(Y2, Y10, 32)
	CRC3(8)
	FOLD_Y(Y3, Y11, 64)
	CRC3(16)
	FOLD_Y(Y4, Y12, 96)
	CRC3(24)
	FOLD_Y(Y5, Y13, 128)
	CRC3(32)
	FOLD_Y(Y6, Y14, 160)
	CRC3(40)
	FOLD_Y(Y7, Y15, 192)
	CRC3(48)
	FOLD_Y(Y8, Y9, 224)
	CRC3(56)
	ADDQ $64, R8
	ADDQ $64, R9
	ADDQ $64, R10
	ADDQ $256, SI
	DECQ CX
	JNZ  loopMixed

	COMBINE_Y
	LANES_Y
	MOVOU k128<>+0(SB), X0
	FOLD16(X2)
	FOLD16(X3)
	FOLD16(X4)
	REDUCE

	// The three runs' states into one, then onto the folded run's.
	MOVQ  ks+40(FP), X6
	SHIFT(R11)
	XORL  R12, R11
	SHIFT(R11)
	XORL  R13, R11
	MOVQ  kb+48(FP), X6
	SHIFT(R11)
	XORL  R11, AX
	MOVL  AX, ret+56(FP)
	RET

// func cpuid7ecx() uint32
//
// ECX of CPUID leaf 7, sub-leaf 0: bit 10 is VPCLMULQDQ, which x/sys/cpu
// reports only with AVX-512.
TEXT ·cpuid7ecx(SB), NOSPLIT, $0-4
	MOVL  $7, AX
	XORL  CX, CX
	CPUID
	MOVL  CX, ret+0(FP)
	RET
