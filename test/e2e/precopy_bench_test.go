package e2e

import (
	"fmt"
	"slices"
	"testing"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/services/dest"
)

// BenchmarkPrecopyDowntime migrates a 4 GiB simulated device over 4
// channels in stop-copy and in pre-copy mode (4 GiB of initial data,
// dirtied at 32 MB/s while it runs; the switchover asked once READY),
// alternating, on loopback agents in this process. It reports each mode's
// downtime and total time, and for pre-copy the last prediction and its
// ratio to the measured downtime. The goal: a pre-copy downtime under a
// twentieth of the stop-copy one, the prediction within 25%.
//
//	go test ./test/e2e/ -run '^$' -bench PrecopyDowntime -benchtime 3x
func BenchmarkPrecopyDowntime(b *testing.B) {
	a := startAgents(b, dest.Config{})
	var stop, stopTotal, pre, preTotal, predicted, ratio []float64
	for b.Loop() {
		n := len(stop) + 1
		s := fmt.Sprintf("sim:size=4GiB,seed=%d", 100+n)
		id := fmt.Sprintf("bench-stop-%d", n)
		a.startStopcopy(b, id, s)
		m := a.waitSource(b, id)
		if m.GetPhase() != succeeded {
			b.Fatalf("stop-copy: %v %v", m.GetPhase(), m.GetError())
		}
		stop = append(stop, m.GetDowntime().AsDuration().Seconds())
		stopTotal = append(stopTotal, elapsed(m))

		p := fmt.Sprintf("sim:size=4GiB,seed=%d,flags=stopcopy|p2p|precopy,precopy=4GiB,dirty=32MB/s", 200+n)
		id = fmt.Sprintf("bench-pre-%d", n)
		a.startPrecopy(b, id, []string{p}, []string{p})
		a.sourceUntil(b, id, inPhase(ferryv1.MigrationPhase_MIGRATION_PHASE_READY))
		if _, err := a.source.Switchover(b.Context(), &ferryv1.SwitchoverRequest{MigrationId: id}); err != nil {
			b.Fatal(err)
		}
		m = a.waitSource(b, id)
		if m.GetPhase() != succeeded {
			b.Fatalf("pre-copy: %v %v", m.GetPhase(), m.GetError())
		}
		d, pd := m.GetDowntime().AsDuration().Seconds(), m.GetPredictedDowntime().AsDuration().Seconds()
		pre, preTotal, predicted = append(pre, d), append(preTotal, elapsed(m)), append(predicted, pd)
		if pd > 0 {
			ratio = append(ratio, d/pd)
		}
		b.Logf("round %d: stop-copy downtime %.3fs of %.3fs; pre-copy downtime %.4fs of %.3fs, predicted %.4fs; %d pre-copy bytes, %d stop-copy bytes",
			n, stop[n-1], stopTotal[n-1], d, preTotal[n-1], pd, m.GetPrecopyBytes(), m.GetStopcopyBytes())
	}
	b.Logf("medians [ranges]: stop-copy downtime %s s, total %s s; pre-copy downtime %s s, total %s s, predicted %s s, measured/predicted %s",
		spread(stop), spread(stopTotal), spread(pre), spread(preTotal), spread(predicted), spread(ratio))
	b.ReportMetric(median(stop)*1e3, "stopcopy-downtime-ms")
	b.ReportMetric(median(pre)*1e3, "precopy-downtime-ms")
	b.ReportMetric(median(predicted)*1e3, "predicted-downtime-ms")
	b.ReportMetric(median(ratio), "measured/predicted")
}

// median is the middle of v (the mean of the middle two), 0 when empty.
func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Sorted(slices.Values(v))
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// spread is "median [min-max]".
func spread(v []float64) string {
	if len(v) == 0 {
		return "-"
	}
	return fmt.Sprintf("%.4g [%.4g-%.4g]", median(v), slices.Min(v), slices.Max(v))
}

// startStopcopy prepares and starts a stop-copy migration of one device
// over 4 channels.
func (a *agents) startStopcopy(t testing.TB, id, spec string) {
	t.Helper()
	prep, err := a.dest.PrepareIncoming(t.Context(), &ferryv1.PrepareIncomingRequest{MigrationId: id, Devices: []string{spec}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.source.StartMigration(t.Context(), &ferryv1.StartMigrationRequest{MigrationId: id, DestAddress: a.destAddr, Token: prep.GetToken(),
		Channels: 4, Devices: []*ferryv1.DevicePair{{SourceDevice: spec, DestDevice: spec}}}); err != nil {
		t.Fatal(err)
	}
}

// elapsed is a migration's total time, start to end.
func elapsed(m *ferryv1.Migration) float64 {
	return m.GetEndTime().AsTime().Sub(m.GetStartTime().AsTime()).Seconds()
}
