package source

import (
	"google.golang.org/grpc/codes"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/flow"
	"github.com/vfio-ferry/ferry/services/wire"
)

// DefaultMemoryBudget bounds what the source agent holds for all its
// outgoing migrations together when Config.MemoryBudget is 0.
const DefaultMemoryBudget = 2 << 30

// The source's memory is what it holds unacknowledged: every chunk read
// and sent stays until the destination says it was written, so a broken
// channel's chunks can be sent again. The destination's window bounds
// that, but the window is the peer's word: a destination may advertise
// 2^20 chunks of 16 MiB per device and acknowledge none. So the source
// bounds it itself. When a session opens, each device gets a cap: its
// initial window's bytes, at most an equal share of what is left of the
// agent's budget. The cap is reserved from the budget for the migration's
// life, and every window the destination advertises is clamped to the cap
// beyond the chunks the source itself knows were written (the acked
// frontier of the chunks it sent, never an offset the peer claims). A
// session whose devices cannot each get a chunk's worth is refused with
// RESOURCE_EXHAUSTED before any device stops.

// reserve takes the devices' caps from the agent's budget.
func (m *migration) reserve(windows []*ferryv1.WindowUpdate) error {
	a := m.a
	n := uint64(len(m.devs))
	chunk := uint64(m.chunkSize)
	a.mu.Lock()
	defer a.mu.Unlock()
	free := a.cfg.MemoryBudget - a.budgetUsed
	share := free / n
	if share < chunk {
		return wire.Errorf(codes.ResourceExhausted, wire.ReasonBudgetExhausted,
			"the source's memory budget has %d of %d bytes free: %d device(s) need a %d-byte chunk each", free, a.cfg.MemoryBudget, n, chunk)
	}
	var total uint64
	prompt := m.features.Has(ferryv1.Feature_FEATURE_PROMPT_FEEDBACK)
	for i, d := range m.devs {
		b := max(min(windows[i].GetLimitOffset(), share), chunk)
		d.capBytes = b
		// Every chunk but a device's last holds chunk bytes; END is one
		// more.
		d.capChunks = b/chunk + 2
		d.chunkBytes = chunk
		d.mu.Lock()
		d.flight = newInflight(b, chunk, prompt)
		d.flightLimit.Store(d.flight.limit())
		d.mu.Unlock()
		total += b
	}
	a.budgetUsed += total
	m.reserved = total
	return nil
}

// unreserve returns the migration's caps to the budget.
func (m *migration) unreserve() {
	a := m.a
	a.mu.Lock()
	a.budgetUsed -= m.reserved
	a.mu.Unlock()
	m.reserved = 0
}

// BudgetUsed is the part of the memory budget the running migrations hold.
func (a *Agent) BudgetUsed() uint64 {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.budgetUsed
}

// clamp bounds a window from the destination to the device's cap, and
// to what the source keeps in flight (inflight.go), beyond the chunks the
// source knows were written.
func (d *srcDevice) clamp(w flow.Window) flow.Window {
	// The limit is the cap where the destination updates only every
	// quarter window, never more (newInflight), and set in reserve, before
	// any window is clamped.
	limit := d.flightLimit.Load()
	w.LimitSeq = min(w.LimitSeq, d.ackedSeq.Load()+min(d.capChunks, limit/d.chunkBytes+2))
	w.LimitOffset = min(w.LimitOffset, d.ackedOffset.Load()+limit)
	return w
}
