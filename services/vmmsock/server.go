//go:build linux

package vmmsock

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"slices"
	"sync"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"

	vmmv1 "github.com/vfio-ferry/ferry/api/proto/ferry/vmm/v1"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/pkg/vmm"
	"github.com/vfio-ferry/ferry/services/wire"
)

// Reasons of the VMM socket, beside the API's (wire.Reason*).
const (
	ReasonPeerNotAllowed = "VMM_PEER_NOT_ALLOWED"
	ReasonNotVFIODevice  = "VMM_FD_NOT_VFIO_DEVICE"
	ReasonConfigTooLarge = "VMM_CONFIG_TOO_LARGE"
	ReasonConfigFrozen   = "VMM_CONFIG_FROZEN"
	ReasonBadFrame       = "VMM_BAD_FRAME"
)

// eventQueue is how many events wait for a slow VMM before the oldest
// are dropped (counted in Event.missed).
const eventQueue = 256

// Lender is what the server lends devices to: the agent's registry.
type Lender interface {
	Lend(name string, dev vfio.Device, config []byte, watch func(vfio.DeviceEvent)) error
	Withdraw(ctx context.Context, name string) error
	SetConfig(name string, config []byte) error
	ReceivedConfig(name string) ([]byte, bool, error)
}

// Options configure a Server.
type Options struct {
	Lender Lender
	// Allow is who may connect (SO_PEERCRED); empty: the agent's own uid.
	Allow vmm.Allow
	// Check tells whether a received descriptor is a VFIO device's; nil
	// means vmm.CheckVFIODevice. Adopt makes a device of it; nil means
	// vfio.AdoptDeviceFD. Tests replace both to lend simulated devices.
	Check func(fd int) error
	Adopt func(fd int, name string) (vfio.Device, error)
	// Logger; nil discards.
	Logger *slog.Logger
}

// Server serves a VMM socket. Serve owns every goroutine it starts.
type Server struct {
	opts Options
	log  *slog.Logger

	mu sync.Mutex
	// watchers are the connections that see each lent device's events,
	// by name (the lender first).
	watchers map[string][]*conn
}

// NewServer returns a server; Serve starts it.
func NewServer(opts Options) *Server {
	if opts.Check == nil {
		opts.Check = vmm.CheckVFIODevice
	}
	if opts.Adopt == nil {
		opts.Adopt = vfio.AdoptDeviceFD
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Server{opts: opts, log: log, watchers: make(map[string][]*conn)}
}

// Listen creates the socket at path: a stale socket file is removed
// first (anything else there is an error), and the socket is given mode
// 0660 and, when gid >= 0, that group.
func Listen(path string, gid int) (*net.UnixListener, error) {
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode().Type() != os.ModeSocket {
			return nil, fmt.Errorf("vmm socket %s: exists and is not a socket", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("vmm socket: %w", err)
		}
	}
	// The socket is created with no permission for others at all, then
	// opened to the group: no window where anyone else may connect.
	old := unix.Umask(0o177)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	unix.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("vmm socket: %w", err)
	}
	ln.SetUnlinkOnClose(true)
	if gid >= 0 {
		if err := os.Chown(path, -1, gid); err != nil {
			ln.Close()
			return nil, fmt.Errorf("vmm socket: %w", err)
		}
	}
	if err := os.Chmod(path, 0o660); err != nil {
		ln.Close()
		return nil, fmt.Errorf("vmm socket: %w", err)
	}
	return ln, nil
}

// Serve accepts connections on ln until ctx ends, then closes ln and
// every connection (which withdraws their devices) and returns once all
// are gone.
func (s *Server) Serve(ctx context.Context, ln *net.UnixListener) error {
	var wg sync.WaitGroup
	defer wg.Wait()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	wg.Add(1)
	go func() {
		defer wg.Done()
		<-ctx.Done()
		ln.Close()
	}()
	for {
		uc, err := ln.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if errors.Is(err, net.ErrClosed) {
				return err
			}
			s.log.Warn("vmm socket accept", "err", err)
			continue
		}
		c := &conn{s: s, vc: vmm.NewConn(uc), out: make(chan *vmmv1.AgentMessage, eventQueue), quit: make(chan struct{})}
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.serve(ctx)
		}()
	}
}

// conn is one VMM's connection.
type conn struct {
	s    *Server
	vc   *vmm.Conn
	cred vmm.Cred
	out  chan *vmmv1.AgentMessage // replies and events for the writer
	quit chan struct{}            // closed when the connection ends: events stop

	mu     sync.Mutex
	missed uint64
	lent   []string // names this connection lent, in order
}

// serve runs the connection: a writer goroutine, requests read and
// answered in order here, and at the end every lent device withdrawn.
func (c *conn) serve(ctx context.Context) {
	defer c.vc.Close()
	cred, err := vmm.PeerCred(c.vc.Unix())
	if err == nil {
		err = c.s.opts.Allow.Check(cred)
	}
	if err != nil {
		c.s.log.Warn("vmm socket peer refused", "err", err)
		c.vc.Write(&vmmv1.AgentMessage{Msg: &vmmv1.AgentMessage_Reply{Reply: &vmmv1.Reply{
			Error: replyError(codes.PermissionDenied, ReasonPeerNotAllowed, err.Error())}}}, -1)
		return
	}
	c.cred = cred
	log := c.s.log.With("vmm_pid", cred.PID, "vmm_uid", cred.UID)
	log.Info("vmm connected")

	writerDone := make(chan struct{})
	go func() {
		defer close(writerDone)
		c.write()
	}()
	stop := context.AfterFunc(ctx, func() { c.vc.Unix().CloseRead() })
	defer stop()

	for {
		var req vmmv1.Request
		fds, err := c.vc.Read(&req)
		if err != nil {
			if !errors.Is(err, io.EOF) && ctx.Err() == nil {
				log.Warn("vmm socket read", "err", err)
				c.reply(&vmmv1.Reply{Id: req.GetId(), Error: replyError(codes.InvalidArgument, ReasonBadFrame, err.Error())})
			}
			break
		}
		c.reply(c.handle(ctx, &req, fds))
	}

	// The VMM went away, or the agent stops: take back what it lent.
	c.mu.Lock()
	names := c.lent
	c.lent = nil
	c.mu.Unlock()
	for _, name := range names {
		if err := c.s.opts.Lender.Withdraw(context.WithoutCancel(ctx), name); err != nil && !errors.Is(err, vfio.ErrNotLent) {
			log.Warn("vmm disconnect: withdraw", "device", "vmm:"+name, "err", err)
		}
	}
	c.s.unwatchAll(c)
	c.mu.Lock() // event sends under it: no send after the close
	close(c.quit)
	close(c.out)
	c.mu.Unlock()
	<-writerDone
	log.Info("vmm disconnected", "withdrawn", len(names))
}

// write sends what c.out carries until it is closed.
func (c *conn) write() {
	broken := false
	for m := range c.out {
		if broken {
			continue
		}
		if err := c.vc.Write(m, -1); err != nil {
			broken = true
			c.vc.Unix().CloseRead() // the reader ends too
		}
	}
}

func (c *conn) reply(r *vmmv1.Reply) {
	c.out <- &vmmv1.AgentMessage{Msg: &vmmv1.AgentMessage_Reply{Reply: r}}
}

// event queues ev without blocking; when the queue is full it is
// dropped and counted in the next one that fits.
func (c *conn) event(ev *vmmv1.Event) {
	c.mu.Lock()
	defer c.mu.Unlock()
	select {
	case <-c.quit:
		return
	default:
	}
	ev.Missed = c.missed
	select {
	case c.out <- &vmmv1.AgentMessage{Msg: &vmmv1.AgentMessage_Event{Event: ev}}:
		c.missed = 0
	default:
		c.missed++
	}
}

// handle answers one request; fds are the descriptors that came with it,
// which it owns.
func (c *conn) handle(ctx context.Context, req *vmmv1.Request, fds []int) *vmmv1.Reply {
	r := &vmmv1.Reply{Id: req.GetId()}
	if _, attach := req.GetOp().(*vmmv1.Request_Attach); !attach {
		for _, fd := range fds {
			unix.Close(fd)
		}
		if len(fds) > 0 {
			r.Error = replyError(codes.InvalidArgument, wire.ReasonInvalidArgument, "only Attach carries a file descriptor")
			return r
		}
	}
	switch op := req.GetOp().(type) {
	case *vmmv1.Request_Attach:
		r.Error = c.attach(op.Attach, fds)
	case *vmmv1.Request_Detach:
		r.Error = c.detach(ctx, op.Detach.GetName())
	case *vmmv1.Request_UpdateConfig:
		r.Error = c.updateConfig(op.UpdateConfig)
	case *vmmv1.Request_Watch:
		r.Error = c.watch(op.Watch.GetName())
	case *vmmv1.Request_FetchConfig:
		cfg, ok, err := c.s.opts.Lender.ReceivedConfig(op.FetchConfig.GetName())
		r.Error = lendError(err)
		r.ConfigState, r.HasConfigState = cfg, ok
	default:
		r.Error = replyError(codes.InvalidArgument, wire.ReasonInvalidArgument, "request has no known operation")
	}
	return r
}

// attach lends the device whose descriptor came with the request.
func (c *conn) attach(a *vmmv1.Attach, fds []int) *vmmv1.Error {
	if len(fds) != 1 {
		for _, fd := range fds {
			unix.Close(fd)
		}
		return replyError(codes.InvalidArgument, wire.ReasonInvalidArgument,
			fmt.Sprintf("Attach %q carries %d file descriptors, want exactly 1", a.GetName(), len(fds)))
	}
	fd := fds[0]
	if err := vfio.ValidateVMMName(a.GetName()); err != nil {
		unix.Close(fd)
		return replyError(codes.InvalidArgument, wire.ReasonInvalidArgument, err.Error())
	}
	if n := len(a.GetConfigState()); n > vmm.MaxConfigState {
		unix.Close(fd)
		return replyError(codes.InvalidArgument, ReasonConfigTooLarge,
			fmt.Sprintf("config state of %q is %d bytes, at most %d", a.GetName(), n, vmm.MaxConfigState))
	}
	if err := c.s.opts.Check(fd); err != nil {
		unix.Close(fd)
		return replyError(codes.InvalidArgument, ReasonNotVFIODevice, err.Error())
	}
	dev, err := c.s.opts.Adopt(fd, a.GetName()) // takes fd, also on error
	if err != nil {
		code, reason := codes.InvalidArgument, wire.ReasonDeviceUnsupported
		if !errors.Is(err, vfio.ErrNotSupported) {
			code, reason = codes.FailedPrecondition, wire.ReasonDeviceState
		}
		return replyError(code, reason, err.Error())
	}
	name := a.GetName()
	c.s.addWatcher(name, c, true)
	if err := c.s.opts.Lender.Lend(name, dev, a.GetConfigState(), func(ev vfio.DeviceEvent) { c.s.publish(name, ev) }); err != nil {
		c.s.removeWatcher(name, c)
		dev.Close()
		return lendError(err)
	}
	c.mu.Lock()
	c.lent = append(c.lent, name)
	c.mu.Unlock()
	c.s.log.Info("vmm lent a device", "device", "vmm:"+name, "config_bytes", len(a.GetConfigState()), "vmm_pid", c.cred.PID)
	return nil
}

// detach withdraws a lent device: any allowed peer may, as an operator
// detaches a device from a VM.
func (c *conn) detach(ctx context.Context, name string) *vmmv1.Error {
	if err := c.s.opts.Lender.Withdraw(ctx, name); err != nil {
		return lendError(err)
	}
	c.mu.Lock()
	if i := slices.Index(c.lent, name); i >= 0 {
		c.lent = append(c.lent[:i], c.lent[i+1:]...)
	}
	c.mu.Unlock()
	return nil
}

func (c *conn) updateConfig(u *vmmv1.UpdateConfig) *vmmv1.Error {
	if n := len(u.GetConfigState()); n > vmm.MaxConfigState {
		return replyError(codes.InvalidArgument, ReasonConfigTooLarge,
			fmt.Sprintf("config state of %q is %d bytes, at most %d", u.GetName(), n, vmm.MaxConfigState))
	}
	c.mu.Lock()
	mine := slices.Index(c.lent, u.GetName()) >= 0
	c.mu.Unlock()
	if !mine {
		return replyError(codes.NotFound, wire.ReasonDeviceNotFound, fmt.Sprintf("this connection lent no device %q", u.GetName()))
	}
	return lendError(c.s.opts.Lender.SetConfig(u.GetName(), u.GetConfigState()))
}

func (c *conn) watch(name string) *vmmv1.Error {
	if err := vfio.ValidateVMMName(name); err != nil {
		return replyError(codes.InvalidArgument, wire.ReasonInvalidArgument, err.Error())
	}
	if !c.s.addWatcher(name, c, false) {
		return replyError(codes.NotFound, wire.ReasonDeviceNotFound, fmt.Sprintf("no device is lent as vmm:%s", name))
	}
	return nil
}

// addWatcher adds c to name's watchers; a watcher that is not the
// lender needs a lender already there.
func (s *Server) addWatcher(name string, c *conn, lender bool) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	ws := s.watchers[name]
	if !lender && len(ws) == 0 {
		return false
	}
	if slices.Index(ws, c) < 0 {
		s.watchers[name] = append(ws, c)
	}
	return true
}

func (s *Server) removeWatcher(name string, c *conn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	ws := s.watchers[name]
	if i := slices.Index(ws, c); i >= 0 {
		ws = append(ws[:i:i], ws[i+1:]...)
	}
	if len(ws) == 0 {
		delete(s.watchers, name)
	} else {
		s.watchers[name] = ws
	}
}

func (s *Server) unwatchAll(c *conn) {
	s.mu.Lock()
	var names []string
	for name, ws := range s.watchers {
		if slices.Index(ws, c) >= 0 {
			names = append(names, name)
		}
	}
	s.mu.Unlock()
	for _, name := range names {
		s.removeWatcher(name, c)
	}
}

// publish sends a device's event to its watchers; the last event of a
// withdrawn device ends its watch.
func (s *Server) publish(name string, ev vfio.DeviceEvent) {
	s.mu.Lock()
	ws := append([]*conn(nil), s.watchers[name]...)
	if ev.Withdrawn {
		delete(s.watchers, name)
	}
	s.mu.Unlock()
	for _, c := range ws {
		c.event(&vmmv1.Event{
			Name: name, State: uint32(ev.State), StateName: ev.State.String(), MigrationId: ev.Owner,
			ConfigState: ev.Config, ConfigReceived: ev.Config != nil, Withdrawn: ev.Withdrawn,
		})
	}
}

// lendError maps the registry's errors to a reply's.
func lendError(err error) *vmmv1.Error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, vfio.ErrBadSpec):
		return replyError(codes.InvalidArgument, wire.ReasonInvalidArgument, err.Error())
	case errors.Is(err, vfio.ErrNotLent):
		return replyError(codes.NotFound, wire.ReasonDeviceNotFound, err.Error())
	case errors.Is(err, vfio.ErrLent):
		return replyError(codes.AlreadyExists, wire.ReasonDeviceBusy, err.Error())
	case errors.Is(err, vfio.ErrConfigFrozen):
		return replyError(codes.FailedPrecondition, ReasonConfigFrozen, err.Error())
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, context.Canceled):
		return replyError(codes.DeadlineExceeded, wire.ReasonDeviceBusy, err.Error())
	}
	return replyError(codes.Internal, wire.ReasonInternal, err.Error())
}

func replyError(code codes.Code, reason, msg string) *vmmv1.Error {
	return &vmmv1.Error{Code: int32(code), Reason: reason, Message: msg}
}
