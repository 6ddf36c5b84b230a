// Package ephemeralca is a certificate authority that lives for one run.
// `ferry bench --tls` and the tests issue agent and client certificates
// from it. Each certificate is written as PEM files, the way an operator
// passes them to --tls-cert, --tls-key and --tls-ca.
//
// It is not for production: the CA's key lives in memory, its files in a
// directory the caller removes, and its certificates expire after a day.
// Production certificates come from the operator's own CA
// (docs/security.md).
package ephemeralca

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// CA is a certificate authority with its files in one directory.
type CA struct {
	Cert   *x509.Certificate
	File   string // the CA certificate, PEM: --tls-ca
	key    *ecdsa.PrivateKey
	dir    string
	serial int64
}

// Files are the PEM files of one issued certificate.
type Files struct {
	Cert string // --tls-cert
	Key  string // --tls-key
	CA   string // --tls-ca: the CA that issued it
}

// New creates a CA named name that writes its files to dir (which must
// exist).
func New(dir, name string) (*CA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
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
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	ca := &CA{Cert: cert, File: filepath.Join(dir, "ca.pem"), key: key, dir: dir, serial: 1}
	if err := writePEM(ca.File, "CERTIFICATE", der); err != nil {
		return nil, err
	}
	return ca, nil
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
// address or a DNS name, and writes it and its key.
func (ca *CA) Issue(o Options, sans ...string) (Files, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return Files{}, err
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
				return Files{}, fmt.Errorf("ephemeralca: SAN %q: %w", s, err)
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
		return Files{}, err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return Files{}, err
	}
	base := filepath.Join(ca.dir, "cert-"+strconv.FormatInt(ca.serial, 10))
	f := Files{Cert: base + ".pem", Key: base + "-key.pem", CA: ca.File}
	if err := writePEM(f.Cert, "CERTIFICATE", der); err != nil {
		return Files{}, err
	}
	if err := writePEM(f.Key, "PRIVATE KEY", keyDER); err != nil {
		return Files{}, err
	}
	return f, nil
}

func writePEM(path, typ string, der []byte) error {
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600)
}
