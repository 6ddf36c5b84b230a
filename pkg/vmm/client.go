//go:build linux

package vmm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"

	vmmv1 "github.com/vfio-ferry/ferry/api/proto/ferry/vmm/v1"
	"github.com/vfio-ferry/ferry/pkg/vfio"
)

// Error is a request the agent refused: a gRPC code and one of Ferry's
// reasons (VMM_FD_NOT_VFIO_DEVICE, DEVICE_NOT_FOUND, ...).
type Error struct {
	Code    int32
	Reason  string
	Message string
}

func (e *Error) Error() string { return fmt.Sprintf("vmm socket: %s: %s", e.Reason, e.Message) }

// ErrClosed: the client or its connection has closed.
var ErrClosed = errors.New("vmm: connection closed")

// Client is a VMM's end of an agent's VMM socket. Its methods are safe
// for concurrent use; each sends one request and waits for its Reply.
// Events of the devices it lent or watches arrive on Events.
type Client struct {
	conn   *Conn
	events chan *vmmv1.Event
	done   chan struct{} // closed when the reader has returned
	err    error         // why the reader returned; read after done

	mu      sync.Mutex // serialises requests: the agent answers in order
	pending chan *vmmv1.Reply
	nextID  uint64
}

// Dial connects to the agent's VMM socket at path.
func Dial(ctx context.Context, path string) (*Client, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("vmm socket: %w", err)
	}
	cl := &Client{
		conn:    NewConn(c.(*net.UnixConn)),
		events:  make(chan *vmmv1.Event, 256),
		done:    make(chan struct{}),
		pending: make(chan *vmmv1.Reply, 1),
	}
	go cl.read()
	return cl, nil
}

// Events carries the events of the devices this client lent or
// watches. It is closed when the connection ends. Read it, or events
// are dropped (and counted in the next one's Missed) once 256 wait.
func (c *Client) Events() <-chan *vmmv1.Event { return c.events }

// Done is closed when the connection has ended; Err says why.
func (c *Client) Done() <-chan struct{} { return c.done }

// Err is why the connection ended (nil while it runs).
func (c *Client) Err() error {
	select {
	case <-c.done:
		return c.err
	default:
		return nil
	}
}

// Close closes the connection: the agent withdraws every device this
// client lent, rolling back a migration that holds one.
func (c *Client) Close() error {
	err := c.conn.Close()
	<-c.done
	return err
}

// read delivers replies and events until the connection ends.
func (c *Client) read() {
	defer close(c.done)
	defer close(c.events)
	for {
		var m vmmv1.AgentMessage
		fds, err := c.conn.Read(&m)
		closeAll(fds)
		if err != nil {
			c.err = err
			return
		}
		switch msg := m.GetMsg().(type) {
		case *vmmv1.AgentMessage_Reply:
			if msg.Reply.GetId() == 0 && msg.Reply.GetError() != nil {
				// Unsolicited: the agent refused the connection.
				c.err = replyErr(msg.Reply.GetError())
				return
			}
			select {
			case c.pending <- msg.Reply:
			default: // a reply nobody waits for
			}
		case *vmmv1.AgentMessage_Event:
			select {
			case c.events <- msg.Event:
			default:
			}
		}
	}
}

// do sends req with fd (when >= 0) and waits for its reply.
func (c *Client) do(ctx context.Context, req *vmmv1.Request, fd int) (*vmmv1.Reply, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.nextID++
	req.Id = c.nextID
	if err := c.conn.Write(req, fd); err != nil {
		// A broken connection: the agent may have said why (a refused
		// peer) before it closed, and the reader ends at the close.
		select {
		case <-c.done:
			if c.err != nil && !errors.Is(c.err, io.EOF) {
				return nil, c.err
			}
		case <-ctx.Done():
		}
		return nil, fmt.Errorf("vmm socket: %w", err)
	}
	for {
		select {
		case r := <-c.pending:
			if r.GetId() != req.Id {
				continue // a stale reply of a request whose caller gave up
			}
			if e := r.GetError(); e != nil {
				return r, replyErr(e)
			}
			return r, nil
		case <-c.done:
			if c.err != nil {
				return nil, c.err
			}
			return nil, ErrClosed
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

func replyErr(e *vmmv1.Error) error {
	return &Error{Code: e.GetCode(), Reason: e.GetReason(), Message: e.GetMessage()}
}

// Attach lends the VFIO device whose descriptor is f to the agent as
// vmm:NAME, with config, the VMM's own state of the device (at most
// MaxConfigState bytes). f stays the caller's: the agent receives a
// duplicate.
func (c *Client) Attach(ctx context.Context, name string, f *os.File, config []byte) error {
	raw, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var derr error
	if err := raw.Control(func(fd uintptr) {
		_, derr = c.do(ctx, &vmmv1.Request{Op: &vmmv1.Request_Attach{Attach: &vmmv1.Attach{Name: name, ConfigState: config}}}, int(fd))
	}); err != nil {
		return err
	}
	return derr
}

// Detach takes the device back; a migration holding it is cancelled and
// rolled back before the agent answers.
func (c *Client) Detach(ctx context.Context, name string) error {
	_, err := c.do(ctx, &vmmv1.Request{Op: &vmmv1.Request_Detach{Detach: &vmmv1.Detach{Name: name}}}, -1)
	return err
}

// UpdateConfig replaces the device's config state; refused (reason
// VMM_CONFIG_FROZEN) once a switchover took it.
func (c *Client) UpdateConfig(ctx context.Context, name string, config []byte) error {
	_, err := c.do(ctx, &vmmv1.Request{Op: &vmmv1.Request_UpdateConfig{UpdateConfig: &vmmv1.UpdateConfig{Name: name, ConfigState: config}}}, -1)
	return err
}

// Watch subscribes to the events of a device another connection lent.
func (c *Client) Watch(ctx context.Context, name string) error {
	_, err := c.do(ctx, &vmmv1.Request{Op: &vmmv1.Request_Watch{Watch: &vmmv1.Watch{Name: name}}}, -1)
	return err
}

// FetchConfig returns the config state a destination migration
// delivered with the device, and whether one has.
func (c *Client) FetchConfig(ctx context.Context, name string) ([]byte, bool, error) {
	r, err := c.do(ctx, &vmmv1.Request{Op: &vmmv1.Request_FetchConfig{FetchConfig: &vmmv1.FetchConfig{Name: name}}}, -1)
	if err != nil {
		return nil, false, err
	}
	return r.GetConfigState(), r.GetHasConfigState(), nil
}

// Recover returns the VFIO device whose descriptor is f to RUNNING, by
// its own descriptor: what a VMM does when the agent it lent the device
// to died mid-migration (the device may rest in STOP_COPY, STOP or
// RESUMING). A device in ERROR, or one whose arcs fail, is reset. f
// stays the caller's. It answers the state before and after.
func Recover(f *os.File) (before, after vfio.State, err error) {
	raw, err := f.SyscallConn()
	if err != nil {
		return 0, 0, err
	}
	var dup int
	var derr error
	if err := raw.Control(func(fd uintptr) { dup, derr = dupCloexec(int(fd)) }); err != nil {
		return 0, 0, err
	}
	if derr != nil {
		return 0, 0, derr
	}
	dev, err := vfio.AdoptDeviceFD(dup, "recover")
	if err != nil {
		return 0, 0, err
	}
	defer dev.Close()
	before, _ = dev.State()
	if err := vfio.Recover(dev, false); err != nil {
		return before, 0, err
	}
	after, err = dev.State()
	return before, after, err
}
