package ephemeralca

import (
	"crypto/tls"
	"crypto/x509"
	"net"
	"os"
	"testing"
)

// TestIssue checks what an agent relies on: the certificate chains to the
// CA, names its SANs, carries the usages asked for, and its key matches.
func TestIssue(t *testing.T) {
	ca, err := New(t.TempDir(), "test CA")
	if err != nil {
		t.Fatal(err)
	}
	f, err := ca.Issue(Options{}, "127.0.0.1", "spiffe://fleet.example/agent", "node-a.example")
	if err != nil {
		t.Fatal(err)
	}
	pair, err := tls.LoadX509KeyPair(f.Cert, f.Key)
	if err != nil {
		t.Fatal(err)
	}
	leaf := pair.Leaf
	roots := x509.NewCertPool()
	pem, err := os.ReadFile(f.CA)
	if err != nil {
		t.Fatal(err)
	}
	if !roots.AppendCertsFromPEM(pem) {
		t.Fatal("the CA file holds no certificate")
	}
	for _, name := range []string{"127.0.0.1", "node-a.example"} {
		if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, DNSName: name, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
			t.Errorf("verify as %s: %v", name, err)
		}
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Errorf("verify as a client: %v", err)
	}
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != "spiffe://fleet.example/agent" {
		t.Errorf("URI SANs %v", leaf.URIs)
	}
	if len(leaf.IPAddresses) != 1 || !leaf.IPAddresses[0].Equal(net.IPv4(127, 0, 0, 1)) {
		t.Errorf("IP SANs %v", leaf.IPAddresses)
	}

	client, err := ca.Issue(Options{Usages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}, "spiffe://fleet.example/cp")
	if err != nil {
		t.Fatal(err)
	}
	cpair, err := tls.LoadX509KeyPair(client.Cert, client.Key)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cpair.Leaf.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err == nil {
		t.Error("a client-only certificate verified as a server")
	}
	if client.Cert == f.Cert || client.Key == f.Key {
		t.Error("two certificates share a file")
	}

	if _, err := ca.Issue(Options{}, "spiffe://bad host/%zz"); err == nil {
		t.Error("a SAN that is no URI was issued")
	}
}
