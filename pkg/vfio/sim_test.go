package vfio

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"slices"
	"strings"
	"testing"
	"testing/synctest"
	"time"
)

// The simulated device must obey the kernel's rules for a migration driver
// (vfio-uapi.md §4 and §5); tests cite the rule they check.

// newSim parses spec and opens a simulated device on it.
func newSim(t testing.TB, spec string) *SimDevice {
	t.Helper()
	s, err := ParseSpec(spec)
	if err != nil {
		t.Fatal(err)
	}
	d, err := NewSim(s)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

// setState moves d to target and fails the test on error.
func setState(t testing.TB, d Device, target State) DataStream {
	t.Helper()
	ds, err := d.SetState(target)
	if err != nil {
		t.Fatalf("SetState(%v): %v", target, err)
	}
	return ds
}

// wantState fails the test unless d is in state want.
func wantState(t testing.TB, d Device, want State) {
	t.Helper()
	if got, err := d.State(); err != nil || got != want {
		t.Fatalf("State() = %v, %v; want %v", got, err, want)
	}
}

// readAll reads r to io.EOF with reads of at most chunk bytes.
func readAll(t testing.TB, r io.Reader, chunk int) []byte {
	t.Helper()
	var out []byte
	buf := make([]byte, chunk)
	for {
		n, err := r.Read(buf)
		out = append(out, buf[:n]...)
		if err == io.EOF {
			return out
		}
		if err != nil {
			t.Fatalf("read at %d: %v", len(out), err)
		}
	}
}

// writeAll writes p to w in writes of at most chunk bytes.
func writeAll(t testing.TB, w io.Writer, p []byte, chunk int) {
	t.Helper()
	for len(p) > 0 {
		n := min(chunk, len(p))
		if m, err := w.Write(p[:n]); err != nil || m != n {
			t.Fatalf("write of %d: %d, %v", n, m, err)
		}
		p = p[n:]
	}
}

// saveState reads the whole STOP_COPY state of d and returns d to RUNNING.
func saveState(t testing.TB, d Device, chunk int) []byte {
	t.Helper()
	ds := setState(t, d, StateStopCopy)
	defer ds.Close()
	state := readAll(t, ds, chunk)
	setState(t, d, StateRunning)
	return state
}

// TestSimRoundTrip migrates the state of a source device into a
// destination with the same spec through reads and writes of many sizes,
// aligned and not, and checks the destination accepts it at RESUMING ->
// STOP (§5.3: "any chunking of the stream is accepted").
func TestSimRoundTrip(t *testing.T) {
	sizes := []uint64{1, 7, 8, 4095, 4096, 4097, 100003, 1<<20 + 13}
	chunks := []struct{ read, write int }{
		{1, 1}, {3, 5}, {4096, 4096}, {65537, 1000}, {1 << 21, 1 << 21},
	}
	for _, zero := range []string{"", ",zero=0.5"} {
		for _, size := range sizes {
			for _, c := range chunks {
				if size > 1<<17 && c.read < 4096 {
					continue // byte-sized chunks of a MiB only take time
				}
				spec := fmt.Sprintf("sim:size=%d,seed=42%s", size, zero)
				t.Run(fmt.Sprintf("%s/read=%d,write=%d", spec, c.read, c.write), func(t *testing.T) {
					roundTrip(t, spec, c.read, c.write)
				})
			}
		}
	}
}

func roundTrip(t *testing.T, spec string, readChunk, writeChunk int) {
	src, dst := newSim(t, spec), newSim(t, spec)
	state := saveState(t, src, readChunk)
	if uint64(len(state)) != src.spec.Sim.Size {
		t.Fatalf("read %d bytes, want %d", len(state), src.spec.Sim.Size)
	}
	ws := setState(t, dst, StateResuming)
	writeAll(t, ws, state, writeChunk)
	ws.Close()
	setState(t, dst, StateStop)
	if !dst.Verified() || dst.Written() != uint64(len(state)) {
		t.Errorf("Verified() = %v, Written() = %d; want true, %d", dst.Verified(), dst.Written(), len(state))
	}
	setState(t, dst, StateRunning)
}

// TestSimContent checks the generator: filling in pieces at any offset
// gives the same bytes as filling at once, and mismatch finds a changed
// byte at its exact offset, in generated and in zero pages.
func TestSimContent(t *testing.T) {
	for _, zero := range []float64{0, 0.5, 1} {
		c := newContent(SimConfig{Seed: 9, ZeroFraction: zero})
		const off, n = 13, 3*simPageSize + 27
		whole := make([]byte, n)
		c.fill(whole, off)
		pieces := make([]byte, n)
		for i := 0; i < n; {
			k := min(1+i%11, n-i)
			c.fill(pieces[i:i+k], off+uint64(i))
			i += k
		}
		if !bytes.Equal(whole, pieces) {
			t.Fatalf("zero=%v: piecewise fill differs", zero)
		}
		if i := c.mismatch(whole, off); i != -1 {
			t.Fatalf("zero=%v: mismatch of own content = %d", zero, i)
		}
		for _, k := range []int{0, 1, 2, 3, 7, 8, 9, 4082, 4083, 4095, 8000, n - 1} {
			whole[k] ^= 0x40
			if i := c.mismatch(whole, off); i != k {
				t.Errorf("zero=%v: byte %d changed, mismatch = %d", zero, k, i)
			}
			if i := c.mismatch(whole[k:], off+uint64(k)); i != 0 {
				t.Errorf("zero=%v: from byte %d, mismatch = %d, want 0", zero, k, i)
			}
			whole[k] ^= 0x40
		}
	}
}

// TestSimZeroFraction checks that about the requested fraction of 4 KiB
// pages is all zero, and no others.
func TestSimZeroFraction(t *testing.T) {
	tests := []struct {
		zero     string
		min, max int // zero pages of 1024
	}{
		{"0", 0, 0},
		{"0.3", 250, 360},
		{"0.5", 450, 575},
		{"1", 1024, 1024},
	}
	for _, tt := range tests {
		d := newSim(t, "sim:size=4MiB,seed=5,zero="+tt.zero)
		state := saveState(t, d, 1<<20)
		zeros := 0
		for page := range slices.Chunk(state, simPageSize) {
			if firstNonZero(page) < 0 {
				zeros++
			}
		}
		if zeros < tt.min || zeros > tt.max {
			t.Errorf("zero=%s: %d zero pages of 1024, want %d..%d", tt.zero, zeros, tt.min, tt.max)
		}
	}
}

// TestSimVerifyFails checks §5.3: "RESUMING→STOP must fail if the written
// data is incomplete, inconsistent or invalid"; the state stays RESUMING
// (mtty) until a reset (§5.3: "To abort a RESUMING session the device must
// be reset").
func TestSimVerifyFails(t *testing.T) {
	tests := []struct {
		name   string
		src    string
		flip   int // byte to corrupt, or -1
		length int // bytes to write, or -1 for all
		want   string
	}{
		{"other-seed", "sim:size=512KiB,seed=7", -1, -1,
			"sim:size=512KiB,seed=8: state mismatch at byte 0 (stream is not this device's state)"},
		{"corrupt", "sim:size=512KiB,seed=8", 12345, -1,
			"sim:size=512KiB,seed=8: state mismatch at byte 12345 (stream corrupt or out of order)"},
		{"short", "sim:size=512KiB,seed=8", -1, 100,
			"sim:size=512KiB,seed=8: short stream: 100 of 524288 bytes"},
		{"empty", "sim:size=512KiB,seed=8", -1, 0,
			"sim:size=512KiB,seed=8: short stream: 0 of 524288 bytes"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			src, dst := newSim(t, tt.src), newSim(t, "sim:seed=8,size=512KiB")
			state := saveState(t, src, 4<<20)
			if tt.flip >= 0 {
				state[tt.flip] ^= 1
			}
			if tt.length >= 0 {
				state = state[:tt.length]
			}
			ws := setState(t, dst, StateResuming)
			writeAll(t, ws, state, 1<<20)
			_, err := dst.SetState(StateStop)
			if !errors.Is(err, ErrVerify) || !strings.HasPrefix(err.Error(), tt.want) {
				t.Fatalf("RESUMING -> STOP: %v, want %q wrapping ErrVerify", err, tt.want)
			}
			wantState(t, dst, StateResuming)
			if dst.Verified() {
				t.Error("Verified() after a failed RESUMING -> STOP")
			}
			if err := dst.Reset(); err != nil {
				t.Fatal(err)
			}
			wantState(t, dst, StateRunning)
		})
	}
}

// TestSimShortStreamCompleted checks that a failed RESUMING -> STOP keeps
// the session (mtty keeps its file enabled): the rest of the stream can
// still be written and the next STOP succeeds.
func TestSimShortStreamCompleted(t *testing.T) {
	spec := "sim:size=512,seed=3"
	src, dst := newSim(t, spec), newSim(t, spec)
	state := saveState(t, src, 64)
	ws := setState(t, dst, StateResuming)
	writeAll(t, ws, state[:100], 100)
	_, err := dst.SetState(StateStop)
	if want := "sim:size=512,seed=3: short stream: 100 of 512 bytes"; !errors.Is(err, ErrVerify) ||
		!strings.HasPrefix(err.Error(), want) {
		t.Fatalf("RESUMING -> STOP: %v, want %q", err, want)
	}
	writeAll(t, ws, state[100:], 1000)
	setState(t, dst, StateStop)
	if !dst.Verified() {
		t.Error("not Verified() after the stream was completed")
	}
}

// TestSimTooLong checks §5.3: drivers reject writes past their state size
// with ENOMEM, accepting nothing of the write.
func TestSimTooLong(t *testing.T) {
	spec := "sim:size=1000,seed=1"
	src, dst := newSim(t, spec), newSim(t, spec)
	state := saveState(t, src, 1000)
	ws := setState(t, dst, StateResuming)

	n, err := ws.Write(append(slices.Clone(state), 0))
	if !errors.Is(err, ErrStreamTooLong) || n != 0 || dst.Written() != 0 {
		t.Fatalf("write of size+1: %d, %v, Written() = %d; want 0, ErrStreamTooLong, 0", n, err, dst.Written())
	}
	writeAll(t, ws, state, 999)
	if n, err := ws.Write([]byte{0}); !errors.Is(err, ErrStreamTooLong) || n != 0 {
		t.Fatalf("write past the end: %d, %v; want 0, ErrStreamTooLong", n, err)
	}
	setState(t, dst, StateStop)
}

// TestSimFault checks fault injection: the read that would cross the
// fault offset stops short of it, and every later read fails.
func TestSimFault(t *testing.T) {
	d := newSim(t, "sim:size=4096,seed=2,fault=1000")
	rs := setState(t, d, StateStopCopy)
	want := make([]byte, 1000)
	d.content.fill(want, 0)
	var got []byte
	buf := make([]byte, 512)
	for _, wantN := range []int{512, 488} {
		n, err := rs.Read(buf)
		if err != nil || n != wantN {
			t.Fatalf("read: %d, %v; want %d, nil", n, err, wantN)
		}
		got = append(got, buf[:n]...)
	}
	if !bytes.Equal(got, want) {
		t.Error("bytes before the fault differ from the device content")
	}
	for range 2 {
		if n, err := rs.Read(buf); !errors.Is(err, ErrInjectedFault) || n != 0 {
			t.Fatalf("read at the fault: %d, %v; want 0, ErrInjectedFault", n, err)
		}
	}
	setState(t, d, StateStop)
}

// TestSimStreamEnds checks §5.1: leaving STOP_COPY or RESUMING, and a
// reset, end the session and later reads and writes fail (ENODEV); a new
// STOP -> STOP_COPY opens a fresh stream from offset 0.
func TestSimStreamEnds(t *testing.T) {
	d := newSim(t, "sim:size=64KiB,seed=4")
	buf := make([]byte, 1000)

	old := setState(t, d, StateStopCopy)
	if _, err := old.Read(buf); err != nil {
		t.Fatal(err)
	}
	first := slices.Clone(buf)
	setState(t, d, StateStop)
	if n, err := old.Read(buf); !errors.Is(err, ErrStreamEnded) || n != 0 {
		t.Fatalf("read after STOP_COPY -> STOP: %d, %v; want ErrStreamEnded", n, err)
	}

	fresh := setState(t, d, StateStopCopy)
	if _, err := fresh.Read(buf); err != nil || !bytes.Equal(buf, first) {
		t.Fatalf("fresh stream: %v, same bytes as the first read: %v", err, bytes.Equal(buf, first))
	}
	if err := d.Reset(); err != nil {
		t.Fatal(err)
	}
	wantState(t, d, StateRunning)
	if _, err := fresh.Read(buf); !errors.Is(err, ErrStreamEnded) {
		t.Fatalf("read after reset: %v, want ErrStreamEnded", err)
	}

	ws := setState(t, d, StateResuming)
	if err := d.Reset(); err != nil {
		t.Fatal(err)
	}
	if _, err := ws.Write(buf); !errors.Is(err, ErrStreamEnded) {
		t.Fatalf("write after reset: %v, want ErrStreamEnded", err)
	}
}

// TestSimStreamMisuse checks the errors of a wrong-way stream and a
// handle closed by its caller.
func TestSimStreamMisuse(t *testing.T) {
	d := newSim(t, "sim:size=64KiB,seed=4")
	buf := make([]byte, 100)

	rs := setState(t, d, StateStopCopy)
	if _, err := rs.Write(buf); !errors.Is(err, ErrNotSupported) {
		t.Errorf("write on a saving stream: %v, want ErrNotSupported", err)
	}
	if err := errors.Join(rs.Close(), rs.Close()); err != nil {
		t.Errorf("Close twice: %v", err)
	}
	if _, err := rs.Read(buf); !errors.Is(err, fs.ErrClosed) {
		t.Errorf("read on a closed handle: %v, want fs.ErrClosed", err)
	}

	ws := setState(t, d, StateResuming)
	if _, err := ws.Read(buf); !errors.Is(err, ErrNotSupported) {
		t.Errorf("read on a resuming stream: %v, want ErrNotSupported", err)
	}
}

// TestSimArcs checks that SetState walks exactly the kernel's arcs (Path)
// for every reachable (current, target) pair of every flag combination,
// and returns a stream exactly when the last arc opens one (§4.3).
func TestSimArcs(t *testing.T) {
	for _, kt := range kernelTables {
		flags := strings.ReplaceAll(strings.ToLower(kt.flags.String()), "_", "")
		spec := "sim:size=100,seed=6,flags=" + flags
		d := newSim(t, spec)
		// A saved stream of the same spec: the raw state, or records
		// when the flags include precopy.
		state := saveState(t, newSim(t, spec), 7)
		var arcs []State
		d.arcHook = func(_, to State) { arcs = append(arcs, to) }
		for _, cur := range kt.cols {
			for _, target := range kt.cols {
				want, err := Path(kt.flags, cur, target)
				if err != nil {
					continue
				}
				// Reach cur, with a complete stream if it is RESUMING.
				if err := d.Reset(); err != nil {
					t.Fatal(err)
				}
				if ds := setState(t, d, cur); cur == StateResuming {
					writeAll(t, ds, state, len(state))
				}
				arcs = nil
				ds, err := d.SetState(target)
				if err != nil {
					t.Errorf("%v: %v -> %v: %v", kt.flags, cur, target, err)
					continue
				}
				if !slices.Equal(arcs, want) {
					t.Errorf("%v: %v -> %v walked %v, want %v", kt.flags, cur, target, arcs, want)
				}
				opens := len(want) > 0 && OpensStream(append([]State{cur}, want...)[len(want)-1], target)
				if (ds != nil) != opens {
					t.Errorf("%v: %v -> %v returned stream %v, want one: %v", kt.flags, cur, target, ds, opens)
				}
				wantState(t, d, target)
			}
		}
	}
}

// TestSimInvalidTransitions checks that refused requests (§4.4 EINVAL
// cells) leave the state alone.
func TestSimInvalidTransitions(t *testing.T) {
	tests := []struct {
		spec   string
		cur    State
		target State
	}{
		{"sim:size=1,flags=stopcopy", StateRunning, StateRunningP2P},
		{"sim:size=1", StateRunning, StatePreCopy},
		{"sim:size=1", StateRunning, StateError},
		{"sim:size=1", StateStop, State(8)},
		{"sim:size=1,flags=stopcopy|p2p|precopy", StateStopCopy, StatePreCopy},
		{"sim:size=1,flags=stopcopy|p2p|precopy", StateStopCopy, StatePreCopyP2P},
	}
	for _, tt := range tests {
		d := newSim(t, tt.spec)
		setState(t, d, tt.cur)
		if ds, err := d.SetState(tt.target); !errors.Is(err, ErrInvalidTransition) || ds != nil {
			t.Errorf("%s: %v -> %v: %v, %v; want ErrInvalidTransition", tt.spec, tt.cur, tt.target, ds, err)
		}
		wantState(t, d, tt.cur)
	}
}

// TestSimPreCopy checks the saving group (§5.1): RUNNING -> PRE_COPY opens
// a stream with no data yet (ErrNoData for "no data now", §5.2); PRE_COPY
// -> STOP_COPY keeps the same stream, which then carries the whole state.
func TestSimPreCopy(t *testing.T) {
	const spec = "sim:size=10000,seed=1,flags=stopcopy|p2p|precopy"
	d := newSim(t, spec)
	rs := setState(t, d, StatePreCopy)
	buf := make([]byte, 100)
	if n, err := rs.Read(buf); n != 0 || !errors.Is(err, ErrNoData) {
		t.Fatalf("read in PRE_COPY: %d, %v; want 0, ErrNoData", n, err)
	}
	if ds := setState(t, d, StateStopCopy); ds != nil {
		t.Fatal("PRE_COPY -> STOP_COPY returned a new stream")
	}
	saved := readAll(t, rs, 999)
	setState(t, d, StateRunning)
	loadInto(t, newSim(t, spec), saved, 333)

	// PRE_COPY -> RUNNING abandons the session.
	rs = setState(t, d, StatePreCopy)
	setState(t, d, StateRunning)
	if _, err := rs.Read(buf); !errors.Is(err, ErrStreamEnded) {
		t.Fatalf("read after PRE_COPY -> RUNNING: %v, want ErrStreamEnded", err)
	}
}

// TestSimClose checks that Close is idempotent, ends the stream and makes
// the device unusable.
func TestSimClose(t *testing.T) {
	d := newSim(t, "sim:size=100,seed=1")
	rs := setState(t, d, StateStopCopy)
	if err := errors.Join(d.Close(), d.Close()); err != nil {
		t.Fatalf("Close twice: %v", err)
	}
	if _, err := rs.Read(make([]byte, 10)); !errors.Is(err, ErrStreamEnded) {
		t.Errorf("read after Close: %v, want ErrStreamEnded", err)
	}
	if _, err := d.State(); !errors.Is(err, fs.ErrClosed) {
		t.Errorf("State after Close: %v, want fs.ErrClosed", err)
	}
	if _, err := d.SetState(StateStop); !errors.Is(err, fs.ErrClosed) {
		t.Errorf("SetState after Close: %v, want fs.ErrClosed", err)
	}
	if err := d.Reset(); !errors.Is(err, fs.ErrClosed) {
		t.Errorf("Reset after Close: %v, want fs.ErrClosed", err)
	}
}

// TestNewSimRejects checks that NewSim validates a hand-built Spec.
func TestNewSimRejects(t *testing.T) {
	for _, s := range []Spec{
		{Kind: SpecPCI},
		{Kind: SpecSim, Sim: SimConfig{Size: 0, Flags: FlagStopCopy}},
		{Kind: SpecSim, Sim: SimConfig{Size: 10, Flags: FlagP2P}},
		{Kind: SpecSim, Sim: SimConfig{Size: 10, Flags: FlagStopCopy, ZeroFraction: 2}},
		{Kind: SpecSim, Sim: SimConfig{Size: 10, Flags: FlagStopCopy, HasFault: true, FaultOffset: 10}},
	} {
		if _, err := NewSim(s); !errors.Is(err, ErrBadSpec) {
			t.Errorf("NewSim(%+v): %v, want ErrBadSpec", s, err)
		}
	}
}

// TestSimReadRate checks the read cap on a fake clock: reading N bytes at
// rate R takes N/R.
func TestSimReadRate(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		d := newSim(t, "sim:size=20MB,seed=1,rate=10MB/s")
		rs := setState(t, d, StateStopCopy)
		start := time.Now()
		got := readAll(t, rs, 1<<20)
		elapsed := time.Since(start)
		if len(got) != 20e6 {
			t.Fatalf("read %d bytes, want 20e6", len(got))
		}
		if want := 2 * time.Second; elapsed < want*99/100 || elapsed > want*101/100 {
			t.Errorf("20MB at 10MB/s took %v, want %v", elapsed, want)
		}
	})
}

// TestSimWriteRate checks the write cap on a fake clock, with writes larger
// than a pacing step.
func TestSimWriteRate(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		spec := "sim:size=3MB,seed=1,wrate=1MB/s"
		src, dst := newSim(t, spec), newSim(t, spec)
		state := saveState(t, src, 1<<20)
		ws := setState(t, dst, StateResuming)
		start := time.Now()
		writeAll(t, ws, state, 1<<20)
		elapsed := time.Since(start)
		if want := 3 * time.Second; elapsed < want*99/100 || elapsed > want*101/100 {
			t.Errorf("3MB at 1MB/s took %v, want %v", elapsed, want)
		}
		setState(t, dst, StateStop)
	})
}

// TestSimResetStopsPacedWrite checks that a reset ends a write sleeping in
// the rate cap within a pacing step, and the write reports the bytes it
// got in before.
func TestSimResetStopsPacedWrite(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		spec := "sim:size=1MB,seed=1,wrate=100kB/s"
		src, dst := newSim(t, spec), newSim(t, spec)
		state := saveState(t, src, 1<<20)
		ws := setState(t, dst, StateResuming)
		type result struct {
			n   int
			err error
			at  time.Duration
		}
		done := make(chan result)
		start := time.Now()
		go func() {
			n, err := ws.Write(state)
			done <- result{n, err, time.Since(start)}
		}()
		time.Sleep(105 * time.Millisecond)
		if err := dst.Reset(); err != nil {
			t.Fatal(err)
		}
		r := <-done
		if !errors.Is(r.err, ErrStreamEnded) || r.n < 10000 || r.n > 12000 || r.at > 120*time.Millisecond {
			t.Errorf("write ended with %d, %v after %v; want ~10kB, ErrStreamEnded, within a step of 105ms",
				r.n, r.err, r.at)
		}
	})
}

// TestSimConcurrentReset races reads against resets and state reads, for
// the race detector: a read after the end must fail, never race.
func TestSimConcurrentReset(t *testing.T) {
	d := newSim(t, "sim:size=64MiB,seed=1")
	for range 20 {
		rs := setState(t, d, StateStopCopy)
		done := make(chan error)
		go func() {
			buf := make([]byte, 64<<10)
			for {
				if _, err := rs.Read(buf); err != nil {
					done <- err
					return
				}
			}
		}()
		if _, err := d.State(); err != nil {
			t.Fatal(err)
		}
		if err := d.Reset(); err != nil {
			t.Fatal(err)
		}
		if err := <-done; !errors.Is(err, ErrStreamEnded) {
			t.Fatalf("reader ended with %v, want ErrStreamEnded", err)
		}
	}
}

// TestSimNoAllocs checks that reads and verified writes allocate nothing.
func TestSimNoAllocs(t *testing.T) {
	spec := "sim:size=1TiB,seed=1"
	src, dst := newSim(t, spec), newSim(t, spec)
	rs := setState(t, src, StateStopCopy)
	ws := setState(t, dst, StateResuming)
	buf := make([]byte, 64<<10)
	allocs := testing.AllocsPerRun(50, func() {
		if _, err := rs.Read(buf); err != nil {
			t.Fatal(err)
		}
		if _, err := ws.Write(buf); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Errorf("%v allocations per read and write, want 0", allocs)
	}
}

// BenchmarkSimRead measures generating the state: reads of 1 MiB.
func BenchmarkSimRead(b *testing.B) {
	d := newSim(b, "sim:size=1TiB,seed=1")
	rs := setState(b, d, StateStopCopy)
	buf := make([]byte, 1<<20)
	b.SetBytes(int64(len(buf)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := rs.Read(buf); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkSimVerifyWrite measures verifying writes of 1 MiB into a
// resuming device; the stream is reopened, off the clock, every 64 MiB.
func BenchmarkSimVerifyWrite(b *testing.B) {
	const size, chunk = 64 << 20, 1 << 20
	d := newSim(b, fmt.Sprintf("sim:size=%d,seed=1", size))
	state := make([]byte, size)
	d.content.fill(state, 0)
	ws := setState(b, d, StateResuming)
	off := 0
	b.SetBytes(chunk)
	b.ReportAllocs()
	for b.Loop() {
		if off == size {
			b.StopTimer()
			setState(b, d, StateStop)
			ws = setState(b, d, StateResuming)
			off = 0
			b.StartTimer()
		}
		if _, err := ws.Write(state[off : off+chunk]); err != nil {
			b.Fatal(err)
		}
		off += chunk
	}
}

// TestPacerCredit checks that time spent away from the stream (an
// oversleep) is not lost, up to one pacing step.
func TestPacerCredit(t *testing.T) {
	t0 := time.Unix(1000, 0)
	ms := time.Millisecond
	for _, tc := range []struct {
		name string
		// steps are (now offset, bytes) pairs admitted in order.
		steps []struct {
			at time.Duration
			n  uint64
		}
		want time.Duration // the last due, from t0
	}{
		{"back to back", []struct {
			at time.Duration
			n  uint64
		}{{10 * ms, 1000}, {10 * ms, 1000}, {10 * ms, 1000}}, 3 * ms},
		// Waking 2ms late, the next steps are already due: no sleep until
		// the credit is spent.
		{"an oversleep of 2ms is made up", []struct {
			at time.Duration
			n  uint64
		}{{10 * ms, 1000}, {13 * ms, 1000}, {13 * ms, 1000}}, 5 * ms},
		{"idle time earns at most one step", []struct {
			at time.Duration
			n  uint64
		}{{10 * ms, 1000}, {1000 * ms, 1000}}, 991 * ms},
	} {
		p := pacer{rate: 1e6} // 1000 bytes a millisecond
		var due time.Time
		for _, s := range tc.steps {
			due = p.admit(t0.Add(s.at), s.n)
		}
		if got := due.Sub(t0); got != tc.want {
			t.Errorf("%s: last due at %v, want %v", tc.name, got, tc.want)
		}
	}
}

// TestSimHang checks each "hang=": the operation blocks, holding no lock
// (State still answers), until Close ends it with fs.ErrClosed; a read or
// write first delivers the bytes before the offset.
func TestSimHang(t *testing.T) {
	tests := []struct {
		spec string
		run  func(t *testing.T, d *SimDevice) error // returns the hung call's error
	}{
		{"sim:size=64KiB,seed=1,hang=read@10000", func(t *testing.T, d *SimDevice) error {
			setState(t, d, StateStop)
			rs := setState(t, d, StateStopCopy)
			buf := make([]byte, 8192)
			for _, want := range []int{8192, 10000 - 8192} {
				if n, err := rs.Read(buf); n != want || err != nil {
					t.Errorf("read before the hang: %d, %v; want %d", n, err, want)
				}
			}
			_, err := rs.Read(buf)
			return err
		}},
		{"sim:size=64KiB,seed=1,hang=write@0", func(t *testing.T, d *SimDevice) error {
			setState(t, d, StateStop)
			ws := setState(t, d, StateResuming)
			_, err := ws.Write(make([]byte, 100))
			return err
		}},
		{"sim:size=64KiB,seed=1,hang=write@100", func(t *testing.T, d *SimDevice) error {
			setState(t, d, StateStop)
			ws := setState(t, d, StateResuming)
			src := make([]byte, 200)
			d.content.fill(src, 0)
			n, err := ws.Write(src)
			if n != 100 {
				t.Errorf("write accepted %d bytes before the hang, want 100", n)
			}
			return err
		}},
		{"sim:size=64KiB,seed=1,hang=state:STOP_COPY", func(t *testing.T, d *SimDevice) error {
			_, err := d.SetState(StateStopCopy)
			return err
		}},
		{"sim:size=64KiB,seed=1,hang=reset", func(t *testing.T, d *SimDevice) error {
			return d.Reset()
		}},
	}
	for _, tt := range tests {
		t.Run(tt.spec, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				d := newSim(t, tt.spec)
				done := make(chan error, 1)
				go func() { done <- tt.run(t, d) }()
				synctest.Wait()
				select {
				case err := <-done:
					t.Fatalf("did not hang: %v", err)
				default:
				}
				if _, err := d.State(); err != nil {
					t.Errorf("State during the hang: %v", err)
				}
				d.Close()
				if err := <-done; !errors.Is(err, fs.ErrClosed) {
					t.Errorf("hung call after Close: %v, want fs.ErrClosed", err)
				}
			})
		})
	}
}

// TestSimHangStatePath checks that a walk through the hung state takes
// the arcs before it.
func TestSimHangStatePath(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		d := newSim(t, "sim:size=1MiB,hang=state:STOP")
		done := make(chan error, 1)
		go func() { _, err := d.SetState(StateStopCopy); done <- err }()
		synctest.Wait()
		wantState(t, d, StateRunningP2P)
		d.Close()
		<-done
	})
}

// TestSimFail checks "fail=": the arc into the named state fails with
// ErrInjectedFault and leaves the device in ERROR, which only a reset
// leaves; with reset, the reset fails too and the device stays put.
func TestSimFail(t *testing.T) {
	d := newSim(t, "sim:size=1MiB,seed=1,fail=state:RUNNING")
	setState(t, d, StateStop)
	rs := setState(t, d, StateStopCopy)
	if _, err := d.SetState(StateRunning); !errors.Is(err, ErrInjectedFault) || !strings.Contains(err.Error(), "ERROR") {
		t.Fatalf("SetState(RUNNING): %v, want ErrInjectedFault saying ERROR", err)
	}
	wantState(t, d, StateError)
	if _, err := rs.Read(make([]byte, 8)); !errors.Is(err, ErrStreamEnded) {
		t.Errorf("read after entering ERROR: %v, want ErrStreamEnded", err)
	}
	if _, err := d.SetState(StateStop); !errors.Is(err, ErrInvalidTransition) {
		t.Errorf("SetState from ERROR: %v, want ErrInvalidTransition", err)
	}
	if err := d.Reset(); err != nil {
		t.Fatal(err)
	}
	wantState(t, d, StateRunning)

	d = newSim(t, "sim:size=1MiB,seed=1,flags=stopcopy,fail=state:RUNNING|reset")
	setState(t, d, StateStop)
	d.SetState(StateRunning)
	if err := d.Reset(); !errors.Is(err, ErrInjectedFault) {
		t.Fatalf("Reset: %v, want ErrInjectedFault", err)
	}
	wantState(t, d, StateError)
}
