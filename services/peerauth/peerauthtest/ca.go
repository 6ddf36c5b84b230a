// Package peerauthtest issues real X.509 certificates for tests: an
// in-test certificate authority (pkg/ephemeralca), and agent and client
// certificates with the subject alternative names a test chooses, written
// as PEM files the way an operator passes them to --tls-cert, --tls-key
// and --tls-ca.
//
// It is imported by tests only.
package peerauthtest

import (
	"testing"

	"github.com/vfio-ferry/ferry/pkg/ephemeralca"
	"github.com/vfio-ferry/ferry/services/peerauth"
)

// CA is a certificate authority that lives for one test.
type CA struct {
	*ephemeralca.CA
}

// Options shape a certificate beyond its names.
type Options = ephemeralca.Options

// NewCA creates a CA named name; its files go to a temporary directory
// removed after the test.
func NewCA(t testing.TB, name string) *CA {
	t.Helper()
	ca, err := ephemeralca.New(t.TempDir(), name)
	if err != nil {
		t.Fatal(err)
	}
	return &CA{ca}
}

// Issue signs a certificate for sans, each a URI (spiffe://...), an IP
// address or a DNS name, usable as a server and a client certificate, and
// returns the files an agent or client is given: the certificate, its
// key and this CA.
func (ca *CA) Issue(t testing.TB, sans ...string) peerauth.TLSFiles {
	t.Helper()
	return ca.IssueWith(t, Options{}, sans...)
}

// IssueWith is Issue with options.
func (ca *CA) IssueWith(t testing.TB, o Options, sans ...string) peerauth.TLSFiles {
	t.Helper()
	f, err := ca.CA.Issue(o, sans...)
	if err != nil {
		t.Fatal(err)
	}
	return peerauth.TLSFiles(f)
}
