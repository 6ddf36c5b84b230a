package peerauth

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"syscall"
	"time"

	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
)

// TLSFiles names the PEM files of an agent's or a client's TLS identity:
// its certificate chain and key, and the CA bundle its peers' certificates
// are verified against. Every Ferry connection is mutual TLS: servers
// require a client certificate, clients verify the server's.
type TLSFiles struct {
	Cert string // --tls-cert: the certificate chain, leaf first
	Key  string // --tls-key: the leaf's private key
	CA   string // --tls-ca: the CA certificates that sign every peer
}

// Configured reports whether any of the files is named.
func (f TLSFiles) Configured() bool { return f.Cert != "" || f.Key != "" || f.CA != "" }

// load reads the key pair and the CA pool, with errors that name the flag
// at fault.
func (f TLSFiles) load(use x509.ExtKeyUsage) (tls.Certificate, *x509.CertPool, error) {
	b, err := f.read()
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	id, err := f.parse(b, use)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	return id.cert, id.pool, nil
}

// fileBytes are the contents of the three files, read once so that what
// is parsed is what was hashed (see Reloader).
type fileBytes struct{ cert, key, ca []byte }

func (f TLSFiles) read() (fileBytes, error) {
	if f.Cert == "" || f.Key == "" || f.CA == "" {
		return fileBytes{}, errors.New("TLS needs all of --tls-cert, --tls-key and --tls-ca")
	}
	var b fileBytes
	var err error
	if b.cert, err = os.ReadFile(f.Cert); err != nil {
		return fileBytes{}, fmt.Errorf("--tls-cert: %w", err)
	}
	if b.key, err = os.ReadFile(f.Key); err != nil {
		return fileBytes{}, fmt.Errorf("--tls-key: %w", err)
	}
	if b.ca, err = os.ReadFile(f.CA); err != nil {
		return fileBytes{}, fmt.Errorf("--tls-ca: %w", err)
	}
	return b, nil
}

// identity is one parsed TLS identity: the key pair, the CA pool and the
// CA certificates in it.
type identity struct {
	cert tls.Certificate
	pool *x509.CertPool
	cas  []*x509.Certificate
}

// parse checks and parses the files' contents: the certificate must have
// a SAN, every usage in uses and not be expired; the CA file at least one
// certificate.
func (f TLSFiles) parse(b fileBytes, uses ...x509.ExtKeyUsage) (*identity, error) {
	cert, err := tls.X509KeyPair(b.cert, b.key)
	if err != nil {
		return nil, fmt.Errorf("--tls-cert %s / --tls-key %s: %w", f.Cert, f.Key, err)
	}
	leaf := cert.Leaf
	if leaf == nil {
		if leaf, err = x509.ParseCertificate(cert.Certificate[0]); err != nil {
			return nil, fmt.Errorf("--tls-cert %s: %w", f.Cert, err)
		}
		cert.Leaf = leaf
	}
	if len(leaf.DNSNames) == 0 && len(leaf.URIs) == 0 && len(leaf.IPAddresses) == 0 {
		return nil, fmt.Errorf("--tls-cert %s: the certificate has no subject alternative name (DNS, URI or IP): peers identify and verify an agent by its SANs", f.Cert)
	}
	for _, use := range uses {
		if !hasUsage(leaf, use) {
			return nil, fmt.Errorf("--tls-cert %s: the certificate's extended key usage does not include %s", f.Cert, usageName(use))
		}
	}
	if now := time.Now(); now.After(leaf.NotAfter) {
		return nil, fmt.Errorf("--tls-cert %s: the certificate expired at %s", f.Cert, leaf.NotAfter.Format(time.RFC3339))
	}
	id := &identity{cert: cert, pool: x509.NewCertPool()}
	rest := b.ca
	for {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("--tls-ca %s: %w", f.CA, err)
		}
		id.pool.AddCert(c)
		id.cas = append(id.cas, c)
	}
	if len(id.cas) == 0 {
		return nil, fmt.Errorf("--tls-ca %s: no PEM certificate in the file", f.CA)
	}
	return id, nil
}

func hasUsage(c *x509.Certificate, use x509.ExtKeyUsage) bool {
	// No extended key usage at all means any usage.
	return len(c.ExtKeyUsage) == 0 || slices.Contains(c.ExtKeyUsage, use) || slices.Contains(c.ExtKeyUsage, x509.ExtKeyUsageAny)
}

func usageName(use x509.ExtKeyUsage) string {
	if use == x509.ExtKeyUsageServerAuth {
		return "serverAuth (TLS Web Server Authentication)"
	}
	return "clientAuth (TLS Web Client Authentication)"
}

// ServerTLS is the TLS configuration of an agent's listener: TLS 1.3 only,
// and a client certificate is required and verified against f.CA.
func ServerTLS(f TLSFiles) (*tls.Config, error) {
	cert, pool, err := f.load(x509.ExtKeyUsageServerAuth)
	if err != nil {
		return nil, err
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    pool,
		NextProtos:   []string{"h2"},
	}, nil
}

// ClientTLS is the TLS configuration of a client of an agent (the source
// agent dialling a destination, or a control-plane client): TLS 1.3 only,
// it presents f's certificate and verifies the server's against f.CA and
// the host name it dials (or serverName when that is set).
func ClientTLS(f TLSFiles, serverName string) (*tls.Config, error) {
	cert, pool, err := f.load(x509.ExtKeyUsageClientAuth)
	if err != nil {
		return nil, err
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		RootCAs:      pool,
		ServerName:   serverName,
		NextProtos:   []string{"h2"},
	}, nil
}

// AgentTLS is what an agent needs: the credentials of its listener and,
// from the same certificate, those it dials its peers with. An agent's
// certificate therefore needs both the serverAuth and clientAuth extended
// key usages.
func AgentTLS(f TLSFiles) (server, client credentials.TransportCredentials, err error) {
	s, err := ServerTLS(f)
	if err != nil {
		return nil, nil, err
	}
	c, err := ClientTLS(f, "")
	if err != nil {
		return nil, nil, err
	}
	return credentials.NewTLS(s), credentials.NewTLS(c), nil
}

// LogRefusedHandshakes wraps the credentials of an agent's listener so
// that a connection whose handshake fails is logged, once, with the
// client's address and why: at warn level when the client spoke plaintext
// to a TLS listener (the usual cause is a client without its TLS flags) or
// failed verification, at debug level when it closed the connection
// without a handshake (a TCP probe, a port scan).
func LogRefusedHandshakes(creds credentials.TransportCredentials, log *slog.Logger) credentials.TransportCredentials {
	if creds == nil || creds.Info().SecurityProtocol != "tls" {
		return creds
	}
	return handshakeLogger{creds, log}
}

type handshakeLogger struct {
	credentials.TransportCredentials
	log *slog.Logger
}

func (h handshakeLogger) ServerHandshake(raw net.Conn) (net.Conn, credentials.AuthInfo, error) {
	conn, auth, err := h.TransportCredentials.ServerHandshake(raw)
	if err == nil {
		return conn, auth, nil
	}
	client := raw.RemoteAddr().String()
	var header tls.RecordHeaderError
	switch {
	case errors.As(err, &header):
		h.log.Warn("refused a plaintext connection: this agent expects TLS (is the client missing --tls-cert, --tls-key and --tls-ca?)", "client", client, "error", err)
	case errors.Is(err, io.EOF), errors.Is(err, syscall.ECONNRESET):
		h.log.Debug("a connection closed before its TLS handshake", "client", client, "error", err)
	default:
		h.log.Warn("refused a TLS handshake", "client", client, "error", err)
	}
	return conn, auth, err
}

func (h handshakeLogger) Clone() credentials.TransportCredentials {
	return handshakeLogger{h.TransportCredentials.Clone(), h.log}
}

// Identity is who called: the subject alternative names of the verified
// client certificate, URIs (spiffe://...), DNS names and IP addresses, each
// kind apart. The zero Identity is an unauthenticated caller (plaintext,
// or no client certificate).
type Identity struct {
	// Verified is set when the caller presented a certificate the TLS
	// handshake verified against the CA.
	Verified bool
	// URIs are the certificate's URI SANs, DNSNames its DNS SANs (lower
	// case), IPs its IP SANs, each in certificate order.
	URIs     []string
	DNSNames []string
	IPs      []netip.Addr
}

// Authenticated reports whether the caller presented a verified
// certificate.
func (id Identity) Authenticated() bool { return id.Verified }

// String is the identity's names, comma-separated: its URIs, then its DNS
// names, then its IP addresses ("" when unauthenticated, "(no SAN)" for a
// certificate without names). Two callers with the same String are the
// same principal: a session is bound to it (a renewed certificate with the
// same names is the same principal).
func (id Identity) String() string {
	if id.Verified && len(id.URIs)+len(id.DNSNames)+len(id.IPs) == 0 {
		return "(no SAN)"
	}
	names := slices.Concat(id.URIs, id.DNSNames)
	for _, ip := range id.IPs {
		names = append(names, ip.String())
	}
	return strings.Join(names, ",")
}

// Matches reports whether the identity has the SAN name, compared only
// with the SANs of name's kind: an IP address (10.0.0.7, fd00::7) with the
// IP SANs, a name with a colon (spiffe://..., urn:...) with the URI SANs,
// exactly, and anything else with the DNS SANs, without regard to case.
// So a DNS SAN spelled like an address never passes for an IP SAN, nor
// one spelled like a URI for a URI SAN. "*" matches any authenticated
// identity.
func (id Identity) Matches(name string) bool {
	if !id.Authenticated() {
		return false
	}
	if name == "*" {
		return true
	}
	if ip, err := netip.ParseAddr(name); err == nil {
		return slices.Contains(id.IPs, ip.Unmap())
	}
	if strings.Contains(name, ":") {
		return slices.Contains(id.URIs, name)
	}
	return slices.Contains(id.DNSNames, strings.ToLower(name))
}

// PeerIdentity is the identity of the caller of an RPC, taken from the
// certificate the TLS handshake verified. It is the zero Identity on a
// plaintext connection.
func PeerIdentity(ctx context.Context) Identity {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return Identity{}
	}
	return AuthIdentity(p.AuthInfo)
}

// AuthIdentity is the identity a transport handshake established: that of
// the certificate the TLS handshake verified, the zero Identity for a
// plaintext connection.
func AuthIdentity(auth credentials.AuthInfo) Identity {
	info, ok := auth.(credentials.TLSInfo)
	if !ok || len(info.State.VerifiedChains) == 0 || len(info.State.VerifiedChains[0]) == 0 {
		return Identity{}
	}
	return CertIdentity(info.State.VerifiedChains[0][0])
}

// CertIdentity is the identity a verified certificate names.
func CertIdentity(c *x509.Certificate) Identity {
	id := Identity{Verified: true}
	for _, u := range c.URIs {
		id.URIs = append(id.URIs, u.String())
	}
	for _, d := range c.DNSNames {
		id.DNSNames = append(id.DNSNames, strings.ToLower(d))
	}
	for _, ip := range c.IPAddresses {
		if a, ok := netip.AddrFromSlice(ip); ok {
			id.IPs = append(id.IPs, a.Unmap())
		}
	}
	return id
}
