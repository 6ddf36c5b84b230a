//go:build !linux

package shapedlink

import (
	"context"
	"net"
)

// DialContext needs Linux network namespaces.
func (n *Namespace) DialContext(context.Context, string, string) (net.Conn, error) {
	return nil, ErrUnsupported
}

// Listen needs Linux network namespaces.
func (n *Namespace) Listen(string, string) (net.Listener, error) {
	return nil, ErrUnsupported
}
