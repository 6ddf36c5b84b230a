package vfio

import "golang.org/x/sys/cpu"

// haveAESNI reports whether the assembly can run: AES-NI, and SSE2,
// which every amd64 CPU has.
var haveAESNI = cpu.X86.HasAES

// genBlocks writes block(z + (j+1)*gamma) at p[16j:16j+16] for each
// whole block of p.
func genBlocks(p []byte, z uint64, k *blockKeys) {
	if !haveAESNI {
		genBlocksGo(p, z, k)
		return
	}
	aesGen(p, z, gamma, k)
}

// diffBlocks reports whether the whole blocks of p differ from those
// genBlocks writes.
func diffBlocks(p []byte, z uint64, k *blockKeys) bool {
	if !haveAESNI {
		return diffBlocksGo(p, z, k)
	}
	return aesDiff(p, z, gamma, k)
}

//go:noescape
func aesGen(p []byte, z, step uint64, k *blockKeys)

//go:noescape
func aesDiff(p []byte, z, step uint64, k *blockKeys) bool
