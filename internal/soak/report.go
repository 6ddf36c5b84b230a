package soak

import (
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"strings"
)

// Report is what a soak did.
type Report struct {
	Seed       uint64         `json:"seed"`
	Migrations int            `json:"migrations"`
	Rounds     int            `json:"rounds"`
	Seconds    float64        `json:"seconds"`
	Outcomes   map[string]int `json:"outcomes"` // by final phase (or REFUSED, SOURCE_LOST)
	Reasons    map[string]int `json:"reasons"`  // failures by ErrorInfo reason
	// Faults are the faults drawn, and Triggered those that happened,
	// by class.
	Faults    map[string]int `json:"faults"`
	Triggered map[string]int `json:"triggered"`
	// Checks are the invariant checks run, by invariant.
	Checks      map[string]int `json:"checks"`
	ChecksTotal int            `json:"checks_total"`
	Restarts    map[string]int `json:"restarts"`
	// ControlPlane counts what the soak's control plane saw the agents
	// answer: budget prepares refused, rivals refused or admitted (the
	// migration had let the device go), destinations in doubt resolved.
	ControlPlane map[string]int `json:"control_plane"`
	// Peak usage of each agent seen at the checks, and its baseline.
	Usage     map[string]usage `json:"peak_usage"`
	Baselines map[string]usage `json:"baselines"`
	// Violation is the first invariant that failed; nil when none did.
	Violation *ViolationReport `json:"violation,omitempty"`
	LogDir    string           `json:"log_dir,omitempty"`
}

// ViolationReport is the first violation, with what replays it.
type ViolationReport struct {
	Invariant string            `json:"invariant"`
	Detail    string            `json:"detail"`
	Migration *migrationPlan    `json:"migration,omitempty"`
	Outcome   *outcome          `json:"outcome,omitempty"`
	Notes     []string          `json:"notes,omitempty"`
	Logs      map[string]string `json:"logs"` // the tail of each agent's log
}

// WriteText prints the report for people.
func (r *Report) WriteText(w io.Writer) {
	fmt.Fprintf(w, "ferry soak: seed %d: %d migration(s) in %d round(s), %.0fs\n", r.Seed, r.Migrations, r.Rounds, r.Seconds)
	fmt.Fprintf(w, "outcomes:  %s\n", counts(r.Outcomes))
	if len(r.Reasons) > 0 {
		fmt.Fprintf(w, "reasons:   %s\n", counts(r.Reasons))
	}
	var fs []string
	for _, c := range faultClasses {
		if n := r.Faults[string(c)]; n > 0 {
			fs = append(fs, fmt.Sprintf("%s %d/%d", c, r.Triggered[string(c)], n))
		}
	}
	fmt.Fprintf(w, "faults (triggered/drawn): %s\n", strings.Join(fs, ", "))
	fmt.Fprintf(w, "checks:    %d (%s)\n", r.ChecksTotal, counts(r.Checks))
	fmt.Fprintf(w, "restarts:  %s\n", counts(r.Restarts))
	fmt.Fprintf(w, "control plane: %s\n", counts(r.ControlPlane))
	names := make([]string, 0, len(r.Usage))
	for n := range r.Usage {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		u, b := r.Usage[n], r.Baselines[n]
		fmt.Fprintf(w, "  %-18s goroutines %d (baseline %d), fds %d (%d), RSS %d MiB (%d MiB), devices open %d (%d)\n",
			n, u.Goroutines, b.Goroutines, u.FDs, b.FDs, u.RSS>>20, b.RSS>>20, u.Devices, b.Devices)
	}
	if v := r.Violation; v != nil {
		fmt.Fprintf(w, "\nVIOLATION %s: %s\n", v.Invariant, v.Detail)
		if v.Migration != nil {
			fmt.Fprintf(w, "migration: %s\n", v.Migration)
		}
		if v.Outcome != nil {
			fmt.Fprintf(w, "outcome:   %s %s %s (destination %s)\n", v.Outcome.Phase, v.Outcome.Reason, v.Outcome.Message, v.Outcome.DestPhase)
		}
		for _, n := range v.Notes {
			fmt.Fprintf(w, "note:      %s\n", n)
		}
		names := make([]string, 0, len(v.Logs))
		for n := range v.Logs {
			names = append(names, n)
		}
		sort.Strings(names)
		for _, n := range names {
			fmt.Fprintf(w, "\n--- %s (last lines) ---\n%s\n", n, v.Logs[n])
		}
		fmt.Fprintf(w, "\nreplay: ferry soak --seed %d\n", r.Seed)
	}
	if r.LogDir != "" {
		fmt.Fprintf(w, "agents' logs: %s\n", r.LogDir)
	}
}

// WriteJSON prints the report as one JSON object.
func (r *Report) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

func counts(m map[string]int) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var parts []string
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%s %d", k, m[k]))
	}
	return strings.Join(parts, ", ")
}
