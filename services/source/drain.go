package source

import (
	"context"

	"github.com/vfio-ferry/ferry/services/wire"
)

// Refuse makes the agent refuse new migrations with UNAVAILABLE, reason
// AGENT_DRAINING, from now on; repeats of a migration it accepted still
// answer.
func (a *Agent) Refuse() {
	a.mu.Lock()
	a.draining = true
	a.mu.Unlock()
}

// Drain refuses new migrations, then waits until every migration the agent
// accepted has ended, or ctx ends (its error is returned then; Close aborts
// what still runs, with the rollback rule).
func (a *Agent) Drain(ctx context.Context) error {
	a.Refuse()
	return wire.WaitDone(ctx, a.dones())
}

// Running reports the migrations not yet ended.
func (a *Agent) Running() int { return wire.CountOpen(a.dones()) }

func (a *Agent) dones() []<-chan struct{} {
	a.mu.Lock()
	defer a.mu.Unlock()
	dones := make([]<-chan struct{}, 0, len(a.migrations))
	for _, m := range a.migrations {
		dones = append(dones, m.done)
	}
	return dones
}
