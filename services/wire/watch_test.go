package wire

import (
	"context"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// A watch whose caller went away ends with a gRPC status (CANCELED), not
// the bare context error: the interceptors around a Watch handler (the
// access log, the grpc_server_handled_total metric) read the handler's
// error as it is, and a bare one is UNKNOWN to them, logged at ERROR. The
// soak found WatchIncoming ending so.
func TestWatchOfAGoneCallerEndsWithAStatus(t *testing.T) {
	ctx, cancel := context.WithCancel(t.Context())
	var b Broadcast
	err := Watch(ctx, &b, func() (int, bool, uint64) { return 0, false, 0 }, func(int) error {
		cancel() // the caller goes away after the first state
		return nil
	})
	s, ok := status.FromError(err)
	if !ok || s.Code() != codes.Canceled {
		t.Fatalf("Watch returned %#v (a status: %v); want a CANCELED status", err, ok)
	}
}
