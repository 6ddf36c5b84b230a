package main

import (
	"context"
	"strings"
	"testing"

	"github.com/vfio-ferry/ferry/internal/loopback"
	"github.com/vfio-ferry/ferry/pkg/vfio"
)

// TestPreflightCommand asks two loopback agents whether device pairs are
// compatible: a matching pair passes, another flag set and another size
// are refused naming the field, and pre-copy into a device without it is
// refused; `ferry migrate` of an incompatible pair fails before the
// source device stops.
func TestPreflightCommand(t *testing.T) {
	a := simAgents(t)
	const pre = "sim:size=8MiB,seed=4,flags=stopcopy|p2p|precopy,precopy=8MiB"
	for _, tc := range []struct {
		src, dst, mode string
		code           int
		out            string
	}{
		{"sim:size=8MiB,seed=4", "sim:size=8MiB,seed=4", "stopcopy", 0, "compatible"},
		{"sim:size=8MiB,seed=4", "sim:size=8MiB,seed=5,flags=stopcopy", "stopcopy", 1, "field migration_flags"},
		{"sim:size=8MiB,seed=4", "sim:size=16MiB,seed=4", "stopcopy", 1, "field sim_size"},
		{pre, "sim:size=8MiB,seed=6", "precopy", 1, "lacks PRE_COPY"},
		{pre, pre, "precopy", 0, "compatible"},
	} {
		code, out, errOut := runCLI(t, "preflight", "--insecure", "--source", a.SourceAddr, "--dest", a.DestAddr,
			"--src-device", tc.src, "--dest-device", tc.dst, "--mode", tc.mode)
		if code != tc.code || !strings.Contains(out, tc.out) {
			t.Errorf("preflight %s -> %s (%s): exit %d, want %d with %q\n%s%s", tc.src, tc.dst, tc.mode, code, tc.code, tc.out, out, errOut)
		}
	}
	code, out, errOut := runCLI(t, "migrate", "--insecure", "--preflight", "--source", a.SourceAddr, "--dest", a.DestAddr,
		"--src-device", "sim:size=8MiB,seed=7", "--dest-device", "sim:size=16MiB,seed=7")
	if code == 0 || !strings.Contains(out+errOut, "INCOMPATIBLE_DEVICE") {
		t.Errorf("migrate of an incompatible pair: exit %d\n%s%s", code, out, errOut)
	}
	for _, d := range a.SourceRegistry.List() {
		if d.Spec == "sim:size=8MiB,seed=7" && d.State != vfio.StateRunning {
			t.Errorf("the source device is in %v", d.State)
		}
	}
}

// simAgents starts two loopback agents that serve simulated devices,
// until the end of the test.
func simAgents(t *testing.T) *loopback.Agents {
	t.Helper()
	a, err := loopback.Start(loopback.Config{
		DestDevices:   vfio.RegistryOptions{AllowSim: true},
		SourceDevices: vfio.RegistryOptions{AllowSim: true},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close(context.Background()) })
	return a
}
