package bench

import (
	"slices"
	"strings"
	"testing"
)

func TestParseProcStat(t *testing.T) {
	for _, tc := range []struct {
		in   string
		busy float64
		ok   bool
	}{
		// user nice system idle iowait irq softirq steal guest guest_nice
		{"cpu  100 20 30 5000 70 4 6 10 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n", 1.70, true},
		{"cpu  1 2 3 4 5 6 7 8\n", 0.27, true},
		{"cpu0 1 2 3 4 5 6 7 8\n", 0, false},
		{"cpu  1 2 3\n", 0, false},
		{"cpu  1 2 x 4 5 6 7 8\n", 0, false},
		{"", 0, false},
	} {
		busy, err := parseProcStat([]byte(tc.in))
		if (err == nil) != tc.ok || tc.ok && (busy < tc.busy-1e-9 || busy > tc.busy+1e-9) {
			t.Errorf("parseProcStat(%q) = %v, %v; want %v, ok %v", tc.in, busy, err, tc.busy, tc.ok)
		}
	}
}

func TestOthersAndQuiet(t *testing.T) {
	for _, tc := range []struct {
		busy, own, wall, want float64
	}{
		{10, 9, 5, 0.2},  // others used 1 s of CPU in 5 s
		{10, 10.5, 5, 0}, // the clocks disagree a little: none
		{3, 1, 0, 0},     // no wall time
	} {
		if got := othersCores(tc.busy, tc.own, tc.wall); got < tc.want-1e-9 || got > tc.want+1e-9 {
			t.Errorf("othersCores(%v, %v, %v) = %v, want %v", tc.busy, tc.own, tc.wall, got, tc.want)
		}
	}
	for _, tc := range []struct {
		a, b       float64
		ranA, ranB bool
		want       bool
	}{
		{0.02, 0.05, true, true, true},
		{0.02, 0.3, true, true, false},
		{0.5, 0, true, true, false},
		{0.5, 0, false, true, true}, // the loaded arm did not run
		{-1, 0.02, true, true, true},
		{-1, -1, true, true, false}, // nothing could tell
	} {
		if got := quiet(tc.a, tc.b, tc.ranA, tc.ranB); got != tc.want {
			t.Errorf("quiet(%v, %v, %v, %v) = %v, want %v", tc.a, tc.b, tc.ranA, tc.ranB, got, tc.want)
		}
	}
}

func TestKeepQuietAndSummary(t *testing.T) {
	if got := keepQuiet([]float64{1, 2, 3}, []bool{true, false, true}); !slices.Equal(got, []float64{1, 3}) {
		t.Errorf("keepQuiet = %v", got)
	}
	if got := keepQuiet([]float64(nil), []bool{true, false}); len(got) != 0 {
		t.Errorf("keepQuiet of an arm not run = %v", got)
	}
	s := quietSummary([]row{{Rounds: 3, DroppedRounds: 1}, {Rounds: 3, NoQuietRound: true}})
	if !strings.Contains(s, "1 of 6 rounds dropped") || !strings.Contains(s, "1 channel count(s) had no quiet round") {
		t.Errorf("summary %q", s)
	}
}
