package vfio

import (
	"encoding/binary"
	"errors"
	"testing"
	"testing/synctest"
	"time"
)

// loadInto writes a saved stream into d (RUNNING) in writes of chunk
// bytes and fails the test unless RESUMING -> STOP verifies it.
func loadInto(t testing.TB, d Device, saved []byte, chunk int) {
	t.Helper()
	if err := tryLoad(t, d, saved, chunk); err != nil {
		t.Fatalf("RESUMING -> STOP: %v", err)
	}
}

// tryLoad writes saved into d and returns the error of RESUMING -> STOP.
func tryLoad(t testing.TB, d Device, saved []byte, chunk int) error {
	t.Helper()
	ws := setState(t, d, StateResuming)
	defer ws.Close()
	writeAll(t, ws, saved, chunk)
	_, err := d.SetState(StateStop)
	return err
}

// precopyInfo asks ds for its pre-copy info and fails the test on error.
func precopyInfo(t testing.TB, ds DataStream) PrecopyInfo {
	t.Helper()
	pi, ok := ds.(PrecopyInfoer)
	if !ok {
		t.Fatalf("%T does not implement PrecopyInfoer", ds)
	}
	info, err := pi.PrecopyInfo()
	if err != nil {
		t.Fatalf("PrecopyInfo: %v", err)
	}
	return info
}

// readPrecopy reads ds in PRE_COPY until ErrNoData, in reads of chunk.
func readPrecopy(t testing.TB, ds DataStream, chunk int) []byte {
	t.Helper()
	var out []byte
	buf := make([]byte, chunk)
	for {
		n, err := ds.Read(buf)
		out = append(out, buf[:n]...)
		if errors.Is(err, ErrNoData) {
			return out
		}
		if err != nil {
			t.Fatalf("read in PRE_COPY at %d: %v", len(out), err)
		}
	}
}

// records splits a record stream into its records, header included.
func records(t testing.TB, stream []byte) [][]byte {
	t.Helper()
	var recs [][]byte
	for len(stream) > 0 {
		if len(stream) < recHeaderLen {
			t.Fatalf("%d bytes left, shorter than a header", len(stream))
		}
		n := recHeaderLen + int(binary.LittleEndian.Uint64(stream[8:]))
		recs, stream = append(recs, stream[:n]), stream[n:]
	}
	return recs
}

// distinctDirty is the number of pages the first events dirty events of
// seed rewrite.
func distinctDirty(seed, events, pages uint64) uint64 {
	seen := map[uint64]bool{}
	for k := range events {
		seen[dirtyPage(dirtyKey(seed), k, pages)] = true
	}
	return uint64(len(seen))
}

// TestSimPrecopyRules checks the pre-copy rules a driver obeys
// (vfio-uapi.md §3.3): ErrNoData (ENOMSG) when nothing is new,
// initial_bytes counting down as the stream is read, dirty_bytes growing
// as the running device rewrites pages it already sent, the info valid
// only in PRE_COPY(_P2P), and REINIT reported once.
func TestSimPrecopyRules(t *testing.T) {
	tests := []struct {
		name string
		spec string
		run  func(t *testing.T, d *SimDevice)
	}{
		{"no data", "sim:size=64KiB,flags=stopcopy|precopy", func(t *testing.T, d *SimDevice) {
			ds := setState(t, d, StatePreCopy)
			if got := precopyInfo(t, ds); got != (PrecopyInfo{}) {
				t.Errorf("info = %+v, want zero", got)
			}
			if n, err := ds.Read(make([]byte, 100)); n != 0 || !errors.Is(err, ErrNoData) {
				t.Errorf("read = %d, %v; want 0, ErrNoData", n, err)
			}
		}},
		{"initial counts down", "sim:size=64KiB,seed=3,flags=stopcopy|precopy,precopy=32KiB", func(t *testing.T, d *SimDevice) {
			ds := setState(t, d, StatePreCopy)
			if got := precopyInfo(t, ds).InitialBytes; got != 32<<10 {
				t.Fatalf("initial = %d, want %d", got, 32<<10)
			}
			readN(t, ds, recHeaderLen+1000)
			if got := precopyInfo(t, ds); got != (PrecopyInfo{InitialBytes: 32<<10 - 1000}) {
				t.Errorf("after 1000 data bytes info = %+v", got)
			}
			rest := readPrecopy(t, ds, 777)
			if got := precopyInfo(t, ds); got != (PrecopyInfo{}) {
				t.Errorf("after the initial data info = %+v, want zero", got)
			}
			if len(rest) != 32<<10-1000 {
				t.Errorf("read %d more bytes, want %d", len(rest), 32<<10-1000)
			}
		}},
		{"p2p keeps the session", "sim:size=16KiB,flags=stopcopy|p2p|precopy,precopy=16KiB", func(t *testing.T, d *SimDevice) {
			setState(t, d, StateRunningP2P)
			ds := setState(t, d, StatePreCopyP2P)
			readN(t, ds, 10)
			if s, err := d.SetState(StatePreCopy); err != nil || s != nil {
				t.Fatalf("PRE_COPY_P2P -> PRE_COPY: %v, %v", s, err)
			}
			if got := precopyInfo(t, ds).InitialBytes; got != 16<<10 {
				t.Errorf("initial = %d, want %d", got, 16<<10)
			}
		}},
		{"info only in pre-copy", "sim:size=16KiB,flags=stopcopy|p2p|precopy,precopy=4KiB", func(t *testing.T, d *SimDevice) {
			ds := setState(t, d, StatePreCopy)
			setState(t, d, StateStopCopy)
			if _, err := ds.(PrecopyInfoer).PrecopyInfo(); !errors.Is(err, ErrNotPreCopy) {
				t.Errorf("info in STOP_COPY: %v, want ErrNotPreCopy", err)
			}
			setState(t, d, StateRunning)
			if _, err := ds.(PrecopyInfoer).PrecopyInfo(); !errors.Is(err, ErrStreamEnded) {
				t.Errorf("info after the session: %v, want ErrStreamEnded", err)
			}
			ws := setState(t, d, StateResuming)
			if _, err := ws.(PrecopyInfoer).PrecopyInfo(); !errors.Is(err, ErrNotPreCopy) {
				t.Errorf("info on a resuming stream: %v, want ErrNotPreCopy", err)
			}
		}},
		{"stop-copy device", "sim:size=16KiB", func(t *testing.T, d *SimDevice) {
			ds := setState(t, d, StateStopCopy)
			if _, err := ds.(PrecopyInfoer).PrecopyInfo(); !errors.Is(err, ErrNotPreCopy) {
				t.Errorf("info in STOP_COPY: %v, want ErrNotPreCopy", err)
			}
		}},
		{"STOP_COPY -> PRE_COPY refused", "sim:size=16KiB,flags=stopcopy|p2p|precopy,precopy=8KiB", func(t *testing.T, d *SimDevice) {
			ds := setState(t, d, StatePreCopy)
			readN(t, ds, 100)
			setState(t, d, StateStopCopy)
			for _, target := range []State{StatePreCopy, StatePreCopyP2P} {
				if s, err := d.SetState(target); !errors.Is(err, ErrInvalidTransition) || s != nil {
					t.Errorf("STOP_COPY -> %v: %v, %v; want ErrInvalidTransition", target, s, err)
				}
			}
			wantState(t, d, StateStopCopy)
			rest := readAll(t, ds, 1000)
			setState(t, d, StateStop)
			first := append(make([]byte, 0, 100+len(rest)), saveHead(t, d.spec.String(), 100)...)
			loadInto(t, newSim(t, d.spec.String()), append(first, rest...), 4096)
		}},
		{"reinit", "sim:size=64KiB,seed=9,flags=stopcopy|precopy,precopy=32KiB,reinit=8000", func(t *testing.T, d *SimDevice) {
			ds := setState(t, d, StatePreCopy)
			if got := precopyInfo(t, ds); got.Reinit || got.InitialBytes != 32<<10 {
				t.Fatalf("info = %+v, want 32KiB initial and no reinit", got)
			}
			// The first record stops at the reinit offset, 8000 rounded
			// up to 8 KiB.
			readN(t, ds, recHeaderLen+8<<10)
			if got := precopyInfo(t, ds); got != (PrecopyInfo{InitialBytes: 32 << 10, Reinit: true}) {
				t.Errorf("at the reinit offset info = %+v, want 32KiB initial and reinit", got)
			}
			if got := precopyInfo(t, ds); got.Reinit {
				t.Error("reinit reported twice")
			}
		}},
		{"reinit at the end of the initial data", "sim:size=64KiB,seed=9,flags=stopcopy|precopy,precopy=32KiB,reinit=32KiB", func(t *testing.T, d *SimDevice) {
			ds := setState(t, d, StatePreCopy)
			readN(t, ds, recHeaderLen+32<<10)
			// The initial data is read whole before the new one appears.
			if got := precopyInfo(t, ds); got != (PrecopyInfo{}) {
				t.Fatalf("after the initial data info = %+v, want all zero", got)
			}
			readN(t, ds, 1)
			if got := precopyInfo(t, ds); !got.Reinit || got.InitialBytes != 32<<10 {
				t.Errorf("after the next read info = %+v, want a reinit and the new initial data", got)
			}
		}},
		{"data size counts what stop-copy would still return", "sim:size=64KiB,seed=9,flags=stopcopy|precopy,precopy=16KiB", func(t *testing.T, d *SimDevice) {
			if n, err := d.DataSize(); err != nil || n != 64<<10 {
				t.Fatalf("before pre-copy DataSize = %d, %v; want the size", n, err)
			}
			ds := setState(t, d, StatePreCopy)
			readN(t, ds, recHeaderLen+16<<10)
			if n, err := d.DataSize(); err != nil || n != 48<<10 {
				t.Errorf("after the initial data DataSize = %d, %v; want the 48KiB not sent", n, err)
			}
			if got := precopyInfo(t, ds); got != (PrecopyInfo{}) {
				t.Errorf("info = %+v, want nothing left of pre-copy", got)
			}
		}},
		{"no data size", "sim:size=64KiB,flags=stopcopy|precopy,precopy=16KiB,datasize=none", func(t *testing.T, d *SimDevice) {
			if _, err := d.DataSize(); !errors.Is(err, ErrNotSupported) {
				t.Errorf("DataSize: %v, want ErrNotSupported", err)
			}
		}},
		{"reinit without the v2 info", "sim:size=64KiB,seed=9,flags=stopcopy|precopy,precopy=32KiB,reinit=8000,precopyinfo=v1", func(t *testing.T, d *SimDevice) {
			ds := setState(t, d, StatePreCopy)
			readN(t, ds, recHeaderLen+8<<10)
			if got := precopyInfo(t, ds); got != (PrecopyInfo{InitialBytes: 32 << 10}) {
				t.Errorf("at the reinit offset info = %+v, want 32KiB initial, no reinit", got)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) { tt.run(t, newSim(t, tt.spec)) })
	}
}

// readN reads exactly n bytes of ds.
func readN(t testing.TB, ds DataStream, n int) []byte {
	t.Helper()
	out := make([]byte, n)
	for done := 0; done < n; {
		m, err := ds.Read(out[done:])
		if err != nil {
			t.Fatalf("read at %d of %d: %v", done, n, err)
		}
		done += m
	}
	return out
}

// saveHead reads the first n bytes a fresh device of spec sends in
// PRE_COPY (no dirty rate: the same bytes as any device of the spec).
func saveHead(t testing.TB, spec string, n int) []byte {
	t.Helper()
	ds := setState(t, newSim(t, spec), StatePreCopy)
	return readN(t, ds, n)
}

// TestSimPrecopyDirty checks dirty accumulation on the device's clock:
// after a second in PRE_COPY at 100 pages a second, the pages dirtied
// since they were read are pending, counted in dirty_bytes, and the
// stream carries them as one record each, oldest first.
func TestSimPrecopyDirty(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const spec = "sim:size=256KiB,seed=5,flags=stopcopy|precopy,precopy=256KiB,dirty=409600B/s"
		d := newSim(t, spec)
		ds := setState(t, d, StatePreCopy)
		readPrecopy(t, ds, 1<<20)
		if got := precopyInfo(t, ds); got != (PrecopyInfo{}) {
			t.Fatalf("at once after the initial data info = %+v, want zero", got)
		}
		time.Sleep(time.Second)
		want := distinctDirty(5, 100, 64) * simPageSize
		if got := precopyInfo(t, ds); got != (PrecopyInfo{DirtyBytes: want}) {
			t.Fatalf("after 1s info = %+v, want %d dirty bytes", got, want)
		}
		dirty := readPrecopy(t, ds, 5000)
		if got := uint64(len(dirty)); got != want/simPageSize*(recHeaderLen+simPageSize) {
			t.Errorf("read %d bytes of dirty records, want %d pages' worth", got, want/simPageSize)
		}
		if got := precopyInfo(t, ds); got != (PrecopyInfo{}) {
			t.Errorf("after the dirty data info = %+v, want zero", got)
		}
	})
}

// TestSimPrecopyMigration migrates a running, dirtying device with a
// reinit through pre-copy and stop-copy into a destination instance: the
// whole stream verifies, in any chunking; the first pass alone does not,
// nor a stream without its trailer or its last dirty record. The rates
// give the destination's check many dirty events per page and few.
func TestSimPrecopyMigration(t *testing.T) {
	for _, rate := range []string{"1MiB/s", "16KiB/s"} {
		t.Run(rate, func(t *testing.T) { testSimPrecopyMigration(t, rate) })
	}
}

func testSimPrecopyMigration(t *testing.T, rate string) {
	synctest.Test(t, func(t *testing.T) {
		spec := "sim:size=1MiB,seed=11,zero=0.25,flags=stopcopy|p2p|precopy,precopy=768KiB,dirty=" + rate + ",reinit=100KiB"
		src := newSim(t, spec)
		ds := setState(t, src, StatePreCopy)
		var saved []byte
		reinits := 0
		for range 5 {
			saved = append(saved, readPrecopy(t, ds, 64<<10)...)
			if precopyInfo(t, ds).Reinit {
				reinits++
			}
			time.Sleep(100 * time.Millisecond)
		}
		if reinits != 1 {
			t.Errorf("saw %d reinits, want 1", reinits)
		}
		time.Sleep(200 * time.Millisecond) // dirtied and not sent before the switchover
		firstPass := len(saved)
		setState(t, src, StatePreCopyP2P)
		setState(t, src, StateStopCopy)
		saved = append(saved, readAll(t, ds, 100<<10)...)
		setState(t, src, StateStop)

		for _, chunk := range []int{1, 4093, 1 << 20} {
			loadInto(t, newSim(t, spec), saved, chunk)
		}

		recs := records(t, saved)
		var lastDirty int
		for i, r := range recs {
			if binary.LittleEndian.Uint64(r[16:]) > 1 { // dirtied after the reinit
				lastDirty = i
			}
		}
		if lastDirty == 0 {
			t.Fatal("no dirty record in the stream")
		}
		join := func(rs [][]byte) []byte {
			var out []byte
			for _, r := range rs {
				out = append(out, r...)
			}
			return out
		}
		withoutDirty := append(append([][]byte{}, recs[:lastDirty]...), recs[lastDirty+1:]...)
		// The last dirty record rewritten as another page's, its bytes
		// right for that page: the counts add up, the events do not.
		moved := append([][]byte{}, recs...)
		moved[lastDirty] = movedRecord(src, recs[lastDirty])
		for name, stream := range map[string][]byte{
			"first pass only":      saved[:firstPass],
			"no trailer":           join(recs[:len(recs)-1]),
			"last dirty dropped":   join(withoutDirty),
			"last dirty moved":     join(moved),
			"cut inside a record":  saved[:len(saved)-recHeaderLen-recTrailerLen-100],
			"another device's":     saveWhole(t, "sim:size=1MiB,seed=12,flags=stopcopy|p2p|precopy"),
			"stop-copy-only state": saveWhole(t, "sim:size=1MiB,seed=11,zero=0.25"),
		} {
			if err := tryLoad(t, newSim(t, spec), stream, 64<<10); !errors.Is(err, ErrVerify) {
				t.Errorf("%s: RESUMING -> STOP: %v, want ErrVerify", name, err)
			}
		}
	})
}

// movedRecord returns rec as the record of the page after its own, with
// the content that page has at rec's generation.
func movedRecord(d *SimDevice, rec []byte) []byte {
	off := (binary.LittleEndian.Uint64(rec[0:]) + simPageSize) % d.spec.Sim.Size
	gen := binary.LittleEndian.Uint64(rec[16:])
	out := append([]byte(nil), rec...)
	binary.LittleEndian.PutUint64(out[0:], off)
	ct := d.content.genContent(gen)
	ct.fill(out[recHeaderLen:], off)
	return out
}

// saveWhole saves the state of a fresh device of spec through STOP_COPY.
func saveWhole(t testing.TB, spec string) []byte {
	t.Helper()
	return saveState(t, newSim(t, spec), 1<<20)
}

// TestGuardPrecopyInfo checks a guarded stream still answers PrecopyInfo.
func TestGuardPrecopyInfo(t *testing.T) {
	g := Guard(newSim(t, "sim:size=64KiB,flags=stopcopy|precopy,precopy=16KiB"), time.Minute)
	defer g.Close()
	ds, err := g.SetState(StatePreCopy)
	if err != nil {
		t.Fatal(err)
	}
	if got := precopyInfo(t, ds); got != (PrecopyInfo{InitialBytes: 16 << 10}) {
		t.Errorf("guarded info = %+v, want 16KiB initial", got)
	}
	g2 := Guard(newSim(t, "sim:size=64KiB"), time.Minute)
	defer g2.Close()
	ds, err = g2.SetState(StateStopCopy)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ds.(PrecopyInfoer).PrecopyInfo(); !errors.Is(err, ErrNotPreCopy) {
		t.Errorf("guarded info in STOP_COPY: %v, want ErrNotPreCopy", err)
	}
}

// FuzzSimRecordStream feeds a resuming pre-copy device arbitrary bytes:
// it never panics, and RESUMING -> STOP either verifies or fails with
// ErrVerify. The seeds are a whole stream and pieces of it.
func FuzzSimRecordStream(f *testing.F) {
	const spec = "sim:size=20000,seed=4,flags=stopcopy|precopy,precopy=8KiB"
	whole := saveWhole(f, spec)
	f.Add(whole)
	f.Add(whole[:len(whole)-1])
	f.Add(whole[recHeaderLen:])
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, stream []byte) {
		d := newSim(t, spec)
		ws := setState(t, d, StateResuming)
		if _, err := ws.Write(stream); err != nil && !errors.Is(err, ErrStreamTooLong) {
			t.Fatalf("write: %v", err)
		}
		if _, err := d.SetState(StateStop); err != nil && !errors.Is(err, ErrVerify) {
			t.Fatalf("RESUMING -> STOP: %v, want nil or ErrVerify", err)
		}
	})
}

// TestSimRecordTrailerLies checks that a trailer claiming more dirty
// events than the stream carried fails at once, without replaying them.
func TestSimRecordTrailerLies(t *testing.T) {
	const spec = "sim:size=20000,seed=4,flags=stopcopy|precopy,precopy=8KiB"
	whole := saveWhole(t, spec)
	lying := append([]byte(nil), whole...)
	binary.LittleEndian.PutUint64(lying[len(lying)-recTrailerLen:], 1<<62)
	if err := tryLoad(t, newSim(t, spec), lying, 1000); !errors.Is(err, ErrVerify) {
		t.Errorf("RESUMING -> STOP: %v, want ErrVerify", err)
	}
	loadInto(t, newSim(t, spec), whole, 1000)
}
