package chunkwire

import "testing"

func TestPoolSizesAndReuse(t *testing.T) {
	p := NewPool()
	for _, n := range []int{1, 4096, 4097, 1 << 20, 1<<20 + 1, 16 << 20} {
		b := p.Get(n)
		if len(*b) != n {
			t.Fatalf("Get(%d) gave %d bytes", n, len(*b))
		}
		if c := cap(*b); c&(c-1) != 0 || c < n {
			t.Fatalf("Get(%d) gave capacity %d, want a power of two >= n", n, c)
		}
		p.Put(b)
	}
	big := p.Get(17 << 20)
	if len(*big) != 17<<20 {
		t.Fatal("oversized Get")
	}
	p.Put(big) // ignored, must not panic
}

func TestPoolNoAllocInSteadyState(t *testing.T) {
	p := NewPool()
	p.Put(p.Get(1 << 20))
	allocs := testing.AllocsPerRun(100, func() { p.Put(p.Get(1 << 20)) })
	if allocs > 0 {
		t.Fatalf("Get+Put allocates %.1f times per chunk", allocs)
	}
}
