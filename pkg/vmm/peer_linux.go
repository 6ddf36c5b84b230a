package vmm

import (
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"strings"

	"golang.org/x/sys/unix"
)

// Cred is a peer's identity as the kernel tells it (SO_PEERCRED).
type Cred struct {
	PID      int32
	UID, GID uint32
}

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

// ErrPeerNotAllowed: the peer's uid and gid are in no allowed list.
var ErrPeerNotAllowed = errors.New("vmm: peer not allowed")

// Allow is who may speak on the socket: a peer whose uid is in UIDs or
// whose gid is in GIDs. Empty lists allow only the agent's own uid.
type Allow struct {
	UIDs, GIDs []uint32
}

// Check admits or refuses c.
func (a Allow) Check(c Cred) error {
	if len(a.UIDs) == 0 && len(a.GIDs) == 0 {
		if c.UID == uint32(os.Getuid()) {
			return nil
		}
	} else if slices.Contains(a.UIDs, c.UID) || slices.Contains(a.GIDs, c.GID) {
		return nil
	}
	return fmt.Errorf("%w: uid %d gid %d (pid %d)", ErrPeerNotAllowed, c.UID, c.GID, c.PID)
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
