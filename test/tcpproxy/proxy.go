// Package tcpproxy is a TCP proxy for Ferry's fault tests: it sits between
// a source and a destination agent on loopback and, on the test's command,
// cuts one connection or all of them, stalls a connection (no bytes, no
// FIN), slows one down, flips a byte, or refuses new connections. Faults
// that depend on progress are armed by byte counts, not by time, so a test
// needs no sleeps: "cut connection 2 once it has carried 8 MiB".
package tcpproxy

import (
	"errors"
	"io"
	"net"
	"sync"
	"time"
)

// Proxy forwards every connection accepted on its address to a target.
type Proxy struct {
	lis    net.Listener
	target string

	mu      sync.Mutex
	conns   []*Conn
	refuse  bool
	onNew   func(*Conn)
	closed  bool
	wg      sync.WaitGroup
	changed chan struct{} // closed and replaced when a connection opens

	// first arms faults for whichever connection reaches a byte count
	// first (CutFirstAfter, StallFirstAfter).
	first struct {
		sync.Mutex
		from, to                  int
		cutAt, stallAt, flipAt    int64
		cutDone, stalled, flipped bool
	}
}

// Conn is one proxied connection. Index is its accept order from 0.
type Conn struct {
	Index  int
	p      *Proxy
	client net.Conn
	server net.Conn

	mu       sync.Mutex
	carried  int64 // client->server bytes forwarded
	cutAt    int64 // cut once carried reaches it (0: never)
	stallAt  int64 // stall once carried reaches it (0: never)
	rate     int64 // client->server bytes per second (0: unlimited)
	stalled  bool
	cut      bool
	stallOff chan struct{} // closed by Cut: releases a stalled connection
	cutOnce  sync.Once
	ended    chan struct{} // closed when client->server forwarding ends
}

// New starts a proxy on 127.0.0.1 forwarding to target.
func New(target string) (*Proxy, error) { return NewOn("127.0.0.1:0", target) }

// NewOn starts a proxy listening on listen forwarding to target: another
// loopback address (127.0.0.2:PORT) can stand in for the target's port
// on 127.0.0.1.
func NewOn(listen, target string) (*Proxy, error) {
	lis, err := net.Listen("tcp", listen)
	if err != nil {
		return nil, err
	}
	p := &Proxy{lis: lis, target: target, changed: make(chan struct{})}
	p.wg.Add(1)
	go p.accept()
	return p, nil
}

// Addr is the address to dial instead of the target.
func (p *Proxy) Addr() string { return p.lis.Addr().String() }

// OnNew calls f with every new connection before it forwards a byte, so a
// test can arm faults on it.
func (p *Proxy) OnNew(f func(*Conn)) {
	p.mu.Lock()
	p.onNew = f
	p.mu.Unlock()
}

// Refuse makes the proxy close new connections at once (a dead peer).
func (p *Proxy) Refuse(refuse bool) {
	p.mu.Lock()
	p.refuse = refuse
	p.mu.Unlock()
}

// Conns returns the connections so far.
func (p *Proxy) Conns() []*Conn {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]*Conn(nil), p.conns...)
}

// CutAll closes every open connection.
func (p *Proxy) CutAll() {
	for _, c := range p.Conns() {
		c.Cut()
	}
}

// Close stops the proxy and closes every connection.
func (p *Proxy) Close() {
	p.mu.Lock()
	p.closed = true
	p.mu.Unlock()
	p.lis.Close()
	p.CutAll()
	p.wg.Wait()
}

func (p *Proxy) accept() {
	defer p.wg.Done()
	for {
		client, err := p.lis.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		if p.refuse || p.closed {
			p.mu.Unlock()
			client.Close()
			continue
		}
		p.mu.Unlock()
		server, err := net.Dial("tcp", p.target)
		if err != nil {
			client.Close()
			continue
		}
		c := &Conn{p: p, client: client, server: server, stallOff: make(chan struct{}), ended: make(chan struct{})}
		p.mu.Lock()
		c.Index = len(p.conns)
		p.conns = append(p.conns, c)
		onNew := p.onNew
		close(p.changed)
		p.changed = make(chan struct{})
		p.mu.Unlock()
		if onNew != nil {
			onNew(c)
		}
		p.wg.Add(2)
		go func() {
			defer p.wg.Done()
			defer close(c.ended)
			c.pump(server, client, true)
		}()
		go func() {
			defer p.wg.Done()
			c.pump(client, server, false)
		}()
	}
}

// CutFirstAfter arms one cut: of whichever connection, among those with
// an index from from to to, first carries n client->server bytes. Which
// channel carries how much depends on scheduling; this cuts one that did
// carry that much.
func (p *Proxy) CutFirstAfter(n int64, from, to int) {
	p.first.Lock()
	p.first.from, p.first.to, p.first.cutAt = from, to, n
	p.first.Unlock()
}

// StallFirstAfter is CutFirstAfter for a stall (see StallAfter). Armed
// together, they pick two connections: the stalled one carries no more.
func (p *Proxy) StallFirstAfter(n int64, from, to int) {
	p.first.Lock()
	p.first.from, p.first.to, p.first.stallAt = from, to, n
	p.first.Unlock()
}

// FlipFirstAt arms one bit flip: at client->server offset n of whichever
// connection, among those with an index from from to to, first carries
// that far.
func (p *Proxy) FlipFirstAt(n int64, from, to int) {
	p.first.Lock()
	p.first.from, p.first.to, p.first.flipAt = from, to, n
	p.first.Unlock()
}

// firstFlip reports whether the bytes [start, end) of a connection take
// the proxy-wide flip, and spends it if so.
func (p *Proxy) firstFlip(index int, start, end int64) (int64, bool) {
	f := &p.first
	f.Lock()
	defer f.Unlock()
	if f.flipped || f.flipAt <= 0 || index < f.from || index > f.to || f.flipAt < start || f.flipAt >= end {
		return 0, false
	}
	f.flipped = true
	return f.flipAt, true
}

// firstFaults reports whether a connection that has carried end bytes
// takes the proxy-wide cut or stall, and spends it if so.
func (p *Proxy) firstFaults(index int, end int64) (cut, stall bool) {
	f := &p.first
	f.Lock()
	defer f.Unlock()
	if index < f.from || index > f.to {
		return false, false
	}
	if !f.stalled && f.stallAt > 0 && end >= f.stallAt {
		f.stalled = true
		return false, true
	}
	if !f.cutDone && f.cutAt > 0 && end >= f.cutAt {
		f.cutDone = true
		return true, false
	}
	return false, false
}

// CutAfter arms a cut once the connection has carried n client->server
// bytes.
func (c *Conn) CutAfter(n int64) {
	c.mu.Lock()
	c.cutAt = n
	c.mu.Unlock()
}

// StallAfter arms a stall once the connection has carried n
// client->server bytes: from then on no byte moves either way and nothing
// is closed, until Cut.
func (c *Conn) StallAfter(n int64) {
	c.mu.Lock()
	c.stallAt = n
	c.mu.Unlock()
}

// Limit caps the client->server rate in bytes per second.
func (c *Conn) Limit(bytesPerSecond int64) {
	c.mu.Lock()
	c.rate = bytesPerSecond
	c.mu.Unlock()
}

// Carried is the client->server bytes forwarded so far.
func (c *Conn) Carried() int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.carried
}

// Ended is closed once the connection carries no more client->server
// bytes: the client closed it, or it was cut.
func (c *Conn) Ended() <-chan struct{} { return c.ended }

// Cut closes both sides of the connection.
func (c *Conn) Cut() {
	c.mu.Lock()
	c.cut = true
	c.mu.Unlock()
	c.cutOnce.Do(func() { close(c.stallOff) })
	c.client.Close()
	c.server.Close()
}

// pump copies src to dst; up is the client->server direction, where the
// faults apply.
func (c *Conn) pump(dst, src net.Conn, up bool) {
	defer func() {
		// A finished direction closes the connection: the proxy never
		// leaves a half-open connection behind unless told to stall.
		c.mu.Lock()
		stalled := c.stalled
		c.mu.Unlock()
		if !stalled {
			dst.Close()
			src.Close()
		}
	}()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if !c.forward(dst, buf[:n], up) {
				return
			}
		}
		if err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) {
				return
			}
			return
		}
	}
}

// forward writes b to dst, applying the faults armed for the connection.
func (c *Conn) forward(dst net.Conn, b []byte, up bool) bool {
	c.mu.Lock()
	if c.stalled {
		c.mu.Unlock()
		<-c.stallOff
		return false
	}
	if !up {
		c.mu.Unlock()
		_, err := dst.Write(b)
		return err == nil
	}
	start := c.carried
	end := start + int64(len(b))
	if off, ok := c.p.firstFlip(c.Index, start, end); ok {
		b[off-start] ^= 0x01
	}
	cut := c.cutAt > 0 && end >= c.cutAt
	stall := c.stallAt > 0 && end >= c.stallAt
	if !cut && !stall {
		cut, stall = c.p.firstFaults(c.Index, end)
	}
	rate := c.rate
	c.carried = end
	if stall {
		c.stalled = true
	}
	c.mu.Unlock()
	if cut {
		c.Cut()
		return false
	}
	if stall {
		// Hold the bytes; the other direction stalls too on its next read.
		<-c.stallOff
		return false
	}
	if rate > 0 {
		time.Sleep(time.Duration(int64(len(b)) * int64(time.Second) / rate))
	}
	_, err := dst.Write(b)
	return err == nil
}
