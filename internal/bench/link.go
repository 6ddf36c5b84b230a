package bench

import (
	"context"
	"net"

	"github.com/vfio-ferry/ferry/internal/shapedlink"
)

// A bench on a shaped link (--link RATE): the run makes one
// internal/shapedlink link, two network namespaces joined by a veth pair
// shaped to the rate, and every transfer of the run crosses it: the
// destination side (`ferry dest`, the raw TCP receiver) runs in the
// link's Dest namespace, the source side (`ferry source`, the raw TCP
// sender) in its Source namespace, and the control plane here dials
// them through their namespaces. So raw TCP and Ferry meet the same
// bottleneck, in the same run, interleaved; without --link both run on
// loopback, where the CPU is the limit.

// DialFunc dials an agent from the namespace it runs in.
type DialFunc func(ctx context.Context, addr string) (net.Conn, error)

// destNS and sourceNS are the namespaces the two sides run in: nil on
// loopback.
func (c config) destNS() *shapedlink.Namespace {
	if c.link == nil {
		return nil
	}
	return c.link.Dest
}

func (c config) sourceNS() *shapedlink.Namespace {
	if c.link == nil {
		return nil
	}
	return c.link.Source
}

// anyPort is a listen address on ns's link address (loopback when nil)
// with a port the kernel picks.
func (c config) anyPort(ns *shapedlink.Namespace) string {
	if ns == nil {
		return "127.0.0.1:0"
	}
	return ns.HostPort(0)
}

// freeAddr returns an address in ns (loopback when nil) with a port that
// was free a moment ago, for an agent child to listen on.
func (c config) freeAddr(ns *shapedlink.Namespace) (string, error) {
	listen := net.Listen
	if ns != nil {
		listen = ns.Listen
	}
	lis, err := listen("tcp", c.anyPort(ns))
	if err != nil {
		return "", err
	}
	addr := lis.Addr().String()
	lis.Close()
	return addr, nil
}

// dialer dials into ns; nil (the default dialer) on loopback.
func (c config) dialer(ns *shapedlink.Namespace) DialFunc {
	if ns == nil {
		return nil
	}
	return func(ctx context.Context, addr string) (net.Conn, error) { return ns.DialContext(ctx, "tcp", addr) }
}
