package dest

import (
	"context"

	"github.com/vfio-ferry/ferry/services/wire"
)

// Refuse makes the agent refuse new migrations (PrepareIncoming) with
// UNAVAILABLE, reason AGENT_DRAINING, from now on; repeats of a migration
// it accepted still answer, and a prepared migration still takes its
// source's Open.
func (a *Agent) Refuse() {
	a.mu.Lock()
	a.draining = true
	a.mu.Unlock()
}

// Drain refuses new migrations, then waits until every incoming migration
// the agent accepted has ended, or ctx ends (its error is returned then;
// Close aborts what still runs and resets its devices). A VERIFIED
// migration ends with its source's Commit or Abort, which normally follow
// the verdict at once; one still VERIFIED when ctx ends is left to the
// source and the control plane (see Close).
func (a *Agent) Drain(ctx context.Context) error {
	a.Refuse()
	return wire.WaitDone(ctx, a.dones())
}

// Running reports the incoming migrations not yet ended.
func (a *Agent) Running() int { return wire.CountOpen(a.dones()) }

func (a *Agent) dones() []<-chan struct{} {
	a.mu.Lock()
	defer a.mu.Unlock()
	dones := make([]<-chan struct{}, 0, len(a.incoming))
	for _, inc := range a.incoming {
		dones = append(dones, inc.done)
	}
	return dones
}
