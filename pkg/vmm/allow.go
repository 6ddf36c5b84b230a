package vmm

import (
	"errors"
	"fmt"
	"os"
	"slices"
)

// Cred is a peer's identity as the kernel tells it (SO_PEERCRED).
type Cred struct {
	PID      int32
	UID, GID uint32
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
