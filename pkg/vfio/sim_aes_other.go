//go:build !amd64

package vfio

func genBlocks(p []byte, z uint64, k *blockKeys) { genBlocksGo(p, z, k) }

func diffBlocks(p []byte, z uint64, k *blockKeys) bool { return diffBlocksGo(p, z, k) }
