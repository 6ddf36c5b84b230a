package vfio

import (
	"encoding/binary"
	"fmt"
	"io"
	"math"
	"time"
)

// The pre-copy model of the simulated device (flags include precopy).
//
// The device's state is Size bytes in 4 KiB pages; page p holds the
// content of generation gen(p) = epoch + dirty(p). Generation 0 is the
// device's plain content (the stop-copy-only stream's bytes); generation
// g > 0 is the splitmix64 words of a key derived from the seed and g, never
// a zero page. While the device is in PRE_COPY(_P2P) it "runs": after t
// seconds there it has made floor(DirtyRate*t / 4096) dirty events, event
// k rewriting page mix(seed key + k*gamma) mod pages (dirty(p)++). The
// clock is time.Now, so tests drive it with testing/synctest. A reinit
// ("reinit=") rewrites every page at once (epoch++).
//
// The saving stream is a sequence of records, each a 24-byte header of
// three little-endian uint64s, offset, length and generation, followed by
// length bytes: the pages [offset, offset+length) at that generation
// (offset a multiple of 4 KiB; length whole pages, the last page of the
// state possibly short). A later record of a page overwrites an earlier
// one. The stream ends with the trailer: offset 2^64-1, length 16,
// generation 0, then the number of dirty events and the epoch the state
// had when STOP_COPY ended. The order:
//
//   - PRE_COPY(_P2P): the initial data, pages [0, PreCopy rounded up) in
//     order, then one record for each page dirtied after it was sent,
//     oldest first; with nothing new a read fails with ErrNoData;
//   - STOP_COPY: the pages not yet sent, up to Size, then the dirty ones,
//     then the trailer, then io.EOF forever.
//
// A resuming device applies the records, checking each byte against the
// page's content at the record's generation, and at RESUMING -> STOP
// replays the trailer's events: every page must hold exactly the
// generation the source had at the end. A stream without the trailer, or
// one that lost a record, fails with ErrVerify.

const (
	// recHeaderLen is the length of a record header.
	recHeaderLen = 24
	// recTrailerOff marks the trailer.
	recTrailerOff = math.MaxUint64
	// recTrailerLen is the length of the trailer's payload.
	recTrailerLen = 16
	// recMaxData is the most data one record of the sequential pass
	// carries.
	recMaxData = 256 << 10
	// genGamma spreads the generations' keys.
	genGamma = 0xd1b54a32d192ed03
)

// genContent returns the content of pages at generation gen.
func (c *content) genContent(gen uint64) content {
	if gen == 0 {
		return *c
	}
	return content{key: mix(c.key ^ gen*genGamma)}
}

// simPages is the number of 4 KiB pages of a state of size bytes.
func simPages(size uint64) uint64 { return (size + simPageSize - 1) / simPageSize }

// pageLen is the length of page p of a state of size bytes.
func pageLen(size, p uint64) uint64 { return min(simPageSize, size-p*simPageSize) }

// dirtyKey is the key of the dirty events' page sequence.
func dirtyKey(seed uint64) uint64 { return mix(seed ^ 0x2545f4914f6cdd1d) }

// dirtyPage is the page the k-th dirty event rewrites.
func dirtyPage(key, k, pages uint64) uint64 { return mix(key+k*gamma) % pages }

// recKind is what the record being read carries, for PrecopyInfo.
type recKind int

const (
	recNone    recKind = iota
	recInitial         // pages of the initial data
	recDirty           // a page dirtied after it was sent
	recOther           // the stop-copy pass or the trailer
)

// recSaver produces the record stream of a saving session. Guarded by its
// stream's mu.
type recSaver struct {
	ct      *content
	size    uint64
	pages   uint64
	initEnd uint64 // end of the initial data: PreCopy rounded up to a page

	running   bool      // in PRE_COPY(_P2P): the device dirties pages
	runSince  time.Time // when the current running spell began
	ranBefore time.Duration
	rate      uint64
	key       uint64
	events    uint64   // dirty events applied
	dirty     []uint32 // per page dirty events; nil until the first
	epoch     uint64

	cursor     uint64   // the sequential pass has sent [0, cursor)
	pending    []uint64 // pages dirtied after they were sent, oldest first
	isPending  []bool   // per page; nil until the first
	pendingLen uint64   // bytes of the pending pages

	reinitAt   uint64 // page-rounded offset of the reinit; valid with hasReinit
	hasReinit  bool
	reinitSeen bool // not yet reported by PrecopyInfo
	infoV1     bool // never report Reinit ("precopyinfo=v1")

	buf     []byte  // the record being read: header and data
	bufOff  int     // bytes of buf read
	bufKind recKind // what buf carries
	trailed bool    // the trailer was produced
}

func newRecSaver(d *SimDevice) *recSaver {
	cfg := &d.spec.Sim
	r := &recSaver{
		ct:      &d.content,
		size:    cfg.Size,
		pages:   simPages(cfg.Size),
		initEnd: min(simPages(cfg.PreCopy)*simPageSize, cfg.Size),
		rate:    cfg.DirtyRate,
		key:     dirtyKey(cfg.Seed),
		buf:     make([]byte, 0, recHeaderLen+recMaxData),
		infoV1:  cfg.PrecopyInfoV1,
	}
	if cfg.HasReinit {
		r.hasReinit = true
		r.reinitAt = simPages(cfg.ReinitOffset) * simPageSize
	}
	return r
}

// run starts or stops the device's running clock; stopping applies the
// dirty events due so far.
func (r *recSaver) run(on bool) {
	if on == r.running {
		return
	}
	if on {
		r.running = true
		if r.rate != 0 {
			r.runSince = time.Now()
		}
		return
	}
	r.advance(false)
	if r.rate != 0 {
		r.ranBefore += time.Since(r.runSince)
	}
	r.running = false
}

// advance applies the dirty events due by now and a reinit that is due.
// A reinit at the end of the initial data waits for a read (fromRead), so
// PrecopyInfo first reports the initial data read whole.
func (r *recSaver) advance(fromRead bool) {
	if r.running && r.rate != 0 {
		ran := r.ranBefore + time.Since(r.runSince)
		sec, ns := uint64(ran/time.Second), uint64(ran%time.Second)
		due := (r.rate*sec + r.rate*ns/uint64(time.Second)) / simPageSize
		for ; r.events < due; r.events++ {
			r.dirtyPage(dirtyPage(r.key, r.events, r.pages))
		}
	}
	if r.hasReinit && !r.reinitSeen && r.epoch == 0 && r.cursor >= r.reinitAt && r.bufOff == len(r.buf) &&
		(fromRead || r.reinitAt < r.initEnd) {
		// New initial data: the whole state is rewritten and sent again.
		r.epoch++
		r.cursor = 0
		for _, p := range r.pending {
			r.isPending[p] = false
		}
		r.pending, r.pendingLen = r.pending[:0], 0
		r.reinitSeen = true
	}
}

// dirtyPage applies one dirty event to page p.
func (r *recSaver) dirtyPage(p uint64) {
	if r.dirty == nil {
		r.dirty = make([]uint32, r.pages)
		r.isPending = make([]bool, r.pages)
	}
	r.dirty[p]++
	if p*simPageSize < r.cursor && !r.isPending[p] {
		r.isPending[p] = true
		r.pending = append(r.pending, p)
		r.pendingLen += pageLen(r.size, p)
	}
}

func (r *recSaver) gen(p uint64) uint64 {
	if r.dirty == nil {
		return r.epoch
	}
	return r.epoch + uint64(r.dirty[p])
}

// info is PrecopyInfo's answer; the caller checked the state.
func (r *recSaver) info() PrecopyInfo {
	r.advance(false)
	unread := uint64(0)
	if r.bufOff < len(r.buf) {
		unread = uint64(min(len(r.buf)-r.bufOff, len(r.buf)-recHeaderLen))
	}
	var in PrecopyInfo
	if r.cursor < r.initEnd {
		in.InitialBytes = r.initEnd - r.cursor
	}
	in.DirtyBytes = r.pendingLen
	switch r.bufKind {
	case recInitial:
		in.InitialBytes += unread
	case recDirty:
		in.DirtyBytes += unread
	}
	if r.reinitSeen {
		in.Reinit, r.reinitSeen = !r.infoV1, false
	}
	return in
}

// remaining is what an immediate STOP_COPY would still return, as
// MIG_DATA_SIZE reports it: the pages the sequential pass has not sent,
// the dirty ones pending and the rest of the record being read (record
// headers left out, as PrecopyInfo leaves them out).
func (r *recSaver) remaining() uint64 {
	r.advance(false)
	n := r.pendingLen
	if r.cursor < r.size {
		n += r.size - r.cursor
	}
	if r.bufOff < len(r.buf) {
		n += uint64(min(len(r.buf)-r.bufOff, len(r.buf)-recHeaderLen))
	}
	return n
}

// read fills p with the next bytes of the stream: in PRE_COPY it fails
// with ErrNoData when nothing is new, in STOP_COPY with io.EOF after the
// trailer.
func (r *recSaver) read(p []byte) (int, error) {
	n := 0
	for n < len(p) {
		if r.bufOff == len(r.buf) && !r.next() {
			break
		}
		c := copy(p[n:], r.buf[r.bufOff:])
		r.bufOff += c
		n += c
	}
	switch {
	case n > 0:
		return n, nil
	case r.running:
		return 0, ErrNoData
	}
	return 0, io.EOF
}

// next builds the next record into buf and reports whether there is one.
func (r *recSaver) next() bool {
	r.advance(true)
	r.buf, r.bufOff, r.bufKind = r.buf[:0], 0, recNone
	end := r.size
	if r.running {
		end = r.initEnd
		if r.hasReinit && r.epoch == 0 && r.cursor < r.reinitAt {
			end = min(end, r.reinitAt)
		}
	}
	switch {
	case r.cursor < end:
		// The sequential pass: whole pages of one generation.
		first := r.cursor / simPageSize
		g := r.gen(first)
		stop := min(end, r.cursor+recMaxData)
		last := first + 1
		for last*simPageSize < stop && r.gen(last) == g {
			last++
		}
		off, n := r.cursor, min(last*simPageSize, r.size)-r.cursor
		r.record(off, n, g)
		r.cursor = off + n
		r.bufKind = recOther
		if r.running {
			r.bufKind = recInitial
		}
	case len(r.pending) > 0:
		p := r.pending[0]
		r.pending = r.pending[1:]
		r.isPending[p] = false
		r.pendingLen -= pageLen(r.size, p)
		r.record(p*simPageSize, pageLen(r.size, p), r.gen(p))
		r.bufKind = recDirty
		if !r.running {
			r.bufKind = recOther
		}
	case !r.running && !r.trailed:
		r.buf = binary.LittleEndian.AppendUint64(r.buf, recTrailerOff)
		r.buf = binary.LittleEndian.AppendUint64(r.buf, recTrailerLen)
		r.buf = binary.LittleEndian.AppendUint64(r.buf, 0)
		r.buf = binary.LittleEndian.AppendUint64(r.buf, r.events)
		r.buf = binary.LittleEndian.AppendUint64(r.buf, r.epoch)
		r.trailed, r.bufKind = true, recOther
	default:
		return false
	}
	return true
}

// record puts the record of [off, off+n) at generation g into buf.
func (r *recSaver) record(off, n, g uint64) {
	r.buf = binary.LittleEndian.AppendUint64(r.buf, off)
	r.buf = binary.LittleEndian.AppendUint64(r.buf, n)
	r.buf = binary.LittleEndian.AppendUint64(r.buf, g)
	r.buf = r.buf[:recHeaderLen+n]
	ct := r.ct.genContent(g)
	ct.fill(r.buf[recHeaderLen:], off)
}

// recLoader applies the record stream of a resuming session. Guarded by
// its stream's mu.
type recLoader struct {
	ct    *content
	size  uint64
	pages uint64
	seed  uint64

	gens []uint32 // per page: 1 + the generation last applied; 0 never
	// Kept as records apply, so that verify costs the dirty events, not
	// the pages: how many pages are at each value of gens (0 excluded),
	// how many were written, and the sum of their generations.
	atGen   map[uint32]uint64
	written uint64
	genSum  uint64
	// And a fingerprint of which pages were rewritten how often:
	// sum over the written pages of generation * pageHash, and of
	// pageHash alone (both wrap). The replay compares it with the dirty
	// events' own (see verify).
	hashKey          uint64
	hashSum, hashAll uint64

	hdr     [recHeaderLen]byte
	hdrN    int    // header bytes gathered
	inRec   bool   // inside a record's data
	recOff  uint64 // the record's offset
	recLen  uint64
	recGen  uint64
	recDone uint64 // data bytes of the record taken
	recCt   content

	trailer  [recTrailerLen]byte
	trailed  bool // the trailer was read whole
	events   uint64
	epoch    uint64
	failed   error // the first defect of the stream, reported at verify
	complete bool  // nothing may follow the trailer
	broken   bool  // a header made no sense: the rest cannot be framed
}

func newRecLoader(d *SimDevice) *recLoader {
	cfg := &d.spec.Sim
	return &recLoader{ct: &d.content, size: cfg.Size, pages: simPages(cfg.Size), seed: cfg.Seed, hashKey: mix(cfg.Seed ^ 0x6a09e667f3bcc909)}
}

// write takes p, the next bytes of the stream. Bytes after the trailer
// fail the write with ErrStreamTooLong; other defects are remembered and
// fail the verification.
func (l *recLoader) write(p []byte) error {
	for len(p) > 0 && !l.broken {
		if l.complete {
			return fmt.Errorf("%d bytes after the end of the state: %w", len(p), ErrStreamTooLong)
		}
		if !l.inRec {
			c := copy(l.hdr[l.hdrN:], p)
			l.hdrN += c
			p = p[c:]
			if l.hdrN == recHeaderLen {
				l.startRecord()
			}
			continue
		}
		c := min(uint64(len(p)), l.recLen-l.recDone)
		l.take(p[:c])
		l.recDone += c
		p = p[c:]
		if l.recDone == l.recLen {
			l.endRecord()
		}
	}
	return nil
}

// startRecord reads the gathered header.
func (l *recLoader) startRecord() {
	l.hdrN, l.inRec, l.recDone = 0, true, 0
	l.recOff = binary.LittleEndian.Uint64(l.hdr[0:])
	l.recLen = binary.LittleEndian.Uint64(l.hdr[8:])
	l.recGen = binary.LittleEndian.Uint64(l.hdr[16:])
	switch {
	case l.recOff == recTrailerOff:
		if l.recLen != recTrailerLen {
			l.fail(fmt.Errorf("trailer of %d bytes, want %d", l.recLen, recTrailerLen))
			l.recLen = 0
		}
		return
	case l.recOff%simPageSize != 0 || l.recOff >= l.size || l.recLen > l.size-l.recOff ||
		l.recLen == 0 || (l.recOff+l.recLen)%simPageSize != 0 && l.recOff+l.recLen != l.size:
		l.fail(fmt.Errorf("record [%d, +%d) is not whole pages of the state", l.recOff, l.recLen))
		l.inRec, l.broken = false, true
		return
	case l.recGen >= math.MaxUint32:
		l.fail(fmt.Errorf("record at %d: generation %d out of range", l.recOff, l.recGen))
	}
	l.recCt = l.ct.genContent(l.recGen)
}

// take checks data bytes of the current record.
func (l *recLoader) take(p []byte) {
	if l.recOff == recTrailerOff {
		copy(l.trailer[l.recDone:], p)
		return
	}
	off := l.recOff + l.recDone
	if i := l.recCt.mismatch(p, off); i >= 0 && l.failed == nil {
		l.fail(fmt.Errorf("state mismatch at byte %d (generation %d): stream corrupt or not this device's", off+uint64(i), l.recGen))
	}
}

// endRecord applies a record whose data was taken whole.
func (l *recLoader) endRecord() {
	l.inRec = false
	if l.recOff == recTrailerOff {
		if l.recLen == recTrailerLen {
			l.events = binary.LittleEndian.Uint64(l.trailer[0:])
			l.epoch = binary.LittleEndian.Uint64(l.trailer[8:])
			l.trailed = true
		}
		l.complete = true
		return
	}
	if l.gens == nil {
		l.gens = make([]uint32, l.pages)
		l.atGen = make(map[uint32]uint64)
	}
	g := uint32(min(l.recGen, math.MaxUint32-1)) + 1
	first, end := l.recOff/simPageSize, simPages(l.recOff+l.recLen)
	// Pages of a record mostly share their old value (the first pass: all
	// 0), so the per-generation counts move once per run of equal old
	// values; the sums move per page.
	run, runLen := uint32(0), uint64(0)
	for p := first; p < end; p++ {
		old := l.gens[p]
		if old > g && l.failed == nil {
			l.fail(fmt.Errorf("page at %d: generation %d after %d (records out of order)", p*simPageSize, g-1, old-1))
		}
		if old != run {
			l.uncount(run, runLen)
			run, runLen = old, 0
		}
		runLen++
		l.gens[p] = g
		h := pageHash(l.hashKey, p)
		if old == 0 {
			l.written++
			l.hashAll += h
		} else {
			l.genSum -= uint64(old - 1)
			l.hashSum -= uint64(old-1) * h
		}
		l.genSum += uint64(g - 1)
		l.hashSum += uint64(g-1) * h
	}
	l.uncount(run, runLen)
	l.atGen[g] += end - first
}

// uncount takes n pages at gens value old out of the per-generation
// counts (pages never written are not counted).
func (l *recLoader) uncount(old uint32, n uint64) {
	if old == 0 || n == 0 {
		return
	}
	if l.atGen[old] -= n; l.atGen[old] == 0 {
		delete(l.atGen, old)
	}
}

func (l *recLoader) fail(err error) {
	if l.failed == nil {
		l.failed = err
	}
}

// verify is the check at RESUMING -> STOP: a clean stream with its
// trailer, every page at the generation the trailer's events and epoch
// give it.
func (l *recLoader) verify() error {
	switch {
	case l.failed != nil:
		return l.failed
	case !l.trailed:
		return fmt.Errorf("short stream: no trailer (%d of %d pages written)", l.pagesWritten(), l.pages)
	case l.epoch >= math.MaxUint32:
		return fmt.Errorf("trailer: epoch %d out of range", l.epoch)
	case l.gens == nil:
		return fmt.Errorf("short stream: no page of the state was written")
	}
	if l.written != l.pages {
		return fmt.Errorf("short stream: page at %d never written", l.firstPage(func(g uint32) bool { return g == 0 })*simPageSize)
	}
	base := uint32(l.epoch) + 1
	for g := range l.atGen {
		if g < base {
			return fmt.Errorf("page at %d is not at its final generation: stream incomplete",
				l.firstPage(func(g uint32) bool { return g < base })*simPageSize)
		}
	}
	// The generations applied above the epoch must add up to the events
	// (which also bounds the replay below by what the stream carried).
	if above := l.genSum - l.pages*l.epoch; above != l.events {
		return fmt.Errorf("pages rewritten %d times, the source made %d dirty events: stream incomplete", above, l.events)
	}
	// The replay costs the events: a stream claiming more than a
	// simulated device makes in hours (2^28 events is 9 hours at 32 MB/s)
	// is refused, not replayed.
	if l.events > maxSimEvents {
		return fmt.Errorf("trailer: %d dirty events, more than a simulated device makes (%d)", l.events, uint64(maxSimEvents))
	}
	// Replay the events: the pages they rewrote, each as often as they
	// hit it, must be the pages the stream rewrote above the epoch. The
	// comparison is of the fingerprints, so it costs the events and
	// never touches the pages: the page counts agree (above) and
	//
	//	sum over pages of (gen - epoch) * pageHash == sum over events of pageHash(page).
	//
	// The hashes are odd, so a stream that differs in one page's count
	// always fails; one that differs in several passes only where its
	// differences cancel modulo 2^64 (a chance of about 2^-64).
	var want uint64
	key := dirtyKey(l.seed)
	for k := range l.events {
		want += pageHash(l.hashKey, dirtyPage(key, k, l.pages))
	}
	if got := l.hashSum - l.epoch*l.hashAll; got != want {
		return fmt.Errorf("the pages rewritten are not the pages the source dirtied: stream incomplete")
	}
	return nil
}

// maxSimEvents bounds the dirty events a destination replays.
const maxSimEvents = 1 << 28

// pageHash is page p's fingerprint term: odd, so never 0 and invertible
// modulo 2^64.
func pageHash(key, p uint64) uint64 { return mix(key+p*gamma) | 1 }

// firstPage finds the first page whose gens value is bad, for errors.
func (l *recLoader) firstPage(bad func(uint32) bool) uint64 {
	for p, g := range l.gens {
		if bad(g) {
			return uint64(p)
		}
	}
	return 0
}

// pagesWritten counts the pages written at least once, for errors.
func (l *recLoader) pagesWritten() uint64 { return l.written }
