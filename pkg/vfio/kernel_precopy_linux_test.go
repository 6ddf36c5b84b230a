//go:build linux

package vfio

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// ferry_mig's stream layout (test/vm/module/ferry_mig.c): a header, one
// record per block sent (a record header and the block), and in STOP_COPY
// an end record. The kernel tests use it to check the PRE_COPY counts and
// MIG_DATA_SIZE byte for byte on ferry_mig instances.
const (
	fmHeaderBytes = 64 // struct fm_header
	fmRecordBytes = 16 // struct fm_rec; the end record is one alone
)

// fmDevice is a ferry_mig instance's sysfs attributes.
type fmDevice struct {
	t     *testing.T
	dir   string // .../migration
	size  uint64 // state bytes
	block uint64 // bytes per block
}

// ferryMig returns the attributes of the device s names, or nil when it
// is no ferry_mig instance (it has no migration/block_size).
func ferryMig(t *testing.T, s Spec) *fmDevice {
	t.Helper()
	r, err := resolveSpec(realHost, s)
	if err != nil {
		t.Fatal(err)
	}
	m := &fmDevice{t: t, dir: filepath.Join(r.sysDir, "migration")}
	if _, err := os.Stat(filepath.Join(m.dir, "block_size")); err != nil {
		return nil
	}
	m.size, m.block = m.uint("size"), m.uint("block_size")
	if m.size == 0 || m.block == 0 {
		t.Fatalf("%s: size %d, block size %d", m.dir, m.size, m.block)
	}
	return m
}

func (m *fmDevice) attr(name string) string {
	m.t.Helper()
	b, err := os.ReadFile(filepath.Join(m.dir, name))
	if err != nil {
		m.t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

func (m *fmDevice) uint(name string) uint64 {
	m.t.Helper()
	v, err := strconv.ParseUint(m.attr(name), 10, 64)
	if err != nil {
		m.t.Fatal(err)
	}
	return v
}

func (m *fmDevice) set(name string, v uint64) {
	m.t.Helper()
	if err := os.WriteFile(filepath.Join(m.dir, name), []byte(strconv.FormatUint(v, 10)), 0); err != nil {
		m.t.Fatalf("writing %d to %s: %v", v, name, err)
	}
}

// field is the KEY=value field of a key=value attribute such as saved.
func (m *fmDevice) field(name, key string) string {
	m.t.Helper()
	for f := range strings.FieldsSeq(m.attr(name)) {
		if v, ok := strings.CutPrefix(f, key+"="); ok {
			return v
		}
	}
	m.t.Fatalf("%s has no %s= field: %q", name, key, m.attr(name))
	return ""
}

func (m *fmDevice) blocks() uint64 { return (m.size + m.block - 1) / m.block }

// record is the stream size of block b's record.
func (m *fmDevice) record(b uint64) uint64 {
	if b == m.blocks()-1 {
		return fmRecordBytes + m.size - b*m.block
	}
	return fmRecordBytes + m.block
}

// fullStream is the size of a stream that sends every block once.
func (m *fmDevice) fullStream() uint64 {
	return fmHeaderBytes + m.blocks()*fmRecordBytes + m.size + fmRecordBytes
}

// precopyRun is one device's pass of TestKernelPrecopy, with the figures
// the VM test prints.
type precopyRun struct {
	t  *testing.T
	d  *kernelDevice
	fm *fmDevice // nil: not ferry_mig, counts are checked loosely

	full, initial, dirty, stopcopy uint64
}

// TestKernelPrecopy drives PRE_COPY on each device that has it: the
// initial data read whole with VFIO_MIG_GET_PRECOPY_INFO after every read,
// the temporary end of the stream (ErrNoData), MIG_DATA_SIZE in each
// state, PRE_COPY_P2P, PRE_COPY -> STOP_COPY on the same stream, the info
// refused in STOP_COPY (EINVAL) and on an ended stream, STOP_COPY ->
// PRE_COPY refused, and the whole stream loaded back. On ferry_mig
// instances every count is checked byte for byte, blocks are rewritten
// during pre-copy (its dirty attribute), the loaded image must be the
// final one and a stream with the first pass but not the blocks sent again
// must be refused. It prints one PRECOPY line per device for the VM test.
func TestKernelPrecopy(t *testing.T) {
	for _, s := range testDevices(t) {
		t.Run(s.String(), func(t *testing.T) {
			d := openTestDevice(t, s)
			if d.Flags()&FlagPreCopy == 0 {
				t.Skipf("flags %v: no PRE_COPY", d.Flags())
			}
			p := &precopyRun{t: t, d: d, fm: ferryMig(t, s)}
			p.run()
			fmt.Printf("PRECOPY spec=%s flags=%v full=%d initial=%d dirty=%d stopcopy=%d\n",
				s, d.Flags(), p.full, p.initial, p.dirty, p.stopcopy)
		})
	}
}

// dataSize reads MIG_DATA_SIZE; ferry_mig must answer it.
func (p *precopyRun) dataSize(where string) uint64 {
	p.t.Helper()
	n, err := p.d.DataSize()
	if err != nil && (p.fm != nil || !errors.Is(err, ErrNotSupported)) {
		p.t.Fatalf("MIG_DATA_SIZE in %s: %v", where, err)
	}
	return n
}

// wantSize checks MIG_DATA_SIZE on ferry_mig.
func (p *precopyRun) wantSize(where string, want uint64) {
	p.t.Helper()
	if p.fm == nil {
		return
	}
	if got := p.dataSize(where); got != want {
		p.t.Errorf("MIG_DATA_SIZE in %s = %d, want %d", where, got, want)
	}
}

func (p *precopyRun) info(st DataStream) PrecopyInfo {
	p.t.Helper()
	pi, ok := st.(PrecopyInfoer)
	if !ok {
		p.t.Fatalf("the PRE_COPY stream %T has no PrecopyInfo", st)
	}
	info, err := pi.PrecopyInfo()
	if err != nil {
		p.t.Fatalf("VFIO_MIG_GET_PRECOPY_INFO: %v", err)
	}
	return info
}

func (p *precopyRun) wantInfo(st DataStream, what string, want PrecopyInfo) {
	p.t.Helper()
	if p.fm == nil {
		return
	}
	if got := p.info(st); got != want {
		p.t.Errorf("%s: precopy info %+v, want %+v", what, got, want)
	}
}

// wantNoData checks that a read at the temporary end fails with ErrNoData
// (ENOMSG), as the uAPI asks.
func (p *precopyRun) wantNoData(st DataStream, what string) {
	p.t.Helper()
	n, err := st.Read(make([]byte, 4096))
	if n != 0 || !errors.Is(err, ErrNoData) || !errors.Is(err, unix.ENOMSG) {
		p.t.Errorf("%s: read = %d, %v; want ErrNoData wrapping ENOMSG", what, n, err)
	}
}

// readExactly reads n bytes in uneven reads, none of which may find the
// stream empty.
func (p *precopyRun) readExactly(st DataStream, n uint64) []byte {
	p.t.Helper()
	out := make([]byte, 0, n)
	buf := make([]byte, 4093)
	for uint64(len(out)) < n {
		k, err := st.Read(buf[:min(uint64(len(buf)), n-uint64(len(out)))])
		if err != nil {
			p.t.Fatalf("after %d of %d bytes: %v", len(out), n, err)
		}
		out = append(out, buf[:k]...)
	}
	return out
}

// readInitial reads until initial_bytes is 0, asking for the info after
// every read: it must never grow, and on ferry_mig it shrinks by exactly
// what was read.
func (p *precopyRun) readInitial(st DataStream, info PrecopyInfo) []byte {
	p.t.Helper()
	var out []byte
	buf := make([]byte, 4093)
	limit := 2*p.full + 64<<20
	for info.InitialBytes > 0 {
		k, err := st.Read(buf)
		if err != nil {
			p.t.Fatalf("reading the initial data (%d bytes left): %v", info.InitialBytes, err)
		}
		out = append(out, buf[:k]...)
		next := p.info(st)
		switch {
		case next.InitialBytes > info.InitialBytes:
			p.t.Fatalf("initial_bytes grew from %d to %d", info.InitialBytes, next.InitialBytes)
		case p.fm != nil && next.InitialBytes != info.InitialBytes-uint64(k):
			p.t.Fatalf("initial_bytes %d after reading %d of %d", next.InitialBytes, k, info.InitialBytes)
		case uint64(len(out)) > limit:
			p.t.Fatalf("%d bytes read and initial_bytes is still %d", len(out), next.InitialBytes)
		}
		info = next
	}
	return out
}

func (p *precopyRun) run() {
	t, d, fm := p.t, p.d, p.fm
	mustResetKernel(t, d)
	p.full = p.dataSize("RUNNING")
	if fm != nil && p.full != fm.fullStream() {
		t.Errorf("MIG_DATA_SIZE in RUNNING = %d, want a whole stream, %d", p.full, fm.fullStream())
	}

	st, err := d.SetState(StatePreCopy)
	if err != nil {
		t.Fatalf("PRE_COPY: %v", err)
	}
	if st == nil {
		t.Fatal("RUNNING -> PRE_COPY opened no data stream")
	}
	defer st.Close()
	info := p.info(st)
	p.initial = info.InitialBytes
	if info.InitialBytes == 0 {
		t.Error("initial_bytes is 0 on entering PRE_COPY")
	}
	p.wantInfo(st, "entering PRE_COPY", PrecopyInfo{InitialBytes: p.full - fmRecordBytes})
	p.wantSize("PRE_COPY", p.full)

	stream := p.readInitial(st, info)
	firstPass := len(stream)
	if fm != nil {
		if uint64(firstPass) != p.full-fmRecordBytes {
			t.Errorf("the initial data is %d bytes, want %d", firstPass, p.full-fmRecordBytes)
		}
		p.wantInfo(st, "after the initial data", PrecopyInfo{})
		p.wantNoData(st, "after the initial data")
		p.wantSize("PRE_COPY after the initial data", fmRecordBytes)

		// Two blocks rewritten: dirty_bytes is their records, and
		// reads return exactly them, then the temporary end again.
		last := fm.blocks() - 1
		fm.set("dirty", 0)
		fm.set("dirty", last)
		want := fm.record(0) + fm.record(last)
		p.dirty = p.info(st).DirtyBytes
		p.wantInfo(st, "two blocks rewritten", PrecopyInfo{DirtyBytes: want})
		p.wantSize("PRE_COPY with two blocks rewritten", want+fmRecordBytes)
		stream = append(stream, p.readExactly(st, want)...)
		p.wantInfo(st, "after the rewritten blocks", PrecopyInfo{})
		p.wantNoData(st, "after the rewritten blocks")
		// Rewritten once more: it goes in the stop-copy part.
		fm.set("dirty", 0)
	}

	dirty := PrecopyInfo{}
	if fm != nil {
		dirty.DirtyBytes = fm.record(0)
	}
	if d.Flags()&FlagP2P != 0 {
		if s, err := d.SetState(StatePreCopyP2P); err != nil || s != nil {
			t.Fatalf("PRE_COPY -> PRE_COPY_P2P = %v, %v; want the same stream", s, err)
		}
		p.wantInfo(st, "PRE_COPY_P2P", dirty)
	}

	// STOP_COPY goes on on the same stream.
	if s, err := d.SetState(StateStopCopy); err != nil || s != nil {
		t.Fatalf("PRE_COPY -> STOP_COPY = %v, %v; want the same stream", s, err)
	}
	if _, err := st.(PrecopyInfoer).PrecopyInfo(); !errors.Is(err, ErrNotPreCopy) || !errors.Is(err, unix.EINVAL) {
		t.Errorf("precopy info in STOP_COPY: %v, want ErrNotPreCopy wrapping EINVAL", err)
	}
	p.stopcopy = p.dataSize("STOP_COPY")
	if fm != nil && p.stopcopy != dirty.DirtyBytes+fmRecordBytes {
		t.Errorf("MIG_DATA_SIZE in STOP_COPY = %d, want %d", p.stopcopy, dirty.DirtyBytes+fmRecordBytes)
	}
	p.refuseStopCopyToPrecopy()
	rest, err := io.ReadAll(st)
	if err != nil {
		t.Fatalf("reading the stop-copy data: %v", err)
	}
	if fm != nil && uint64(len(rest)) != p.stopcopy {
		t.Errorf("the stop-copy data is %d bytes, MIG_DATA_SIZE said %d", len(rest), p.stopcopy)
	}
	if n, err := st.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Errorf("read after the end = %d, %v; want 0, io.EOF", n, err)
	}
	stream = append(stream, rest...)
	p.wantSize("STOP_COPY at the end", 0)

	if _, err := d.SetState(StateStop); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Read(make([]byte, 16)); !errors.Is(err, ErrStreamEnded) {
		t.Errorf("read after STOP_COPY -> STOP: %v, want ErrStreamEnded", err)
	}
	if _, err := st.(PrecopyInfoer).PrecopyInfo(); err == nil {
		t.Error("precopy info on an ended stream succeeded")
	}

	var saved string
	if fm != nil {
		saved = fm.field("saved", "digest")
	}
	loadKernelState(t, d, stream)
	if fm != nil && fm.attr("digest") != saved {
		t.Errorf("loaded image %s, the source's final image was %s", fm.attr("digest"), saved)
	}
	if _, err := d.SetState(StateRunning); err != nil {
		t.Fatal(err)
	}
	if fm != nil {
		p.refuseFirstPass(stream[:firstPass], stream[len(stream)-fmRecordBytes:])
	}
	p.precopyToRunning()
}

// refuseStopCopyToPrecopy: SetState refuses STOP_COPY -> PRE_COPY itself;
// ferry_mig also refuses it when asked directly, staying in STOP_COPY.
func (p *precopyRun) refuseStopCopyToPrecopy() {
	t, d := p.t, p.d
	t.Helper()
	if _, err := d.SetState(StatePreCopy); !errors.Is(err, ErrInvalidTransition) {
		t.Errorf("STOP_COPY -> PRE_COPY: %v, want ErrInvalidTransition", err)
	}
	if p.fm == nil {
		return // other drivers may spin on it in kernels without the fix
	}
	for _, to := range []State{StatePreCopy, StatePreCopyP2P} {
		if !d.Flags().Supports(to) {
			continue
		}
		if fd, err := deviceSetMigState(d.dev, uint32(to)); !errors.Is(err, unix.EINVAL) {
			t.Errorf("STOP_COPY -> %v asked of the kernel: fd %d, %v; want EINVAL", to, fd, err)
		}
		if s, err := d.State(); err != nil || s != StateStopCopy {
			t.Errorf("after STOP_COPY -> %v was refused: %v, %v; want STOP_COPY", to, s, err)
		}
	}
}

// refuseFirstPass loads the first pass and the end record without the
// blocks sent again: every block arrives, but the image is not the final
// one, and RESUMING -> STOP must fail.
func (p *precopyRun) refuseFirstPass(first, end []byte) {
	t, d := p.t, p.d
	t.Helper()
	mustResetKernel(t, d)
	w, err := d.SetState(StateResuming)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write(append(slices.Clone(first), end...)); err != nil {
		t.Fatalf("writing the first pass: %v", err)
	}
	w.Close()
	if _, err := d.SetState(StateStop); !errors.Is(err, ErrVerify) {
		t.Errorf("RESUMING -> STOP with the first pass only: %v, want ErrVerify", err)
	}
	if why := p.fm.attr("last_error"); !strings.Contains(why, "final image") {
		t.Errorf("RESUMING -> STOP with the first pass only: last_error %q, want it to name the final image", why)
	}
	mustResetKernel(t, d)
}

// precopyToRunning: PRE_COPY -> RUNNING ends the stream.
func (p *precopyRun) precopyToRunning() {
	t, d := p.t, p.d
	t.Helper()
	st, err := d.SetState(StatePreCopy)
	if err != nil || st == nil {
		t.Fatalf("PRE_COPY again: %v, %v", st, err)
	}
	defer st.Close()
	if _, err := d.SetState(StateRunning); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Read(make([]byte, 16)); !errors.Is(err, ErrStreamEnded) || !errors.Is(err, unix.ENODEV) {
		t.Errorf("read after PRE_COPY -> RUNNING: %v, want ErrStreamEnded wrapping ENODEV", err)
	}
	if _, err := st.(PrecopyInfoer).PrecopyInfo(); !errors.Is(err, ErrStreamEnded) {
		t.Errorf("precopy info after PRE_COPY -> RUNNING: %v, want ErrStreamEnded", err)
	}
	p.wantSize("RUNNING again", p.full)
}

// TestKernelResetOnClose: closing a device's last fd resets it, as
// vfio-pci does: opened again it is RUNNING. On ferry_mig instances a
// reset also restores the power-on image, so a loaded state is gone after
// the close.
func TestKernelResetOnClose(t *testing.T) {
	for _, s := range testDevices(t) {
		t.Run(s.String(), func(t *testing.T) {
			fm := ferryMig(t, s)
			d := openTestDevice(t, s)
			mustResetKernel(t, d)
			var power string
			if fm != nil {
				power = fm.attr("digest")
				fm.set("dirty", 0)
				changed := fm.attr("digest")
				if changed == power {
					t.Fatalf("rewriting block 0 left the image %s", power)
				}
				saved := saveKernelState(t, d)
				mustResetKernel(t, d)
				if got := fm.attr("digest"); got != power {
					t.Errorf("after a reset: image %s, want the power-on %s", got, power)
				}
				loadKernelState(t, d, saved)
				if got := fm.attr("digest"); got != changed {
					t.Errorf("loaded image %s, want %s", got, changed)
				}
			} else if _, err := d.SetState(StateStop); err != nil {
				t.Fatal(err)
			}
			if err := d.Close(); err != nil {
				t.Fatal(err)
			}
			d = openTestDevice(t, s)
			if st, err := d.State(); err != nil || st != StateRunning {
				t.Errorf("opened again after a close in STOP: %v, %v; want RUNNING", st, err)
			}
			if fm != nil {
				if got := fm.attr("digest"); got != power {
					t.Errorf("opened again: image %s, want the power-on %s (the loaded state discarded)", got, power)
				}
			}
		})
	}
}
