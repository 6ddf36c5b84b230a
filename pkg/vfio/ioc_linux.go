//go:build linux && !(ppc64 || ppc64le || mips || mipsle || mips64 || mips64le)

package vfio

// iocDirNone is _IOC_NONE << _IOC_DIRSHIFT from asm-generic/ioctl.h.
const iocDirNone = 0
