package source

import (
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
)

// TestInflightLimit drives the in-flight estimator through the paths a
// migration meets and checks the limit it keeps: the floor on a short
// path, twice the bandwidth-delay product on a long one, never more than
// the cap, and the whole cap for a destination without prompt feedback.
func TestInflightLimit(t *testing.T) {
	const (
		mib   = 1 << 20
		chunk = 1 * mib
		cap64 = 64 * mib
	)
	// ack is one acknowledgement: at (since the start), the frontier at
	// offset, the newest acknowledged chunk's round trip (0: resent).
	type ack struct {
		at     time.Duration
		offset uint64
		rtt    time.Duration
	}
	// steady acknowledges at rate bytes per second every step for d, each
	// ack's chunk having taken rtt.
	steady := func(rate uint64, rtt, step, d time.Duration) []ack {
		var out []ack
		for at := time.Duration(0); at <= d; at += step {
			out = append(out, ack{at: at, offset: rate * uint64(at) / uint64(time.Second), rtt: rtt})
		}
		return out
	}
	tests := []struct {
		name   string
		ceil   uint64
		chunk  uint64
		prompt bool
		acks   []ack
		want   uint64
	}{
		{
			name: "before any acknowledgement the floor", ceil: cap64, chunk: chunk, prompt: true,
			want: 16 * mib,
		},
		{
			name: "an old destination gets the whole cap", ceil: cap64, chunk: chunk, prompt: false,
			acks: steady(3e9, 200*time.Microsecond, time.Millisecond, time.Second),
			want: cap64,
		},
		{
			// 3 GB/s over 0.2 ms is 0.6 MB: loopback needs little.
			name: "a short path keeps the floor", ceil: cap64, chunk: chunk, prompt: true,
			acks: steady(3e9, 200*time.Microsecond, time.Millisecond, time.Second),
			want: 16 * mib,
		},
		{
			// 1 GB/s over 10 ms is 10 MB; twice that is kept.
			name: "a long path keeps twice its bandwidth-delay product", ceil: cap64, chunk: chunk, prompt: true,
			acks: steady(1e9, 10*time.Millisecond, 5*time.Millisecond, time.Second),
			want: 20_000_000,
		},
		{
			// 1 GB/s over 50 ms is 50 MB: twice is above the cap.
			name: "never more than the cap", ceil: cap64, chunk: chunk, prompt: true,
			acks: steady(1e9, 50*time.Millisecond, 5*time.Millisecond, time.Second),
			want: cap64,
		},
		{
			name: "a cap below the floor is the limit", ceil: 4 * mib, chunk: chunk, prompt: true,
			want: 4 * mib,
		},
		{
			// Four 16 MiB chunks: the floor holds at least four chunks.
			name: "the floor holds four chunks", ceil: 256 * mib, chunk: 16 * mib, prompt: true,
			want: 64 * mib,
		},
		{
			// Queues lengthen later round trips: the shortest one counts.
			name: "the shortest round trip counts", ceil: cap64, chunk: chunk, prompt: true,
			acks: append(steady(1e9, 10*time.Millisecond, 5*time.Millisecond, 500*time.Millisecond),
				ack{at: 600 * time.Millisecond, offset: 600_000_000, rtt: 40 * time.Millisecond}),
			want: 20_000_000,
		},
		{
			// Resent chunks give no round trip; the rate alone is no
			// product.
			name: "resent chunks alone measure no round trip", ceil: cap64, chunk: chunk, prompt: true,
			acks: steady(1e9, 0, 5*time.Millisecond, time.Second),
			want: 16 * mib,
		},
		{
			// A burst of acknowledgements closer together than
			// rateInterval is no bandwidth sample: 64 MiB acknowledged in
			// 1 ms would read as 67 GB/s.
			name: "a burst shorter than the rate interval is no rate", ceil: cap64, chunk: chunk, prompt: true,
			acks: []ack{
				{at: 0, offset: 0, rtt: 10 * time.Millisecond},
				{at: time.Millisecond, offset: cap64, rtt: 10 * time.Millisecond},
			},
			want: 16 * mib,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newInflight(tt.ceil, tt.chunk, tt.prompt)
			for _, a := range tt.acks {
				f.acked(a.at, a.offset, a.rtt)
			}
			// Within a millionth: the rate is a float.
			if got := f.limit(); got < tt.want-tt.want/1e6 || got > tt.want+tt.want/1e6 {
				t.Errorf("limit = %d, want %d (min round trip %v, max rate %.0f B/s)", got, tt.want, f.minRTT, f.maxRate)
			}
		})
	}
}

// TestSourceKeepsItsInFlightLimit: to a destination that acknowledges
// nothing, the source sends its in-flight limit of a 48 MiB window when
// the destination updates promptly, and the whole window when it is an
// older one that updates every quarter window.
func TestSourceKeepsItsInFlightLimit(t *testing.T) {
	const chunk = 1 << 20
	const window = 48 << 20
	tests := []struct {
		name     string
		withhold []ferryv1.Feature
		want     uint64
	}{
		{"prompt feedback", nil, inflightFloor},
		{"an older destination", []ferryv1.Feature{ferryv1.Feature_FEATURE_PROMPT_FEEDBACK}, window},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			held := make(chan struct{})
			var got atomic.Uint64
			open := []*ferryv1.WindowUpdate{{LimitSeq: 1 << 20, LimitOffset: window}}
			f := &fakeDest{windows: open, withhold: tt.withhold}
			f.channel = func(n int, st grpc.BidiStreamingServer[ferryv1.ChannelRequest, ferryv1.ChannelResponse]) error {
				if err := st.Send(&ferryv1.ChannelResponse{Windows: open}); err != nil {
					return err
				}
				for {
					req, err := st.Recv()
					if err != nil {
						return err
					}
					if got.Add(uint64(len(req.GetData()))) == tt.want {
						close(held)
					}
				}
			}
			a, _ := sourceAgent(t, Config{ReconnectTimeout: time.Hour, ProgressTimeout: time.Hour})
			start(t, a, "held", serveFake(t, f), hostileSpec, chunk, time.Hour)
			m, err := a.lookup("held")
			if err != nil {
				t.Fatal(err)
			}
			select {
			case <-held:
			case <-m.done:
				snap, _, _ := m.snapshot()
				t.Fatalf("the migration ended before it sent %d bytes: %v %v", tt.want, snap.GetPhase(), snap.GetError())
			}
			if w := m.devs[0].gate.Window(); w.LimitOffset != tt.want {
				t.Errorf("the source's window reaches byte %d, want %d", w.LimitOffset, tt.want)
			}
			snap, _, _ := m.snapshot()
			if got := snap.GetDevices()[0].GetInFlightLimitBytes(); got != tt.want {
				t.Errorf("status says the in-flight limit is %d bytes, want %d", got, tt.want)
			}
			if _, err := a.CancelMigration(t.Context(), &ferryv1.CancelMigrationRequest{MigrationId: "held"}); err != nil {
				t.Fatal(err)
			}
			waitEnd(t, a, "held")
			if n := got.Load(); n != tt.want {
				t.Errorf("the source sent %d bytes unacknowledged, want %d", n, tt.want)
			}
		})
	}
}
