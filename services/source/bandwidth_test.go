package source

import (
	"context"
	"errors"
	"testing"
	"testing/synctest"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/mem"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/services/wire"
)

// The bucket admits bytes at its rate, on a fake clock: after the first
// burst every MiB costs its share of a second, and every wait counts as a
// stall.
func TestBandwidthLimitRate(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const bps = 4_000_000
		b := newBandwidthLimit(bps)
		burst := burstOf(bps)
		start := time.Now()
		const chunk, chunks = 100_000, 40
		for range chunks {
			if _, err := b.wait(t.Context(), chunk); err != nil {
				t.Fatal(err)
			}
		}
		elapsed := time.Since(start)
		want := time.Duration(float64(chunk*chunks-burst) / bps * float64(time.Second))
		if elapsed < want-time.Millisecond || elapsed > want+time.Millisecond {
			t.Errorf("%d bytes took %v at %d B/s, want %v", chunk*chunks, elapsed, bps, want)
		}
		if got := b.bytes.Load(); got != chunk*chunks {
			t.Errorf("bytes admitted = %d, want %d", got, chunk*chunks)
		}
		// The bucket holds 64 KiB: the first chunk waited already.
		if got := b.stalls.Load(); got != chunks {
			t.Errorf("stalls = %d, want %d", got, chunks)
		}
		if got := time.Duration(b.stallNanos.Load()); got != elapsed {
			t.Errorf("stall time = %v, want all of %v", got, elapsed)
		}
	})
}

// A payload larger than the bucket is admitted in pieces, not refused.
func TestBandwidthLimitLargerThanBurst(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := newBandwidthLimit(MinBandwidth)
		start := time.Now()
		if _, err := b.wait(t.Context(), 16<<20); err != nil {
			t.Fatal(err)
		}
		want := time.Duration(float64(16<<20-burstOf(MinBandwidth)) / MinBandwidth * float64(time.Second))
		if got := time.Since(start); got < want-time.Millisecond || got > want+time.Millisecond {
			t.Errorf("16 MiB at 1 MB/s took %v, want %v", got, want)
		}
	})
}

// Lifting the limit wakes a sender waiting on it at once; lowering it
// makes the next wait longer.
func TestBandwidthLimitChange(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := newBandwidthLimit(MinBandwidth)
		if _, err := b.wait(t.Context(), burstOf(MinBandwidth)); err != nil {
			t.Fatal(err)
		}
		done := make(chan time.Duration)
		go func() {
			d, _ := b.wait(context.Background(), 10_000_000) // 10 s at this rate
			done <- d
		}()
		synctest.Wait()
		time.Sleep(time.Second)
		select {
		case <-done:
			t.Fatal("the waiter returned before its tokens were due")
		default:
		}
		b.set(0)
		synctest.Wait()
		select {
		case d := <-done:
			if d != time.Second {
				t.Errorf("the waiter reports %v waited, want 1s", d)
			}
		default:
			t.Fatal("lifting the limit did not release the waiter")
		}
		if b.limit() != 0 {
			t.Errorf("limit = %d after lifting", b.limit())
		}
		start := time.Now()
		if d, err := b.wait(t.Context(), 1<<30); err != nil || d != 0 {
			t.Errorf("unlimited wait = %v, %v; want none", d, err)
		}
		if time.Since(start) != 0 {
			t.Error("an unlimited bucket made a sender wait")
		}
	})
}

// A sender whose stream ends while it waits gets ctx's error and gives
// its tokens back.
func TestBandwidthLimitCancel(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := newBandwidthLimit(MinBandwidth)
		ctx, cancel := context.WithCancel(t.Context())
		errc := make(chan error)
		go func() {
			_, err := b.wait(ctx, 5_000_000)
			errc <- err
		}()
		synctest.Wait()
		cancel()
		if err := <-errc; !errors.Is(err, context.Canceled) {
			t.Fatalf("wait = %v, want context.Canceled", err)
		}
		if b.bytes.Load() != 0 {
			t.Errorf("a cancelled wait counted %d bytes", b.bytes.Load())
		}
		// The piece it waited for gave its tokens back: the next burst
		// costs only the refill of the piece it had spent.
		start := time.Now()
		if _, err := b.wait(t.Context(), burstOf(MinBandwidth)); err != nil {
			t.Fatal(err)
		}
		want := time.Duration(float64(burstOf(MinBandwidth)) / MinBandwidth * float64(time.Second))
		if got := time.Since(start); got < want-time.Millisecond || got > want+time.Millisecond {
			t.Errorf("after a cancelled wait a burst took %v, want %v", got, want)
		}
	})
}

// throttle passes every chunk through the migration's limit and the
// agent's, which two migrations share: the node bucket sees both
// migrations' bytes, and each device counts its own stalls.
func TestThrottleSharesTheNodeLimit(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		a := &Agent{nodeBandwidth: newBandwidthLimit(2 * MinBandwidth)}
		newMig := func(bps uint64) (*migration, *srcDevice) {
			return &migration{a: a, bandwidth: newBandwidthLimit(bps)}, &srcDevice{}
		}
		m1, d1 := newMig(0)
		m2, d2 := newMig(MinBandwidth)
		const chunk, chunks = 200_000, 10
		send := func(m *migration, d *srcDevice) {
			for range chunks {
				ch := &outChunk{dev: d, payload: mem.SliceBuffer(make([]byte, chunk))}
				if err := m.throttle(t.Context(), ch); err != nil {
					t.Error(err)
					return
				}
			}
		}
		start := time.Now()
		done := make(chan struct{})
		go func() { send(m1, d1); done <- struct{}{} }()
		go func() { send(m2, d2); done <- struct{}{} }()
		<-done
		<-done
		if got, want := a.nodeBandwidth.bytes.Load(), uint64(2*chunk*chunks); got != want {
			t.Errorf("node limit admitted %d bytes, want both migrations' %d", got, want)
		}
		for i, m := range []*migration{m1, m2} {
			if got := m.limitedBytes.Load(); got != chunk*chunks {
				t.Errorf("migration %d limited bytes = %d, want %d", i+1, got, chunk*chunks)
			}
		}
		if m1.bandwidth.stalls.Load() != 0 || m2.bandwidth.stalls.Load() == 0 {
			t.Errorf("own-limit stalls = %d, %d; want 0 for the unlimited migration, some for the limited one",
				m1.bandwidth.stalls.Load(), m2.bandwidth.stalls.Load())
		}
		if d1.bwStalls.Load() == 0 || d2.bwStalls.Load() == 0 {
			t.Errorf("device bandwidth stalls = %d, %d; want both to have waited on the shared limit", d1.bwStalls.Load(), d2.bwStalls.Load())
		}
		// 4 MB through a 2 MB/s node limit: no faster than it.
		if got, least := time.Since(start), time.Duration(float64(2*chunk*chunks-burstOf(2*MinBandwidth))/(2*MinBandwidth)*float64(time.Second)); got < least {
			t.Errorf("both migrations took %v, less than the node limit allows (%v)", got, least)
		}
		// An END (no payload) is never held.
		if err := m2.throttle(t.Context(), &outChunk{dev: d2}); err != nil {
			t.Fatal(err)
		}
	})
}

func TestValidateBandwidth(t *testing.T) {
	for _, ok := range []uint64{0, MinBandwidth, 1 << 40} {
		if err := validateBandwidth("max_bandwidth", ok); err != nil {
			t.Errorf("validateBandwidth(%d) = %v", ok, err)
		}
	}
	err := validateBandwidth("max_bandwidth", MinBandwidth-1)
	if wire.Code(err) != codes.InvalidArgument || wire.Reason(err) != wire.ReasonInvalidArgument {
		t.Errorf("validateBandwidth(below the least) = %v, want INVALID_ARGUMENT", err)
	}
}

func TestCapThroughput(t *testing.T) {
	for _, c := range []struct {
		measured float64
		limit    uint64
		want     float64
	}{{5e8, 0, 5e8}, {5e8, 1e8, 1e8}, {5e7, 1e8, 5e7}} {
		if got := capThroughput(c.measured, c.limit); got != c.want {
			t.Errorf("capThroughput(%v, %d) = %v, want %v", c.measured, c.limit, got, c.want)
		}
	}
}

// SetBandwidth and StartMigration refuse a limit below the least with
// INVALID_ARGUMENT, an unknown migration with NOT_FOUND, and an agent
// refuses a node-wide limit below it.
func TestBandwidthRequests(t *testing.T) {
	a, _ := sourceAgent(t, Config{})
	_, err := a.SetBandwidth(t.Context(), &ferryv1.SetBandwidthRequest{MigrationId: "m1", MaxBandwidth: 10})
	if wire.Code(err) != codes.InvalidArgument {
		t.Errorf("SetBandwidth(10 B/s) = %v, want INVALID_ARGUMENT", err)
	}
	_, err = a.SetBandwidth(t.Context(), &ferryv1.SetBandwidthRequest{MigrationId: "m1", MaxBandwidth: 0})
	if wire.Code(err) != codes.NotFound {
		t.Errorf("SetBandwidth(unknown) = %v, want NOT_FOUND", err)
	}
	_, err = a.StartMigration(t.Context(), &ferryv1.StartMigrationRequest{
		MigrationId: "m1", DestAddress: "127.0.0.1:1", Token: "token", MaxBandwidth: MinBandwidth - 1,
		Devices: []*ferryv1.DevicePair{{SourceDevice: "sim:size=1MiB,seed=1", DestDevice: "sim:size=1MiB,seed=1"}},
	})
	if wire.Code(err) != codes.InvalidArgument || wire.Reason(err) != wire.ReasonInvalidArgument {
		t.Errorf("StartMigration(max_bandwidth below the least) = %v, want INVALID_ARGUMENT", err)
	}
	if _, err := New(Config{Registry: vfio.NewRegistry(vfio.RegistryOptions{}), PeerCreds: insecure.NewCredentials(), MaxBandwidth: 1}); err == nil {
		t.Error("New took a node-wide limit of 1 B/s")
	}
}
