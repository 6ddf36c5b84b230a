//go:build !linux

package chunkwire

import "io"

// lowatConn is Linux's; elsewhere a data connection is read as it is.
type lowatConn struct{}

func newLowatConn(io.Reader) *lowatConn { return nil }

func (*lowatConn) expect(int) {}

func (*lowatConn) Read([]byte) (int, error) { return 0, io.EOF }
