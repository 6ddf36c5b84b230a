package shapedlink

import (
	"context"
	"fmt"
	"net"
	"os"
	"runtime"
	"syscall"
)

// cloneNewNet is CLONE_NEWNET, the namespace type setns is asked to join.
const cloneNewNet = 0x40000000

// DialContext connects to address inside the namespace, as net.Dialer
// does; the connection then belongs to the namespace for its life.
func (n *Namespace) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	var conn net.Conn
	err := n.do(func() error {
		var d net.Dialer
		var err error
		conn, err = d.DialContext(ctx, network, address)
		return err
	})
	return conn, err
}

// Listen listens on address inside the namespace, as net.Listen does.
func (n *Namespace) Listen(network, address string) (net.Listener, error) {
	var lis net.Listener
	err := n.do(func() error {
		var err error
		lis, err = net.Listen(network, address)
		return err
	})
	return lis, err
}

// do runs f on a thread of its own that has joined the namespace. The
// thread goes back to this process's namespace afterwards; if it cannot,
// it stays locked and ends with its goroutine, so no other goroutine ever
// runs in the namespace by mistake.
func (n *Namespace) do(f func() error) error {
	target, err := os.Open("/run/netns/" + n.Name)
	if err != nil {
		return fmt.Errorf("namespace %s: %w", n.Name, err)
	}
	defer target.Close()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		home, err := os.Open(fmt.Sprintf("/proc/%d/task/%d/ns/net", os.Getpid(), syscall.Gettid()))
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer home.Close()
		if err := setns(target); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("join namespace %s: %w", n.Name, err)
			return
		}
		err = f()
		if setns(home) == nil {
			runtime.UnlockOSThread()
		}
		errc <- err
	}()
	return <-errc
}

// setnsTrap is setns(2)'s number by architecture: the syscall package
// does not name it on every one.
var setnsTrap = map[string]uintptr{"amd64": 308, "arm64": 268, "riscv64": 268, "loong64": 268, "386": 346, "ppc64le": 350, "s390x": 339}

func setns(f *os.File) error {
	trap, ok := setnsTrap[runtime.GOARCH]
	if !ok {
		return fmt.Errorf("%w: setns on %s", ErrUnsupported, runtime.GOARCH)
	}
	if _, _, e := syscall.RawSyscall(trap, f.Fd(), cloneNewNet, 0); e != 0 {
		return e
	}
	return nil
}
