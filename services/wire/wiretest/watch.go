// Package wiretest holds what tests of the agents share on the wire: it
// follows a migration watch to its end (LastMigration) and serves a gRPC
// server on loopback for the length of a test (Serve).
//
// It is imported by tests only.
package wiretest

import ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"

// Watched is what a migration watch sends (WatchMigrationResponse,
// WatchIncomingResponse).
type Watched interface {
	GetMigration() *ferryv1.Migration
}

// LastMigration receives from a watch until it ends and returns the last
// migration it sent (nil for none) and the error that ended it: io.EOF
// when the agent closed the watch at the migration's end.
func LastMigration[R Watched](recv func() (R, error)) (*ferryv1.Migration, error) {
	var last *ferryv1.Migration
	for {
		resp, err := recv()
		if err != nil {
			return last, err
		}
		last = resp.GetMigration()
	}
}
