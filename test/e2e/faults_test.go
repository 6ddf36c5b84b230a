package e2e

import (
	"fmt"
	"net"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/vfio-ferry/ferry/services/dest"
	"github.com/vfio-ferry/ferry/services/source"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/internal/agentproc"
	"github.com/vfio-ferry/ferry/services/wire"
	"github.com/vfio-ferry/ferry/test/tcpproxy"
)

// The tests in this file break things from outside the agents: a TCP proxy
// of the test's own between the source and the destination cuts, stalls
// or corrupts connections, and agent processes are killed with SIGKILL.
// Whatever happens, nothing may be lost: a failed migration leaves the
// source device RUNNING and the destination device reset, and the agents
// keep serving.

// Short deadlines so faults resolve quickly; the tests never assert on
// time, only on outcomes.
var (
	sourceFaultFlags = []string{"--reconnect-timeout", "2s", "--progress-timeout", "2s", "--drain-timeout", "1s"}
	destFaultFlags   = []string{"--source-timeout", "2s", "--drain-timeout", "1s"}
)

// pair is a destination and a source agent process with clients, and a
// proxy in front of the destination's Transfer port.
type pair struct {
	dst, src *agentproc.Agent
	proxy    *tcpproxy.Proxy
	dest     ferryv1.DestAgentClient
	source   ferryv1.SourceAgentClient
}

func startPair(t *testing.T, destArgs ...string) *pair {
	t.Helper()
	p := &pair{
		dst: startAgent(t, "dest", append(destFaultFlags, destArgs...)...),
		src: startAgent(t, "source", sourceFaultFlags...),
	}
	proxy, err := tcpproxy.New(p.dst.Addr())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(proxy.Close)
	p.proxy = proxy
	p.dest = ferryv1.NewDestAgentClient(dial(t, p.dst.Addr()))
	p.source = ferryv1.NewSourceAgentClient(dial(t, p.src.Addr()))
	return p
}

// start prepares the destination and starts the source, the source
// reaching the destination through the proxy.
func (p *pair) start(t *testing.T, id string, src, dst []string, channels uint32) {
	t.Helper()
	prep, err := p.dest.PrepareIncoming(t.Context(), &ferryv1.PrepareIncomingRequest{MigrationId: id, Devices: dst})
	if err != nil {
		t.Fatalf("prepare: %v", err)
	}
	req := &ferryv1.StartMigrationRequest{MigrationId: id, DestAddress: p.proxy.Addr(), Token: prep.GetToken(), Channels: channels}
	for i := range src {
		req.Devices = append(req.Devices, &ferryv1.DevicePair{SourceDevice: src[i], DestDevice: dst[i]})
	}
	if _, err := p.source.StartMigration(t.Context(), req); err != nil {
		t.Fatalf("start: %v", err)
	}
}

func (p *pair) agents() *agents {
	return &agents{source: p.source, dest: p.dest}
}

func TestOneChannelCutIsResent(t *testing.T) {
	p := startPair(t)
	// Connection 0 carries Open; 1-4 are the channels. Cut the first
	// channel connection to carry 16 MiB; its re-dialled successor is left
	// alone.
	p.proxy.CutFirstAfter(16<<20, 1, 4)
	spec := []string{"sim:size=256MiB,seed=41"}
	p.start(t, "cut-one", spec, spec, 4)
	s := p.agents().waitSource(t, "cut-one")
	if s.GetPhase() != succeeded {
		t.Fatalf("phase %v: %v", s.GetPhase(), s.GetError())
	}
	if s.GetRetransmittedChunks() == 0 {
		t.Error("no chunk was re-sent after the cut")
	}
	if d := p.agents().waitDest(t, "cut-one"); !d.GetDevices()[0].GetVerified() {
		t.Error("destination device not verified")
	}
	// The source closed every connection it opened, the re-dialled one
	// too: a migration that ended holds none.
	waitClosed(t, p.proxy)
}

// waitClosed waits until the client side closed every connection through
// proxy, and fails the test, naming those still open, if that has not
// happened shortly before the test's deadline.
func waitClosed(t *testing.T, proxy *tcpproxy.Proxy) {
	t.Helper()
	var expired <-chan time.Time
	if deadline, ok := t.Deadline(); ok {
		timer := time.NewTimer(time.Until(deadline) * 9 / 10)
		defer timer.Stop()
		expired = timer.C
	}
	for _, c := range proxy.Conns() {
		select {
		case <-c.Ended():
		case <-expired:
			t.Fatalf("connection %d through the proxy is still open after the migration ended", c.Index)
		}
	}
}

// advertised is the destination's data listener as the source sees it:
// the proxy's address stands in for the listener's own.
type advertised struct {
	net.Listener
	addr net.Addr
}

func (a advertised) Addr() net.Addr { return a.addr }

func TestDirectDataConnectionCutIsResent(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	proxy, err := tcpproxy.New(lis.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(proxy.Close)
	paddr, err := net.ResolveTCPAddr("tcp", proxy.Addr())
	if err != nil {
		t.Fatal(err)
	}
	// Stall the first of the four channels' data connections to carry
	// 8 MiB, and cut the first other one to carry 16 MiB; their
	// successors are left alone.
	proxy.StallFirstAfter(8<<20, 0, 3)
	proxy.CutFirstAfter(16<<20, 0, 3)
	a := startAgentsOn(t, dest.Config{}, source.Config{ReconnectTimeout: 5 * time.Second, ProgressTimeout: 2 * time.Second}, advertised{Listener: lis, addr: paddr})
	spec := []string{"sim:size=128MiB,seed=45"}
	s, d := a.run(t, migration{id: "cut-data", src: spec, dst: spec, channels: 4})
	if s.GetPhase() != succeeded || !d.GetDevices()[0].GetVerified() {
		t.Fatalf("phase %v, verified %v: %v", s.GetPhase(), d.GetDevices()[0].GetVerified(), s.GetError())
	}
	if !s.GetDirectData() {
		t.Error("the chunks did not travel on direct data connections")
	}
	if s.GetRetransmittedChunks() == 0 {
		t.Error("no chunk was re-sent after the data connections broke")
	}
	// The stalled connection never forwards another byte and the cut one
	// is gone, so the verified success says what they held was sent
	// again. How many new data connections the proxy saw by the end is
	// the machine's timing: on a loaded machine it was 5, not 6, about one
	// run in ten before the stall rule went by acknowledgements and a few
	// in ten after (both channels re-dialled, by their logs; the second's
	// new data connection was not in the proxy's list when the migration
	// ended).
	if conns := proxy.Conns(); len(conns) < 5 {
		var carried []int64
		for _, c := range conns {
			carried = append(carried, c.Carried())
		}
		t.Errorf("%d data connections (carried %v), want the 4 channels' and a re-dialled one at least", len(conns), carried)
	}
}

func TestUnreachableDataPortFallsBackToGRPC(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	// The destination advertises a port where nothing listens: the
	// source's data connections are refused, as behind a firewall that
	// rejects them.
	closed, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed.Close()
	a := startAgentsOn(t, dest.Config{}, source.Config{}, advertised{Listener: lis, addr: closed.Addr()})
	spec := []string{"sim:size=32MiB,seed=46"}
	s, d := a.run(t, migration{id: "fallback", src: spec, dst: spec, channels: 2})
	if s.GetPhase() != succeeded || !d.GetDevices()[0].GetVerified() {
		t.Fatalf("phase %v: %v", s.GetPhase(), s.GetError())
	}
	if s.GetDirectData() {
		t.Error("the source reports direct data, but no data connection could be opened")
	}
}

func TestAllChannelsCutBriefly(t *testing.T) {
	p := startPair(t)
	p.proxy.OnNew(func(c *tcpproxy.Conn) {
		if c.Index <= 4 { // Open and the first generation of channels
			c.CutAfter(8 << 20)
		}
	})
	spec := []string{"sim:size=256MiB,seed=42"}
	p.start(t, "cut-all", spec, spec, 4)
	if s := p.agents().waitSource(t, "cut-all"); s.GetPhase() != succeeded {
		t.Fatalf("phase %v: %v", s.GetPhase(), s.GetError())
	}
}

func TestChannelsLostPastTheDeadline(t *testing.T) {
	p := startPair(t)
	// After the first cut, the destination is unreachable for good.
	p.proxy.OnNew(func(c *tcpproxy.Conn) {
		if c.Index >= 1 {
			c.CutAfter(8 << 20)
		}
		if c.Index > 4 {
			p.proxy.Refuse(true)
			c.Cut()
		}
	})
	src, dst := "sim:size=256MiB,seed=43", "sim:size=256MiB,seed=43"
	p.start(t, "deadline", []string{src}, []string{dst}, 4)
	s := p.agents().waitSource(t, "deadline")
	if s.GetPhase() != failed || codes.Code(s.GetError().GetCode()) != codes.Unavailable {
		t.Fatalf("phase %v, error %v; want FAILED, UNAVAILABLE", s.GetPhase(), s.GetError())
	}
	if st := s.GetDevices()[0].GetState(); st != ferryv1.DeviceState_DEVICE_STATE_RUNNING {
		t.Errorf("source device %v, want RUNNING", st)
	}
	// The destination notices the source is gone and resets its device.
	if d := p.agents().waitDest(t, "deadline"); d.GetPhase() != failed || d.GetDevices()[0].GetState() != ferryv1.DeviceState_DEVICE_STATE_RUNNING {
		t.Errorf("destination %v, device %v; want FAILED and RUNNING (reset)", d.GetPhase(), d.GetDevices()[0].GetState())
	}
}

func TestStalledConnectionIsDetected(t *testing.T) {
	p := startPair(t)
	p.proxy.StallFirstAfter(16<<20, 1, 4) // no bytes either way, no FIN
	spec := []string{"sim:size=256MiB,seed=44"}
	p.start(t, "stall", spec, spec, 4)
	s := p.agents().waitSource(t, "stall")
	if s.GetPhase() != succeeded {
		t.Fatalf("phase %v: %v", s.GetPhase(), s.GetError())
	}
	if s.GetRetransmittedChunks() == 0 {
		t.Error("no chunk was re-sent after the stall")
	}
}

// A healthy migration that lasts many progress timeouts succeeds and is
// verified: the stall watchdog never fails it, and whatever it re-dials
// is re-sent without loss. (Whether a channel is re-dialled at all here
// depends on the machine's scheduling: a process starved for longer than
// the timeout hears nothing and is right to re-dial. That the watchdog
// never fires while the destination keeps speaking is a property of the
// source's watchdog under a fake clock, for a synctest unit test; this one
// asserts only what holds on any machine.)
func TestSlowHealthyMigrationLastingManyProgressTimeouts(t *testing.T) {
	const timeout = 500 * time.Millisecond
	for _, direct := range []bool{true, false} {
		t.Run(fmt.Sprintf("direct=%v", direct), func(t *testing.T) {
			var lis net.Listener
			if direct {
				var err error
				if lis, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
					t.Fatal(err)
				}
			}
			a := startAgentsOn(t, dest.Config{}, source.Config{ProgressTimeout: timeout}, lis)
			// About 3 s: six timeouts. The destination speaks whenever
			// its frontier moves, every chunk here.
			spec := []string{"sim:size=48MiB,seed=46,rate=16MB/s"}
			s, d := a.run(t, migration{id: "healthy", src: spec, dst: spec, channels: 4})
			if s.GetPhase() != succeeded || !d.GetDevices()[0].GetVerified() {
				t.Fatalf("phase %v: %v", s.GetPhase(), s.GetError())
			}
			if s.GetDirectData() != direct {
				t.Errorf("direct data %v, want %v", s.GetDirectData(), direct)
			}
			if got := d.GetBytes(); got != 48<<20 {
				t.Errorf("the destination wrote %d bytes, want %d", got, 48<<20)
			}
			t.Logf("%d chunks re-sent", s.GetRetransmittedChunks())
		})
	}
}

func TestDestinationKilled(t *testing.T) {
	p := startPair(t)
	src := "sim:size=4GiB,seed=45,rate=256MB/s"
	dst := "sim:size=4GiB,seed=45"
	p.start(t, "dest-killed", []string{src}, []string{dst}, 4)
	p.agents().sourceUntil(t, "dest-killed", moving)
	p.dst.Kill()
	s := p.agents().waitSource(t, "dest-killed")
	if s.GetPhase() != failed || s.GetError().GetReason() == "" {
		t.Fatalf("phase %v, error %v; want FAILED with a reason", s.GetPhase(), s.GetError())
	}
	if st := s.GetDevices()[0].GetState(); st != ferryv1.DeviceState_DEVICE_STATE_RUNNING {
		t.Errorf("source device %v, want RUNNING", st)
	}
	// A restarted destination accepts a new migration.
	dst2 := startAgent(t, "dest", destFaultFlags...)
	a := &agents{source: p.source, dest: ferryv1.NewDestAgentClient(dial(t, dst2.Addr())), destAddr: dst2.Addr()}
	spec := []string{"sim:size=32MiB,seed=46"}
	if s, _ := a.run(t, migration{id: "after-restart", src: spec, dst: spec, channels: 4}); s.GetPhase() != succeeded {
		t.Fatalf("after the restart: %v %v", s.GetPhase(), s.GetError())
	}
}

func TestSourceKilled(t *testing.T) {
	p := startPair(t, "--memory-budget", "65MiB", "--max-buffer-bytes", "64MiB")
	src := "sim:size=4GiB,seed=47,rate=256MB/s"
	dst := "sim:size=4GiB,seed=47"
	p.start(t, "source-killed", []string{src}, []string{dst}, 4)
	p.agents().sourceUntil(t, "source-killed", moving)
	p.src.Kill()
	d := p.agents().waitDest(t, "source-killed")
	if d.GetPhase() != failed || d.GetError().GetReason() == "" {
		t.Fatalf("destination %v %v, want FAILED with a reason", d.GetPhase(), d.GetError())
	}
	if st := d.GetDevices()[0].GetState(); st != ferryv1.DeviceState_DEVICE_STATE_RUNNING {
		t.Errorf("destination device %v, want RUNNING (reset)", st)
	}
	// The budget is free again: a prepare that needs all of it (a window and
	// its reassembly ring) fits.
	if _, err := p.dest.PrepareIncoming(t.Context(), &ferryv1.PrepareIncomingRequest{MigrationId: "budget-back", Devices: []string{"sim:size=1MiB,seed=48"}}); err != nil {
		t.Fatalf("prepare after the source died: %v", err)
	}
}

func TestSlowDestinationSlowsTheSource(t *testing.T) {
	p := startPair(t, "--max-buffers", "8", "--max-buffer-bytes", "8MiB")
	src, dst := "sim:size=64MiB,seed=49", "sim:size=64MiB,seed=49,wrate=128MB/s"
	p.start(t, "slow-dest", []string{src}, []string{dst}, 4)
	s := p.agents().waitSource(t, "slow-dest")
	if s.GetPhase() != succeeded {
		t.Fatalf("phase %v: %v", s.GetPhase(), s.GetError())
	}
	if s.GetDevices()[0].GetWindowStalls() == 0 {
		t.Error("the source never waited for the destination's window")
	}
	d := p.agents().waitDest(t, "slow-dest")
	if d.GetPeakBufferedBytes() > 8<<20 {
		t.Errorf("destination buffered %d bytes, more than its 8 MiB window", d.GetPeakBufferedBytes())
	}
}

func TestCorruptedChunkIsNeverVerified(t *testing.T) {
	p := startPair(t)
	// One bit, in the first channel connection to carry that far.
	p.proxy.FlipFirstAt(5<<20+12345, 1, 4)
	spec := []string{"sim:size=64MiB,seed=50"}
	p.start(t, "corrupt", spec, spec, 4)
	s := p.agents().waitSource(t, "corrupt")
	d := p.agents().waitDest(t, "corrupt")
	switch s.GetPhase() {
	case succeeded:
		// The flip hit framing, the connection was dropped and its chunks
		// re-sent: the destination must have verified every byte.
		if !d.GetDevices()[0].GetVerified() {
			t.Fatal("SUCCEEDED without a verified destination device")
		}
	case failed:
		if r := s.GetError().GetReason(); r != wire.ReasonChunkCRC {
			t.Errorf("reason %q, want %s", r, wire.ReasonChunkCRC)
		}
		if st := s.GetDevices()[0].GetState(); st != ferryv1.DeviceState_DEVICE_STATE_RUNNING {
			t.Errorf("source device %v, want RUNNING", st)
		}
	default:
		t.Fatalf("phase %v", s.GetPhase())
	}
}

func TestCancelBeforeOpen(t *testing.T) {
	p := startPair(t)
	// Every connection to the destination stalls: Open never answers.
	p.proxy.OnNew(func(c *tcpproxy.Conn) { c.StallAfter(1) })
	spec := []string{"sim:size=16MiB,seed=51"}
	p.start(t, "cancel-open", spec, spec, 4)
	resp, err := p.source.CancelMigration(t.Context(), &ferryv1.CancelMigrationRequest{MigrationId: "cancel-open"})
	if err != nil {
		t.Fatal(err)
	}
	if m := resp.GetMigration(); m.GetPhase() != cancelled || m.GetDevices()[0].GetState() != ferryv1.DeviceState_DEVICE_STATE_RUNNING {
		t.Fatalf("%v, device %v; want CANCELLED and RUNNING", m.GetPhase(), m.GetDevices()[0].GetState())
	}
}

func TestCancelDuringFinish(t *testing.T) {
	p := startPair(t)
	// A slow destination device keeps the migration in FINISHING.
	src, dst := "sim:size=64MiB,seed=52", "sim:size=64MiB,seed=52,wrate=16MB/s"
	p.start(t, "cancel-finish", []string{src}, []string{dst}, 4)
	p.agents().sourceUntil(t, "cancel-finish", inPhase(ferryv1.MigrationPhase_MIGRATION_PHASE_FINISHING))
	resp, err := p.source.CancelMigration(t.Context(), &ferryv1.CancelMigrationRequest{MigrationId: "cancel-finish"})
	if err != nil {
		t.Fatal(err)
	}
	if m := resp.GetMigration(); m.GetPhase() != cancelled || m.GetDevices()[0].GetState() != ferryv1.DeviceState_DEVICE_STATE_RUNNING {
		t.Fatalf("%v, device %v; want CANCELLED and RUNNING", m.GetPhase(), m.GetDevices()[0].GetState())
	}
	if d := p.agents().waitDest(t, "cancel-finish"); d.GetPhase() != failed || d.GetDevices()[0].GetState() != ferryv1.DeviceState_DEVICE_STATE_RUNNING {
		t.Errorf("destination %v, device %v; want FAILED and reset", d.GetPhase(), d.GetDevices()[0].GetState())
	}
}

func TestConcurrentMigrations(t *testing.T) {
	p := startPair(t)
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Go(func() {
			src := []string{fmt.Sprintf("sim:size=24MiB,seed=%d", 600+2*i), fmt.Sprintf("sim:size=17MiB,seed=%d", 601+2*i)}
			p.start(t, fmt.Sprintf("load-%d", i), src, src, 4)
		})
	}
	wg.Wait()
	for i := range 8 {
		if s := p.agents().waitSource(t, fmt.Sprintf("load-%d", i)); s.GetPhase() != succeeded {
			t.Errorf("migration %d: %v %v", i, s.GetPhase(), s.GetError())
		}
	}
}
