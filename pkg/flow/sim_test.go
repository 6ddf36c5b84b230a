package flow

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"
)

// The simulation below runs whole device streams through the package: per
// device a source (a Gate and the device's bytes) and a destination (a
// Reassembly and a writer), joined by N channels that carry chunks one way
// and windows the other. Each channel is FIFO, as a gRPC stream is, but
// which channel a message takes and which message is delivered next are
// chosen at random, so chunks and windows arrive out of order; chunks
// already sent are sent again at random, as after a broken channel.
//
// It is one goroutine stepping through events: at each step it lists every
// event possible and a chooser picks one. So a deadlock is not a hang but a
// step with nothing possible before every stream is complete.

// chooser picks among n possibilities.
type chooser interface{ IntN(n int) int }

// byteChooser takes its choices from fuzz input; once that is used up it
// always picks the first possibility, which still runs the simulation to
// its end.
type byteChooser struct{ b []byte }

func (c *byteChooser) IntN(n int) int {
	if n <= 1 || len(c.b) == 0 {
		return 0
	}
	v := int(c.b[0])
	c.b = c.b[1:]
	if n > 256 && len(c.b) > 0 {
		v = v<<8 | int(c.b[0])
		c.b = c.b[1:]
	}
	return v % n
}

type simConfig struct {
	chunkSize uint32
	limits    Limits
	lengths   []int // stream length of each device
	channels  int   // 1..8
	resends   int   // how many chunks may be sent again
}

func (c simConfig) String() string {
	return fmt.Sprintf("chunk %d, limits %+v, lengths %v, %d channels, %d resends",
		c.chunkSize, c.limits, c.lengths, c.channels, c.resends)
}

type simSource struct {
	gate        *Gate
	data        []byte
	seq, offset uint64          // the next chunk, as the simulation counts
	ended       bool            // END sent
	seen        Window          // the largest of the windows delivered to the gate
	sent        []Chunk[[]byte] // everything sent, for resends
}

type simDest struct {
	r          *Reassembly[[]byte]
	written    []byte // what the writer wrote into the "device"
	advertised Window // the newest window put on a channel
	dups       int
}

type simChunk struct {
	dev int
	c   Chunk[[]byte]
}

type simWindow struct {
	dev int
	w   Window
}

type simEvent struct {
	kind int
	i    int // device or channel
}

const (
	evSend      = iota // a source reads its next chunk and puts it on a channel
	evResend           // a source puts a chunk it sent before on a channel again
	evDeliver          // a channel delivers its oldest chunk to its destination
	evWrite            // a writer writes the chunk at its frontier
	evAdvertise        // a destination puts its window on a channel
	evUpdate           // a channel delivers its oldest window to its source
)

// streamBytes is device dev's stream, distinct per device and offset.
func streamBytes(dev, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*131 + dev*17 + i>>8)
	}
	return b
}

// simulate runs the streams of cfg to completion under the choices of ch,
// checking that
//
//	(a) no destination ever holds more than MaxChunks chunks or MaxBytes bytes,
//	(b) no source ever sends outside the window it last saw,
//	(c) every stream is written in order, complete and unchanged, and
//	(d) the simulation always ends: some event is possible until every
//	    stream is complete.
//
// It returns the number of steps and of duplicates dropped.
func simulate(t *testing.T, cfg simConfig, ch chooser) (steps, dups int) {
	t.Helper()
	initial := Window{LimitSeq: uint64(cfg.limits.MaxChunks), LimitOffset: cfg.limits.MaxBytes}
	srcs := make([]simSource, len(cfg.lengths))
	dsts := make([]simDest, len(cfg.lengths))
	for d, n := range cfg.lengths {
		srcs[d] = simSource{gate: NewGate(initial), data: streamBytes(d, n), seen: initial}
		dsts[d] = simDest{r: NewReassembly[[]byte](cfg.limits, cfg.chunkSize), advertised: initial}
	}
	fwd := make([][]simChunk, cfg.channels)
	back := make([][]simWindow, cfg.channels)
	resends := cfg.resends
	cs := uint64(cfg.chunkSize)
	var events []simEvent

	fail := func(format string, args ...any) {
		t.Helper()
		var b strings.Builder
		fmt.Fprintf(&b, "step %d: %s\nconfig: %v\n", steps, fmt.Sprintf(format, args...), cfg)
		for d := range srcs {
			s, r := &srcs[d], dsts[d].r
			fseq, foff := r.Frontier()
			n, nb := r.Buffered()
			fmt.Fprintf(&b, "device %d: source at seq %d offset %d (ended %t), gate window %v;"+
				" destination frontier seq %d offset %d, holds %d/%d bytes, window %v (advertised %v), done %t\n",
				d, s.seq, s.offset, s.ended, s.gate.Window(), fseq, foff, n, nb, r.Window(), dsts[d].advertised, r.Done())
		}
		for k := range fwd {
			fmt.Fprintf(&b, "channel %d: %d chunks, %d windows in flight\n", k, len(fwd[k]), len(back[k]))
		}
		t.Fatal(b.String())
	}

	for ; ; steps++ {
		events = events[:0]
		for d := range srcs {
			s := &srcs[d]
			if s.ended {
				continue
			}
			_, _, ok, err := s.gate.tryWait(cs)
			if err != nil {
				fail("device %d: gate: %v", d, err)
			}
			if want := s.seen.Admits(s.seq, s.offset, cs); ok != want {
				fail("device %d: gate admits %t, the window it was given admits %t", d, ok, want)
			}
			if ok {
				events = append(events, simEvent{evSend, d})
			}
		}
		if resends > 0 {
			for d := range srcs {
				if len(srcs[d].sent) > 0 {
					events = append(events, simEvent{evResend, d})
				}
			}
		}
		for k := range fwd {
			if len(fwd[k]) > 0 {
				events = append(events, simEvent{evDeliver, k})
			}
			if len(back[k]) > 0 {
				events = append(events, simEvent{evUpdate, k})
			}
		}
		for d := range dsts {
			_, ok, err := dsts[d].r.Next()
			if err != nil {
				fail("device %d: Next: %v", d, err)
			}
			if ok {
				events = append(events, simEvent{evWrite, d})
			}
			if dsts[d].r.Window() != dsts[d].advertised {
				events = append(events, simEvent{evAdvertise, d})
			}
		}
		if len(events) == 0 {
			break
		}

		switch e := events[ch.IntN(len(events))]; e.kind {
		case evSend:
			s := &srcs[e.i]
			seq, offset, ok, err := s.gate.tryWait(cs)
			if !ok || err != nil || seq != s.seq || offset != s.offset {
				fail("device %d: tryWait = %d, %d, %t, %v; want %d, %d", e.i, seq, offset, ok, err, s.seq, s.offset)
			}
			c := Chunk[[]byte]{Seq: seq, Offset: offset}
			if left := uint64(len(s.data)) - offset; left == 0 {
				c.End = true
				s.ended = true
			} else {
				n := min(1+uint64(ch.IntN(int(cs))), left)
				c.Len = uint32(n)
				c.Payload = s.data[offset : offset+n]
			}
			// (b) The source sends only what the window it last saw admits.
			if !s.seen.Admits(c.Seq, c.Offset, uint64(c.Len)) || s.gate.Window() != s.seen {
				fail("device %d: sending %+v under window %v (gate %v)", e.i, c, s.seen, s.gate.Window())
			}
			s.gate.Sent(uint64(c.Len))
			s.seq++
			s.offset += uint64(c.Len)
			s.sent = append(s.sent, c)
			k := ch.IntN(cfg.channels)
			fwd[k] = append(fwd[k], simChunk{e.i, c})

		case evResend:
			s := &srcs[e.i]
			c := s.sent[ch.IntN(len(s.sent))]
			k := ch.IntN(cfg.channels)
			fwd[k] = append(fwd[k], simChunk{e.i, c})
			resends--

		case evDeliver:
			m := fwd[e.i][0]
			fwd[e.i] = fwd[e.i][1:]
			dst := &dsts[m.dev]
			dup, err := dst.r.Accept(m.c)
			if err != nil {
				fail("device %d: Accept(seq %d offset %d len %d end %t): %v", m.dev, m.c.Seq, m.c.Offset, m.c.Len, m.c.End, err)
			}
			if dup {
				dst.dups++
				dups++
			}
			// (a) The destination holds no more than its limits.
			if n, b := dst.r.Buffered(); n > int(cfg.limits.MaxChunks) || b > cfg.limits.MaxBytes {
				fail("device %d holds %d chunks, %d bytes", m.dev, n, b)
			}

		case evWrite:
			dst := &dsts[e.i]
			c, _, _ := dst.r.Next()
			seq, offset := dst.r.Frontier()
			if c.Seq != seq || c.Offset != offset || c.Offset != uint64(len(dst.written)) {
				fail("device %d: writing chunk seq %d offset %d at frontier %d, %d after %d bytes",
					e.i, c.Seq, c.Offset, seq, offset, len(dst.written))
			}
			dst.written = append(dst.written, c.Payload...)
			dst.r.Advance()

		case evAdvertise:
			dst := &dsts[e.i]
			dst.advertised = dst.r.Window()
			k := ch.IntN(cfg.channels)
			back[k] = append(back[k], simWindow{e.i, dst.advertised})

		case evUpdate:
			m := back[e.i][0]
			back[e.i] = back[e.i][1:]
			s := &srcs[m.dev]
			s.gate.Update(m.w)
			s.seen.LimitSeq = max(s.seen.LimitSeq, m.w.LimitSeq)
			s.seen.LimitOffset = max(s.seen.LimitOffset, m.w.LimitOffset)
		}
	}

	// (d) Nothing is possible any more: every stream must be complete.
	for d := range dsts {
		dst, s := &dsts[d], &srcs[d]
		if !dst.r.Done() {
			fail("deadlock: device %d not done and no event possible", d)
		}
		// (c) In order, complete, unchanged.
		if !bytes.Equal(dst.written, s.data) {
			fail("device %d: wrote %d bytes that differ from the %d-byte stream", d, len(dst.written), len(s.data))
		}
		if seq, off := dst.r.Frontier(); seq != s.seq || off != uint64(len(s.data)) {
			fail("device %d: frontier %d, %d; source sent %d chunks of %d bytes", d, seq, off, s.seq, len(s.data))
		}
		if n, b := dst.r.Buffered(); n != 0 || b != 0 {
			fail("device %d: %d chunks, %d bytes still held at the end", d, n, b)
		}
		if p := dst.r.PeakBytes(); p > cfg.limits.MaxBytes {
			fail("device %d: peak %d bytes", d, p)
		}
	}
	return steps, dups
}

// randomConfig draws a configuration, favouring the edges: one-chunk
// windows, MaxBytes equal to the chunk size, empty streams.
func randomConfig(rng *rand.Rand) simConfig {
	cfg := simConfig{
		chunkSize: 1 + rng.Uint32N(16),
		channels:  1 + rng.IntN(8),
		resends:   rng.IntN(30),
	}
	cfg.limits.MaxChunks = 1 + rng.Uint32N(8)
	cfg.limits.MaxBytes = uint64(cfg.chunkSize)
	if rng.IntN(4) != 0 {
		cfg.limits.MaxBytes += rng.Uint64N(4 * uint64(cfg.chunkSize))
	}
	for range 1 + rng.IntN(3) {
		n := 0
		if rng.IntN(6) != 0 {
			n = rng.IntN(300)
		}
		cfg.lengths = append(cfg.lengths, n)
	}
	return cfg
}

func TestWindowDeliveryProperty(t *testing.T) {
	fixed := []simConfig{
		{chunkSize: 1, limits: Limits{MaxChunks: 1, MaxBytes: 1}, lengths: []int{0}, channels: 1},
		{chunkSize: 1, limits: Limits{MaxChunks: 1, MaxBytes: 1}, lengths: []int{50}, channels: 8, resends: 20},
		{chunkSize: 16, limits: Limits{MaxChunks: 1, MaxBytes: 16}, lengths: []int{200, 0, 31}, channels: 3, resends: 10},
		{chunkSize: 16, limits: Limits{MaxChunks: 8, MaxBytes: 16}, lengths: []int{200}, channels: 8, resends: 10},
		{chunkSize: 4, limits: Limits{MaxChunks: 2, MaxBytes: 100}, lengths: []int{4, 8, 400}, channels: 2, resends: 10},
	}
	for i, cfg := range fixed {
		simulate(t, cfg, rand.New(rand.NewPCG(uint64(i), 2)))
	}
	var steps, dups int
	for seed := range uint64(1000) {
		rng := rand.New(rand.NewPCG(seed, 1))
		cfg := randomConfig(rng)
		s, d := simulate(t, cfg, rng)
		steps += s
		dups += d
	}
	t.Logf("%d steps, %d duplicates dropped", steps, dups)
}

func FuzzWindowDelivery(f *testing.F) {
	f.Add(uint8(0), uint8(0), uint8(0), uint8(0), uint8(0), uint16(0), uint8(0), []byte{})
	f.Add(uint8(0), uint8(7), uint8(0), uint8(0), uint8(0), uint16(40), uint8(10), []byte{1, 5, 9, 200, 3, 77, 4, 4, 18})
	f.Add(uint8(2), uint8(3), uint8(15), uint8(0), uint8(0), uint16(300), uint8(20), []byte{0xff, 0, 0x80, 7, 3, 99, 12, 250, 1, 2, 3})
	f.Add(uint8(1), uint8(5), uint8(9), uint8(7), uint8(50), uint16(777), uint8(5), []byte("the quick brown fox jumps over the lazy dog"))
	f.Add(uint8(2), uint8(1), uint8(31), uint8(3), uint8(1), uint16(513), uint8(0), []byte{9, 9, 9, 9, 0, 0, 0, 1, 1, 1})
	f.Fuzz(func(t *testing.T, devices, channels, chunkSize, maxChunks, extraBytes uint8, length uint16, resends uint8, choices []byte) {
		ch := &byteChooser{b: choices}
		cfg := simConfig{
			chunkSize: 1 + uint32(chunkSize%32),
			channels:  1 + int(channels%8),
			resends:   int(resends % 64),
		}
		cfg.limits = Limits{MaxChunks: 1 + uint32(maxChunks%8), MaxBytes: uint64(cfg.chunkSize) + uint64(extraBytes%64)}
		cfg.lengths = []int{int(length % 512)}
		for range devices % 3 {
			cfg.lengths = append(cfg.lengths, ch.IntN(512))
		}
		simulate(t, cfg, ch)
	})
}
