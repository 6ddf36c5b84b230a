package source

import (
	"context"
	"errors"
	"io"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/flow"
	"github.com/vfio-ferry/ferry/services/chunkwire"
	"github.com/vfio-ferry/ferry/services/telemetry"
	"github.com/vfio-ferry/ferry/services/wire"
)

// Defaults for the fault deadlines.
const (
	// DefaultReconnectTimeout is how long a lost channel (or an
	// unreachable destination) is retried before the migration fails.
	DefaultReconnectTimeout = 30 * time.Second
	// DefaultProgressTimeout is how long a channel may go without
	// progress on what it sent (stall.go) before it is declared stalled
	// and re-dialled. TCP keepalives take far longer to notice a
	// connection that stalls without closing.
	DefaultProgressTimeout = 30 * time.Second
)

// channel is one of a session's channels: one connection, and a Channel
// stream on it that is re-opened when it breaks.
type channel struct {
	m       *migration
	index   int32
	conn    *grpc.ClientConn
	dial    func() (*grpc.ClientConn, error)
	client  ferryv1.TransferClient
	session string
	queue   <-chan *outChunk
	resend  *resendQueue
	ready   chan<- struct{}

	readyOnce sync.Once
}

type channelStream = grpc.BidiStreamingClient[ferryv1.ChannelRequest, ferryv1.ChannelResponse]

// run serves the channel until ctx ends or the session ends. A broken
// stream is re-opened, and the chunks it had sent but the destination had
// not acknowledged are queued again; if the channel makes no progress
// within the reconnect timeout it fails the migration.
//
// Progress is the destination acknowledging something it had not before,
// not a stream that merely answered: a destination that accepts each new
// stream and then loses it again (a flapping one) would otherwise keep the
// migration alive for ever, its devices stopped.
func (c *channel) run(ctx context.Context) error {
	cfg := &c.m.a.cfg
	var lostSince time.Time
	backoff := 50 * time.Millisecond
	for {
		acked := c.m.ackedChunks()
		_, err := c.serve(ctx)
		if ctx.Err() != nil || err == nil {
			return nil
		}
		if !retryable(err) {
			return err
		}
		n := c.m.requeue(c.index, c.resend)
		if c.m.ackedChunks() > acked {
			lostSince, backoff = time.Time{}, 50*time.Millisecond
		}
		if lostSince.IsZero() {
			lostSince = time.Now()
		}
		if time.Since(lostSince) > cfg.ReconnectTimeout {
			return wire.Errorf(codes.Unavailable, wire.ReasonPeerUnavailable,
				"channel %d to the destination was lost and not re-established within %s: %s", c.index, cfg.ReconnectTimeout, wire.Message(err))
		}
		// A new connection: gRPC may still hold the old one, stalled
		// without a FIN, as usable.
		if conn, derr := c.dial(); derr == nil {
			c.conn.Close()
			c.conn, c.client = conn, ferryv1.NewTransferClient(conn)
		}
		c.m.log.Warn("channel lost; re-dialling", "channel", c.index, "resend_chunks", n, "error", wire.Message(err))
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
		backoff = min(2*backoff, time.Second)
	}
}

// serve runs one stream of the channel until it breaks. up reports
// whether the destination answered on it.
func (c *channel) serve(ctx context.Context) (up bool, err error) {
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	sctx = metadata.AppendToOutgoingContext(sctx, wire.HeaderSession, c.session, wire.HeaderChannel, strconv.Itoa(int(c.index)))
	st, err := c.client.Channel(sctx)
	if err != nil {
		return false, err
	}
	var (
		upFlag  atomic.Bool
		stalled atomic.Bool
		prog    = newProgress(c.m.createTime, len(c.m.devs), c.m.acksOf)
		// dataFailed is why the direct data connection failed, if it did.
		dataFailed atomic.Pointer[error]
	)
	timeout := c.m.a.cfg.ProgressTimeout
	dog := newWatchdog(timeout, prog, func() {
		stalled.Store(true)
		cancel()
	})
	defer dog.stop()

	s := &sender{c: c, prog: prog}
	if c.m.dataAddr != "" {
		s.dialed = c.markReady
		s.key = make(chan []byte, 1)
		s.fail = func(err error) {
			dataFailed.CompareAndSwap(nil, &err)
			cancel()
		}
	}
	var wg sync.WaitGroup
	wg.Go(func() { s.run(sctx, st) })
	err = c.receive(st, &upFlag, prog, s.key)
	cancel()
	wg.Wait()
	if upFlag.Load() {
		c.m.connected.Add(-1)
	}
	switch {
	case stalled.Load():
		err = wire.Errorf(codes.Unavailable, "", "channel %d: stalled: for %s a send did not return or nothing it sent was acknowledged", c.index, timeout)
	case dataFailed.Load() != nil:
		err = *dataFailed.Load()
	}
	return upFlag.Load(), err
}

// sender sends a stream's chunks: in Channel messages, or, when the
// session uses direct data, on the data connection the stream's key
// attaches.
type sender struct {
	c    *channel
	prog *progress
	// key receives the stream's data key (nil without direct data).
	key chan []byte
	// fail ends the stream because the data connection failed.
	fail func(error)
	// dialed, with direct data, is called once the data connection is
	// open or the stream fell back to Channel messages: the channel is
	// ready only then, so no data connection is dialled inside the
	// downtime.
	dialed func()
}

// run takes chunks from the resend queue first, then from the shared
// queue, and sends them until the stream breaks or ctx ends; the receiver
// reports why the stream ended.
func (s *sender) run(ctx context.Context, st channelStream) {
	c := s.c
	out := &chunkwire.OutChunk{}
	send := func(ch *outChunk) error {
		out.Header, out.Payload = &ch.hdr, ch.payload
		return st.SendMsg(out)
	}
	var conn net.Conn
	if s.key != nil {
		var key []byte
		select {
		case <-ctx.Done():
			return
		case key = <-s.key:
		}
		var err error
		conn, err = c.dialData(ctx, key)
		switch {
		case ctx.Err() != nil:
			if conn != nil {
				conn.Close()
			}
			return
		case err != nil:
			// The destination's data port cannot be reached from here
			// (a firewall, a NAT): this stream's chunks go in Channel
			// messages, which the destination takes as well.
			c.m.log.Warn("direct data connection failed; this channel sends its chunks in gRPC messages", "channel", c.index, "address", c.m.dataAddr, "error", err)
			c.m.fallbacks.Add(1)
			c.m.a.cfg.Metrics.DataConnection(telemetry.RoleSource, telemetry.DataFailed)
		default:
			c.m.a.cfg.Metrics.DataConnection(telemetry.RoleSource, telemetry.DataOpened)
		}
		s.dialed()
	}
	if conn != nil {
		defer conn.Close()
		// A write blocked on a destination that stopped reading ends with
		// the stream.
		stop := context.AfterFunc(ctx, func() { conn.Close() })
		defer stop()
		w := chunkwire.NewDirectWriter(conn)
		send = func(ch *outChunk) error {
			var payload []byte
			if ch.payload != nil {
				payload = ch.payload.ReadOnlyData()
			}
			if err := w.Write(&ch.hdr, payload); err != nil {
				if ctx.Err() == nil {
					s.fail(wire.Errorf(codes.Unavailable, "", "channel %d: direct data connection: %v", c.index, err))
				}
				return err
			}
			return nil
		}
	}
	for {
		ch := c.take(ctx)
		if ch == nil {
			return
		}
		if ch.acked.Load() {
			ch.release()
			continue
		}
		// The chunk is this channel's from here: if the stream breaks
		// before it is sent, it is queued again with the channel's others.
		ch.channel.Store(c.index)
		// The bandwidth limits, before the bytes reach the socket; a wait
		// here is not a send, so the stall watchdog does not count it.
		if err := c.m.throttle(ctx, ch); err != nil {
			ch.release()
			return
		}
		s.prog.sending()
		err := send(ch)
		s.prog.sentChunk(int(ch.hdr.Device), ch.hdr.Seq, err == nil)
		ch.release()
		if err != nil {
			return
		}
	}
}

// take returns the next chunk for the channel to send: one to resend
// first; then the device's next chunk, read by this sender when the
// channels read the device themselves (see puller), or the next one the
// devices' readers queued. nil once ctx ends.
func (c *channel) take(ctx context.Context) *outChunk {
	if ch := c.resend.pop(); ch != nil {
		return ch
	}
	if p := c.m.pull; p != nil {
		return c.pull(ctx, p)
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-c.resend.wait():
			if ch := c.resend.pop(); ch != nil {
				return ch
			}
		case ch := <-c.queue:
			return ch
		}
	}
}

// puller lets the channels' senders of a one-device migration read the
// device themselves, taking turns, as plain TCP senders would: the sender
// holding the turn waits for window credit, reads the next chunk
// (checksumming it as it goes), gives the turn to the next sender, and
// writes the chunk to its connection while the bytes are still in its
// core's cache. With one channel, reading and sending alternate on one
// thread, and the socket's buffer keeps the connection busy meanwhile;
// with several, one sender reads while the others send.
//
// Handing every chunk from a reader goroutine to the sender instead (with
// the destination's receivers handing chunks to its loader) cost a fifth
// more CPU per GiB on a 2-core host (docs/performance.md): the goroutines
// of each pair run on different cores, and the kernel copies of the
// chunk's bytes, at both ends, then run from colder caches. A migration of several
// devices keeps a reader per device (readDevice), so slow devices are read
// in parallel whatever the number of channels.
type puller struct {
	d *srcDevice
	// turn holds the token to read the device (1-buffered). The
	// migration puts it in once the device is in STOP_COPY; the sender
	// that ends the reading keeps it, so the others wait for resends only.
	turn chan struct{}
	// read is closed once the state is read to its end and the device
	// left STOP_COPY (err nil), or reading failed (err says why; set
	// before read closes). Then only resends are left to send.
	read chan struct{}
	err  error
}

func newPuller(d *srcDevice) *puller {
	return &puller{d: d, turn: make(chan struct{}, 1), read: make(chan struct{})}
}

// pull returns the next chunk for the channel to send: a resend, or the
// device's next chunk, read holding the turn. nil once ctx ends.
func (c *channel) pull(ctx context.Context, p *puller) *outChunk {
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-c.resend.wait():
			if ch := c.resend.pop(); ch != nil {
				return ch
			}
			continue
		case <-p.turn:
		}
		ch := c.readTurn(ctx, p)
		select {
		case <-p.read:
			// Reading ended: the turn stays taken.
		default:
			p.turn <- struct{}{}
		}
		if ch != nil || ctx.Err() != nil {
			return ch
		}
	}
}

// readTurn reads the device's next chunk, holding the turn: it waits for
// credit, or gives up the turn for a chunk to resend, which may be what
// the window waits for. It returns nil when ctx ends or reading ends
// without a chunk (a failed read).
func (c *channel) readTurn(ctx context.Context, p *puller) *outChunk {
	d, m := p.d, c.m
	var seq, off uint64
	for {
		var err error
		var admitted bool
		seq, off, admitted, err = d.gate.Poll(d.want(m.chunkSize))
		if err != nil {
			p.end(err)
			return nil
		}
		if admitted {
			break
		}
		select {
		case <-ctx.Done():
			return nil
		case <-c.resend.wait():
			if ch := c.resend.pop(); ch != nil {
				return ch
			}
		case <-d.gate.Ready():
		}
	}
	ch, err := m.readNext(d, seq, off)
	if err != nil {
		p.end(err)
		return nil
	}
	if d.finished {
		p.end(m.leaveStopCopy(d))
	}
	return ch
}

// end closes read, with the reason reading failed, if it did. Only the
// turn holder calls it, once.
func (p *puller) end(err error) {
	p.err = err
	close(p.read)
}

// dataDialTimeout bounds opening a data connection (TCP, TLS, preamble);
// past it the stream sends in Channel messages.
const dataDialTimeout = 10 * time.Second

// dialData opens the stream's direct data connection: TCP to the
// destination's data port, the agent's TLS (as its gRPC connections), the
// preamble with the stream's key.
func (c *channel) dialData(ctx context.Context, key []byte) (net.Conn, error) {
	dctx, cancel := context.WithTimeout(ctx, dataDialTimeout)
	defer cancel()
	var d net.Dialer
	raw, err := d.DialContext(dctx, "tcp", c.m.dataAddr)
	if err != nil {
		return nil, err
	}
	// TLS writes a record a system call; its records gather under it, a
	// chunk's worth at a time (chunkwire.WriteBuffer).
	buf := chunkwire.NewWriteBuffer(raw)
	conn, _, err := c.m.a.cfg.PeerCreds.ClientHandshake(dctx, c.m.dataAuthority, buf)
	if err != nil {
		raw.Close()
		return nil, err
	}
	if conn == net.Conn(buf) {
		// No security layer: the chunks go to the socket in one writev.
		conn = raw
	} else {
		conn = &chunkwire.BufferedConn{Conn: conn, Buf: buf}
	}
	if err := chunkwire.WriteDirectPreamble(conn, key); err != nil {
		conn.Close()
		return nil, err
	}
	buf.Hold()
	return conn, nil
}

// receive applies the destination's window updates until the stream ends.
// It returns nil when the destination ended the stream because the session
// ended (Finish tells how), the stream's status otherwise. With direct
// data, the key in the first response goes to key.
func (c *channel) receive(st channelStream, up *atomic.Bool, prog *progress, key chan<- []byte) error {
	m := c.m
	for {
		resp, err := st.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		if key != nil && !up.Load() {
			k := resp.GetDataKey()
			if len(k) != chunkwire.DataKeyLen {
				return wire.Errorf(codes.FailedPrecondition, wire.ReasonSessionState, "channel %d: the destination offered direct data but gave the stream a data key of %d bytes", c.index, len(k))
			}
			key <- k
		}
		prog.word()
		m.lastWord.Store(time.Now().UnixNano())
		for _, w := range resp.GetWindows() {
			if err := wire.CheckWindowUpdate(w, len(m.devs), m.sentFrontier); err != nil {
				return err
			}
			d := m.devs[w.GetDevice()]
			// Acknowledgements first: the window is bounded from what
			// the source knows was written, not from what the peer says.
			d.ack(w.GetAckedSeq())
			d.gate.Update(d.clamp(flow.Window{LimitSeq: w.GetLimitSeq(), LimitOffset: w.GetLimitOffset()}))
		}
		if !up.Load() {
			up.Store(true)
			m.connected.Add(1)
			if key == nil {
				c.markReady()
			}
		}
	}
}

// markReady tells the migration, once, that the channel is up: its
// stream answered and, with direct data, its data connection is open or
// it fell back to Channel messages.
func (c *channel) markReady() { c.readyOnce.Do(func() { c.ready <- struct{}{} }) }

// requeue queues for a resend every unacknowledged chunk last sent on
// channel, and counts them as retransmitted. It never blocks.
func (m *migration) requeue(channel int32, resend *resendQueue) int {
	var chunks []*outChunk
	for _, d := range m.devs {
		before := len(chunks)
		chunks = d.unsent(channel, chunks)
		d.retrans.Add(uint64(len(chunks) - before))
	}
	resend.push(chunks)
	return len(chunks)
}

// ackedChunks is how many chunks the destination has acknowledged over
// all devices: a channel that moves it made progress.
func (m *migration) ackedChunks() uint64 {
	var n uint64
	for _, d := range m.devs {
		n += d.ackedSeq.Load()
	}
	return n
}

// drain releases the queue references of chunks left in the send queue.
func drain(q chan *outChunk) {
	for {
		select {
		case ch := <-q:
			ch.release()
		default:
			return
		}
	}
}

// retryable reports whether a stream or call failed for the transport's
// sake (the connection broke, or the destination is not ready yet) rather
// than because the destination refused it.
func retryable(err error) bool {
	if wire.Code(err) != codes.Unavailable {
		return false
	}
	r := wire.Reason(err)
	return r == "" || r == wire.ReasonNotReady
}

// retry calls f until it succeeds, fails for a reason other than the
// transport, ctx ends, or the reconnect timeout passes.
// A call in progress is not cut at the timeout: Finish waits for the
// verdict as long as the destination needs (the switchover deadline
// bounds that).
func (m *migration) retry(ctx context.Context, f func(context.Context) error) error {
	return retryLoop(ctx, time.Now().Add(m.a.cfg.ReconnectTimeout), retryable, f)
}

// retryUntil calls f until it succeeds, fails for a reason other than the
// transport, or ctx ends.
func (m *migration) retryUntil(ctx context.Context, f func(context.Context) error) error {
	return retryLoop(ctx, time.Time{}, retryable, f)
}

// retryLoop calls f until it succeeds, fails with an error again does
// not retry, ctx ends, or (when deadline is set) deadline passes.
func retryLoop(ctx context.Context, deadline time.Time, again func(error) bool, f func(context.Context) error) error {
	backoff := 50 * time.Millisecond
	for {
		err := f(ctx)
		if err == nil || !again(err) || ctx.Err() != nil || (!deadline.IsZero() && time.Now().After(deadline)) {
			return err
		}
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return err
		case <-t.C:
		}
		backoff = min(2*backoff, time.Second)
	}
}
