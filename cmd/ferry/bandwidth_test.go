package main

import "testing"

func TestParseLimit(t *testing.T) {
	for in, want := range map[string]uint64{"none": 0, "0": 0, "2Gbit/s": 250e6, "250MB/s": 250e6, "1MB/s": 1e6} {
		if got, err := parseLimit(in); err != nil || got != want {
			t.Errorf("parseLimit(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "fast", "100kB/s", "8bit"} {
		if _, err := parseLimit(bad); err == nil {
			t.Errorf("parseLimit(%q) took it", bad)
		}
	}
	if limitString(0) != "none" || limitString(125e6) != "125.00 MB/s" {
		t.Errorf("limitString: %q, %q", limitString(0), limitString(125e6))
	}
}
