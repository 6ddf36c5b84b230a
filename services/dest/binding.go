package dest

import (
	"context"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/services/peerauth"
	"github.com/vfio-ferry/ferry/services/wire"
)

// A prepared migration's token admits one Open; the session it opens is
// bound to the source identity that opened it (peerauth.PeerIdentity: the
// SANs of the verified client certificate), so a session id that leaks
// is of no use to another agent. On plaintext connections every caller
// has the empty identity and the binding checks nothing: TLS is what
// gives it teeth.

// boundSession returns the session id names if the caller is the source
// identity that opened it; else PERMISSION_DENIED with
// SESSION_PEER_MISMATCH.
func (a *Agent) boundSession(ctx context.Context, id string) (*incoming, error) {
	inc, err := a.session(id)
	if err != nil {
		return nil, err
	}
	if err := inc.checkPeer(ctx); err != nil {
		return nil, err
	}
	inc.touch()
	return inc, nil
}

// tokenIncoming returns the incoming migration id names if token is its
// token (see checkToken; spent or expired tokens still name it) and, once a session is open, the caller is the identity
// that opened it.
func (a *Agent) tokenIncoming(ctx context.Context, id, token string) (*incoming, error) {
	inc, err := a.lookup(id)
	if err != nil {
		return nil, err
	}
	if err := checkToken(token, inc.token, id); err != nil {
		return nil, err
	}
	inc.mu.Lock()
	opened := inc.sessionID != ""
	inc.mu.Unlock()
	if opened {
		if err := inc.checkPeer(ctx); err != nil {
			return nil, err
		}
	}
	return inc, nil
}

// checkPeer refuses a caller that is not the identity that opened the
// session. The refusal does not name the owner; the log does.
func (inc *incoming) checkPeer(ctx context.Context) error {
	caller := peerauth.PeerIdentity(ctx).String()
	inc.mu.Lock()
	owner := inc.peer
	inc.mu.Unlock()
	if caller == owner {
		return nil
	}
	method, _ := grpc.Method(ctx)
	inc.log.Warn("session used by another identity", "method", method, "caller", caller, "owner", owner)
	return wire.Errorf(codes.PermissionDenied, wire.ReasonPeerMismatch,
		"the session of incoming migration %s belongs to another source identity than %q", inc.id, caller)
}

// expire fails a prepared migration whose source did not open it within
// its open timeout (the token's lifetime, at most the source timeout), so
// its devices and budget are not held for a source that will not come. It runs on the expiry timer; a session opened
// in the meantime is left alone (Open and expire serialise on inc.mu).
func (inc *incoming) expire(ttl time.Duration) {
	inc.mu.Lock()
	opened := inc.sessionID != ""
	inc.mu.Unlock()
	if opened {
		return
	}
	inc.fail(wire.Errorf(codes.DeadlineExceeded, wire.ReasonBadToken, "the source did not open incoming migration %s within %s", inc.id, ttl), ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED, failFound)
}
