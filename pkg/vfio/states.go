package vfio

import (
	"fmt"
	"strconv"
	"strings"
)

// numStates is the kernel's VFIO_DEVICE_STATE_NR: states 0..7.
const numStates = 8

// stateNames are the kernel's names for the states, indexed by value.
var stateNames = [numStates]string{
	StateError:      "ERROR",
	StateStop:       "STOP",
	StateRunning:    "RUNNING",
	StateStopCopy:   "STOP_COPY",
	StateResuming:   "RESUMING",
	StateRunningP2P: "RUNNING_P2P",
	StatePreCopy:    "PRE_COPY",
	StatePreCopyP2P: "PRE_COPY_P2P",
}

// String returns the kernel's name of the state ("STOP_COPY"), or
// "STATE(n)" for a value the kernel does not define.
func (s State) String() string {
	if s < numStates {
		return stateNames[s]
	}
	return "STATE(" + strconv.FormatUint(uint64(s), 10) + ")"
}

// flagNames are the kernel's names of the migration flags, lowest bit first.
var flagNames = [...]struct {
	flag Flags
	name string
}{
	{FlagStopCopy, "STOP_COPY"},
	{FlagP2P, "P2P"},
	{FlagPreCopy, "PRE_COPY"},
}

// String returns the flags joined by "|", lowest bit first
// ("STOP_COPY|P2P"); bits the kernel does not define are printed in hex
// and no flags at all is "0".
func (f Flags) String() string {
	if f == 0 {
		return "0"
	}
	var parts []string
	for _, fn := range flagNames {
		if f&fn.flag != 0 {
			parts = append(parts, fn.name)
			f &^= fn.flag
		}
	}
	if f != 0 {
		parts = append(parts, "0x"+strconv.FormatUint(uint64(f), 16))
	}
	return strings.Join(parts, "|")
}

// requiredFlags is the kernel's vfio_mig_get_next_state state_flags_table:
// the migration flags a device must report for a state to be supported.
// ERROR requires every bit (the kernel's ~0U); Supports refuses it
// outright, so it is never supported whatever bits a device reports.
var requiredFlags = [numStates]Flags{
	StateError:      ^Flags(0),
	StateStop:       FlagStopCopy,
	StateRunning:    FlagStopCopy,
	StateStopCopy:   FlagStopCopy,
	StateResuming:   FlagStopCopy,
	StateRunningP2P: FlagStopCopy | FlagP2P,
	StatePreCopy:    FlagStopCopy | FlagPreCopy,
	StatePreCopyP2P: FlagStopCopy | FlagP2P | FlagPreCopy,
}

// Supports reports whether a device with these flags supports state s.
// ERROR and values outside the kernel's enum are never supported.
func (f Flags) Supports(s State) bool {
	if s == StateError || s >= numStates {
		return false
	}
	req := requiredFlags[s]
	return f&req == req
}

// fsmTable is the kernel's vfio_from_fsm_table (drivers/vfio/vfio_main.c):
// fsmTable[cur][target] is the next state on the way from cur to target
// when every optional state is supported. ERROR marks a blocked request.
var fsmTable = [numStates][numStates]State{
	StateStop: {
		StateStop:       StateStop,
		StateRunning:    StateRunningP2P,
		StatePreCopy:    StateRunningP2P,
		StatePreCopyP2P: StateRunningP2P,
		StateStopCopy:   StateStopCopy,
		StateResuming:   StateResuming,
		StateRunningP2P: StateRunningP2P,
		StateError:      StateError,
	},
	StateRunning: {
		StateStop:       StateRunningP2P,
		StateRunning:    StateRunning,
		StatePreCopy:    StatePreCopy,
		StatePreCopyP2P: StateRunningP2P,
		StateStopCopy:   StateRunningP2P,
		StateResuming:   StateRunningP2P,
		StateRunningP2P: StateRunningP2P,
		StateError:      StateError,
	},
	StatePreCopy: {
		StateStop:       StateRunning,
		StateRunning:    StateRunning,
		StatePreCopy:    StatePreCopy,
		StatePreCopyP2P: StatePreCopyP2P,
		StateStopCopy:   StatePreCopyP2P,
		StateResuming:   StateRunning,
		StateRunningP2P: StateRunning,
		StateError:      StateError,
	},
	StatePreCopyP2P: {
		StateStop:       StateRunningP2P,
		StateRunning:    StateRunningP2P,
		StatePreCopy:    StatePreCopy,
		StatePreCopyP2P: StatePreCopyP2P,
		StateStopCopy:   StateStopCopy,
		StateResuming:   StateRunningP2P,
		StateRunningP2P: StateRunningP2P,
		StateError:      StateError,
	},
	StateStopCopy: {
		StateStop:       StateStop,
		StateRunning:    StateStop,
		StatePreCopy:    StateError, // blocked
		StatePreCopyP2P: StateError, // blocked
		StateStopCopy:   StateStopCopy,
		StateResuming:   StateStop,
		StateRunningP2P: StateStop,
		StateError:      StateError,
	},
	StateResuming: {
		StateStop:       StateStop,
		StateRunning:    StateStop,
		StatePreCopy:    StateStop,
		StatePreCopyP2P: StateStop,
		StateStopCopy:   StateStop,
		StateResuming:   StateResuming,
		StateRunningP2P: StateStop,
		StateError:      StateError,
	},
	StateRunningP2P: {
		StateStop:       StateStop,
		StateRunning:    StateRunning,
		StatePreCopy:    StateRunning,
		StatePreCopyP2P: StatePreCopyP2P,
		StateStopCopy:   StateStop,
		StateResuming:   StateStop,
		StateRunningP2P: StateRunningP2P,
		StateError:      StateError,
	},
	StateError: {
		StateStop:       StateError,
		StateRunning:    StateError,
		StatePreCopy:    StateError,
		StatePreCopyP2P: StateError,
		StateStopCopy:   StateError,
		StateResuming:   StateError,
		StateRunningP2P: StateError,
		StateError:      StateError,
	},
}

// NextState is the kernel's vfio_mig_get_next_state with the ERROR guard
// of the 2026 fix: the first single arc a driver with these flags takes on
// the way from cur to target. It returns cur when cur == target.
//
// The error wraps ErrInvalidTransition when cur is unsupported (ERROR
// included), target is unsupported or out of range (ERROR included), or
// the request is blocked (STOP_COPY -> PRE_COPY and PRE_COPY_P2P).
func NextState(flags Flags, cur, target State) (State, error) {
	if !flags.Supports(cur) {
		return cur, fmt.Errorf("%v -> %v: current state not supported with flags %v: %w",
			cur, target, flags, ErrInvalidTransition)
	}
	if !flags.Supports(target) {
		return cur, fmt.Errorf("%v -> %v: target state not supported with flags %v: %w",
			cur, target, flags, ErrInvalidTransition)
	}
	next := fsmTable[cur][target]
	for next != StateError && !flags.Supports(next) {
		next = fsmTable[next][target]
	}
	if next == StateError {
		return cur, fmt.Errorf("%v -> %v: blocked: %w", cur, target, ErrInvalidTransition)
	}
	return next, nil
}

// Path returns the single arcs a driver with these flags executes to move
// from cur to target, as the states entered in order: Path(f, RUNNING,
// STOP_COPY) is [RUNNING_P2P STOP STOP_COPY] when f has P2P. The path is
// empty when cur == target and the flags support it; errors are
// NextState's, so ERROR is refused at either end even when cur == target.
func Path(flags Flags, cur, target State) ([]State, error) {
	var path []State
	for {
		next, err := NextState(flags, cur, target)
		if err != nil {
			return nil, err
		}
		if cur == target {
			return path, nil
		}
		if len(path) == numStates {
			// Unreachable with the kernel's table: every path is shorter.
			panic(fmt.Sprintf("vfio: no path from %v to %v with flags %v", cur, target, flags))
		}
		path = append(path, next)
		cur = next
	}
}

// OpensStream reports whether the single arc from -> to opens a new data
// stream (the kernel returns a data_fd): STOP -> STOP_COPY,
// STOP -> RESUMING, RUNNING -> PRE_COPY and RUNNING_P2P -> PRE_COPY_P2P.
func OpensStream(from, to State) bool {
	switch {
	case from == StateStop && to == StateStopCopy,
		from == StateStop && to == StateResuming,
		from == StateRunning && to == StatePreCopy,
		from == StateRunningP2P && to == StatePreCopyP2P:
		return true
	}
	return false
}

// EndsStream reports whether the single arc from -> to ends the data
// stream opened before it: STOP_COPY -> STOP, RESUMING -> STOP (where the
// device validates what it was given), PRE_COPY -> RUNNING and
// PRE_COPY_P2P -> RUNNING_P2P. Arcs inside the saving group (PRE_COPY <->
// PRE_COPY_P2P -> STOP_COPY) keep the stream. A device reset ends any
// stream as well.
func EndsStream(from, to State) bool {
	switch {
	case from == StateStopCopy && to == StateStop,
		from == StateResuming && to == StateStop,
		from == StatePreCopy && to == StateRunning,
		from == StatePreCopyP2P && to == StateRunningP2P:
		return true
	}
	return false
}
