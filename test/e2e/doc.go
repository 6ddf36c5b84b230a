// Package e2e holds Ferry's end-to-end tests: a source and a destination
// agent talking real gRPC over loopback TCP, driven through their public
// APIs as a control plane would, in this process (agents_test.go) and as
// separate `ferry` processes (process_test.go).
package e2e
