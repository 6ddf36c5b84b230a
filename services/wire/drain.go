package wire

import (
	"context"

	"google.golang.org/grpc/codes"
)

// ErrDraining refuses a new migration on an agent that is shutting down:
// UNAVAILABLE, reason AGENT_DRAINING, so the control plane picks another
// node. role is "source" or "destination".
func ErrDraining(role string) error {
	return Errorf(codes.Unavailable, ReasonDraining, "the %s agent is shutting down and takes no new migrations; use another node", role)
}

// WaitDone waits until every channel in dones is closed (each closes when
// its migration has ended and rolled back if it had to), or ctx ends.
func WaitDone(ctx context.Context, dones []<-chan struct{}) error {
	for _, d := range dones {
		select {
		case <-d:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

// CountOpen counts the channels in dones not yet closed.
func CountOpen(dones []<-chan struct{}) int {
	n := 0
	for _, d := range dones {
		select {
		case <-d:
		default:
			n++
		}
	}
	return n
}
