package flow

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"reflect"
	"slices"
	"strings"
	"testing"
)

func data(seq, offset uint64, n uint32) Chunk[string] {
	return Chunk[string]{Seq: seq, Offset: offset, Len: n, Payload: fmt.Sprintf("d%d", seq)}
}

func end(seq, offset uint64) Chunk[string] {
	return Chunk[string]{Seq: seq, Offset: offset, End: true, Payload: "end"}
}

// snapshot copies r deeply enough to compare it later with reflect.DeepEqual.
func snapshot[T any](r *Reassembly[T]) Reassembly[T] {
	s := *r
	s.ring = slices.Clone(r.ring)
	return s
}

// TestReassemblyAccept checks every rule of Accept. Unless a case says
// otherwise the limits are 4 chunks / 40 bytes with 10-byte chunks, so a
// fresh Reassembly advertises seq < 4, offset+len <= 40. The chunks in
// before are accepted (they must be), then advance chunks are written,
// then c is offered.
func TestReassemblyAccept(t *testing.T) {
	for _, tt := range []struct {
		name      string
		limits    Limits // zero: {4, 40}
		chunkSize uint32 // zero: 10
		before    []Chunk[string]
		advance   int
		c         Chunk[string]
		dup       bool
		err       error
	}{
		// Accepted.
		{name: "first-chunk", c: data(0, 0, 10)},
		{name: "short-chunk", c: data(0, 0, 1)},
		{name: "ahead-of-frontier", c: data(3, 30, 10)},
		{name: "end-of-empty-stream", c: end(0, 0)},
		{name: "end-ahead", before: []Chunk[string]{data(1, 10, 10)}, c: end(2, 20)},
		{name: "end-at-limit-offset", c: end(3, 40)},
		{
			name:   "exact-max-bytes",
			before: []Chunk[string]{data(0, 0, 10), data(1, 10, 10), data(2, 20, 10)},
			c:      data(3, 30, 10),
		},
		{
			name:    "window-moves-with-frontier",
			before:  []Chunk[string]{data(0, 0, 10), data(1, 10, 10), data(2, 20, 10), data(3, 30, 10)},
			advance: 2,
			c:       data(5, 50, 10),
		},
		{name: "single-slot", limits: Limits{MaxChunks: 1, MaxBytes: 10}, c: data(0, 0, 10)},
		{
			name:    "ring-slot-reused",
			limits:  Limits{MaxChunks: 2, MaxBytes: 20},
			before:  []Chunk[string]{data(0, 0, 10), data(1, 10, 10)},
			advance: 1,
			c:       data(2, 20, 10),
		},

		// Duplicates: dropped, nothing kept.
		{name: "dup-written", before: []Chunk[string]{data(0, 0, 10)}, advance: 1, c: data(0, 0, 10), dup: true},
		{name: "dup-written-short", before: []Chunk[string]{data(0, 0, 3)}, advance: 1, c: data(0, 0, 3), dup: true},
		{
			name:    "dup-written-end",
			before:  []Chunk[string]{data(0, 0, 10), end(1, 10)},
			advance: 2,
			c:       end(1, 10),
			dup:     true,
		},
		{name: "dup-held", before: []Chunk[string]{data(2, 20, 10)}, c: data(2, 20, 10), dup: true},
		{name: "dup-held-end", before: []Chunk[string]{end(2, 20)}, c: end(2, 20), dup: true},

		// Conflicts: the same seq with another offset, length or kind.
		{name: "held-other-offset", before: []Chunk[string]{data(2, 20, 10)}, c: data(2, 21, 9), err: ErrConflict},
		{name: "held-other-len", before: []Chunk[string]{data(2, 20, 10)}, c: data(2, 20, 5), err: ErrConflict},
		{name: "held-data-then-end", before: []Chunk[string]{data(2, 20, 10)}, c: end(2, 20), err: ErrConflict},
		{name: "held-end-then-data", before: []Chunk[string]{end(2, 20)}, c: data(2, 20, 10), err: ErrConflict},
		{name: "held-end-other-offset", before: []Chunk[string]{end(2, 20)}, c: end(2, 25), err: ErrConflict},
		{name: "second-end-earlier", before: []Chunk[string]{end(3, 30)}, c: end(2, 20), err: ErrConflict},
		{
			name:    "written-reaches-past-frontier",
			before:  []Chunk[string]{data(0, 0, 10)},
			advance: 1,
			c:       data(0, 5, 10),
			err:     ErrConflict,
		},
		{
			name:    "written-end-resent-as-data",
			before:  []Chunk[string]{data(0, 0, 10), end(1, 10)},
			advance: 2,
			c:       data(1, 5, 5),
			err:     ErrConflict,
		},
		{
			name:    "written-data-resent-as-end",
			before:  []Chunk[string]{data(0, 0, 10)},
			advance: 1,
			c:       end(0, 10),
			err:     ErrConflict,
		},
		{
			name:    "written-end-other-offset",
			before:  []Chunk[string]{data(0, 0, 10), end(1, 10)},
			advance: 2,
			c:       end(1, 9),
			err:     ErrConflict,
		},

		// Outside the window.
		{name: "seq-at-limit", c: data(4, 30, 10), err: ErrOutsideWindow},
		{name: "seq-far-beyond", c: data(1<<40, 0, 1), err: ErrOutsideWindow},
		{name: "seq-max", c: data(math.MaxUint64, 0, 1), err: ErrOutsideWindow},
		{name: "bytes-beyond-limit", c: data(3, 31, 10), err: ErrOutsideWindow},
		{name: "end-beyond-limit", c: end(3, 41), err: ErrOutsideWindow},
		{name: "offset-wraps", c: data(1, math.MaxUint64-5, 10), err: ErrOutsideWindow},
		{
			name:    "offset-below-frontier",
			before:  []Chunk[string]{data(0, 0, 10)},
			advance: 1,
			c:       data(2, 5, 10),
			err:     ErrOutsideWindow,
		},
		{name: "single-slot-ahead", limits: Limits{MaxChunks: 1, MaxBytes: 10}, c: data(1, 10, 10), err: ErrOutsideWindow},
		{
			// Each chunk is inside the window, but they overlap, so together
			// they would be more than MaxBytes.
			name:   "overlap-exceeds-max-bytes",
			limits: Limits{MaxChunks: 4, MaxBytes: 20},
			before: []Chunk[string]{data(1, 10, 10), data(2, 10, 10)},
			c:      data(3, 10, 10),
			err:    ErrOutsideWindow,
		},

		// Gap at the frontier.
		{name: "frontier-chunk-off-offset", c: data(0, 5, 5), err: ErrGap},
		{name: "frontier-end-off-offset", before: []Chunk[string]{data(0, 0, 10)}, advance: 1, c: end(1, 15), err: ErrGap},

		// Lengths.
		{name: "empty-data", c: data(1, 10, 0), err: ErrBadLength},
		{name: "data-over-chunk-size", c: data(0, 0, 11), err: ErrBadLength},
		{name: "end-with-bytes", c: Chunk[string]{Seq: 1, Offset: 10, Len: 1, End: true}, err: ErrBadLength},
		{
			// Length is checked before anything else, even for a chunk that
			// would otherwise be a harmless stale resend.
			name:    "written-with-bad-length",
			before:  []Chunk[string]{data(0, 0, 10)},
			advance: 1,
			c:       data(0, 0, 11),
			err:     ErrBadLength,
		},

		// After the end.
		{name: "after-held-end", before: []Chunk[string]{end(2, 20)}, c: data(3, 30, 10), err: ErrAfterEnd},
		{name: "end-after-held-end", before: []Chunk[string]{end(2, 20)}, c: end(3, 20), err: ErrAfterEnd},
		{
			name:    "after-written-end",
			before:  []Chunk[string]{data(0, 0, 10), end(1, 10)},
			advance: 2,
			c:       data(2, 10, 10),
			err:     ErrAfterEnd,
		},
		{name: "end-before-held-chunk", before: []Chunk[string]{data(3, 30, 10)}, c: end(2, 20), err: ErrAfterEnd},
	} {
		t.Run(tt.name, func(t *testing.T) {
			limits, chunkSize := tt.limits, tt.chunkSize
			if limits == (Limits{}) {
				limits = Limits{MaxChunks: 4, MaxBytes: 40}
			}
			if chunkSize == 0 {
				chunkSize = 10
			}
			r := NewReassembly[string](limits, chunkSize)
			for _, c := range tt.before {
				if dup, err := r.Accept(c); dup || err != nil {
					t.Fatalf("setup: Accept(%+v) = %t, %v", c, dup, err)
				}
			}
			for range tt.advance {
				r.Advance()
			}

			was := snapshot(r)
			dup, err := r.Accept(tt.c)
			if tt.err != nil {
				if !errors.Is(err, tt.err) {
					t.Fatalf("Accept(%+v) = %t, %v; want %v", tt.c, dup, err, tt.err)
				}
				if want := fmt.Sprintf("seq %d offset %d", tt.c.Seq, tt.c.Offset); !strings.Contains(err.Error(), want) {
					t.Errorf("error %q does not name %q", err, want)
				}
				if !strings.Contains(err.Error(), "window seq < ") {
					t.Errorf("error %q does not name the window", err)
				}
			} else if err != nil || dup != tt.dup {
				t.Fatalf("Accept(%+v) = %t, %v; want %t, nil", tt.c, dup, err, tt.dup)
			}
			if dup || err != nil {
				if now := snapshot(r); !reflect.DeepEqual(now, was) {
					t.Fatalf("rejected or duplicate chunk changed the state:\nbefore %+v\nafter  %+v", was, now)
				}
				return
			}
			chunks, bytes := r.Buffered()
			wasChunks, wasBytes := was.Buffered()
			if chunks != wasChunks+1 || bytes != wasBytes+uint64(tt.c.Len) {
				t.Fatalf("Buffered() = %d, %d after accepting; want %d, %d", chunks, bytes, wasChunks+1, wasBytes+uint64(tt.c.Len))
			}
			if chunks > int(limits.MaxChunks) || bytes > limits.MaxBytes {
				t.Fatalf("Buffered() = %d, %d exceeds %+v", chunks, bytes, limits)
			}
		})
	}
}

// TestReassemblyRing follows the ring through a wrap, comparing the whole
// value at each step as raft's inflights tests do.
func TestReassemblyRing(t *testing.T) {
	r := NewReassembly[string](Limits{MaxChunks: 3, MaxBytes: 30}, 10)
	for _, c := range []Chunk[string]{data(2, 20, 10), data(1, 10, 10), data(0, 0, 10)} {
		if _, err := r.Accept(c); err != nil {
			t.Fatal(err)
		}
	}
	r.Advance()
	r.Advance()
	if _, err := r.Accept(data(3, 30, 5)); err != nil {
		t.Fatal(err)
	}

	//	          frontier
	//	             v
	//	+-------+-------+-------+
	//	|   3   |   -   |   2   |
	//	+-------+-------+-------+
	want := &Reassembly[string]{
		limits:    Limits{MaxChunks: 3, MaxBytes: 30},
		chunkSize: 10,
		ring:      []slot[string]{{c: data(3, 30, 5), held: true}, {}, {c: data(2, 20, 10), held: true}},
		seq:       2,
		offset:    20,
		held:      2,
		heldBytes: 15,
		peakBytes: 30,
		top:       4,
	}
	if !reflect.DeepEqual(r, want) {
		t.Fatalf("got  %+v\nwant %+v", r, want)
	}
	if got, want := r.Window(), (Window{LimitSeq: 5, LimitOffset: 50}); got != want {
		t.Fatalf("Window() = %v, want %v", got, want)
	}

	r.Advance()
	r.Advance()
	if _, err := r.Accept(end(4, 35)); err != nil {
		t.Fatal(err)
	}
	r.Advance()
	want = &Reassembly[string]{
		limits:    Limits{MaxChunks: 3, MaxBytes: 30},
		chunkSize: 10,
		ring:      make([]slot[string], 3),
		seq:       5,
		offset:    35,
		peakBytes: 30,
		top:       5,
		endKnown:  true,
		endSeq:    4,
		done:      true,
	}
	if !reflect.DeepEqual(r, want) {
		t.Fatalf("got  %+v\nwant %+v", r, want)
	}
}

func TestReassemblyNext(t *testing.T) {
	r := NewReassembly[string](Limits{MaxChunks: 4, MaxBytes: 40}, 10)
	if _, ok, err := r.Next(); ok || err != nil {
		t.Fatalf("Next() on empty = %t, %v", ok, err)
	}
	for _, c := range []Chunk[string]{data(1, 10, 10), end(2, 20), data(0, 0, 10)} {
		if _, err := r.Accept(c); err != nil {
			t.Fatal(err)
		}
	}
	var got []Chunk[string]
	for {
		c, ok, err := r.Next()
		if err != nil {
			t.Fatal(err)
		}
		if !ok {
			break
		}
		got = append(got, c)
		r.Advance()
	}
	if want := []Chunk[string]{data(0, 0, 10), data(1, 10, 10), end(2, 20)}; !reflect.DeepEqual(got, want) {
		t.Fatalf("written %+v, want %+v", got, want)
	}
	if !r.Done() {
		t.Fatal("not Done after END")
	}
	if seq, off := r.Frontier(); seq != 3 || off != 20 {
		t.Fatalf("Frontier() = %d, %d, want 3, 20", seq, off)
	}
	if _, ok, err := r.Next(); ok || err != nil {
		t.Fatalf("Next() after END = %t, %v", ok, err)
	}
}

// TestReassemblyGap: chunks that each fit the window but leave a hole or
// overlap are caught when they reach the frontier.
func TestReassemblyGap(t *testing.T) {
	for _, tt := range []struct {
		name   string
		chunks []Chunk[string]
		writes int // successful writes before the gap
	}{
		{"hole", []Chunk[string]{data(0, 0, 5), data(1, 10, 10)}, 1},
		{"overlap", []Chunk[string]{data(0, 0, 10), data(1, 5, 10)}, 1},
		{"end-short", []Chunk[string]{data(0, 0, 10), data(1, 10, 10), end(2, 15)}, 2},
		{"end-long", []Chunk[string]{data(0, 0, 10), end(1, 11)}, 1},
	} {
		t.Run(tt.name, func(t *testing.T) {
			r := NewReassembly[string](Limits{MaxChunks: 4, MaxBytes: 40}, 10)
			for _, c := range slices.Backward(tt.chunks) {
				if _, err := r.Accept(c); err != nil {
					t.Fatalf("Accept(%+v): %v", c, err)
				}
			}
			for range tt.writes {
				if _, ok, err := r.Next(); !ok || err != nil {
					t.Fatalf("Next() = %t, %v", ok, err)
				}
				r.Advance()
			}
			if _, ok, err := r.Next(); ok || !errors.Is(err, ErrGap) {
				t.Fatalf("Next() = %t, %v; want ErrGap", ok, err)
			}
			mustPanic(t, "Advance at a gap", r.Advance)
		})
	}
}

func TestReassemblyAdvancePanics(t *testing.T) {
	r := NewReassembly[string](Limits{MaxChunks: 4, MaxBytes: 40}, 10)
	mustPanic(t, "Advance on empty", r.Advance)
	if _, err := r.Accept(data(1, 10, 10)); err != nil {
		t.Fatal(err)
	}
	mustPanic(t, "Advance with the frontier chunk missing", r.Advance)
	if _, err := r.Accept(data(0, 0, 10)); err != nil {
		t.Fatal(err)
	}
	r.Advance()
	r.Advance()
	mustPanic(t, "Advance past the held chunks", r.Advance)
}

func TestNewReassemblyPanicsOnBadLimits(t *testing.T) {
	mustPanic(t, "NewReassembly with MaxBytes < chunk size", func() {
		NewReassembly[string](Limits{MaxChunks: 4, MaxBytes: 9}, 10)
	})
}

// TestReassemblyBoundedAgainstDishonestPeer offers random chunks, honest or
// not, and checks that what is held never exceeds the limits, that a
// rejected chunk changes nothing and that the frontier only moves in order.
func TestReassemblyBoundedAgainstDishonestPeer(t *testing.T) {
	for seed := range uint64(50) {
		rng := rand.New(rand.NewPCG(seed, 0xd15))
		chunkSize := 1 + rng.Uint32N(16)
		limits := Limits{MaxChunks: 1 + rng.Uint32N(8), MaxBytes: uint64(chunkSize) + rng.Uint64N(64)}
		r := NewReassembly[int](limits, chunkSize)
		for range 2000 {
			seq, off := r.Frontier()
			c := Chunk[int]{
				Seq:    seq + rng.Uint64N(uint64(limits.MaxChunks)+2) - min(seq, rng.Uint64N(3)),
				Offset: off + rng.Uint64N(limits.MaxBytes+2) - min(off, rng.Uint64N(3)),
				Len:    rng.Uint32N(chunkSize + 2),
				End:    rng.IntN(20) == 0,
			}
			if c.End {
				c.Len = 0
			}
			was := snapshot(r)
			dup, err := r.Accept(c)
			if dup || err != nil {
				if now := snapshot(r); !reflect.DeepEqual(now, was) {
					t.Fatalf("seed %d: rejected %+v (dup %t, err %v) changed the state", seed, c, dup, err)
				}
			}
			if n, b := r.Buffered(); n > int(limits.MaxChunks) || b > limits.MaxBytes {
				t.Fatalf("seed %d: holds %d chunks, %d bytes; limits %+v", seed, n, b, limits)
			}
			if rng.IntN(3) == 0 {
				if _, ok, err := r.Next(); ok {
					r.Advance()
				} else if err != nil && !errors.Is(err, ErrGap) {
					t.Fatalf("seed %d: Next: %v", seed, err)
				}
			}
			if r.Done() {
				break
			}
		}
		if r.PeakBytes() > limits.MaxBytes {
			t.Fatalf("seed %d: PeakBytes() = %d > %d", seed, r.PeakBytes(), limits.MaxBytes)
		}
	}
}

func TestReassemblyNoAllocs(t *testing.T) {
	r := NewReassembly[[]byte](Limits{MaxChunks: 8, MaxBytes: 8 * 4096}, 4096)
	buf := make([]byte, 4096)
	var seq uint64
	allocs := testing.AllocsPerRun(1000, func() {
		// Two chunks, the second arriving first.
		b := Chunk[[]byte]{Seq: seq + 1, Offset: (seq + 1) * 4096, Len: 4096, Payload: buf}
		a := Chunk[[]byte]{Seq: seq, Offset: seq * 4096, Len: 4096, Payload: buf}
		if _, err := r.Accept(b); err != nil {
			panic(err)
		}
		if _, err := r.Accept(a); err != nil {
			panic(err)
		}
		for range 2 {
			if _, ok, _ := r.Next(); !ok {
				panic("nothing at the frontier")
			}
			r.Advance()
		}
		seq += 2
	})
	if allocs != 0 {
		t.Fatalf("%v allocations per Accept/Next/Advance round, want 0", allocs)
	}
}

func mustPanic(t *testing.T, what string, f func()) {
	t.Helper()
	defer func() {
		t.Helper()
		if recover() == nil {
			t.Fatalf("%s did not panic", what)
		}
	}()
	f()
}

func TestDrainReleasesEveryHeldPayload(t *testing.T) {
	r := NewReassembly[int](Limits{MaxChunks: 4, MaxBytes: 40}, 10)
	for _, seq := range []uint64{1, 3, 2} {
		if _, err := r.Accept(Chunk[int]{Seq: seq, Offset: seq * 10, Len: 10, Payload: int(seq)}); err != nil {
			t.Fatalf("Accept(%d): %v", seq, err)
		}
	}
	var got []int
	r.Drain(func(p int) { got = append(got, p) })
	if len(got) != 3 {
		t.Fatalf("Drain released %v, want the 3 held payloads", got)
	}
	if n, b := r.Buffered(); n != 0 || b != 0 {
		t.Fatalf("Buffered() = %d, %d after Drain", n, b)
	}
	if _, ok, _ := r.Next(); ok {
		t.Fatal("Next() found a chunk after Drain")
	}
}

func TestHeld(t *testing.T) {
	r := NewReassembly[int](Limits{MaxChunks: 4, MaxBytes: 40}, 10)
	if _, err := r.Accept(Chunk[int]{Seq: 2, Offset: 20, Len: 10, Payload: 7}); err != nil {
		t.Fatal(err)
	}
	if c, ok := r.Held(2); !ok || c.Payload != 7 {
		t.Fatalf("Held(2) = %v, %v", c, ok)
	}
	for _, seq := range []uint64{0, 1, 3, 6, 1 << 62} {
		if _, ok := r.Held(seq); ok {
			t.Errorf("Held(%d) found a chunk", seq)
		}
	}
}
