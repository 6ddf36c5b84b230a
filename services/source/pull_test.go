package source

import (
	"context"
	"log/slog"
	"strings"
	"testing"
	"testing/synctest"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/flow"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/services/chunkwire"
	"github.com/vfio-ferry/ferry/services/wire"
)

const pullChunk = 1 << 20

// readingDevice is a one-device migration of chunk-byte chunks whose
// device, spec, is in STOP_COPY with its digest and its gate under window:
// what the device's reader needs.
func readingDevice(tb testing.TB, spec string, chunk uint32, window flow.Window) (*migration, *srcDevice) {
	tb.Helper()
	s, err := vfio.ParseSpec(spec)
	if err != nil {
		tb.Fatal(err)
	}
	dev, err := vfio.NewSim(s)
	if err != nil {
		tb.Fatal(err)
	}
	rs, err := dev.SetState(vfio.StateStopCopy)
	if err != nil {
		tb.Fatal(err)
	}
	m := &migration{
		a:         &Agent{cfg: Config{Pool: chunkwire.NewPool(), Logger: slog.New(slog.DiscardHandler)}},
		req:       &ferryv1.StartMigrationRequest{},
		chunkSize: chunk,
		log:       slog.New(slog.DiscardHandler),
	}
	digest, err := chunkwire.NewDigest(m.req.GetDigest())
	if err != nil {
		tb.Fatal(err)
	}
	d := &srcDevice{spec: dev.Spec(), dev: dev, release: func() {}, stream: rs, digest: digest, gate: flow.NewGate(window)}
	m.devs = []*srcDevice{d}
	return m, d
}

// pullSetup is readingDevice with the turn handed out to two channels
// that take turns reading the device.
func pullSetup(t *testing.T, spec string, window flow.Window) (*migration, *puller, [2]*channel) {
	t.Helper()
	m, d := readingDevice(t, spec, pullChunk, window)
	m.pull = newPuller(d)
	m.pull.turn <- struct{}{}
	resend := newResendQueue()
	var chs [2]*channel
	for i := range chs {
		chs[i] = &channel{m: m, index: int32(i), resend: resend}
	}
	return m, m.pull, chs
}

// pulled runs c.pull in the background; synctest.Wait then tells whether
// it is blocked.
func pulled(ctx context.Context, c *channel, p *puller) <-chan *outChunk {
	out := make(chan *outChunk, 1)
	go func() { out <- c.pull(ctx, p) }()
	return out
}

func wantChunk(t *testing.T, got <-chan *outChunk, kind ferryv1.ChunkKind, seq, offset uint64) *outChunk {
	t.Helper()
	synctest.Wait()
	select {
	case ch := <-got:
		if ch == nil || ch.hdr.GetKind() != kind || ch.hdr.GetSeq() != seq || ch.hdr.GetOffset() != offset {
			t.Fatalf("pull = %v, want %v seq %d at %d", ch, kind, seq, offset)
		}
		return ch
	default:
		t.Fatalf("pull blocked, want %v seq %d", kind, seq)
		return nil
	}
}

func wantBlocked(t *testing.T, got <-chan *outChunk, why string) {
	t.Helper()
	synctest.Wait()
	select {
	case ch := <-got:
		t.Fatalf("%s: pull returned %v, want it blocked", why, ch)
	default:
	}
}

// The channels of a one-device migration read the device in turn, under
// window credit, in sequence, then END; the device leaves STOP_COPY once
// END is read, and the senders are left with resends.
func TestSendersReadTheDeviceInTurn(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const size = 2*pullChunk + 5
		_, p, chs := pullSetup(t, "sim:size=2097157,seed=3", flow.Window{LimitSeq: 2, LimitOffset: 2 * pullChunk})
		ctx := t.Context()
		wantChunk(t, pulled(ctx, chs[0], p), ferryv1.ChunkKind_CHUNK_KIND_DATA, 0, 0)
		wantChunk(t, pulled(ctx, chs[1], p), ferryv1.ChunkKind_CHUNK_KIND_DATA, 1, pullChunk)

		// The window is used up: the next reader waits with the turn, and
		// the other channel waits for it.
		first := pulled(ctx, chs[0], p)
		wantBlocked(t, first, "window used up")
		second := pulled(ctx, chs[1], p)
		wantBlocked(t, second, "turn taken")
		if n, _ := p.d.gate.Stalls(); n != 1 {
			t.Errorf("window stalls = %d, want 1", n)
		}

		p.d.gate.Update(flow.Window{LimitSeq: 3, LimitOffset: 3 * pullChunk})
		// Whichever had the turn reads the last 5 bytes; the other then
		// waits for credit for END.
		var last *outChunk
		var waiting <-chan *outChunk
		synctest.Wait()
		select {
		case last = <-first:
			waiting = second
		case last = <-second:
			waiting = first
		default:
			t.Fatal("no sender read after the window grew")
		}
		if last.hdr.GetSeq() != 2 || last.hdr.GetOffset() != 2*pullChunk || last.payload.Len() != 5 {
			t.Fatalf("third chunk: seq %d at %d, %d bytes; want seq 2 at %d, 5 bytes", last.hdr.GetSeq(), last.hdr.GetOffset(), last.payload.Len(), 2*pullChunk)
		}
		wantBlocked(t, waiting, "END needs credit of its own")
		p.d.gate.Update(flow.Window{LimitSeq: 4, LimitOffset: 3 * pullChunk})
		end := wantChunk(t, waiting, ferryv1.ChunkKind_CHUNK_KIND_END, 3, size)
		if end.hdr.GetTotalBytes() != size || end.hdr.GetTotalChunks() != 3 || len(end.hdr.GetDigest()) == 0 {
			t.Errorf("END: %d bytes, %d chunks, digest %x", end.hdr.GetTotalBytes(), end.hdr.GetTotalChunks(), end.hdr.GetDigest())
		}
		select {
		case <-p.read:
		default:
			t.Fatal("reading not over after END")
		}
		if p.err != nil {
			t.Fatalf("reading ended with %v", p.err)
		}
		if st, err := p.d.dev.State(); err != nil || st != vfio.StateStop {
			t.Errorf("device in %v (%v) after END, want STOP", st, err)
		}
		if n := len(p.d.unacked); n != 4 {
			t.Errorf("%d chunks kept for a resend, want 4", n)
		}

		// Only resends are left; a sender waits for them until its stream
		// ends.
		sctx, cancel := context.WithCancel(ctx)
		rest := pulled(sctx, chs[0], p)
		wantBlocked(t, rest, "nothing left to read")
		chs[0].resend.push([]*outChunk{last})
		if got := wantChunk(t, rest, ferryv1.ChunkKind_CHUNK_KIND_DATA, 2, 2*pullChunk); got != last {
			t.Error("a resend other than the one queued")
		}
		rest = pulled(sctx, chs[0], p)
		wantBlocked(t, rest, "nothing left to read")
		cancel()
		synctest.Wait()
		if ch := <-rest; ch != nil {
			t.Errorf("pull after its stream ended = %v, want nil", ch)
		}
	})
}

// A sender waiting for credit with the turn gives way to a chunk to
// resend: the window may be waiting for exactly that chunk.
func TestTurnHolderGivesWayToResend(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		_, p, chs := pullSetup(t, "sim:size=4MiB,seed=4", flow.Window{LimitSeq: 1, LimitOffset: pullChunk})
		ctx := t.Context()
		lost := wantChunk(t, pulled(ctx, chs[0], p), ferryv1.ChunkKind_CHUNK_KIND_DATA, 0, 0)
		waiting := pulled(ctx, chs[1], p)
		wantBlocked(t, waiting, "window used up")
		chs[1].resend.push([]*outChunk{lost})
		if got := wantChunk(t, waiting, ferryv1.ChunkKind_CHUNK_KIND_DATA, 0, 0); got != lost {
			t.Fatal("a resend other than the one queued")
		}
		// The turn came back with it: the next reader takes it.
		p.d.gate.Update(flow.Window{LimitSeq: 2, LimitOffset: 2 * pullChunk})
		wantChunk(t, pulled(ctx, chs[0], p), ferryv1.ChunkKind_CHUNK_KIND_DATA, 1, pullChunk)
	})
}

// A device read that fails ends the reading with its error, for the
// migration to fail with; no sender gets a chunk for it.
func TestDeviceReadFailureEndsReading(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		_, p, chs := pullSetup(t, "sim:size=4MiB,seed=5,fault=1MiB", flow.Window{LimitSeq: 8, LimitOffset: 8 * pullChunk})
		ctx, cancel := context.WithCancel(t.Context())
		wantChunk(t, pulled(ctx, chs[0], p), ferryv1.ChunkKind_CHUNK_KIND_DATA, 0, 0)
		rest := pulled(ctx, chs[1], p)
		wantBlocked(t, rest, "reading failed: resends only")
		select {
		case <-p.read:
		default:
			t.Fatal("reading not over after the device failed")
		}
		if wire.Reason(p.err) != wire.ReasonSourceDeviceFailed || !strings.Contains(wire.Message(p.err), "byte 1048576") {
			t.Errorf("reading ended with %v (reason %q), want the device's fault at byte 1048576", p.err, wire.Reason(p.err))
		}
		cancel()
		synctest.Wait()
		if ch := <-rest; ch != nil {
			t.Errorf("pull = %v after a failed read, want nil", ch)
		}
	})
}
