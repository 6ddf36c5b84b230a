// Package wiretest issues real X.509 certificates for tests: an in-test
// certificate authority, and agent and client certificates with the
// subject alternative names a test chooses, written as PEM files the way
// an operator passes them to --tls-cert, --tls-key and --tls-ca.
//
// It is imported by tests only.
package wiretest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vfio-ferry/ferry/services/wire"
)

// CA is a certificate authority that lives for one test.
type CA struct {
	Cert   *x509.Certificate
	key    *ecdsa.PrivateKey
	dir    string
	File   string // the CA certificate, PEM: --tls-ca
	serial int64
}

// NewCA creates a CA named name; its files go to a temporary directory
// removed after the test.
func NewCA(t testing.TB, name string) *CA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	ca := &CA{Cert: cert, key: key, dir: t.TempDir(), serial: 1}
	ca.File = filepath.Join(ca.dir, "ca.pem")
	writePEM(t, ca.File, "CERTIFICATE", der)
	return ca
}

// Options shape a certificate beyond its names.
type Options struct {
	// Usages are its extended key usages; nil means both serverAuth and
	// clientAuth, as an agent's certificate has.
	Usages []x509.ExtKeyUsage
	// NotBefore and NotAfter default to an hour ago and a day from now.
	NotBefore, NotAfter time.Time
}

// Issue signs a certificate for sans, each a URI (spiffe://...), an IP
// address or a DNS name, usable as a server and a client certificate, and
// returns the files an agent or client is given: the certificate, its
// key and this CA.
func (ca *CA) Issue(t testing.TB, sans ...string) wire.TLSFiles {
	t.Helper()
	return ca.IssueWith(t, Options{}, sans...)
}

// IssueWith is Issue with options.
func (ca *CA) IssueWith(t testing.TB, o Options, sans ...string) wire.TLSFiles {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	if o.NotBefore.IsZero() {
		o.NotBefore = now.Add(-time.Hour)
	}
	if o.NotAfter.IsZero() {
		o.NotAfter = now.Add(24 * time.Hour)
	}
	if o.Usages == nil {
		o.Usages = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}
	}
	ca.serial++
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(ca.serial),
		NotBefore:    o.NotBefore,
		NotAfter:     o.NotAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  o.Usages,
	}
	for _, s := range sans {
		switch {
		case strings.Contains(s, "://"):
			u, err := url.Parse(s)
			if err != nil {
				t.Fatal(err)
			}
			tmpl.URIs = append(tmpl.URIs, u)
		case net.ParseIP(s) != nil:
			tmpl.IPAddresses = append(tmpl.IPAddresses, net.ParseIP(s))
		default:
			tmpl.DNSNames = append(tmpl.DNSNames, s)
		}
	}
	if len(sans) > 0 {
		tmpl.Subject.CommonName = sans[0]
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	base := filepath.Join(ca.dir, "cert-"+big.NewInt(ca.serial).String())
	f := wire.TLSFiles{Cert: base + ".pem", Key: base + "-key.pem", CA: ca.File}
	writePEM(t, f.Cert, "CERTIFICATE", der)
	writePEM(t, f.Key, "PRIVATE KEY", keyDER)
	return f
}

func writePEM(t testing.TB, path, typ string, der []byte) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}
