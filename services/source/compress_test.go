package source

import "testing"

func TestCompBackoff(t *testing.T) {
	var b compBackoff
	var tried []int
	// Chunks 0..199 of incompressible state: none shrinks.
	for i := range 200 {
		if b.try() {
			tried = append(tried, i)
			b.result(false)
		}
	}
	// Tries at 0, then after skipping 1, 2, 4, ..., 64, 64, ...
	want := []int{0, 2, 5, 10, 19, 36, 69, 134, 199}
	if len(tried) != len(want) {
		t.Fatalf("tried %v, want %v", tried, want)
	}
	for i := range want {
		if tried[i] != want[i] {
			t.Fatalf("tried %v, want %v", tried, want)
		}
	}
	// A chunk that shrinks brings every chunk back.
	for !b.try() {
	}
	b.result(true)
	for i := range 5 {
		if !b.try() {
			t.Fatalf("chunk %d after one that shrank was skipped", i)
		}
		b.result(true)
	}
}
