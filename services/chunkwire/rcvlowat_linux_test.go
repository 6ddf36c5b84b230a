package chunkwire

import (
	"errors"
	"io"
	"net"
	"testing"

	"golang.org/x/sys/unix"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
)

// tcpPair returns the two ends of a loopback TCP connection.
func tcpPair(t *testing.T) (client, server *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	return c.(*net.TCPConn), s.(*net.TCPConn)
}

// rcvlowat reads a socket's SO_RCVLOWAT.
func rcvlowat(t *testing.T, c *net.TCPConn) int {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var v int
	var gerr error
	if err := rc.Control(func(fd uintptr) { v, gerr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVLOWAT) }); err != nil || gerr != nil {
		t.Fatal(err, gerr)
	}
	return v
}

// The low-water mark waits for a payload's bytes, never for more than
// the source sends before it waits: a header alone, a small payload, and
// the last bytes of a large one each arrive while the writer waits for the
// reader (a low-water mark above what is coming would hang the test). The
// mark never passes its cap, and the reader waits between frames with a
// mark of 1.
func TestLowatWaitsOnlyForWhatIsComing(t *testing.T) {
	src, dst := tcpPair(t)
	r := NewDirectReader(dst, NewPool(), 4<<20)
	if r.lowat == nil {
		t.Fatal("a TCP connection is read without a low-water mark")
	}
	big := make([]byte, 4<<20)
	for i := range big {
		big[i] = byte(i * 11)
	}
	payloads := [][]byte{nil, big[:100], big, nil, big[:maxRcvLowat+1], big[:3]}
	maxLowat := 0
	got := make(chan error)
	next := make(chan struct{})
	go func() {
		got <- func() error {
			return readInStep(r, payloads, next, func() { maxLowat = max(maxLowat, r.lowat.lowat) })
		}()
	}()
	w := NewDirectWriter(src)
	writeInStep(t, w, payloads, next, got)
	if maxLowat > maxRcvLowat {
		t.Errorf("SO_RCVLOWAT reached %d, over its cap %d", maxLowat, maxRcvLowat)
	}
	// The reader waits for the next frame's header with the mark at 1.
	done := make(chan error, 1)
	go func() {
		var in InChunk
		done <- r.Read(&in)
	}()
	if err := w.Write(&ferryv1.ChannelRequest{Seq: 99}, nil); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	// (Linux reports a mark of 1 as 0 or 1: both wake on any byte.)
	if v := max(rcvlowat(t, dst), 1); v != r.lowat.lowat {
		t.Errorf("socket SO_RCVLOWAT %d, the reader thinks %d", v, r.lowat.lowat)
	}
	src.Close()
	var in InChunk
	if err := r.Read(&in); !errors.Is(err, io.EOF) {
		t.Fatalf("read after the source closed: %v, want EOF", err)
	}
}

func TestLowatMark(t *testing.T) {
	for _, tc := range []struct{ coming, want int }{
		{0, 1},     // between frames: any byte
		{1, 1},     //
		{100, 100}, // the rest of a small payload
		{maxRcvLowat, maxRcvLowat},
		{4 << 20, maxRcvLowat}, // a large payload: a MiB at a time
	} {
		c := &lowatConn{}
		c.expect(tc.coming)
		if got := c.mark(); got != tc.want {
			t.Errorf("%d bytes coming: mark %d, want %d", tc.coming, got, tc.want)
		}
	}
	c := &lowatConn{}
	c.expect(-5)
	if got := c.mark(); got != 1 {
		t.Errorf("a negative expectation: mark %d, want 1", got)
	}
}
