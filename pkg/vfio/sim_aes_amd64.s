#include "textflag.h"

// The simulated device's blocks with AES-NI: block j of p is two AESENC
// rounds of [z+(j+1)step, z+(j+1)step] under the round keys k[0:2], k[2:4]
// (sim_aes.go computes the same in Go). Four blocks a round, so the
// rounds of one block wait for the AES unit, not for each other.

// LOADSTATE sets X8 to [z, z], X9-X11 to [step, step] times 1-3, X7 to times
// 4, and the round keys into X12 and X13, from the frame of either
// function (their first arguments are the same).
#define LOADSTATE \
	MOVQ       z+24(FP), X8; \
	PUNPCKLQDQ X8, X8; \
	MOVQ       step+32(FP), X9; \
	PUNPCKLQDQ X9, X9; \
	MOVO       X9, X10; \
	PADDQ      X9, X10; \
	MOVO       X10, X11; \
	PADDQ      X9, X11; \
	MOVO       X10, X7; \
	PADDQ      X10, X7; \
	MOVQ       k+40(FP), AX; \
	MOVOU      (AX), X12; \
	MOVOU      16(AX), X13

// FOUR sets X0-X3 to the next four blocks and moves X8 on by four.
#define FOUR \
	MOVO   X8, X0; \
	PADDQ  X9, X0; \
	MOVO   X8, X1; \
	PADDQ  X10, X1; \
	MOVO   X8, X2; \
	PADDQ  X11, X2; \
	MOVO   X8, X3; \
	PADDQ  X7, X3; \
	AESENC X12, X0; \
	AESENC X12, X1; \
	AESENC X12, X2; \
	AESENC X12, X3; \
	AESENC X13, X0; \
	AESENC X13, X1; \
	AESENC X13, X2; \
	AESENC X13, X3; \
	PADDQ  X7, X8

// ONE sets X0 to the next block and moves X8 on by one.
#define ONE \
	PADDQ  X9, X8; \
	MOVO   X8, X0; \
	AESENC X12, X0; \
	AESENC X13, X0

// func aesGen(p []byte, z, step uint64, k *blockKeys)
TEXT ·aesGen(SB), NOSPLIT, $0-48
	MOVQ p_base+0(FP), DI
	MOVQ p_len+8(FP), CX
	LOADSTATE
	CMPQ CX, $64
	JB   gen1

gen4:
	FOUR
	MOVOU X0, (DI)
	MOVOU X1, 16(DI)
	MOVOU X2, 32(DI)
	MOVOU X3, 48(DI)
	ADDQ  $64, DI
	SUBQ  $64, CX
	CMPQ  CX, $64
	JAE   gen4

gen1:
	CMPQ  CX, $16
	JB    gendone
	ONE
	MOVOU X0, (DI)
	ADDQ  $16, DI
	SUBQ  $16, CX
	JMP   gen1

gendone:
	RET

// func aesDiff(p []byte, z, step uint64, k *blockKeys) bool
TEXT ·aesDiff(SB), NOSPLIT, $0-49
	MOVQ p_base+0(FP), SI
	MOVQ p_len+8(FP), CX
	LOADSTATE
	PXOR X6, X6
	CMPQ CX, $64
	JB   diff1

diff4:
	FOUR
	MOVOU (SI), X4
	PXOR  X4, X0
	MOVOU 16(SI), X4
	PXOR  X4, X1
	MOVOU 32(SI), X4
	PXOR  X4, X2
	MOVOU 48(SI), X4
	PXOR  X4, X3
	POR   X0, X6
	POR   X1, X6
	POR   X2, X6
	POR   X3, X6
	ADDQ  $64, SI
	SUBQ  $64, CX
	CMPQ  CX, $64
	JAE   diff4

diff1:
	CMPQ  CX, $16
	JB    diffdone
	ONE
	MOVOU (SI), X4
	PXOR  X4, X0
	POR   X0, X6
	ADDQ  $16, SI
	SUBQ  $16, CX
	JMP   diff1

diffdone:
	MOVQ     X6, AX
	PSRLDQ   $8, X6
	MOVQ     X6, BX
	ORQ      BX, AX
	SETNE    ret+48(FP)
	RET
