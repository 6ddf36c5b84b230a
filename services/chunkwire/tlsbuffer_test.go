package chunkwire

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"testing"
	"testing/synctest"
	"time"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
)

// testTLS returns a server and a client configuration that trust one
// self-signed certificate.
func testTLS(t *testing.T) (server, client *tls.Config) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		DNSNames:     []string{"dest"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(cert)
	server = &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}, MinVersion: tls.VersionTLS13}
	client = &tls.Config{RootCAs: roots, ServerName: "dest", MinVersion: tls.VersionTLS13}
	return server, client
}

// Chunks written through TLS over a WriteBuffer arrive whole through TLS
// over a ReadBuffer, each once its write returns: the writer waits for
// the reader after every chunk, so a chunk left in the buffer would hang
// the test.
func TestBufferedTLSCarriesEachChunk(t *testing.T) {
	scfg, ccfg := testTLS(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	big := make([]byte, 3*TLSSocketBuffer+123)
	for i := range big {
		big[i] = byte(i * 13)
	}
	payloads := [][]byte{big, nil, big[:1], big[:TLSSocketBuffer], nil, big[7:]}
	got := make(chan error)
	next := make(chan struct{})
	go func() {
		got <- func() error {
			raw, err := ln.Accept()
			if err != nil {
				return err
			}
			conn := tls.Server(NewReadBuffer(raw), scfg)
			defer conn.Close()
			if _, err := ReadDirectPreamble(conn); err != nil {
				return err
			}
			r := NewDirectReader(conn, NewPool(), len(big))
			return readInStep(r, payloads, next, nil)
		}()
	}()

	raw, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	buf := NewWriteBuffer(raw)
	tc := tls.Client(buf, ccfg)
	if err := tc.Handshake(); err != nil { // before Hold: the flights reach the peer
		t.Fatal(err)
	}
	conn := &BufferedConn{Conn: tc, Buf: buf}
	defer conn.Close()
	if err := WriteDirectPreamble(conn, make([]byte, DataKeyLen)); err != nil {
		t.Fatal(err)
	}
	buf.Hold()
	w := NewDirectWriter(conn)
	writeInStep(t, w, payloads, next, got)
}

// A Close from another goroutine ends a Flush blocked on a peer that
// stopped reading, and does not wait for it.
func TestWriteBufferCloseEndsBlockedFlush(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		a, b := net.Pipe() // b is never read: a's writes block
		defer b.Close()
		buf := NewWriteBuffer(a)
		buf.Hold()
		if _, err := buf.Write([]byte("chunk")); err != nil {
			t.Fatal(err)
		}
		flushed := make(chan error, 1)
		go func() { flushed <- buf.Flush() }()
		synctest.Wait() // the Flush is blocked in the pipe
		if err := (&BufferedConn{Conn: a, Buf: buf}).Close(); err != nil {
			t.Fatal(err)
		}
		if err := <-flushed; !errors.Is(err, io.ErrClosedPipe) {
			t.Fatalf("blocked Flush ended with %v, want the closed connection's error", err)
		}
	})
}

// writeInStep writes payloads as DATA chunks 0, 1, ... through w, each
// only once the reader said it had the one before (next), and then
// waits for the reader's end (got).
func writeInStep(t *testing.T, w *DirectWriter, payloads [][]byte, next <-chan struct{}, got <-chan error) {
	t.Helper()
	for i, p := range payloads {
		if err := w.Write(&ferryv1.ChannelRequest{Seq: uint64(i), Kind: ferryv1.ChunkKind_CHUNK_KIND_DATA, Crc32C: CRC32C(p)}, p); err != nil {
			t.Fatal(err)
		}
		select {
		case <-next:
		case err := <-got:
			t.Fatalf("chunk %d: %v", i, err)
		}
	}
	if err := <-got; err != nil {
		t.Fatal(err)
	}
}

// readInStep reads the chunks writeInStep writes, checks each against
// payloads, calls after (if set) and tells the writer (next).
func readInStep(r *DirectReader, payloads [][]byte, next chan<- struct{}, after func()) error {
	for i, want := range payloads {
		var in InChunk
		if err := r.Read(&in); err != nil {
			return err
		}
		var data []byte
		if in.Data != nil {
			data = in.Data.Materialize()
			in.Data.Free()
		}
		if in.Msg.Seq != uint64(i) || !bytes.Equal(data, want) {
			return fmt.Errorf("chunk %d differs", i)
		}
		if after != nil {
			after()
		}
		next <- struct{}{}
	}
	return nil
}
