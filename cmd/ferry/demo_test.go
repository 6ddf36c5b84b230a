package main

import (
	"bytes"
	"encoding/json"
	"io"
	"strings"
	"testing"
)

// The demo's banner claims nothing about how the chunks will travel: the
// summary says how they did, from the migration's direct_data.
func TestDemoSaysHowChunksTravelled(t *testing.T) {
	var out bytes.Buffer
	if err := runDemo(t.Context(), []string{"--size", "8MiB", "--channels", "2"}, &out, io.Discard); err != nil {
		t.Fatal(err)
	}
	banner, summary, _ := strings.Cut(out.String(), "\n")
	if strings.Contains(banner, "chunks") {
		t.Errorf("the banner claims how the chunks travel before they did: %q", banner)
	}
	if !strings.Contains(summary, "chunks of 1MiB on direct data connections") {
		t.Errorf("the summary does not say the chunks travelled on direct data connections:\n%s", summary)
	}
}

// TestDemoPrecopy: the pre-copy demo moves most of the state while the VM
// runs and switches over by itself, at the downtime limit or, without
// one, by asking once the destination is READY; its summary says so and
// gives the measured downtime.
func TestDemoPrecopy(t *testing.T) {
	for _, tc := range []struct {
		name    string
		args    []string
		trigger string
	}{
		{"downtime limit", []string{"--downtime-limit", "5s"}, "downtime_limit"},
		{"asked once READY", nil, "requested"},
	} {
		var out bytes.Buffer
		args := append([]string{"--mode", "precopy", "--size", "8MiB", "--dirty", "1MB/s", "--json"}, tc.args...)
		if err := runDemo(t.Context(), args, &out, io.Discard); err != nil {
			t.Fatalf("%s: %v\n%s", tc.name, err, out.String())
		}
		var r result
		if err := json.Unmarshal(out.Bytes(), &r); err != nil {
			t.Fatalf("%s: %v\n%s", tc.name, err, out.String())
		}
		pre := r.Precopy
		switch {
		case !r.Verified:
			t.Errorf("%s: not verified: %s", tc.name, out.String())
		case pre == nil:
			t.Errorf("%s: no pre-copy in the summary: %s", tc.name, out.String())
		case pre.PrecopyBytes <= pre.StopcopyBytes || pre.PrecopyBytes+pre.StopcopyBytes != r.Bytes:
			t.Errorf("%s: %d bytes before the switchover, %d after, %d in all: pre-copy moved too little", tc.name, pre.PrecopyBytes, pre.StopcopyBytes, r.Bytes)
		case r.DowntimeSeconds <= 0:
			t.Errorf("%s: no measured downtime: %s", tc.name, out.String())
		case pre.SwitchoverTrigger != tc.trigger:
			t.Errorf("%s: switched over by %q, want %q", tc.name, pre.SwitchoverTrigger, tc.trigger)
		}
	}
}

// TestDemoPrecopyUsage: the pre-copy flags need --mode precopy.
func TestDemoPrecopyUsage(t *testing.T) {
	for _, args := range [][]string{{"--dirty", "1MB/s"}, {"--precopy", "1MiB"}, {"--downtime-limit", "1s"}} {
		code, _, errOut := runCLI(t, append([]string{"demo"}, args...)...)
		if code != 2 || !strings.Contains(errOut, args[0]+" needs --mode precopy") {
			t.Errorf("ferry demo %q: exit %d, stderr %q", args, code, errOut)
		}
	}
	if code, _, errOut := runCLI(t, "demo", "--mode", "precopy", "--size", "1MiB", "--precopy", "2MiB"); code != 2 || !strings.Contains(errOut, "is above --size") {
		t.Errorf("--precopy above --size: exit %d, stderr %q", code, errOut)
	}
}
