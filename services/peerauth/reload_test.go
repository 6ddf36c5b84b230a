package peerauth_test

import (
	"crypto/tls"
	"crypto/x509"
	"net"
	"os"
	"testing"

	"google.golang.org/grpc/credentials"

	"github.com/vfio-ferry/ferry/services/peerauth"
	"github.com/vfio-ferry/ferry/services/peerauth/peerauthtest"
)

// handshake runs one TLS handshake between server and client credentials
// over loopback TCP and returns the leaf each side presented, or the
// client's error.
func handshake(t *testing.T, server, client credentials.TransportCredentials) (serverLeaf, clientLeaf *x509.Certificate, err error) {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	type result struct {
		auth credentials.AuthInfo
		err  error
	}
	done := make(chan result, 1)
	go func() {
		s, err := lis.Accept()
		if err != nil {
			done <- result{nil, err}
			return
		}
		defer s.Close()
		conn, auth, err := server.ServerHandshake(s)
		if err == nil {
			// Read until the client closes, so the handshake completes
			// on both sides.
			conn.Read(make([]byte, 1))
			conn.Close()
		}
		done <- result{auth, err}
	}()
	c, err := net.Dial("tcp", lis.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	conn, auth, err := client.ClientHandshake(t.Context(), "127.0.0.1:7100", c)
	if err != nil {
		c.Close()
		<-done
		return nil, nil, err
	}
	conn.Close()
	sr := <-done
	if sr.err != nil {
		return nil, nil, sr.err
	}
	return auth.(credentials.TLSInfo).State.PeerCertificates[0], sr.auth.(credentials.TLSInfo).State.PeerCertificates[0], nil
}

// A Kubernetes Secret volume is updated by a symlink swap: the reloader
// takes the new certificate and CA for the next handshake, refuses a
// corrupt update (counted once, the old identity stays), and takes the
// next good one.
func TestReloaderSecretVolume(t *testing.T) {
	ca1, ca2 := peerauthtest.NewCA(t, "ca one"), peerauthtest.NewCA(t, "ca two")
	serverVol, clientVol := peerauthtest.NewSecretVolume(t), peerauthtest.NewSecretVolume(t)
	s1, c1 := ca1.Issue(t, "127.0.0.1", "node-a"), ca1.Issue(t, "spiffe://ferry.test/cp")
	serverVol.Project(t, s1, ca1.File)
	clientVol.Project(t, c1, ca1.File)
	sr, err := peerauth.NewReloader(serverVol.Files(), nil, x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth)
	if err != nil {
		t.Fatal(err)
	}
	cr, err := peerauth.NewReloader(clientVol.Files(), nil, x509.ExtKeyUsageClientAuth)
	if err != nil {
		t.Fatal(err)
	}
	server, client := sr.ServerCreds(), cr.ClientCreds("")
	serial := func(c *x509.Certificate) string { return c.SerialNumber.String() }
	want := func(name string, sf, cf peerauth.TLSFiles) {
		t.Helper()
		sl, cl, err := handshake(t, server, client)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if serial(sl) != serial(leaf(t, sf)) || serial(cl) != serial(leaf(t, cf)) {
			t.Errorf("%s: the handshake presented serials %s and %s", name, serial(sl), serial(cl))
		}
	}
	want("at start", s1, c1)
	if changed, err := sr.Check(); changed || err != nil {
		t.Fatalf("Check without a change: %v %v", changed, err)
	}

	// Rotate the CA and both certificates: the new bundle holds both CAs
	// while the fleet moves, then only the new one.
	s2, c2 := ca2.Issue(t, "127.0.0.1", "node-a"), ca2.Issue(t, "spiffe://ferry.test/cp")
	serverVol.Project(t, s2, ca2.File, ca1.File)
	clientVol.Project(t, c2, ca2.File, ca1.File)
	for _, r := range []*peerauth.Reloader{sr, cr} {
		if changed, err := r.Check(); !changed || err != nil {
			t.Fatalf("Check after the rotation: %v %v", changed, err)
		}
	}
	want("after the rotation", s2, c2)
	serverVol.Project(t, s2, ca2.File)
	clientVol.Project(t, c2, ca2.File)
	sr.Check()
	cr.Check()
	want("with the new CA alone", s2, c2)
	if n := len(sr.Certificates()); n != 2 {
		t.Errorf("%d certificates in use, want the leaf and one CA", n)
	}

	// A corrupt certificate: refused, counted once, the identity stays.
	serverVol.ProjectBytes(t, []byte("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n"), read(t, s2.Key), read(t, ca2.File))
	for range 2 {
		if changed, err := sr.Check(); changed || err == nil {
			t.Fatalf("Check of a corrupt certificate: %v %v", changed, err)
		}
	}
	if n := sr.Failures(); n != 1 {
		t.Errorf("%d failures counted, want 1", n)
	}
	want("after a corrupt update", s2, c2)
	// A certificate whose key is another's: refused too.
	s3 := ca2.Issue(t, "127.0.0.1", "node-a")
	serverVol.ProjectBytes(t, read(t, s3.Cert), read(t, s2.Key), read(t, ca2.File))
	if _, err := sr.Check(); err == nil {
		t.Fatal("a mismatched key pair was taken")
	}
	want("after a mismatched pair", s2, c2)
	serverVol.Project(t, s3, ca2.File)
	if changed, err := sr.Check(); !changed || err != nil {
		t.Fatalf("Check of the next good update: %v %v", changed, err)
	}
	want("after the next good update", s3, c2)
	if sr.Failures() != 2 || sr.Reloads() != 3 {
		t.Errorf("failures %d, reloads %d; want 2 and 3", sr.Failures(), sr.Reloads())
	}

	// A client that does not trust the server's CA fails its handshake.
	old, err := peerauth.NewReloader(c1, nil, x509.ExtKeyUsageClientAuth)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := handshake(t, server, old.ClientCreds("")); err == nil {
		t.Error("a client of the old CA alone handshook with the rotated server")
	}
}

func leaf(t *testing.T, f peerauth.TLSFiles) *x509.Certificate {
	t.Helper()
	c, err := tls.LoadX509KeyPair(f.Cert, f.Key)
	if err != nil {
		t.Fatal(err)
	}
	l, err := x509.ParseCertificate(c.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func read(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
