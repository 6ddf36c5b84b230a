package main

import (
	"fmt"
	"io"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc/codes"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/size"
)

func phaseName(p ferryv1.MigrationPhase) string {
	return strings.TrimPrefix(p.String(), "MIGRATION_PHASE_")
}

func stateName(s ferryv1.DeviceState) string {
	return strings.TrimPrefix(s.String(), "DEVICE_STATE_")
}

func codeName(c int32) string {
	return strings.ToUpper(codes.Code(c).String())
}

// progressView draws a migration's progress: on a terminal one live line
// per device (bytes, rate, ETA) redrawn in place; elsewhere a plain line
// per phase change and at most one every few seconds.
type progressView struct {
	w   io.Writer
	tty bool

	mu        sync.Mutex
	drawn     int
	phase     ferryv1.MigrationPhase
	lastPlain time.Time
	prevBytes []uint64
	prevTime  time.Time
	rates     []float64
}

func newProgressView(w io.Writer) *progressView {
	return &progressView{w: w, tty: isTerminal(w)}
}

// update draws the state m.
func (v *progressView) update(m *ferryv1.Migration) {
	v.mu.Lock()
	defer v.mu.Unlock()
	now := time.Now()
	devs := m.GetDevices()
	if len(v.prevBytes) != len(devs) {
		v.prevBytes = make([]uint64, len(devs))
		v.rates = make([]float64, len(devs))
		v.prevTime = now
	}
	if dt := now.Sub(v.prevTime).Seconds(); dt > 0.05 {
		for i, d := range devs {
			inst := float64(d.GetBytes()-min(d.GetBytes(), v.prevBytes[i])) / dt
			v.rates[i] = 0.5*v.rates[i] + 0.5*inst
			v.prevBytes[i] = d.GetBytes()
		}
		v.prevTime = now
	}
	if v.tty {
		v.drawTTY(m)
		return
	}
	if m.GetPhase() != v.phase || now.Sub(v.lastPlain) >= 2*time.Second {
		v.phase = m.GetPhase()
		v.lastPlain = now
		var b strings.Builder
		fmt.Fprintf(&b, "%s %s", m.GetId(), phaseName(m.GetPhase()))
		for i, d := range devs {
			fmt.Fprintf(&b, "  [%d] %s/%s", i, size.Format(d.GetBytes()), totalText(d))
		}
		fmt.Fprintln(v.w, b.String())
	}
}

func totalText(d *ferryv1.DeviceProgress) string {
	if d.GetTotalBytes() == 0 {
		return "?"
	}
	return size.Format(d.GetTotalBytes())
}

func (v *progressView) drawTTY(m *ferryv1.Migration) {
	var b strings.Builder
	if v.drawn > 0 {
		fmt.Fprintf(&b, "\x1b[%dA", v.drawn)
	}
	fmt.Fprintf(&b, "\x1b[2K%s  %s\n", m.GetId(), phaseName(m.GetPhase()))
	for i, d := range m.GetDevices() {
		frac := 0.0
		if t := d.GetTotalBytes(); t > 0 {
			frac = min(1, float64(d.GetBytes())/float64(t))
		}
		const width = 24
		filled := int(frac * width)
		bar := strings.Repeat("#", filled) + strings.Repeat(".", width-filled)
		eta := "-"
		if r := v.rates[i]; r > 0 && d.GetTotalBytes() > d.GetBytes() {
			eta = (time.Duration(float64(d.GetTotalBytes()-d.GetBytes())/r*1e9) * time.Nanosecond).Round(100 * time.Millisecond).String()
		}
		fmt.Fprintf(&b, "\x1b[2K  %-28s [%s] %3.0f%% %9s/%-9s %12s  ETA %-6s %s\n",
			shorten(d.GetDevice(), 28), bar, frac*100, size.Format(d.GetBytes()), totalText(d),
			size.FormatRate(v.rates[i]), eta, stateName(d.GetState()))
	}
	v.drawn = 1 + len(m.GetDevices())
	io.WriteString(v.w, b.String())
}

func shorten(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n-1] + "…"
}

// printSummary prints a result for people.
func printSummary(w io.Writer, r *result) {
	verdict := "VERIFIED"
	if !r.Verified {
		verdict = "NOT VERIFIED"
	}
	fmt.Fprintf(w, "migration %s: %s (%s)\n", r.MigrationID, r.Phase, verdict)
	fmt.Fprintf(w, "  bytes        %s (%d) in %d device(s)\n", size.Format(r.Bytes), r.Bytes, r.Devices)
	path := "in gRPC messages"
	if r.DirectData {
		path = "on direct data connections"
	}
	fmt.Fprintf(w, "  channels     %d, chunks of %s %s\n", r.Channels, size.Format(uint64(r.ChunkSize)), path)
	if r.Verified {
		fmt.Fprintf(w, "  duration     %.3fs\n", r.DurationSeconds)
		fmt.Fprintf(w, "  throughput   %s\n", size.FormatRate(r.ThroughputBytesPerSecond))
	}
	fmt.Fprintf(w, "  downtime     %.3fs (switchover start to verdict)\n", r.DowntimeSeconds)
	fmt.Fprintf(w, "  dest buffer  peak %s of a %s window\n", size.Format(r.DestPeakBufferedBytes), size.Format(r.WindowBytes))
	for _, d := range r.DeviceResults {
		line := fmt.Sprintf("  %s -> %s: %s, source %s, destination %s", d.Source, d.Dest, size.Format(d.Bytes), d.SourceState, d.DestState)
		if d.Verified {
			line += ", verified"
		}
		fmt.Fprintln(w, line)
		if d.Error != "" {
			fmt.Fprintf(w, "    error: %s\n", d.Error)
		}
	}
	if r.Error != nil {
		fmt.Fprintf(w, "  error        %s (%s, %s)\n", r.Error.Message, r.Error.Code, r.Error.Reason)
	}
}
