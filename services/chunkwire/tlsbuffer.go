package chunkwire

import (
	"bufio"
	"net"
	"sync"
)

// Under TLS, crypto/tls writes every record of at most 16 KiB to the
// socket with a write call of its own, and reads the socket about a
// record at a time: 64 system calls a MiB at each end, and at the
// destination as many chances to sleep and be woken again as the source
// has write calls. A data connection's TLS therefore runs over buffers
// between it and the TCP socket: at the source, the records of a chunk
// gather in a WriteBuffer and reach the socket TLSSocketBuffer bytes at a
// time; at the destination, a ReadBuffer reads what the socket holds, up
// to as much, in one call, and crypto/tls takes its records from there.
// The records on the wire are the same; only the system calls change.

// TLSSocketBuffer is the size of the buffers under a data connection's TLS.
const TLSSocketBuffer = 256 << 10

// WriteBuffer is a TCP connection whose writes, once Hold is called,
// gather in a buffer until it is full or Flush is called. Before Hold they
// go straight to the socket, so the TLS handshake, whose peer answers each
// flight, is never held back. Close closes the socket at once, dropping
// what is held, so a Close from another goroutine ends a blocked Flush.
type WriteBuffer struct {
	net.Conn
	mu   sync.Mutex
	w    *bufio.Writer // nil until Hold
	conn net.Conn
}

// NewWriteBuffer returns a WriteBuffer over conn.
func NewWriteBuffer(conn net.Conn) *WriteBuffer {
	return &WriteBuffer{Conn: conn, conn: conn}
}

// Hold makes later writes gather in the buffer.
func (b *WriteBuffer) Hold() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.w == nil {
		b.w = bufio.NewWriterSize(b.conn, TLSSocketBuffer)
	}
}

// Write writes p to the socket, or into the buffer once held.
func (b *WriteBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.w == nil {
		return b.conn.Write(p)
	}
	return b.w.Write(p)
}

// Flush writes what the buffer holds to the socket.
func (b *WriteBuffer) Flush() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.w == nil {
		return nil
	}
	return b.w.Flush()
}

// ReadBuffer is a TCP connection read through a TLSSocketBuffer buffer.
// It is not safe for concurrent reads, nor is the TLS it serves.
type ReadBuffer struct {
	net.Conn
	r *bufio.Reader
}

// NewReadBuffer returns a ReadBuffer over conn.
func NewReadBuffer(conn net.Conn) *ReadBuffer {
	return &ReadBuffer{Conn: conn, r: bufio.NewReaderSize(conn, TLSSocketBuffer)}
}

// Read reads from the buffer, filling it from the socket when it is empty.
func (b *ReadBuffer) Read(p []byte) (int, error) { return b.r.Read(p) }

// BufferedConn is a connection's TLS (or other security) over its
// WriteBuffer, as the source writes chunks to it: a DirectWriter flushes
// it after each chunk. Close closes the socket at once, without TLS's
// close_notify, which would wait behind a Flush blocked on a destination
// that stopped reading.
type BufferedConn struct {
	net.Conn // the security layer, over Buf
	Buf      *WriteBuffer
}

// Flush writes what the buffer holds to the socket.
func (c *BufferedConn) Flush() error { return c.Buf.Flush() }

// Close closes the socket.
func (c *BufferedConn) Close() error { return c.Buf.Close() }
