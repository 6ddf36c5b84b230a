package chunkwire

import (
	"math/bits"
	"sync"
)

// Pool hands out chunk buffers by power-of-two size class, from 4 KiB to
// 16 MiB, without zeroing them. Fresh memory costs page faults (about
// 1 GB/s on the machines Ferry was measured on), so chunk buffers are
// always reused. It implements google.golang.org/grpc/mem.BufferPool, so a
// mem.Buffer made with mem.NewBuffer returns its bytes here when gRPC and
// Ferry have both released it.
//
// Ferry gives the same Pool to gRPC (experimental.BufferPool and
// WithBufferPool in services/grpcserver), so the 16 KiB buffers gRPC reads DATA frames
// into come from here too: gRPC's default pool zeroes every buffer it
// hands out (6% of both agents' CPU in BenchmarkMigration's profile),
// which a buffer that is read into in full does not need.
type Pool struct {
	classes [numClasses]sync.Pool
	hot     [numClasses]hotStack
	// payloads recycles received chunks' Payloads (see InChunk).
	payloads sync.Pool
}

const (
	minClassShift = 12 // 4 KiB
	maxClassShift = 24 // 16 MiB
	numClasses    = maxClassShift - minClassShift + 1
)

// NewPool returns an empty pool.
func NewPool() *Pool { return &Pool{} }

func classOf(n int) (class int, size int) {
	if n <= 1<<minClassShift {
		return 0, 1 << minClassShift
	}
	shift := bits.Len(uint(n - 1))
	return shift - minClassShift, 1 << shift
}

// Get returns a buffer of length n. Sizes above 16 MiB are allocated and
// never pooled.
func (p *Pool) Get(n int) *[]byte {
	if n > 1<<maxClassShift {
		b := make([]byte, n)
		return &b
	}
	class, size := classOf(n)
	if b := p.hot[class].pop(); b != nil {
		*b = (*b)[:n]
		return b
	}
	if v := p.classes[class].Get(); v != nil {
		b := v.(*[]byte)
		*b = (*b)[:n]
		return b
	}
	b := make([]byte, n, size)
	return &b
}

// Put returns a buffer obtained from Get.
func (p *Pool) Put(b *[]byte) {
	c := cap(*b)
	if c < 1<<minClassShift || c > 1<<maxClassShift || c&(c-1) != 0 {
		return
	}
	class, _ := classOf(c)
	*b = (*b)[:0]
	if p.hot[class].push(b) {
		return
	}
	p.classes[class].Put(b)
}

// hotStack keeps the few buffers of a class freed last and hands them out
// first, last in first out: they are the likeliest to be in a cache. A
// sync.Pool gives no such order: a buffer freed on one P (the
// destination's loader) and taken on another (the connection's reader) is
// stolen from the far end of the other P's list, the buffer that went
// cold longest ago. Reading chunks into the last freed buffers took the
// kernel's copy at the destination from 0.24 to 0.20 CPU-seconds per GiB
// and both agents' CPU down by 5-10% (perf-sampled 1-channel runs of 4
// GiB, alternating with the plain pool); 16 buffers did no better than 4.
// The stacks keep at most hotStackDepth buffers of each class in use
// beyond any migration.
type hotStack struct {
	mu   sync.Mutex
	n    int
	bufs [hotStackDepth]*[]byte
}

const hotStackDepth = 4

func (h *hotStack) pop() *[]byte {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.n == 0 {
		return nil
	}
	h.n--
	b := h.bufs[h.n]
	h.bufs[h.n] = nil
	return b
}

func (h *hotStack) push(b *[]byte) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.n == hotStackDepth {
		return false
	}
	h.bufs[h.n] = b
	h.n++
	return true
}
