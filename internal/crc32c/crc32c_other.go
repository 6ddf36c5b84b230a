//go:build !amd64

package crc32c

const widest = noFold

func foldWidth(crc uint32, p []byte, w width) uint32 {
	panic("crc32c: no fold on this architecture")
}
