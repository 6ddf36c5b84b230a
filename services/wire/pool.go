package wire

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
// WithBufferPool in grpc.go), so the 16 KiB buffers gRPC reads DATA frames
// into come from here too: gRPC's default pool zeroes every buffer it
// hands out (6% of both agents' CPU in BenchmarkMigration's profile),
// which a buffer that is read into in full does not need.
type Pool struct {
	classes [numClasses]sync.Pool
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
	p.classes[class].Put(b)
}
