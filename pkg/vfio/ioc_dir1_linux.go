//go:build linux && (ppc64 || ppc64le || mips || mipsle || mips64 || mips64le)

package vfio

// iocDirNone is _IOC_NONE << _IOC_DIRSHIFT on powerpc and mips, whose
// asm/ioctl.h define _IOC_NONE as 1 and a 13-bit size field (shift 29).
const iocDirNone = 1 << 29
