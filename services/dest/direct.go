package dest

import (
	"context"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	"github.com/vfio-ferry/ferry/services/chunkwire"
	"github.com/vfio-ferry/ferry/services/peerauth"
	"github.com/vfio-ferry/ferry/services/telemetry"
	"github.com/vfio-ferry/ferry/services/wire"
)

// Direct data connections (chunkwire.DirectMagic) carry a channel's chunks
// beside its Channel stream, without HTTP/2. The agent offers them in
// OpenResponse.data_port when it serves a data listener (ServeData) and
// the source asks for them. Each Channel stream of such a session hands
// out a one-time key in its first response; a connection that presents
// the key is attached to that stream and lives and dies with it. The key
// travels inside the stream, which is already authenticated and bound to
// the session's source; with TLS the data connection must also present
// that source's identity.

// dataHandshakeTimeout bounds a new data connection's TLS handshake and
// preamble.
const dataHandshakeTimeout = 10 * time.Second

// maxDataHandshakes bounds the data connections in their handshake at
// once; more are closed at once (nobody gets to hold goroutines and
// sockets by connecting and saying nothing).
const maxDataHandshakes = 64

// dataAttach is a Channel stream waiting for its data connection.
type dataAttach struct {
	inc  *incoming
	key  [chunkwire.DataKeyLen]byte
	conn chan net.Conn // 1-buffered; receives the attached connection
	// dropped is set, under Agent.mu, once the stream has ended: a
	// connection that spent the key just before is closed, not handed on.
	dropped bool
}

// ServeData accepts direct data connections on ln until ln is closed or
// the agent closes (ln is closed then); a failed accept is retried. creds
// are the agent's own transport credentials: the data connection is
// secured exactly as the gRPC one. While it serves, sessions whose source
// asks for direct data get them.
func (a *Agent) ServeData(ln net.Listener, creds credentials.TransportCredentials) error {
	addr, ok := ln.Addr().(*net.TCPAddr)
	if !ok {
		return errors.New("dest: the direct data listener must be TCP")
	}
	a.dataPort.Store(uint32(addr.Port))
	defer a.dataPort.Store(0)
	stop := context.AfterFunc(a.ctx, func() { ln.Close() })
	defer stop()
	sem := make(chan struct{}, maxDataHandshakes)
	var backoff time.Duration
	for {
		conn, err := ln.Accept()
		if err != nil {
			if a.ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return nil
			}
			// Out of file descriptors, say: wait and accept again, as
			// net/http does, rather than stop serving.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			a.cfg.Logger.Warn("direct data listener: accept failed; retrying", "error", err, "in", backoff.String())
			t := time.NewTimer(backoff)
			select {
			case <-a.ctx.Done():
				t.Stop()
				return nil
			case <-t.C:
			}
			continue
		}
		backoff = 0
		select {
		case sem <- struct{}{}:
		default:
			a.cfg.Logger.Warn("direct data connection refused: too many in their handshake", "remote", conn.RemoteAddr().String())
			a.cfg.Metrics.DataConnection(telemetry.RoleDest, telemetry.DataRefusedBusy)
			conn.Close()
			continue
		}
		a.crew.Go(func() {
			defer func() { <-sem }()
			a.attachData(conn, creds)
		})
	}
}

// attachData authenticates a new data connection, reads its preamble and
// hands it to the stream whose key it presents; else closes it.
func (a *Agent) attachData(raw net.Conn, creds credentials.TransportCredentials) {
	log := a.cfg.Logger.With("remote", raw.RemoteAddr().String())
	// An agent that closes does not wait out a handshake.
	stop := context.AfterFunc(a.ctx, func() { raw.Close() })
	defer stop()
	raw.SetDeadline(time.Now().Add(dataHandshakeTimeout))
	var under net.Conn = raw
	if creds.Info().SecurityProtocol != "insecure" {
		// A security layer reads the socket a record at a time: it reads
		// from a buffer instead (chunkwire.ReadBuffer). Without one, chunks
		// are read from the socket straight into their buffers.
		under = chunkwire.NewReadBuffer(raw)
	}
	conn, auth, err := creds.ServerHandshake(under)
	if err != nil {
		log.Warn("direct data connection refused: handshake", "error", err)
		a.cfg.Metrics.DataConnection(telemetry.RoleDest, telemetry.DataRefusedHandshake)
		raw.Close()
		return
	}
	key, err := chunkwire.ReadDirectPreamble(conn)
	if err != nil {
		log.Warn("direct data connection refused", "error", err)
		a.cfg.Metrics.DataConnection(telemetry.RoleDest, telemetry.DataRefusedPreamble)
		conn.Close()
		return
	}
	conn.SetDeadline(time.Time{})
	at := a.takeDataKey(key)
	if at == nil {
		log.Warn("direct data connection refused: unknown or spent key")
		a.cfg.Metrics.DataConnection(telemetry.RoleDest, telemetry.DataRefusedKey)
		conn.Close()
		return
	}
	caller := peerauth.AuthIdentity(auth).String()
	at.inc.mu.Lock()
	owner := at.inc.peer
	at.inc.mu.Unlock()
	if caller != owner {
		at.inc.log.Warn("direct data connection refused: another identity than the session's source", "caller", caller, "owner", owner)
		a.cfg.Metrics.DataConnection(telemetry.RoleDest, telemetry.DataRefusedIdentity)
		conn.Close()
		return
	}
	if a.handData(at, conn) {
		a.cfg.Metrics.DataConnection(telemetry.RoleDest, telemetry.DataAttached)
	}
}

// handData hands conn to at's stream, unless the stream has ended: then
// it closes conn. A key is spent once, so the send never blocks.
func (a *Agent) handData(at *dataAttach, conn net.Conn) bool {
	a.mu.Lock()
	handed := !at.dropped
	if handed {
		at.conn <- conn
	}
	a.mu.Unlock()
	if !handed {
		conn.Close()
	}
	return handed
}

// newDataKey registers a stream that waits for its data connection; its
// key attaches one.
func (a *Agent) newDataKey(inc *incoming) *dataAttach {
	at := &dataAttach{inc: inc, conn: make(chan net.Conn, 1)}
	rand.Read(at.key[:])
	a.mu.Lock()
	a.dataKeys[at.key] = at
	a.mu.Unlock()
	return at
}

// takeDataKey spends key: it returns the stream it attaches to (nil for
// an unknown or spent key) and forgets it.
func (a *Agent) takeDataKey(key [chunkwire.DataKeyLen]byte) *dataAttach {
	a.mu.Lock()
	defer a.mu.Unlock()
	at := a.dataKeys[key]
	delete(a.dataKeys, key)
	return at
}

// dropDataKey forgets at's key if it was not spent, and closes a
// connection handed to it that its stream never took; one handed later is
// closed by handData.
func (a *Agent) dropDataKey(at *dataAttach) {
	a.mu.Lock()
	at.dropped = true
	if a.dataKeys[at.key] == at {
		delete(a.dataKeys, at.key)
	}
	a.mu.Unlock()
	select {
	case conn := <-at.conn:
		conn.Close()
	default:
	}
}

// receiveDirect reads chunks from a channel's data connection and accepts
// them, until the connection ends (see receiveChunks).
func (inc *incoming) receiveDirect(conn net.Conn, pool *chunkwire.Pool) error {
	inc.mu.Lock()
	chunkSize := inc.chunkSize
	inc.mu.Unlock()
	r := chunkwire.NewDirectReader(conn, pool, int(chunkSize))
	return inc.receiveChunks(func(in *chunkwire.InChunk) error {
		err := r.Read(in)
		if err == nil || errors.Is(err, io.EOF) || wire.Reason(err) != "" {
			return err // a chunk, the end, or a frame that breaks the protocol
		}
		// The connection broke: the source dials the channel again.
		return status.Errorf(codes.Unavailable, "channel data connection: %v", err)
	})
}
