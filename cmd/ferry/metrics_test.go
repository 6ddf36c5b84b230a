package main

import (
	"strings"
	"testing"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
)

// TestMetricsOfOneRole: a source-only agent exports nothing of the
// destination's role, not even at zero; and a destination's prepare that
// no source opened is in the by-phase gauge as prepared, not active.
func TestMetricsOfOneRole(t *testing.T) {
	bin := buildFerry(t)
	src := startSource(t, bin)
	page := scrape(t, src)
	for _, bad := range []string{`role="dest"`, "ferry_dest_"} {
		if strings.Contains(page, bad) {
			t.Errorf("a source agent's /metrics has %s", bad)
		}
	}
	mustMetric(t, page, "ferry_migrations_active", map[string]string{"role": "source"})
	mustMetric(t, page, "ferry_build_info", nil)

	dst := startRole(t, bin, "dest")
	dpage := scrape(t, dst)
	for _, bad := range []string{`role="source"`, "ferry_source_", "grpc_client_"} {
		if strings.Contains(dpage, bad) {
			t.Errorf("a destination agent's /metrics has %s", bad)
		}
	}
	dc := ferryv1.NewDestAgentClient(dialAgent(t, dst.Addr()))
	if _, err := dc.PrepareIncoming(t.Context(), &ferryv1.PrepareIncomingRequest{MigrationId: "unopened", Devices: []string{"sim:size=1MiB,seed=3"}}); err != nil {
		t.Fatal(err)
	}
	dpage = scrape(t, dst)
	if v := mustMetric(t, dpage, "ferry_migrations_active", map[string]string{"role": "dest"}); v != 0 {
		t.Errorf("a prepare nobody opened counts as active: %v", v)
	}
	if v := mustMetric(t, dpage, "ferry_migrations_by_phase", map[string]string{"role": "dest", "phase": "prepared"}); v != 1 {
		t.Errorf("ferry_migrations_by_phase{phase=prepared} = %v, want 1", v)
	}
}
