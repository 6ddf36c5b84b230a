package chunkwire

import (
	"io"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// A destination reading a chunk from a plain TCP socket is woken by the
// kernel each time a few segments arrive: on a fast link the reader
// drains the socket faster than the sender fills it, sleeps, and wakes
// again for the next 64 KiB. Each sleep and wake-up is a context switch
// (and on a virtual machine an idle vCPU woken by an interrupt), and in
// runs where the two fall into step they cost more than the copy itself
// (docs/performance.md, the wake-ups).
//
// The reader knows better than the kernel how much is coming: once a
// frame's lengths are in, its payload is. So while it reads a payload the
// socket's SO_RCVLOWAT is the part of the payload still to come, up to
// maxRcvLowat, and Linux wakes the reader only when that much has
// arrived (tcp_data_ready, and setting SO_RCVLOWAT signals at once if
// the data is already there). Between payloads it is 1 again, since a
// header may be all the source sends before it waits. The low-water mark
// never exceeds what the source is bound to send without waiting for the
// destination, so it cannot stall a stream.

// maxRcvLowat caps the low-water mark: a whole 1 MiB chunk, read in one
// wake-up and one read. Linux grows the socket's receive buffer to hold
// it (and caps the mark at half of net.ipv4.tcp_rmem's maximum). Against
// a quarter chunk, 256 KiB, a 1-channel migration ran at 2.68-2.95
// against 2.42-2.64 GB/s (alternating, quiet): the fewer reads free the
// receive buffer in fewer steps, so the destination sends fewer window
// updates, and the source's kernel, which handles each in its softirq
// (_raw_spin_unlock_irqrestore and handle_softirqs in its profile), went
// from 23% of the source's samples to 19%. At 4 channels 2.57-2.59
// against 2.51-2.53.
const maxRcvLowat = 1 << 20

// lowatConn reads a TCP socket, setting its SO_RCVLOWAT from what the
// reader says is coming before each wait. A DirectReader owns it.
type lowatConn struct {
	rc     syscall.RawConn
	coming int  // payload bytes the reader knows are on their way
	lowat  int  // the socket's SO_RCVLOWAT, as last set
	off    bool // setting it failed once: leave it alone
}

// newLowatConn wraps r when it is a TCP socket (not TLS: its records
// hide how much of the socket's data is payload); else it returns nil.
func newLowatConn(r io.Reader) *lowatConn {
	type rawConner interface {
		SyscallConn() (syscall.RawConn, error)
		Read([]byte) (int, error)
	}
	tc, ok := r.(interface {
		rawConner
		CloseWrite() error // a *net.TCPConn, not a Unix socket or a pipe
	})
	if !ok {
		return nil
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return nil
	}
	return &lowatConn{rc: rc, lowat: 1}
}

// expect says n more payload bytes are on their way (0: none known).
func (c *lowatConn) expect(n int) { c.coming = max(n, 0) }

// Read reads what the socket holds, as a TCP connection's Read does,
// waiting for at least the low-water mark when it holds nothing.
func (c *lowatConn) Read(b []byte) (int, error) {
	if len(b) == 0 {
		return 0, nil
	}
	var n int
	var rerr error
	err := c.rc.Read(func(fd uintptr) bool {
		for {
			n, rerr = unix.Read(int(fd), b)
			if rerr != unix.EINTR {
				break
			}
		}
		if rerr == unix.EAGAIN {
			c.setLowat(int(fd), c.mark())
			return false
		}
		return true
	})
	switch {
	case err != nil:
		return 0, err
	case rerr != nil:
		return 0, os.NewSyscallError("read", rerr)
	case n == 0:
		return 0, io.EOF
	}
	c.coming = max(c.coming-n, 0)
	return n, nil
}

// mark is the low-water mark to wait with: what is coming, at least 1,
// at most maxRcvLowat.
func (c *lowatConn) mark() int { return min(max(c.coming, 1), maxRcvLowat) }

// setLowat sets the socket's SO_RCVLOWAT to v unless it is already v.
func (c *lowatConn) setLowat(fd, v int) {
	if c.off || v == c.lowat {
		return
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVLOWAT, v); err != nil {
		c.off = true
		return
	}
	c.lowat = v
}
