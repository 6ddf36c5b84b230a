package source

import "sync"

// resendQueue holds the chunks a lost channel had sent and the destination
// had not acknowledged, for any channel's sender to send again before new
// chunks.
//
// It is a list, not a buffered channel: the number of chunks a lost channel
// leaves behind is bounded only by what the source holds unacknowledged
// (its windows, which grow while the migration runs, under the source's
// own memory budget), so a queue sized when the session opened could fill,
// and the channel goroutine that queues them would then block on the one
// goroutine that drains them: its own sender. Pushing never blocks.
type resendQueue struct {
	mu     sync.Mutex
	chunks []*outChunk
	// ready holds a token while chunks may be non-empty (1-buffered):
	// a sender waiting for work selects on it.
	ready chan struct{}
}

func newResendQueue() *resendQueue { return &resendQueue{ready: make(chan struct{}, 1)} }

// push queues chunks for a resend; each holds a queue reference.
func (q *resendQueue) push(chunks []*outChunk) {
	if len(chunks) == 0 {
		return
	}
	q.mu.Lock()
	q.chunks = append(q.chunks, chunks...)
	q.mu.Unlock()
	q.signal()
}

// pop returns the oldest queued chunk, or nil when there is none.
func (q *resendQueue) pop() *outChunk {
	q.mu.Lock()
	if len(q.chunks) == 0 {
		q.mu.Unlock()
		return nil
	}
	ch := q.chunks[0]
	q.chunks[0] = nil
	q.chunks = q.chunks[1:]
	more := len(q.chunks) > 0
	if !more {
		q.chunks = q.chunks[:0:0]
	}
	q.mu.Unlock()
	if more {
		// Another sender may take the next one.
		q.signal()
	}
	return ch
}

// wait is ready when a chunk may be queued; pop tells.
func (q *resendQueue) wait() <-chan struct{} { return q.ready }

// len is how many chunks are queued.
func (q *resendQueue) len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.chunks)
}

// drain releases the queue references of what is left.
func (q *resendQueue) drain() {
	q.mu.Lock()
	chunks := q.chunks
	q.chunks = nil
	q.mu.Unlock()
	for _, ch := range chunks {
		ch.release()
	}
}

func (q *resendQueue) signal() {
	select {
	case q.ready <- struct{}{}:
	default:
	}
}
