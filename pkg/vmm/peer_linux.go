package vmm

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strings"

	"golang.org/x/sys/unix"
)

// PeerCred reads the credentials of the process at the other end of uc,
// as they were when it connected.
func PeerCred(uc *net.UnixConn) (Cred, error) {
	raw, err := uc.SyscallConn()
	if err != nil {
		return Cred{}, err
	}
	var cred *unix.Ucred
	var serr error
	if err := raw.Control(func(fd uintptr) {
		cred, serr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return Cred{}, err
	}
	if serr != nil {
		return Cred{}, fmt.Errorf("SO_PEERCRED: %w", serr)
	}
	return Cred{PID: cred.Pid, UID: cred.Uid, GID: cred.Gid}, nil
}

// ErrNotVFIODevice: a descriptor is not a VFIO device's.
var ErrNotVFIODevice = errors.New("vmm: not a VFIO device file descriptor")

// CheckVFIODevice tells whether fd is a VFIO device's: one a group handed
// out (an anonymous inode "[vfio-device]") or a VFIO device cdev
// (/dev/vfio/devices/vfioN, a character device of the vfio-dev class).
// It looks only at what the kernel says the descriptor is, and issues no
// ioctl on it: an ioctl number means something else to another driver.
func CheckVFIODevice(fd int) error {
	target, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", fd))
	if err != nil {
		return fmt.Errorf("%w: %v", ErrNotVFIODevice, err)
	}
	if target == "anon_inode:[vfio-device]" {
		return nil
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fmt.Errorf("%w: %v", ErrNotVFIODevice, err)
	}
	if st.Mode&unix.S_IFMT == unix.S_IFCHR && isVFIOCdev(unix.Major(st.Rdev), unix.Minor(st.Rdev)) {
		return nil
	}
	return fmt.Errorf("%w: it is %s", ErrNotVFIODevice, strings.TrimSpace(target))
}

// isVFIOCdev reports whether major:minor is a device of sysfs's
// vfio-dev class.
func isVFIOCdev(major, minor uint32) bool {
	want := fmt.Sprintf("%d:%d", major, minor)
	entries, err := os.ReadDir("/sys/class/vfio-dev")
	if err != nil {
		return false
	}
	for _, e := range entries {
		b, err := os.ReadFile("/sys/class/vfio-dev/" + e.Name() + "/dev")
		if err == nil && strings.TrimSpace(string(b)) == want {
			return true
		}
	}
	return false
}

// dupCloexec duplicates fd with close-on-exec set.
func dupCloexec(fd int) (int, error) {
	nfd, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("dup: %w", err)
	}
	return nfd, nil
}
