package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/vfio-ferry/ferry/pkg/vfio"
)

// The raw TCP baseline: the least a transfer of device state over N
// loopback connections can cost on this machine. The sender reads each
// device's stream from a simulated device in chunks; chunk i of device d
// travels on connection (i+d) mod N behind a 4-byte length and nothing
// else; the receiver writes the chunks, in order, into simulated
// destination devices, which check every byte and verify the whole state
// at RESUMING->STOP. Both sides therefore do the device work Ferry does;
// what they leave out is everything Ferry adds (gRPC, HTTP/2, protobuf
// headers, CRC32C, digests, windows, acknowledgements, reassembly).
//
// Since each side knows the schedule, no sequence number is needed: on
// either side, the goroutine of connection c handles, in rounds r = 0, 1,
// ..., chunk r*N + (c-d) mod N of every device d, and waits for its turn
// on the device (a token passed from connection to connection) only
// around the device read or write, so socket I/O overlaps across
// connections as Ferry's channels do.

// peerResult is a raw TCP peer's line on stdout.
type peerResult struct {
	Addr          string `json:"addr,omitempty"`
	StartUnixNano int64  `json:"start_unix_nano,omitempty"`
	EndUnixNano   int64  `json:"end_unix_nano,omitempty"`
	Bytes         uint64 `json:"bytes"`
	PeakRSS       uint64 `json:"peak_rss"`
	Error         string `json:"error,omitempty"`
}

// benchRawTCP runs one raw TCP transfer between two child processes.
func benchRawTCP(ctx context.Context, cfg benchConfig, channels int) (benchRun, error) {
	ctx, cancel := context.WithTimeout(ctx, benchTimeout(cfg))
	defer cancel()
	common := []string{
		"--channels", strconv.Itoa(channels), "--devices", strconv.Itoa(cfg.devices),
		"--size", strconv.FormatUint(cfg.size, 10), "--chunk-size", strconv.FormatUint(uint64(cfg.chunkSize), 10),
	}
	if cfg.rate != "" {
		common = append(common, "--rate", cfg.rate)
	}
	recv, err := startBenchChild(ctx, "rawtcp receiver", cfg.exe, append([]string{"bench", "peer", "rawtcp-recv"}, common...)...)
	if err != nil {
		return benchRun{}, err
	}
	var hello peerResult
	if err := recv.next(&hello); err != nil {
		recv.kill()
		return benchRun{}, err
	}
	send, err := startBenchChild(ctx, "rawtcp sender", cfg.exe, append([]string{"bench", "peer", "rawtcp-send", "--addr", hello.Addr}, common...)...)
	if err != nil {
		recv.kill()
		return benchRun{}, err
	}
	var sres, rres peerResult
	serr := send.next(&sres)
	rerr := recv.next(&rres)
	scpu, swerr := send.wait()
	rcpu, rwerr := recv.wait()
	if err := errors.Join(serr, rerr, errPeer(sres.Error), errPeer(rres.Error), swerr, rwerr); err != nil {
		return benchRun{}, err
	}
	if rres.Bytes != cfg.totalBytes() {
		return benchRun{}, fmt.Errorf("the receiver wrote %d bytes of %d", rres.Bytes, cfg.totalBytes())
	}
	secs := time.Duration(rres.EndUnixNano - sres.StartUnixNano).Seconds()
	if secs <= 0 {
		return benchRun{}, fmt.Errorf("the transfer took %v", secs)
	}
	return benchRun{
		bytesPerSecond: float64(rres.Bytes) / secs, seconds: secs,
		cpuSeconds: scpu + rcpu, sendCPU: scpu, recvCPU: rcpu,
		recvRSS: rres.PeakRSS, sendRSS: sres.PeakRSS,
	}, nil
}

// rawPeer is one side of a raw TCP transfer.
type rawPeer struct {
	channels  int
	devices   int
	size      uint64
	chunkSize int
	rate      string

	streams []vfio.DataStream
	devs    []*vfio.SimDevice
	// turns[d][c] holds the token of device d when connection c is next
	// to read (or write) it.
	turns [][]chan struct{}
}

func (p *rawPeer) chunks() int { return int((p.size + uint64(p.chunkSize) - 1) / uint64(p.chunkSize)) }

func (p *rawPeer) chunkLen(i int) int {
	return int(min(uint64(p.chunkSize), p.size-uint64(i)*uint64(p.chunkSize)))
}

// open opens the devices in target (STOP_COPY or RESUMING) and sets up
// the turn tokens.
func (p *rawPeer) open(target vfio.State) error {
	for d := range p.devices {
		spec := fmt.Sprintf("sim:size=%d,seed=%d", p.size, d+1)
		if p.rate != "" {
			spec += ",rate=" + p.rate
		}
		s, err := vfio.ParseSpec(spec)
		if err != nil {
			return err
		}
		dev, err := vfio.NewSim(s)
		if err != nil {
			return err
		}
		st, err := dev.SetState(target)
		if err != nil {
			return err
		}
		p.devs = append(p.devs, dev)
		p.streams = append(p.streams, st)
		turns := make([]chan struct{}, p.channels)
		for c := range turns {
			turns[c] = make(chan struct{}, 1)
		}
		turns[d%p.channels] <- struct{}{}
		p.turns = append(p.turns, turns)
	}
	return nil
}

// each calls f for every chunk connection c carries, in order, holding
// the device's turn around turn(d, i).
func (p *rawPeer) each(ctx context.Context, c int, f func(d, i, n int, turn func(func() error) error) error) error {
	n := p.chunks()
	for r := 0; ; r++ {
		any := false
		for d := range p.devices {
			i := r*p.channels + ((c-d)%p.channels+p.channels)%p.channels
			if i >= n {
				continue
			}
			any = true
			turn := func(g func() error) error {
				select {
				case <-p.turns[d][c]:
				case <-ctx.Done():
					return ctx.Err()
				}
				err := g()
				p.turns[d][(c+1)%p.channels] <- struct{}{}
				return err
			}
			if err := f(d, i, p.chunkLen(i), turn); err != nil {
				return err
			}
		}
		if !any {
			return nil
		}
	}
}

func runBenchPeer(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		return &exitError{code: 2, err: errors.New("bench peer: rawtcp-send or rawtcp-recv")}
	}
	role := args[0]
	fs := newFlagSet("bench peer "+role, stderr, "(internal to ferry bench)")
	addr := fs.String("addr", "", "receiver address")
	channels := fs.Int("channels", 1, "connections")
	devices := fs.Int("devices", 1, "devices")
	sz := fs.Uint64("size", 1<<30, "bytes per device")
	chunk := fs.Int("chunk-size", 1<<20, "chunk size")
	rate := fs.String("rate", "", "device read cap")
	if err := parse(fs, args[1:]); err != nil {
		return err
	}
	p := &rawPeer{channels: *channels, devices: *devices, size: *sz, chunkSize: *chunk, rate: *rate}
	if p.channels < 1 || p.devices < 1 || p.chunkSize < 1 || p.size == 0 {
		return &exitError{code: 2, err: errors.New("bench peer: bad flags")}
	}
	enc := json.NewEncoder(stdout)
	var res peerResult
	var err error
	switch role {
	case "rawtcp-send":
		res, err = p.send(ctx, *addr)
	case "rawtcp-recv":
		res, err = p.recv(ctx, func(a string) error { return enc.Encode(peerResult{Addr: a}) })
	default:
		return &exitError{code: 2, err: fmt.Errorf("bench peer: unknown role %q", role)}
	}
	if err != nil {
		res.Error = err.Error()
	}
	res.PeakRSS = peakRSSOf("self")
	if err := enc.Encode(res); err != nil {
		return err
	}
	if res.Error != "" {
		return &exitError{code: 1}
	}
	return nil
}

// send dials the receiver and streams every device's state to it.
func (p *rawPeer) send(ctx context.Context, addr string) (peerResult, error) {
	var res peerResult
	if err := p.open(vfio.StateStopCopy); err != nil {
		return res, err
	}
	conns := make([]net.Conn, p.channels)
	for c := range conns {
		conn, err := (&net.Dialer{}).DialContext(ctx, "tcp", addr)
		if err != nil {
			return res, err
		}
		defer conn.Close()
		var hello [4]byte
		binary.LittleEndian.PutUint32(hello[:], uint32(c))
		if _, err := conn.Write(hello[:]); err != nil {
			return res, err
		}
		conns[c] = conn
	}
	var start sync.Once
	g, gctx := errgroup.WithContext(ctx)
	stop := context.AfterFunc(gctx, func() {
		for _, c := range conns {
			c.Close()
		}
	})
	defer stop()
	for c, conn := range conns {
		g.Go(func() error {
			// One buffer per connection: the length, then the chunk read
			// straight behind it, written with one call.
			buf := make([]byte, 4+p.chunkSize)
			return p.each(gctx, c, func(d, i, n int, turn func(func() error) error) error {
				err := turn(func() error {
					start.Do(func() { res.StartUnixNano = time.Now().UnixNano() })
					_, err := io.ReadFull(p.streams[d], buf[4:4+n])
					return err
				})
				if err != nil {
					return fmt.Errorf("device %d chunk %d: %w", d, i, err)
				}
				binary.LittleEndian.PutUint32(buf, uint32(n))
				_, err = conn.Write(buf[:4+n])
				return err
			})
		})
	}
	if err := g.Wait(); err != nil {
		return res, err
	}
	for _, s := range p.streams {
		s.Close()
	}
	res.Bytes = p.size * uint64(p.devices)
	return res, nil
}

// recv accepts the sender's connections and writes what arrives into the
// devices, then verifies them.
func (p *rawPeer) recv(ctx context.Context, ready func(addr string) error) (peerResult, error) {
	var res peerResult
	if err := p.open(vfio.StateResuming); err != nil {
		return res, err
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return res, err
	}
	defer lis.Close()
	if err := ready(lis.Addr().String()); err != nil {
		return res, err
	}
	conns := make([]net.Conn, p.channels)
	for range conns {
		conn, err := lis.Accept()
		if err != nil {
			return res, err
		}
		defer conn.Close()
		var hello [4]byte
		if _, err := io.ReadFull(conn, hello[:]); err != nil {
			return res, err
		}
		c := int(binary.LittleEndian.Uint32(hello[:]))
		if c >= len(conns) || conns[c] != nil {
			return res, fmt.Errorf("bad connection index %d", c)
		}
		conns[c] = conn
	}
	g, gctx := errgroup.WithContext(ctx)
	stop := context.AfterFunc(gctx, func() {
		for _, c := range conns {
			c.Close()
		}
	})
	defer stop()
	for c, conn := range conns {
		g.Go(func() error {
			buf := make([]byte, 4+p.chunkSize)
			return p.each(gctx, c, func(d, i, n int, turn func(func() error) error) error {
				if _, err := io.ReadFull(conn, buf[:4]); err != nil {
					return err
				}
				if l := int(binary.LittleEndian.Uint32(buf)); l != n {
					return fmt.Errorf("device %d chunk %d: %d bytes, want %d", d, i, l, n)
				}
				if _, err := io.ReadFull(conn, buf[4:4+n]); err != nil {
					return err
				}
				return turn(func() error {
					_, err := p.streams[d].Write(buf[4 : 4+n])
					return err
				})
			})
		})
	}
	if err := g.Wait(); err != nil {
		return res, err
	}
	for d, dev := range p.devs {
		p.streams[d].Close()
		if _, err := dev.SetState(vfio.StateStop); err != nil {
			return res, fmt.Errorf("device %d did not verify: %w", d, err)
		}
	}
	res.EndUnixNano = time.Now().UnixNano()
	res.Bytes = p.size * uint64(p.devices)
	return res, nil
}
