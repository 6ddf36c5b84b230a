package wiretest

import (
	"net"
	"testing"

	"google.golang.org/grpc"
)

// Serve serves s on a loopback port until the end of the test and returns
// its address. The server stops, and Serve's goroutine has returned,
// before the cleanups registered ahead of Serve run: register what must
// outlive the server (a registry) before it, what must end first (the
// agent) after it.
func Serve(tb testing.TB, s *grpc.Server) string {
	tb.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	served := make(chan struct{})
	go func() {
		defer close(served)
		s.Serve(lis)
	}()
	tb.Cleanup(func() {
		s.Stop()
		<-served
	})
	return lis.Addr().String()
}
