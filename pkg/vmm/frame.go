package vmm

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"

	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"
)

// MaxConfigState is the largest config-state blob a VMM may attach.
const MaxConfigState = 1 << 20

// MaxFrame is the largest frame body: a config state and room for the
// rest of its message.
const MaxFrame = MaxConfigState + 64<<10

// maxFDs is the most descriptors one frame may carry.
const maxFDs = 1

// Errors of a Conn. Compare with errors.Is.
var (
	// ErrFrameTooLarge: a frame's length is above MaxFrame. The
	// connection cannot be read on: its framing is lost.
	ErrFrameTooLarge = errors.New("vmm: frame too large")
	// ErrTooManyFDs: a frame came with more descriptors than one (they
	// were closed).
	ErrTooManyFDs = errors.New("vmm: too many file descriptors in one frame")
)

// Conn is one VMM socket connection, either end. Reads and writes may
// run concurrently with each other, but not with themselves.
type Conn struct {
	uc  *net.UnixConn
	oob []byte
}

// NewConn wraps a Unix stream connection.
func NewConn(uc *net.UnixConn) *Conn {
	return &Conn{uc: uc, oob: make([]byte, unix.CmsgSpace(4*(maxFDs+1)))}
}

// Close closes the connection.
func (c *Conn) Close() error { return c.uc.Close() }

// Unix is the underlying connection.
func (c *Conn) Unix() *net.UnixConn { return c.uc }

// Write sends m as one frame, with fd (when fd >= 0) as SCM_RIGHTS.
func (c *Conn) Write(m proto.Message, fd int) error {
	body, err := proto.Marshal(m)
	if err != nil {
		return err
	}
	if len(body) > MaxFrame {
		return fmt.Errorf("%w: %d bytes", ErrFrameTooLarge, len(body))
	}
	frame := binary.LittleEndian.AppendUint32(make([]byte, 0, 4+len(body)), uint32(len(body)))
	frame = append(frame, body...)
	var oob []byte
	if fd >= 0 {
		oob = unix.UnixRights(fd)
	}
	n, oobn, err := c.uc.WriteMsgUnix(frame, oob, nil)
	if err != nil {
		return err
	}
	if oobn != len(oob) {
		return errors.New("vmm: descriptor not sent")
	}
	// The rest of a frame a short write left goes as plain bytes.
	for n < len(frame) {
		m, err := c.uc.Write(frame[n:])
		if err != nil {
			return err
		}
		n += m
	}
	return nil
}

// Read reads the next frame into m and returns the descriptors that came
// with it; the caller owns them. On ErrTooManyFDs every descriptor of
// the frame is closed, and the frame's message is still read into m.
func (c *Conn) Read(m proto.Message) ([]int, error) {
	var hdr [4]byte
	fds, err := c.readFull(hdr[:], nil)
	if err != nil {
		closeAll(fds)
		return nil, err
	}
	n := binary.LittleEndian.Uint32(hdr[:])
	if n > MaxFrame {
		closeAll(fds)
		return nil, fmt.Errorf("%w: %d bytes, at most %d", ErrFrameTooLarge, n, MaxFrame)
	}
	body := make([]byte, n)
	if fds, err = c.readFull(body, fds); err != nil {
		closeAll(fds)
		return nil, err
	}
	if err := proto.Unmarshal(body, m); err != nil {
		closeAll(fds)
		return nil, fmt.Errorf("vmm: bad message: %w", err)
	}
	if len(fds) > maxFDs {
		closeAll(fds)
		return nil, fmt.Errorf("%w: %d", ErrTooManyFDs, len(fds))
	}
	return fds, nil
}

// readFull fills p exactly, gathering the descriptors that arrive.
func (c *Conn) readFull(p []byte, fds []int) ([]int, error) {
	for got := 0; got < len(p); {
		n, oobn, flags, _, err := c.uc.ReadMsgUnix(p[got:], c.oob)
		if oobn > 0 {
			more, perr := parseRights(c.oob[:oobn])
			fds = append(fds, more...)
			if perr != nil {
				return fds, perr
			}
		}
		if flags&unix.MSG_CTRUNC != 0 {
			return fds, fmt.Errorf("%w: control data cut", ErrTooManyFDs)
		}
		got += n
		switch {
		case err != nil:
			return fds, err
		case n == 0:
			if got == 0 {
				return fds, io.EOF
			}
			return fds, io.ErrUnexpectedEOF
		}
	}
	return fds, nil
}

// parseRights takes the descriptors out of control messages.
func parseRights(oob []byte) ([]int, error) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, err
	}
	var fds []int
	for _, m := range msgs {
		if m.Header.Level != unix.SOL_SOCKET || m.Header.Type != unix.SCM_RIGHTS {
			continue
		}
		got, err := unix.ParseUnixRights(&m)
		if err != nil {
			return fds, err
		}
		fds = append(fds, got...)
	}
	return fds, nil
}

func closeAll(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}
