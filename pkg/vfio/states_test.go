package vfio

import (
	"errors"
	"slices"
	"strings"
	"testing"
)

// The tests in this file check the state machine against the kernel's
// VFIO migration uAPI (include/uapi/linux/vfio.h, "enum
// vfio_device_mig_state") and its next-state algorithm
// (drivers/vfio/vfio_main.c, vfio_mig_get_next_state), as the kernel's
// documentation comments in include/uapi/linux/vfio.h describe them
// (upstream: https://git.kernel.org/pub/scm/linux/kernel/git/torvalds/linux.git/tree/include/uapi/linux/vfio.h).
// Each test names the part of the kernel documentation it checks.

// kernelTable is one of the "Full combination tables" of vfio-uapi.md §4.4,
// transcribed cell by cell: rows are the current state, columns the target,
// a cell the arcs the kernel executes in order ("—" for none, "EINVAL" for a
// refused request). States that are neither a row nor a column are not
// supported with the table's flags: every request from or to them, and
// from or to ERROR, is EINVAL.
type kernelTable struct {
	flags Flags
	cols  []State
	rows  []kernelRow
}

type kernelRow struct {
	cur   State
	cells []string
}

// kernelTables holds the four tables of §4.4 exactly as the kernel
// documentation's algorithm produces them.
var kernelTables = []kernelTable{
	{
		// flags = STOP_COPY (the common 6.1 case, e.g. hisi_acc)
		flags: FlagStopCopy,
		cols:  []State{StateRunning, StateStop, StateStopCopy, StateResuming},
		rows: []kernelRow{
			{StateRunning, []string{"—", "STOP", "STOP → STOP_COPY", "STOP → RESUMING"}},
			{StateStop, []string{"RUNNING", "—", "STOP_COPY", "RESUMING"}},
			{StateStopCopy, []string{"STOP → RUNNING", "STOP", "—", "STOP → RESUMING"}},
			{StateResuming, []string{"STOP → RUNNING", "STOP", "STOP → STOP_COPY", "—"}},
		},
	},
	{
		// flags = STOP_COPY | P2P (6.1 mlx5, pds, xe, ice…)
		flags: FlagStopCopy | FlagP2P,
		cols:  []State{StateRunning, StateStop, StateStopCopy, StateResuming, StateRunningP2P},
		rows: []kernelRow{
			{StateRunning, []string{"—", "RUNNING_P2P → STOP", "RUNNING_P2P → STOP → STOP_COPY", "RUNNING_P2P → STOP → RESUMING", "RUNNING_P2P"}},
			{StateStop, []string{"RUNNING_P2P → RUNNING", "—", "STOP_COPY", "RESUMING", "RUNNING_P2P"}},
			{StateStopCopy, []string{"STOP → RUNNING_P2P → RUNNING", "STOP", "—", "STOP → RESUMING", "STOP → RUNNING_P2P"}},
			{StateResuming, []string{"STOP → RUNNING_P2P → RUNNING", "STOP", "STOP → STOP_COPY", "—", "STOP → RUNNING_P2P"}},
			{StateRunningP2P, []string{"RUNNING", "STOP", "STOP → STOP_COPY", "STOP → RESUMING", "—"}},
		},
	},
	{
		// flags = STOP_COPY | PRE_COPY (6.2+)
		flags: FlagStopCopy | FlagPreCopy,
		cols:  []State{StateRunning, StateStop, StateStopCopy, StateResuming, StatePreCopy},
		rows: []kernelRow{
			{StateRunning, []string{"—", "STOP", "STOP → STOP_COPY", "STOP → RESUMING", "PRE_COPY"}},
			{StateStop, []string{"RUNNING", "—", "STOP_COPY", "RESUMING", "RUNNING → PRE_COPY"}},
			{StateStopCopy, []string{"STOP → RUNNING", "STOP", "—", "STOP → RESUMING", "EINVAL"}},
			{StateResuming, []string{"STOP → RUNNING", "STOP", "STOP → STOP_COPY", "—", "STOP → RUNNING → PRE_COPY"}},
			{StatePreCopy, []string{"RUNNING", "RUNNING → STOP", "STOP_COPY", "RUNNING → STOP → RESUMING", "—"}},
		},
	},
	{
		// flags = STOP_COPY | P2P | PRE_COPY (6.2+, mtty, qat, mlx5 upstream)
		flags: FlagStopCopy | FlagP2P | FlagPreCopy,
		cols:  []State{StateRunning, StateStop, StateStopCopy, StateResuming, StateRunningP2P, StatePreCopy, StatePreCopyP2P},
		rows: []kernelRow{
			{StateRunning, []string{"—", "RUNNING_P2P → STOP", "RUNNING_P2P → STOP → STOP_COPY", "RUNNING_P2P → STOP → RESUMING", "RUNNING_P2P", "PRE_COPY", "RUNNING_P2P → PRE_COPY_P2P"}},
			{StateStop, []string{"RUNNING_P2P → RUNNING", "—", "STOP_COPY", "RESUMING", "RUNNING_P2P", "RUNNING_P2P → RUNNING → PRE_COPY", "RUNNING_P2P → PRE_COPY_P2P"}},
			{StateStopCopy, []string{"STOP → RUNNING_P2P → RUNNING", "STOP", "—", "STOP → RESUMING", "STOP → RUNNING_P2P", "EINVAL", "EINVAL"}},
			{StateResuming, []string{"STOP → RUNNING_P2P → RUNNING", "STOP", "STOP → STOP_COPY", "—", "STOP → RUNNING_P2P", "STOP → RUNNING_P2P → RUNNING → PRE_COPY", "STOP → RUNNING_P2P → PRE_COPY_P2P"}},
			{StateRunningP2P, []string{"RUNNING", "STOP", "STOP → STOP_COPY", "STOP → RESUMING", "—", "RUNNING → PRE_COPY", "PRE_COPY_P2P"}},
			{StatePreCopy, []string{"RUNNING", "RUNNING → RUNNING_P2P → STOP", "PRE_COPY_P2P → STOP_COPY", "RUNNING → RUNNING_P2P → STOP → RESUMING", "RUNNING → RUNNING_P2P", "—", "PRE_COPY_P2P"}},
			{StatePreCopyP2P, []string{"RUNNING_P2P → RUNNING", "RUNNING_P2P → STOP", "STOP_COPY", "RUNNING_P2P → STOP → RESUMING", "RUNNING_P2P", "PRE_COPY", "—"}},
		},
	},
}

// allStates are the kernel's eight states plus one value past the enum.
var allStates = []State{
	StateError, StateStop, StateRunning, StateStopCopy, StateResuming,
	StateRunningP2P, StatePreCopy, StatePreCopyP2P, State(8),
}

// cellPath turns a table cell into the expected path; ok is false for
// "EINVAL".
func cellPath(t *testing.T, cell string) (path []State, ok bool) {
	t.Helper()
	switch cell {
	case "EINVAL":
		return nil, false
	case "—":
		return []State{}, true
	}
	for name := range strings.SplitSeq(cell, " → ") {
		i := slices.Index(stateNames[:], name)
		if i < 0 {
			t.Fatalf("bad state %q in cell %q", name, cell)
		}
		path = append(path, State(i))
	}
	return path, true
}

// expectedCells expands a table to every (cur, target) pair of allStates:
// pairs outside the table's rows and columns are EINVAL (§4.4: "Any target
// not listed as a column (an unsupported optional state, ERROR, or a value
// ≥ 8) → EINVAL. Current state ERROR → EINVAL for every target.").
func expectedCells(kt kernelTable) map[[2]State]string {
	cells := make(map[[2]State]string)
	for _, cur := range allStates {
		for _, target := range allStates {
			cells[[2]State{cur, target}] = "EINVAL"
		}
	}
	for _, row := range kt.rows {
		for i, target := range kt.cols {
			cells[[2]State{row.cur, target}] = row.cells[i]
		}
	}
	return cells
}

// TestPathKernelTables checks Path and NextState against every cell of the
// four combination tables of vfio-uapi.md §4.4 ("the first element is what
// vfio_mig_get_next_state returns"), including the EINVAL cells: blocked
// STOP_COPY -> PRE_COPY(_P2P), unsupported targets, ERROR as current or
// target state, and values past the enum.
func TestPathKernelTables(t *testing.T) {
	for _, kt := range kernelTables {
		t.Run(kt.flags.String(), func(t *testing.T) {
			for pair, cell := range expectedCells(kt) {
				cur, target := pair[0], pair[1]
				want, ok := cellPath(t, cell)
				got, err := Path(kt.flags, cur, target)
				next, nerr := NextState(kt.flags, cur, target)
				if !ok {
					if !errors.Is(err, ErrInvalidTransition) || !errors.Is(nerr, ErrInvalidTransition) {
						t.Errorf("%v -> %v: Path = %v, %v; NextState = %v, %v; want EINVAL",
							cur, target, got, err, next, nerr)
					}
					continue
				}
				if err != nil || nerr != nil {
					t.Errorf("%v -> %v: Path err %v, NextState err %v; want %q", cur, target, err, nerr, cell)
					continue
				}
				if !slices.Equal(got, want) {
					t.Errorf("%v -> %v: Path = %v, want %v", cur, target, got, want)
				}
				wantNext := cur
				if len(want) > 0 {
					wantNext = want[0]
				}
				if next != wantNext {
					t.Errorf("%v -> %v: NextState = %v, want %v", cur, target, next, wantNext)
				}
			}
		})
	}
}

// directArcs returns the single arcs a driver with these flags implements,
// from the comment in vfio_mig_get_next_state (vfio-uapi.md §4.2).
func directArcs(flags Flags) map[[2]State]bool {
	arcs := map[[2]State]bool{
		// Always.
		{StateResuming, StateStop}: true,
		{StateStop, StateResuming}: true,
		{StateStop, StateStopCopy}: true,
		{StateStopCopy, StateStop}: true,
	}
	p2p, pre := flags&FlagP2P != 0, flags&FlagPreCopy != 0
	add := func(pairs ...[2]State) {
		for _, p := range pairs {
			arcs[p] = true
		}
	}
	if p2p {
		add([2]State{StateRunning, StateRunningP2P}, [2]State{StateRunningP2P, StateRunning},
			[2]State{StateRunningP2P, StateStop}, [2]State{StateStop, StateRunningP2P})
	} else {
		add([2]State{StateRunning, StateStop}, [2]State{StateStop, StateRunning})
	}
	switch {
	case pre && p2p:
		add([2]State{StatePreCopy, StateRunning}, [2]State{StatePreCopy, StatePreCopyP2P},
			[2]State{StatePreCopyP2P, StatePreCopy}, [2]State{StatePreCopyP2P, StateRunningP2P},
			[2]State{StatePreCopyP2P, StateStopCopy}, [2]State{StateRunning, StatePreCopy},
			[2]State{StateRunningP2P, StatePreCopyP2P})
	case pre:
		add([2]State{StateRunning, StatePreCopy}, [2]State{StatePreCopy, StateRunning},
			[2]State{StatePreCopy, StateStopCopy})
	}
	return arcs
}

// inSavingGroup reports whether s is PRE_COPY, PRE_COPY_P2P or STOP_COPY.
func inSavingGroup(s State) bool {
	return s == StatePreCopy || s == StatePreCopyP2P || s == StateStopCopy
}

// TestPathUsesDirectArcs checks the path rules of §4.2: every step of every
// path is an arc the driver implements, a path never enters the saving
// group (PRE_COPY, PRE_COPY_P2P, STOP_COPY) at an interior state, and a
// data stream can only be opened by the last arc ("a data_fd can only come
// from the last arc of a combination", §4.3). The uAPI words the saving
// group rule as "saving-group states may only be the start or end of a
// path", but the kernel's own list of combinations includes PRE_COPY ->
// PRE_COPY_P2P -> STOP_COPY, which stays inside the group with one stream.
func TestPathUsesDirectArcs(t *testing.T) {
	for _, kt := range kernelTables {
		arcs := directArcs(kt.flags)
		for _, cur := range allStates {
			for _, target := range allStates {
				path, err := Path(kt.flags, cur, target)
				if err != nil {
					continue
				}
				from := cur
				for i, to := range path {
					last := i == len(path)-1
					if !arcs[[2]State{from, to}] {
						t.Errorf("%v: %v -> %v takes arc %v -> %v, which drivers need not implement",
							kt.flags, cur, target, from, to)
					}
					if !last && inSavingGroup(to) && !inSavingGroup(from) {
						t.Errorf("%v: %v -> %v enters the saving group at interior %v", kt.flags, cur, target, to)
					}
					if !last && OpensStream(from, to) {
						t.Errorf("%v: %v -> %v opens a stream at interior arc %v -> %v",
							kt.flags, cur, target, from, to)
					}
					from = to
				}
			}
		}
	}
}

// TestBlockedPreCopy checks the ERROR guard of the 2026 fix: STOP_COPY ->
// PRE_COPY(_P2P) on a PRE_COPY-capable device is refused, not looped on
// (vfio-uapi.md §4.3 step 5).
func TestBlockedPreCopy(t *testing.T) {
	flags := FlagStopCopy | FlagP2P | FlagPreCopy
	for _, target := range []State{StatePreCopy, StatePreCopyP2P} {
		if _, err := NextState(flags, StateStopCopy, target); !errors.Is(err, ErrInvalidTransition) {
			t.Errorf("NextState(STOP_COPY -> %v) = %v, want ErrInvalidTransition", target, err)
		}
	}
}

func TestStateString(t *testing.T) {
	tests := []struct {
		s    State
		want string
	}{
		{StateError, "ERROR"},
		{StateStop, "STOP"},
		{StateRunning, "RUNNING"},
		{StateStopCopy, "STOP_COPY"},
		{StateResuming, "RESUMING"},
		{StateRunningP2P, "RUNNING_P2P"},
		{StatePreCopy, "PRE_COPY"},
		{StatePreCopyP2P, "PRE_COPY_P2P"},
		{State(9), "STATE(9)"},
	}
	for _, tt := range tests {
		if got := tt.s.String(); got != tt.want {
			t.Errorf("State(%d).String() = %q, want %q", uint32(tt.s), got, tt.want)
		}
	}
}

func TestFlagsString(t *testing.T) {
	tests := []struct {
		f    Flags
		want string
	}{
		{0, "0"},
		{FlagStopCopy, "STOP_COPY"},
		{FlagStopCopy | FlagP2P, "STOP_COPY|P2P"},
		{FlagStopCopy | FlagPreCopy, "STOP_COPY|PRE_COPY"},
		{FlagStopCopy | FlagP2P | FlagPreCopy, "STOP_COPY|P2P|PRE_COPY"},
		{FlagP2P | 1<<5, "P2P|0x20"},
	}
	for _, tt := range tests {
		if got := tt.f.String(); got != tt.want {
			t.Errorf("Flags(%#x).String() = %q, want %q", uint64(tt.f), got, tt.want)
		}
	}
}

// TestFlagsSupports checks the required-flags table of §4.3 step 2.
func TestFlagsSupports(t *testing.T) {
	tests := []struct {
		f    Flags
		want []State
	}{
		{0, nil},
		{FlagP2P | FlagPreCopy, nil},
		{FlagStopCopy, []State{StateStop, StateRunning, StateStopCopy, StateResuming}},
		{FlagStopCopy | FlagP2P, []State{StateStop, StateRunning, StateStopCopy, StateResuming, StateRunningP2P}},
		{FlagStopCopy | FlagPreCopy, []State{StateStop, StateRunning, StateStopCopy, StateResuming, StatePreCopy}},
		{^Flags(0), []State{StateStop, StateRunning, StateStopCopy, StateResuming, StateRunningP2P, StatePreCopy, StatePreCopyP2P}},
	}
	for _, tt := range tests {
		var got []State
		for _, s := range allStates {
			if tt.f.Supports(s) {
				got = append(got, s)
			}
		}
		if !slices.Equal(got, tt.want) {
			t.Errorf("%v supports %v, want %v", tt.f, got, tt.want)
		}
	}
}

// TestStreamArcs checks §5.1: which single arcs open and end a session.
func TestStreamArcs(t *testing.T) {
	opens := map[[2]State]bool{
		{StateStop, StateStopCopy}:         true,
		{StateStop, StateResuming}:         true,
		{StateRunning, StatePreCopy}:       true,
		{StateRunningP2P, StatePreCopyP2P}: true,
	}
	ends := map[[2]State]bool{
		{StateStopCopy, StateStop}:         true,
		{StateResuming, StateStop}:         true,
		{StatePreCopy, StateRunning}:       true,
		{StatePreCopyP2P, StateRunningP2P}: true,
	}
	for _, from := range allStates {
		for _, to := range allStates {
			arc := [2]State{from, to}
			if got := OpensStream(from, to); got != opens[arc] {
				t.Errorf("OpensStream(%v, %v) = %v", from, to, got)
			}
			if got := EndsStream(from, to); got != ends[arc] {
				t.Errorf("EndsStream(%v, %v) = %v", from, to, got)
			}
		}
	}
}
