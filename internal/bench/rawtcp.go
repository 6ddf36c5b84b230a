package bench

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/services/peerauth"
)

// The raw TCP baseline: the least a transfer of device state over N
// loopback connections can cost on this machine. The sender reads each
// device's stream from a simulated device in chunks, each device on a
// goroutine of its own as Ferry's readers do; chunk i of device d travels
// on connection (i+d) mod N behind a 4-byte length and nothing else; the
// receiver writes the chunks, in order, into simulated destination
// devices, again a goroutine per device, and the devices check every byte
// and verify the whole state at RESUMING->STOP. Both sides therefore do
// the device work Ferry does; what they leave out is everything Ferry adds
// (gRPC, HTTP/2, protobuf headers, CRC32C, digests, windows,
// acknowledgements, reassembly). With `ferry bench --tls` every connection
// carries the agents' TLS 1.3 configuration (peerauth.ServerTLS, peerauth.ClientTLS)
// with the run's certificates, so the ratio still isolates what Ferry adds.
//
// Since each side knows the schedule, no sequence number is needed: the
// goroutine of connection c carries, in rounds r = 0, 1, ..., chunk
// r*N + (c-d) mod N of every device d. With several devices it hands
// chunks to and from the devices' goroutines through small per-device,
// per-connection pipes; with one, the connections' goroutines take turns
// on the device themselves (see send).

// peerResult is a raw TCP peer's line on stdout.
type peerResult struct {
	Addr          string `json:"addr,omitempty"`
	StartUnixNano int64  `json:"start_unix_nano,omitempty"`
	EndUnixNano   int64  `json:"end_unix_nano,omitempty"`
	Bytes         uint64 `json:"bytes"`
	PeakRSS       uint64 `json:"peak_rss"`
	Error         string `json:"error,omitempty"`
}

// runRawTCP runs one raw TCP transfer between two child processes.
func runRawTCP(ctx context.Context, cfg config, channels int) (sample, error) {
	ctx, cancel := context.WithTimeout(ctx, transferTimeout(cfg))
	defer cancel()
	common := []string{
		"--channels", strconv.Itoa(channels), "--devices", strconv.Itoa(cfg.devices),
		"--size", strconv.FormatUint(cfg.size, 10), "--chunk-size", strconv.FormatUint(uint64(cfg.chunkSize), 10),
	}
	if cfg.rate != "" {
		common = append(common, "--rate", cfg.rate)
	}
	common = append(common, cfg.tls.peerArgs()...)
	recv, err := startChild(ctx, "rawtcp receiver", cfg.destNS(), cfg.exe, append([]string{"bench", "peer", "rawtcp-recv", "--listen", cfg.anyPort(cfg.destNS())}, common...)...)
	if err != nil {
		return sample{}, err
	}
	var hello peerResult
	if err := recv.next(&hello); err != nil {
		recv.kill()
		return sample{}, err
	}
	send, err := startChild(ctx, "rawtcp sender", cfg.sourceNS(), cfg.exe, append([]string{"bench", "peer", "rawtcp-send", "--addr", hello.Addr}, common...)...)
	if err != nil {
		recv.kill()
		return sample{}, err
	}
	var sres, rres peerResult
	serr := send.next(&sres)
	rerr := recv.next(&rres)
	scpu, swerr := send.wait()
	rcpu, rwerr := recv.wait()
	if err := errors.Join(serr, rerr, errPeer(sres.Error), errPeer(rres.Error), swerr, rwerr); err != nil {
		return sample{}, err
	}
	if rres.Bytes != cfg.totalBytes() {
		return sample{}, fmt.Errorf("the receiver wrote %d bytes of %d", rres.Bytes, cfg.totalBytes())
	}
	secs := time.Duration(rres.EndUnixNano - sres.StartUnixNano).Seconds()
	if secs <= 0 {
		return sample{}, fmt.Errorf("the transfer took %v", secs)
	}
	return sample{
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
	// tls, when configured, puts mutual TLS on every connection, as
	// `ferry bench --tls` does for Ferry's.
	tls peerauth.TLSFiles

	streams []vfio.DataStream
	devs    []*vfio.SimDevice
	// pipes[d][c] carries device d's chunks that travel on connection c,
	// in order, between the device's goroutine and the connection's; free[d]
	// holds device d's idle buffers.
	pipes [][]chan rawChunk
	free  []chan []byte
}

// rawChunk is a chunk between a device's goroutine and a connection's.
type rawChunk struct {
	buf []byte // 4-byte length, then the bytes
	n   int
}

func (p *rawPeer) chunks() int { return int((p.size + uint64(p.chunkSize) - 1) / uint64(p.chunkSize)) }

func (p *rawPeer) chunkLen(i int) int {
	return int(min(uint64(p.chunkSize), p.size-uint64(i)*uint64(p.chunkSize)))
}

// conn is the connection chunk i of device d travels on.
func (p *rawPeer) conn(d, i int) int { return (i + d) % p.channels }

// open opens the devices in target (STOP_COPY or RESUMING) and, with
// several devices, sets up the pipes (two chunks each) and each device's
// buffers. A connection
// holds at most three of a device's buffers ahead of the chunk that
// device waits for (one in hand, two in its pipe), so 3N+2 buffers per
// device never run out while the device waits: no deadlock.
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
		if p.devices == 1 {
			continue // the connections take turns on the device: no pipes
		}
		pipes := make([]chan rawChunk, p.channels)
		for c := range pipes {
			pipes[c] = make(chan rawChunk, 2)
		}
		p.pipes = append(p.pipes, pipes)
		free := make(chan []byte, 3*p.channels+2)
		for range cap(free) {
			free <- make([]byte, 4+p.chunkSize)
		}
		p.free = append(p.free, free)
	}
	return nil
}

// schedule calls f, in order, for every chunk connection c carries: in
// rounds, one chunk of each device.
func (p *rawPeer) schedule(c int, f func(d, i, n int) error) error {
	n := p.chunks()
	for r := 0; ; r++ {
		any := false
		for d := range p.devices {
			i := r*p.channels + ((c-d)%p.channels+p.channels)%p.channels
			if i >= n {
				continue
			}
			any = true
			if err := f(d, i, p.chunkLen(i)); err != nil {
				return err
			}
		}
		if !any {
			return nil
		}
	}
}

// turns are the turn tokens of a single device: turns[c] holds it while
// connection c is next to read (or write) the device.
func (p *rawPeer) turns() []chan struct{} {
	t := make([]chan struct{}, p.channels)
	for c := range t {
		t[c] = make(chan struct{}, 1)
	}
	t[0] <- struct{}{}
	return t
}

// inTurn runs f holding the device's turn and passes it to the next
// connection.
func (p *rawPeer) inTurn(ctx context.Context, turns []chan struct{}, c int, f func() error) error {
	if _, err := recvChan(ctx, turns[c]); err != nil {
		return err
	}
	err := f()
	turns[(c+1)%p.channels] <- struct{}{}
	return err
}

// eachChunk runs, on g, a goroutine per connection that calls f for every
// chunk i (n bytes) of the single device the connection carries, in order,
// with a chunk buffer of the connection's own.
func (p *rawPeer) eachChunk(g *errgroup.Group, conns []net.Conn, f func(c int, conn net.Conn, buf []byte, i, n int) error) {
	for c, conn := range conns {
		g.Go(func() error {
			buf := make([]byte, 4+p.chunkSize)
			return p.schedule(c, func(_, i, n int) error { return f(c, conn, buf, i, n) })
		})
	}
}

// connGroup is an errgroup for goroutines that use conns: when one fails
// (or ctx ends) the connections close, so the others' I/O ends too. Call
// stop when done.
func connGroup(ctx context.Context, conns []net.Conn) (g *errgroup.Group, gctx context.Context, stop func() bool) {
	g, gctx = errgroup.WithContext(ctx)
	stop = context.AfterFunc(gctx, func() {
		for _, c := range conns {
			c.Close()
		}
	})
	return g, gctx, stop
}

// readRawChunk reads chunk i of device d, n bytes behind its 4-byte
// length, into buf.
func readRawChunk(conn net.Conn, buf []byte, d, i, n int) error {
	if _, err := io.ReadFull(conn, buf[:4]); err != nil {
		return err
	}
	if l := int(binary.LittleEndian.Uint32(buf)); l != n {
		return fmt.Errorf("device %d chunk %d: %d bytes, want %d", d, i, l, n)
	}
	_, err := io.ReadFull(conn, buf[4:4+n])
	return err
}

// recvChan and sendChan wait on a channel or ctx.
func recvChan[T any](ctx context.Context, ch <-chan T) (T, error) {
	select {
	case v := <-ch:
		return v, nil
	case <-ctx.Done():
		var zero T
		return zero, ctx.Err()
	}
}

func sendChan[T any](ctx context.Context, ch chan<- T, v T) error {
	select {
	case ch <- v:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// ErrUsage marks a RunPeer error in its arguments.
var ErrUsage = errors.New("bench peer: usage")

// ErrPeerFailed is RunPeer's error when the transfer failed; the failure
// is in the result line it printed.
var ErrPeerFailed = errors.New("bench peer: the transfer failed")

// RunPeer is `ferry bench peer ROLE [flags]`, the hidden half of the
// benchmark: one side of a raw TCP transfer, in a child process of its
// own. It prints its result as JSON lines on stdout (rawtcp-recv first
// prints the address it listens on).
func RunPeer(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		return fmt.Errorf("%w: rawtcp-send or rawtcp-recv", ErrUsage)
	}
	role := args[0]
	fs := flag.NewFlagSet("ferry bench peer "+role, flag.ContinueOnError)
	fs.SetOutput(stderr)
	addr := fs.String("addr", "", "receiver address")
	listen := fs.String("listen", "127.0.0.1:0", "the receiver's listen address")
	channels := fs.Int("channels", 1, "connections")
	devices := fs.Int("devices", 1, "devices")
	sz := fs.Uint64("size", 1<<30, "bytes per device")
	chunk := fs.Int("chunk-size", 1<<20, "chunk size")
	rate := fs.String("rate", "", "device read cap")
	var files peerauth.TLSFiles
	fs.StringVar(&files.Cert, "tls-cert", "", "certificate (mutual TLS when given)")
	fs.StringVar(&files.Key, "tls-key", "", "its key")
	fs.StringVar(&files.CA, "tls-ca", "", "the CA")
	if err := fs.Parse(args[1:]); err != nil {
		return fmt.Errorf("%w: %v", ErrUsage, err)
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("%w: unexpected argument %q", ErrUsage, fs.Arg(0))
	}
	p := &rawPeer{channels: *channels, devices: *devices, size: *sz, chunkSize: *chunk, rate: *rate, tls: files}
	if p.channels < 1 || p.devices < 1 || p.chunkSize < 1 || p.size == 0 {
		return fmt.Errorf("%w: bad flags", ErrUsage)
	}
	enc := json.NewEncoder(stdout)
	var res peerResult
	var err error
	switch role {
	case "rawtcp-send":
		res, err = p.send(ctx, *addr)
	case "rawtcp-recv":
		res, err = p.recv(ctx, *listen, func(a string) error { return enc.Encode(peerResult{Addr: a}) })
	default:
		return fmt.Errorf("%w: unknown role %q", ErrUsage, role)
	}
	if err != nil {
		res.Error = err.Error()
	}
	res.PeakRSS = peakRSSOf("self")
	if err := enc.Encode(res); err != nil {
		return err
	}
	if res.Error != "" {
		return ErrPeerFailed
	}
	return nil
}

// send dials the receiver and streams every device's state to it: each
// device read by a goroutine of its own, as fast as it allows, each
// connection written by its own.
func (p *rawPeer) send(ctx context.Context, addr string) (peerResult, error) {
	var res peerResult
	if err := p.open(vfio.StateStopCopy); err != nil {
		return res, err
	}
	var tlsConf *tls.Config
	if p.tls.Configured() {
		var err error
		if tlsConf, err = peerauth.ClientTLS(p.tls, "127.0.0.1"); err != nil {
			return res, err
		}
	}
	conns := make([]net.Conn, p.channels)
	for c := range conns {
		conn, err := (&net.Dialer{}).DialContext(ctx, "tcp", addr)
		if err != nil {
			return res, err
		}
		defer conn.Close()
		if tlsConf != nil {
			tc := tls.Client(conn, tlsConf)
			if err := tc.HandshakeContext(ctx); err != nil {
				return res, err
			}
			conn = tc
		}
		var hello [4]byte
		binary.LittleEndian.PutUint32(hello[:], uint32(c))
		if _, err := conn.Write(hello[:]); err != nil {
			return res, err
		}
		conns[c] = conn
	}
	var start sync.Once
	g, gctx, stop := connGroup(ctx, conns)
	defer stop()
	if p.devices == 1 {
		// One device: each connection's goroutine reads its chunks from the
		// device itself, in turn, and writes them at once, while they are
		// still in its cache; a hand-off to another goroutine costs more
		// than the pipes save when there is one device to wait for.
		turns := p.turns()
		p.eachChunk(g, conns, func(c int, conn net.Conn, buf []byte, i, n int) error {
			err := p.inTurn(gctx, turns, c, func() error {
				start.Do(func() { res.StartUnixNano = time.Now().UnixNano() })
				_, err := io.ReadFull(p.streams[0], buf[4:4+n])
				return err
			})
			if err != nil {
				return fmt.Errorf("device 0 chunk %d: %w", i, err)
			}
			binary.LittleEndian.PutUint32(buf, uint32(n))
			_, err = conn.Write(buf[:4+n])
			return err
		})
	} else {
		for d := range p.devices {
			g.Go(func() error {
				for i := range p.chunks() {
					buf, err := recvChan(gctx, p.free[d])
					if err != nil {
						return err
					}
					n := p.chunkLen(i)
					start.Do(func() { res.StartUnixNano = time.Now().UnixNano() })
					// The chunk is read straight behind its length, and goes
					// out with one write.
					if _, err := io.ReadFull(p.streams[d], buf[4:4+n]); err != nil {
						return fmt.Errorf("device %d chunk %d: %w", d, i, err)
					}
					binary.LittleEndian.PutUint32(buf, uint32(n))
					if err := sendChan(gctx, p.pipes[d][p.conn(d, i)], rawChunk{buf: buf, n: n}); err != nil {
						return err
					}
				}
				return nil
			})
		}
		for c, conn := range conns {
			g.Go(func() error {
				return p.schedule(c, func(d, i, n int) error {
					ch, err := recvChan(gctx, p.pipes[d][c])
					if err != nil {
						return err
					}
					_, err = conn.Write(ch.buf[:4+ch.n])
					p.free[d] <- ch.buf
					return err
				})
			})
		}
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
func (p *rawPeer) recv(ctx context.Context, listen string, ready func(addr string) error) (peerResult, error) {
	var res peerResult
	if err := p.open(vfio.StateResuming); err != nil {
		return res, err
	}
	var tlsConf *tls.Config
	if p.tls.Configured() {
		var err error
		if tlsConf, err = peerauth.ServerTLS(p.tls); err != nil {
			return res, err
		}
	}
	lis, err := net.Listen("tcp", listen)
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
		if tlsConf != nil {
			tc := tls.Server(conn, tlsConf)
			if err := tc.HandshakeContext(ctx); err != nil {
				return res, err
			}
			conn = tc
		}
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
	g, gctx, stop := connGroup(ctx, conns)
	defer stop()
	if p.devices == 1 {
		// One device: each connection's goroutine writes what it read
		// into the device itself, in turn (see send).
		turns := p.turns()
		p.eachChunk(g, conns, func(c int, conn net.Conn, buf []byte, i, n int) error {
			if err := readRawChunk(conn, buf, 0, i, n); err != nil {
				return err
			}
			return p.inTurn(gctx, turns, c, func() error {
				_, err := p.streams[0].Write(buf[4 : 4+n])
				return err
			})
		})
	} else {
		for c, conn := range conns {
			g.Go(func() error {
				return p.schedule(c, func(d, i, n int) error {
					buf, err := recvChan(gctx, p.free[d])
					if err != nil {
						return err
					}
					if err := readRawChunk(conn, buf, d, i, n); err != nil {
						return err
					}
					return sendChan(gctx, p.pipes[d][c], rawChunk{buf: buf, n: n})
				})
			})
		}
		for d := range p.devices {
			g.Go(func() error {
				for i := range p.chunks() {
					ch, err := recvChan(gctx, p.pipes[d][p.conn(d, i)])
					if err != nil {
						return err
					}
					_, err = p.streams[d].Write(ch.buf[4 : 4+ch.n])
					p.free[d] <- ch.buf
					if err != nil {
						return fmt.Errorf("device %d chunk %d: %w", d, i, err)
					}
				}
				return nil
			})
		}
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
