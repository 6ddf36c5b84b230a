package source

import (
	"context"

	"google.golang.org/grpc/codes"

	"github.com/vfio-ferry/ferry/services/wire"
)

// errDraining refuses a new migration on a draining agent.
func errDraining() error {
	return wire.Errorf(codes.Unavailable, wire.ReasonDraining, "the source agent is shutting down and takes no new migrations; use another node")
}

// Refuse makes the agent refuse new migrations with UNAVAILABLE (reason
// AGENT_DRAINING) from now on; repeats of a migration it accepted still
// answer.
func (a *Agent) Refuse() {
	a.mu.Lock()
	a.draining = true
	a.mu.Unlock()
}

// Drain makes the agent refuse new migrations with UNAVAILABLE, then waits
// until every migration it accepted has ended, or ctx ends (its error is
// returned then; Close aborts what still runs, with the rollback rule).
func (a *Agent) Drain(ctx context.Context) error {
	a.mu.Lock()
	a.draining = true
	running := make([]*migration, 0, len(a.migrations))
	for _, m := range a.migrations {
		running = append(running, m)
	}
	a.mu.Unlock()
	for _, m := range running {
		select {
		case <-m.done:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

// Running reports the migrations not yet ended.
func (a *Agent) Running() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	n := 0
	for _, m := range a.migrations {
		select {
		case <-m.done:
		default:
			n++
		}
	}
	return n
}
