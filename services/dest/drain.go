package dest

import (
	"context"

	"google.golang.org/grpc/codes"

	"github.com/vfio-ferry/ferry/services/wire"
)

// errDraining refuses a new migration on a draining agent.
func errDraining() error {
	return wire.Errorf(codes.Unavailable, wire.ReasonDraining, "the destination agent is shutting down and takes no new migrations; use another node")
}

// Refuse makes the agent refuse new migrations with UNAVAILABLE (reason
// AGENT_DRAINING) from now on; repeats of a migration it accepted still
// answer.
func (a *Agent) Refuse() {
	a.mu.Lock()
	a.draining = true
	a.mu.Unlock()
}

// Drain makes the agent refuse new migrations (PrepareIncoming) with
// UNAVAILABLE, then waits until every incoming migration it accepted has
// ended, or ctx ends (its error is returned then; Close aborts what still
// runs and resets its devices). A prepared migration still takes its
// source's Open while the agent drains.
func (a *Agent) Drain(ctx context.Context) error {
	a.mu.Lock()
	a.draining = true
	running := make([]*incoming, 0, len(a.incoming))
	for _, inc := range a.incoming {
		running = append(running, inc)
	}
	a.mu.Unlock()
	for _, inc := range running {
		select {
		case <-inc.done:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

// Running reports the incoming migrations not yet ended.
func (a *Agent) Running() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	n := 0
	for _, inc := range a.incoming {
		if !isClosed(inc.done) {
			n++
		}
	}
	return n
}
