package e2e

import (
	"bufio"
	"context"
	"net"
	"net/http"
	"strconv"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/internal/agentproc"
	"github.com/vfio-ferry/ferry/internal/shapedlink"
	"github.com/vfio-ferry/ferry/services/chunkwire"
	"github.com/vfio-ferry/ferry/services/grpcserver"
)

// The tests in this file run the agents as processes in two network
// namespaces joined by a shaped veth pair (internal/shapedlink), so the
// chunks cross a real link at a set rate instead of loopback. They need
// root; elsewhere they skip. Every assertion is on counters the agents
// report, never on how long something took.

// linkRate is the shaped link: 4 Gbit/s.
const linkRate = 500_000_000

// linkAgents is a destination and a source agent on a shaped link.
type linkAgents struct {
	*agents
	link        *shapedlink.Link
	srcProc     *agentproc.Agent
	destProcess *agentproc.Agent
}

// startOnLink starts `ferry dest` in the link's Dest namespace (direct
// data on) and `ferry source` in its Source namespace, with the source's
// extra flags, and dials both from the test through their namespaces.
func startOnLink(t *testing.T, rate uint64, sourceArgs ...string) *linkAgents {
	t.Helper()
	l := shapedlink.ForTest(t, rate)
	inNS := func(ns *shapedlink.Namespace, role string, args ...string) *agentproc.Agent {
		base := []string{"netns", "exec", ns.Name, ferry(t), role, "--listen", ns.HostPort(0), "--log-format", "json", "--insecure", "--allow-sim"}
		return agentproc.Start(t, "ip", append(base, args...)...)
	}
	dst := inNS(l.Dest, "dest", "--data-listen", l.Dest.HostPort(0))
	src := inNS(l.Source, "source", sourceArgs...)
	a := &agents{destAddr: dst.Addr(), sourceAddr: src.Addr()}
	dconn := dialIn(t, l.Dest, a.destAddr)
	a.dest = ferryv1.NewDestAgentClient(dconn)
	a.transfer = ferryv1.NewTransferClient(dconn)
	a.source = ferryv1.NewSourceAgentClient(dialIn(t, l.Source, a.sourceAddr))
	return &linkAgents{agents: a, link: l, srcProc: src, destProcess: dst}
}

// dialIn connects to addr from inside ns.
func dialIn(t *testing.T, ns *shapedlink.Namespace, addr string) *grpc.ClientConn {
	t.Helper()
	opts := append(grpcserver.DialOptions(insecure.NewCredentials(), chunkwire.NewPool()),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) { return ns.DialContext(ctx, "tcp", addr) }))
	conn, err := grpc.NewClient("passthrough:///"+addr, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// checkVerified fails t unless both sides ended SUCCEEDED with size bytes
// per device.
func checkVerified(t *testing.T, src, dst *ferryv1.Migration, size uint64) {
	t.Helper()
	if src.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED || dst.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED {
		t.Fatalf("migration %s: source %v (%v), destination %v (%v)", src.GetId(), src.GetPhase(), src.GetError(), dst.GetPhase(), dst.GetError())
	}
	for _, d := range dst.GetDevices() {
		if !d.GetVerified() || d.GetBytes() != size {
			t.Errorf("destination device %s: verified %v, %d bytes; want verified, %d", d.GetDevice(), d.GetVerified(), d.GetBytes(), size)
		}
	}
}

// checkLimitedBytes fails t unless every byte the source sent went through
// the bandwidth limits: the chunks' bytes as they travel, plus the
// payloads of the chunks it sent again. The state here does not shrink on
// the wire, so that is at least its bytes.
func checkLimitedBytes(t *testing.T, src *ferryv1.Migration, chunkSize uint64) {
	t.Helper()
	got, wire, state := src.GetBandwidthLimitedBytes(), src.GetWireBytes(), src.GetBytes()
	resent := src.GetRetransmittedChunks()
	if wire < state || got < wire || got > wire+resent*chunkSize {
		t.Errorf("bandwidth-limited bytes = %d for %d bytes on the wire (%d of state) and %d chunks resent: every byte sent passes the limits once", got, wire, state, resent)
	}
	var stalls uint64
	for _, d := range src.GetDevices() {
		stalls += d.GetBandwidthStalls()
	}
	if stalls != src.GetBandwidthStalls() {
		t.Errorf("bandwidth stalls: %d over the devices, %d for the migration", stalls, src.GetBandwidthStalls())
	}
}

// A migration at 4 channels across a 4 Gbit/s link verifies, with no
// limit: the senders pass the (unlimited) limits and never wait on them.
func TestShapedLinkFourChannels(t *testing.T) {
	a := startOnLink(t, linkRate)
	const size = 256 << 20
	spec := "sim:size=256MiB,seed=161"
	src, dst := a.run(t, migration{id: "link-4ch", src: []string{spec}, dst: []string{spec}, channels: 4, chunkSize: 1 << 20})
	checkVerified(t, src, dst, size)
	checkLimitedBytes(t, src, 1<<20)
	if src.GetBandwidthStalls() != 0 || src.GetMaxBandwidth() != 0 || src.GetNodeMaxBandwidth() != 0 {
		t.Errorf("an unlimited migration: %d bandwidth stalls, limits %d and %d", src.GetBandwidthStalls(), src.GetMaxBandwidth(), src.GetNodeMaxBandwidth())
	}
	if !src.GetDirectData() || src.GetChannels() != 4 {
		t.Errorf("channels %d, direct data %v; want 4 on direct data", src.GetChannels(), src.GetDirectData())
	}
}

// A migration limited below the link's rate verifies; every byte it sent
// went through its limit, which made its senders wait, and those waits
// are counted as bandwidth stalls, apart from the window stalls.
func TestShapedLinkMigrationLimit(t *testing.T) {
	a := startOnLink(t, linkRate)
	const size, limit = 96 << 20, 50_000_000
	spec := "sim:size=96MiB,seed=162"
	src, dst := a.run(t, migration{id: "link-limit", src: []string{spec}, dst: []string{spec}, channels: 4, chunkSize: 1 << 20, maxBandwidth: limit})
	checkVerified(t, src, dst, size)
	checkLimitedBytes(t, src, 1<<20)
	if src.GetMaxBandwidth() != limit {
		t.Errorf("max_bandwidth reported %d, want %d", src.GetMaxBandwidth(), limit)
	}
	// 96 MiB through a bucket of 10 ms of the rate: nearly every chunk
	// waited.
	if n := src.GetBandwidthStalls(); n < size/(1<<20)/2 {
		t.Errorf("bandwidth stalls = %d for %d chunks at a limit far below the link: the limit was not consulted", n, size>>20)
	}
	if src.GetBandwidthStallTime().AsDuration() <= 0 {
		t.Error("no time counted waiting on the limit")
	}
}

// Lifting a migration's limit while it runs takes effect: the source
// reports the limit gone, its senders stop waiting on it (beyond the waits
// in progress when it was lifted) and the migration finishes.
func TestShapedLinkLiftLimit(t *testing.T) {
	a := startOnLink(t, linkRate)
	const size, channels = 256 << 20, 4
	spec := "sim:size=256MiB,seed=163"
	ctx := t.Context()
	prep, err := a.dest.PrepareIncoming(ctx, &ferryv1.PrepareIncomingRequest{MigrationId: "link-lift", Devices: []string{spec}})
	if err != nil {
		t.Fatal(err)
	}
	// At 2 MB/s it would take over two minutes.
	if _, err := a.source.StartMigration(ctx, &ferryv1.StartMigrationRequest{
		MigrationId: "link-lift", DestAddress: a.destAddr, Token: prep.GetToken(), Channels: channels, ChunkSize: 1 << 20, MaxBandwidth: 2_000_000,
		Devices: []*ferryv1.DevicePair{{SourceDevice: spec, DestDevice: spec}},
	}); err != nil {
		t.Fatal(err)
	}
	a.sourceUntil(t, "link-lift", func(m *ferryv1.Migration) bool { return m.GetBandwidthStalls() > 0 })
	resp, err := a.source.SetBandwidth(ctx, &ferryv1.SetBandwidthRequest{MigrationId: "link-lift", MaxBandwidth: 0})
	if err != nil {
		t.Fatal(err)
	}
	at := resp.GetMigration()
	if at.GetMaxBandwidth() != 0 {
		t.Errorf("after lifting, max_bandwidth = %d", at.GetMaxBandwidth())
	}
	if at.GetBytes() >= size {
		t.Fatalf("the migration had read all its state (%d bytes) before the limit was lifted", at.GetBytes())
	}
	src, dst := a.waitSource(t, "link-lift"), a.waitDest(t, "link-lift")
	checkVerified(t, src, dst, size)
	checkLimitedBytes(t, src, 1<<20)
	if src.GetMaxBandwidth() != 0 {
		t.Errorf("final max_bandwidth = %d, want 0 (lifted)", src.GetMaxBandwidth())
	}
	// Each channel's sender may finish the one wait it was in.
	if after, before := src.GetBandwidthStalls(), at.GetBandwidthStalls(); after > before+channels {
		t.Errorf("bandwidth stalls went from %d to %d after the limit was lifted: the senders still waited on it", before, after)
	}
	// A finished migration has no limit to change.
	if _, err := a.source.SetBandwidth(ctx, &ferryv1.SetBandwidthRequest{MigrationId: "link-lift", MaxBandwidth: 10_000_000}); err == nil {
		t.Error("SetBandwidth on a finished migration succeeded")
	}
}

// The source's node-wide limit is one bucket for all its outgoing
// migrations: two at once both wait on it, and what it let through (the
// agent's metric) is exactly both migrations' bytes.
func TestShapedLinkNodeLimit(t *testing.T) {
	const node = 40_000_000
	a := startOnLink(t, linkRate, "--max-bandwidth", "320Mbit/s", "--metrics-listen", "127.0.0.1:0")
	const size = 48 << 20
	done := make(chan [2]*ferryv1.Migration, 2)
	for i, id := range []string{"node-a", "node-b"} {
		spec := "sim:size=48MiB,seed=" + strconv.Itoa(170+i)
		go func() {
			var r [2]*ferryv1.Migration
			defer func() { done <- r }()
			r[0], r[1] = a.runAsync(t, migration{id: id, src: []string{spec}, dst: []string{spec}, channels: 2, chunkSize: 1 << 20})
		}()
	}
	var total uint64
	for range 2 {
		r := <-done
		if r[0] == nil {
			t.FailNow()
		}
		src, dst := r[0], r[1]
		checkVerified(t, src, dst, size)
		checkLimitedBytes(t, src, 1<<20)
		if src.GetNodeMaxBandwidth() != node || src.GetMaxBandwidth() != 0 {
			t.Errorf("%s: limits %d (own) and %d (node), want 0 and %d", src.GetId(), src.GetMaxBandwidth(), src.GetNodeMaxBandwidth(), node)
		}
		if src.GetBandwidthStalls() == 0 {
			t.Errorf("%s never waited on the node-wide limit", src.GetId())
		}
		total += src.GetBandwidthLimitedBytes()
	}
	m := scrapeIn(t, a.link.Source, a.srcProc.MetricsAddr())
	if got := m["ferry_source_node_bandwidth_bytes_total"]; got != float64(total) {
		t.Errorf("the node-wide limit let %v bytes through, the two migrations sent %d through it", got, total)
	}
	if m["ferry_source_node_max_bandwidth_bytes_per_second"] != node {
		t.Errorf("node limit metric = %v, want %d", m["ferry_source_node_max_bandwidth_bytes_per_second"], node)
	}
	if m["ferry_source_node_bandwidth_stalls_total"] == 0 {
		t.Error("the node-wide limit counted no stalls")
	}
}

// runAsync is run for a goroutine other than the test's: it reports a
// failure with Errorf and returns nils.
func (a *agents) runAsync(t *testing.T, m migration) (src, dst *ferryv1.Migration) {
	ctx := t.Context()
	prep, err := a.dest.PrepareIncoming(ctx, &ferryv1.PrepareIncomingRequest{MigrationId: m.id, Devices: m.dst})
	if err != nil {
		t.Errorf("PrepareIncoming %s: %v", m.id, err)
		return nil, nil
	}
	req := &ferryv1.StartMigrationRequest{MigrationId: m.id, DestAddress: a.destAddr, Token: prep.GetToken(), Channels: m.channels, ChunkSize: m.chunkSize, MaxBandwidth: m.maxBandwidth}
	for i := range m.src {
		req.Devices = append(req.Devices, &ferryv1.DevicePair{SourceDevice: m.src[i], DestDevice: m.dst[i]})
	}
	if _, err := a.source.StartMigration(ctx, req); err != nil {
		t.Errorf("StartMigration %s: %v", m.id, err)
		return nil, nil
	}
	final := func(recv func() (*ferryv1.Migration, error)) *ferryv1.Migration {
		var last *ferryv1.Migration
		for {
			m, err := recv()
			if err != nil {
				return last
			}
			last = m
		}
	}
	sw, err := a.source.WatchMigration(ctx, &ferryv1.WatchMigrationRequest{MigrationId: m.id})
	if err != nil {
		t.Errorf("watch %s: %v", m.id, err)
		return nil, nil
	}
	src = final(func() (*ferryv1.Migration, error) { r, err := sw.Recv(); return r.GetMigration(), err })
	dw, err := a.dest.WatchIncoming(ctx, &ferryv1.WatchIncomingRequest{MigrationId: m.id})
	if err != nil {
		t.Errorf("watch incoming %s: %v", m.id, err)
		return nil, nil
	}
	dst = final(func() (*ferryv1.Migration, error) { r, err := dw.Recv(); return r.GetMigration(), err })
	if src == nil || dst == nil {
		t.Errorf("%s: a watch ended without a state", m.id)
		return nil, nil
	}
	return src, dst
}

// scrapeIn reads the unlabelled series of an agent's /metrics from
// inside ns.
func scrapeIn(t *testing.T, ns *shapedlink.Namespace, addr string) map[string]float64 {
	t.Helper()
	c := &http.Client{Transport: &http.Transport{DialContext: ns.DialContext}}
	req, err := http.NewRequestWithContext(t.Context(), http.MethodGet, "http://"+addr+"/metrics", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	out := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) != 2 || strings.HasPrefix(f[0], "#") || strings.Contains(f[0], "{") {
			continue
		}
		if v, err := strconv.ParseFloat(f[1], 64); err == nil {
			out[f[0]] = v
		}
	}
	return out
}
