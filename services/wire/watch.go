package wire

import (
	"context"
	"sync"
	"time"

	"google.golang.org/grpc/status"
)

// Broadcast wakes every watcher of a migration when it changes phase.
// Watch handlers take Changed() before they read the state, then wait on
// it; Notify closes the channel they hold and starts a new one.
type Broadcast struct {
	mu sync.Mutex
	ch chan struct{}
}

// Changed returns a channel closed at the next Notify.
func (b *Broadcast) Changed() <-chan struct{} {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.ch == nil {
		b.ch = make(chan struct{})
	}
	return b.ch
}

// Notify wakes every watcher.
func (b *Broadcast) Notify() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.ch != nil {
		close(b.ch)
	}
	b.ch = make(chan struct{})
}

// WatchInterval is how often a watch stream reports progress between phase
// changes.
const WatchInterval = 250 * time.Millisecond

// Watch calls send with snapshots of a migration until the snapshot is
// final or ctx ends: at once, on every phase change, and every
// WatchInterval while bytes move. snapshot returns the state, whether it
// is final, and a progress counter that tells whether anything changed.
func Watch[T any](ctx context.Context, b *Broadcast, snapshot func() (T, bool, uint64), send func(T) error) error {
	t := time.NewTicker(WatchInterval)
	defer t.Stop()
	var last uint64
	first := true
	for {
		changed := b.Changed()
		m, final, progress := snapshot()
		if first || final || progress != last {
			if err := send(m); err != nil {
				return err
			}
		}
		if final {
			return nil
		}
		first, last = false, progress
		select {
		case <-ctx.Done():
			// As gRPC sends it: the interceptors around a handler read a
			// bare context error as UNKNOWN.
			return status.FromContextError(ctx.Err()).Err()
		case <-changed:
			first = true // a phase change is always sent
		case <-t.C:
		}
	}
}
