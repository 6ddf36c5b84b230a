package main

import (
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"golang.org/x/term"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/size"
)

// phaseName is how the CLI names a phase: "PRECOPY", "READY", ...
func phaseName(p ferryv1.MigrationPhase) string {
	return strings.TrimPrefix(p.String(), "MIGRATION_PHASE_")
}

// precopying reports whether m streams while the VM runs: PRECOPY, or
// READY (the destination has loaded the initial data).
func precopying(m *ferryv1.Migration) bool {
	switch m.GetPhase() {
	case ferryv1.MigrationPhase_MIGRATION_PHASE_PRECOPY, ferryv1.MigrationPhase_MIGRATION_PHASE_READY:
		return true
	}
	return false
}

// precopyText is what the progress shows of a migration in pre-copy
// beside its phase: the predicted downtime (or why there is none), the
// bytes sent while the VM ran, and how fast the devices dirty their
// state. Empty outside pre-copy.
func precopyText(m *ferryv1.Migration) string {
	if !precopying(m) {
		return ""
	}
	pred := "no downtime prediction yet"
	switch {
	case m.GetPredictedDowntime() != nil:
		pred = "predicted downtime " + m.GetPredictedDowntime().AsDuration().Round(time.Millisecond).String()
		if m.GetPredictionNote() != "" {
			pred += " (" + m.GetPredictionNote() + ")"
		}
	case m.GetPredictionNote() != "":
		pred = "no downtime prediction: " + m.GetPredictionNote()
	}
	return fmt.Sprintf("%s, pre-copy %s, dirty %s", pred, size.Format(m.GetPrecopyBytes()), size.FormatRate(m.GetDirtyBytesPerSecond()))
}

// phaseText is the phase, with the pre-copy figures while it runs.
func phaseText(m *ferryv1.Migration) string {
	if t := precopyText(m); t != "" {
		return phaseName(m.GetPhase()) + "  " + t
	}
	return phaseName(m.GetPhase())
}

func stateName(s ferryv1.DeviceState) string {
	return strings.TrimPrefix(s.String(), "DEVICE_STATE_")
}

// progressView draws a migration's progress: on a terminal, lines per
// device (bytes, rate, ETA) redrawn in place and fitted to the terminal's
// width; elsewhere a plain line per phase change and at most one every
// few seconds.
type progressView struct {
	w     io.Writer
	tty   bool
	now   func() time.Time
	width func() int // the terminal's columns, read at every redraw

	mu        sync.Mutex
	drawn     int // lines drawn by the last redraw
	phase     ferryv1.MigrationPhase
	lastPlain time.Time
	devs      []deviceRate
	prevTime  time.Time
}

// deviceRate is what the view keeps of one device to show its rate.
type deviceRate struct {
	prevBytes uint64
	rate      float64 // smoothed bytes per second while it moves
	// first is when the device was first seen moving, and firstBytes its
	// bytes then.
	first      time.Time
	firstBytes uint64
	// done: the device read its whole state; final is then its average
	// rate from first to the moment it was seen done, shown from then on.
	done  bool
	final float64
}

func newProgressView(w io.Writer) *progressView {
	v := &progressView{w: w, tty: isTerminal(w), now: time.Now}
	v.width = func() int { return terminalWidth(w) }
	return v
}

// terminalWidth is the width of the terminal w (or stdout) draws on:
// its size, else $COLUMNS, else 80.
func terminalWidth(w io.Writer) int {
	for _, f := range []io.Writer{w, os.Stdout} {
		if f, ok := f.(*os.File); ok {
			if cols, _, err := term.GetSize(int(f.Fd())); err == nil && cols > 0 {
				return cols
			}
		}
	}
	return widthFromEnv(os.Getenv("COLUMNS"))
}

// widthFromEnv is the width $COLUMNS gives, 80 when it gives none.
func widthFromEnv(columns string) int {
	if n, err := strconv.Atoi(strings.TrimSpace(columns)); err == nil && n > 0 {
		return n
	}
	return 80
}

// note prints a line of its own above the progress lines.
func (v *progressView) note(msg string) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.tty && v.drawn > 0 {
		// Over the progress lines; the next update draws them below.
		fmt.Fprintf(v.w, "\x1b[%dA\x1b[J", v.drawn)
		v.drawn = 0
	}
	fmt.Fprintln(v.w, msg)
}

// update draws the state m.
func (v *progressView) update(m *ferryv1.Migration) {
	v.mu.Lock()
	defer v.mu.Unlock()
	now := v.now()
	devs := m.GetDevices()
	if len(v.devs) != len(devs) {
		v.devs = make([]deviceRate, len(devs))
		v.prevTime = now
	}
	dt := now.Sub(v.prevTime).Seconds()
	for i, d := range devs {
		r := &v.devs[i]
		b := d.GetBytes()
		if r.first.IsZero() && b > 0 {
			// Moving since the last update at the latest.
			r.first, r.firstBytes = v.prevTime, r.prevBytes
		}
		if dt > 0.05 && !r.done {
			inst := float64(b-min(b, r.prevBytes)) / dt
			r.rate = 0.5*r.rate + 0.5*inst
		}
		if !r.done && d.GetTotalBytes() > 0 && b >= d.GetTotalBytes() {
			r.done = true
			r.final = r.rate
			if span := now.Sub(r.first).Seconds(); !r.first.IsZero() && span > 0 {
				r.final = float64(b-min(b, r.firstBytes)) / span
			}
		}
	}
	if dt > 0.05 {
		for i, d := range devs {
			v.devs[i].prevBytes = d.GetBytes()
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
		fmt.Fprintf(&b, "%s %s", m.GetId(), phaseText(m))
		if w := m.GetWireBytes(); w != 0 && w != m.GetBytes() {
			fmt.Fprintf(&b, " (%s on the wire)", size.Format(w))
		}
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
	var lines []string
	width := v.width()
	head := m.GetId() + "  " + phaseText(m)
	if w := m.GetWireBytes(); w != 0 && w != m.GetBytes() {
		head += fmt.Sprintf("  (%s on the wire for %s of state)", size.Format(w), size.Format(m.GetBytes()))
	}
	lines = append(lines, elide(head, width-1))
	names := make([]string, len(m.GetDevices()))
	stats := make([]deviceStats, len(m.GetDevices()))
	for i, d := range m.GetDevices() {
		names[i] = d.GetDevice()
		stats[i] = v.stats(i, d)
	}
	lines = append(lines, fitDevices(width, names, stats)...)
	var b strings.Builder
	if v.drawn > 0 {
		fmt.Fprintf(&b, "\x1b[%dA", v.drawn)
	}
	for _, l := range lines {
		b.WriteString("\x1b[2K")
		b.WriteString(l)
		b.WriteByte('\n')
	}
	// Clear what a longer previous drawing left below.
	b.WriteString("\x1b[J")
	v.drawn = len(lines)
	io.WriteString(v.w, b.String())
}

// deviceStats is one device's figures as the progress lines show them.
type deviceStats struct {
	frac  float64 // of the total, 0 when unknown
	bytes string  // "1.2GiB/4GiB"
	rate  string
	eta   string // "ETA 3.2s", "done", or "" when unknown
	state string
}

func (v *progressView) stats(i int, d *ferryv1.DeviceProgress) deviceStats {
	s := deviceStats{bytes: size.Format(d.GetBytes()) + "/" + totalText(d), state: stateName(d.GetState())}
	if t := d.GetTotalBytes(); t > 0 {
		s.frac = min(1, float64(d.GetBytes())/float64(t))
	}
	r := v.devs[i]
	switch {
	case r.done:
		s.rate, s.eta = size.FormatRate(r.final), "done"
	case r.rate > 0 && d.GetTotalBytes() > d.GetBytes():
		s.rate = size.FormatRate(r.rate)
		s.eta = "ETA " + (time.Duration(float64(d.GetTotalBytes()-d.GetBytes())/r.rate*1e9) * time.Nanosecond).Round(100*time.Millisecond).String()
	default:
		s.rate = size.FormatRate(r.rate)
	}
	return s
}

// The progress bar's widths, in columns.
const (
	barMax = 24
	barMin = 8
)

// fitDevices lays out the devices' progress lines in width columns. Every
// line stays short of the last column (a line that fills it wraps on some
// terminals, and a redraw then leaves half-lines behind). Wide, a device
// is one line: its name (padded to the longest), a bar, the figures.
// Narrower, the bar shrinks and goes; when the names do not fit whole
// beside the figures, each name gets a line of its own above them, elided
// in the middle only when even that line is too short (so both ends of an
// mdev UUID stay).
func fitDevices(width int, names []string, stats []deviceStats) []string {
	avail := width - 1
	figures := make([]string, len(stats))
	longest := 0
	for i, s := range stats {
		figures[i] = strings.Join(nonEmpty(fmt.Sprintf("%3.0f%%", s.frac*100), s.bytes, s.rate, s.eta, s.state), " ")
		longest = max(longest, utf8.RuneCountInString(figures[i]))
	}
	nameW := 0
	for _, n := range names {
		nameW = max(nameW, utf8.RuneCountInString(n))
	}
	// "  " name " " [bar] " " figures
	rest := avail - 2 - 1 - longest
	var lines []string
	switch {
	case rest-nameW >= barMin+3:
		bar := min(barMax, rest-nameW-3)
		for i := range names {
			lines = append(lines, "  "+pad(names[i], nameW)+" "+progressBar(stats[i].frac, bar)+" "+figures[i])
		}
	case rest >= nameW:
		for i := range names {
			lines = append(lines, "  "+pad(names[i], nameW)+" "+figures[i])
		}
	default:
		for i := range names {
			lines = append(lines, "  "+elide(names[i], avail-2))
			lines = append(lines, elide("    "+figures[i], avail))
		}
	}
	return lines
}

func nonEmpty(fields ...string) []string {
	out := fields[:0]
	for _, f := range fields {
		if f != "" {
			out = append(out, f)
		}
	}
	return out
}

func progressBar(frac float64, width int) string {
	filled := int(frac * float64(width))
	return "[" + strings.Repeat("#", filled) + strings.Repeat(".", width-filled) + "]"
}

func pad(s string, n int) string {
	return s + strings.Repeat(" ", max(0, n-utf8.RuneCountInString(s)))
}

// elide shortens s to n columns by cutting its middle, so that both its
// start and its end stay readable.
func elide(s string, n int) string {
	r := []rune(s)
	if len(r) <= n {
		return s
	}
	if n <= 1 {
		return string(r[:max(0, n)])
	}
	head := (n - 1) / 2
	tail := n - 1 - head
	return string(r[:head]) + "…" + string(r[len(r)-tail:])
}

// printSummary prints a result for people.
func printSummary(w io.Writer, r *result) {
	verdict := "VERIFIED"
	if !r.Verified {
		verdict = "NOT VERIFIED"
	}
	fmt.Fprintf(w, "migration %s: %s (%s)\n", r.MigrationID, r.Phase, verdict)
	fmt.Fprintf(w, "  owner        %s\n", ownerText(r.Owner))
	fmt.Fprintf(w, "  bytes        %s (%d) in %d device(s)\n", size.Format(r.Bytes), r.Bytes, r.Devices)
	if r.WireBytes != 0 && r.WireBytes != r.Bytes {
		fmt.Fprintf(w, "  on the wire  %s (%.2f of the state: zero pages stayed home, or compression shrank them)\n", size.Format(r.WireBytes), float64(r.WireBytes)/float64(max(r.Bytes, 1)))
	}
	path := "in gRPC messages"
	if r.DirectData {
		path = "on direct data connections"
	}
	fmt.Fprintf(w, "  channels     %d, chunks of %s %s\n", r.Channels, size.Format(uint64(r.ChunkSize)), path)
	if r.DurationSeconds > 0 {
		fmt.Fprintf(w, "  duration     %.3fs (accepted to verdict)\n", r.DurationSeconds)
	}
	if r.Verified {
		fmt.Fprintf(w, "  transfer     %.3fs at %s (first chunk read to verdict)\n", r.TransferSeconds, size.FormatRate(r.ThroughputBytesPerSecond))
	}
	fmt.Fprintf(w, "  downtime     %.3fs (switchover start to the commit: the devices stopped)\n", r.DowntimeSeconds)
	if pre := r.Precopy; pre != nil {
		fmt.Fprintf(w, "  pre-copy     %s while the VM ran, %s after the devices stopped\n", size.Format(pre.PrecopyBytes), size.Format(pre.StopcopyBytes))
		predicted := "none"
		if pre.PredictedDowntimeSeconds != nil {
			predicted = fmt.Sprintf("%.3fs", *pre.PredictedDowntimeSeconds)
		}
		if pre.PredictionNote != "" {
			predicted += " (" + pre.PredictionNote + ")"
		}
		fmt.Fprintf(w, "  predicted    %s downtime (the last prediction before the switchover), measured %.3fs\n", predicted, r.DowntimeSeconds)
		trigger := pre.SwitchoverTrigger
		if trigger == "" {
			trigger = "none (the migration never switched over)"
		}
		fmt.Fprintf(w, "  switchover   %s\n", trigger)
	}
	fmt.Fprintf(w, "  dest buffer  peak %s of a %s window\n", size.Format(r.DestPeakBufferedBytes), size.Format(r.WindowBytes))
	for _, d := range r.DeviceResults {
		line := fmt.Sprintf("  %s -> %s: %s, source %s, destination %s", d.Source, d.Dest, size.Format(d.Bytes), d.SourceState, d.DestState)
		if d.Verified {
			line += ", verified"
		}
		if d.InFlightLimitBytes != 0 {
			line += fmt.Sprintf("; in flight at most %s", size.Format(d.InFlightLimitBytes))
			if d.MinRoundTripSeconds > 0 {
				line += fmt.Sprintf(" (round trip %s)", time.Duration(d.MinRoundTripSeconds*float64(time.Second)).Round(time.Microsecond))
			}
		}
		fmt.Fprintln(w, line)
		if d.Error != "" {
			fmt.Fprintf(w, "    error: %s\n", d.Error)
		}
	}
	if r.Error != nil {
		e := r.Error.Code
		if r.Error.Reason != "" {
			e += ", " + r.Error.Reason
		}
		fmt.Fprintf(w, "  error        %s (%s)\n", r.Error.Message, e)
	}
	if r.Next != "" {
		fmt.Fprintf(w, "  next         %s\n", r.Next)
	}
}

// ownerText says what the owner in a result means.
func ownerText(owner string) string {
	switch owner {
	case "SOURCE":
		return "SOURCE (the VM may run with the devices on the source host)"
	case "DESTINATION":
		return "DESTINATION (the migration committed: the VM may run on the destination host)"
	case "IN_DOUBT":
		return "IN_DOUBT (verified but not committed: the source decides)"
	}
	return owner + " (the source did not say)"
}
