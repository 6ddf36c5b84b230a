package peerauth

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/credentials"
)

// A Reloader holds a TLS identity read from TLSFiles and reads the files
// again when they change, so a certificate rotated by cert-manager or a
// mesh is used without a restart.
//
// Every handshake takes the identity in use at that moment: the server
// side through tls.Config.GetConfigForClient, the client side through
// credentials that build the client's configuration per handshake (its CA
// pool must be the current one, and crypto/tls has no callback for the
// root pool that still knows the name being verified when it is an IP
// address). Connections already established keep the identity they
// handshook with: TLS 1.3 does not renegotiate, so a running migration's
// channels go on, and its next re-dialled channel uses the new identity.
//
// Check reads the three files and, when their contents changed, parses
// them with the same checks as at start (SANs, extended key usages,
// expiry, a CA in the bundle). A set that does not parse is logged and
// counted once (until the contents change again) and the identity in use
// stays. Reading the contents rather than watching file events handles a
// Kubernetes Secret volume, which updates by swapping the ..data symlink
// to a new timestamped directory: the files' paths stay, what they
// resolve to changes. A writer that replaces the certificate and the key
// one after the other may be caught between the two: that set fails
// (the key does not match), is counted, and the next Check takes the
// whole new pair.
type Reloader struct {
	files TLSFiles
	uses  []x509.ExtKeyUsage
	log   *slog.Logger

	cur atomic.Pointer[identity]

	// mu serialises Check; it guards sum and badSum.
	mu     sync.Mutex
	sum    [sha256.Size]byte // of the contents of the identity in use
	badSum [sha256.Size]byte // of the last contents that failed
	// failures counts the sets of contents that failed to parse; reloads
	// the new identities taken into use.
	failures atomic.Uint64
	reloads  atomic.Uint64
}

// DefaultReloadInterval is how often an agent checks its TLS files. A
// Kubernetes Secret volume itself lags a Secret's update by up to about a
// minute.
const DefaultReloadInterval = 10 * time.Second

// NewReloader reads the identity of f, which must hold for uses (an
// agent's certificate needs serverAuth and clientAuth, a client's
// clientAuth): an error here is a start-up error.
func NewReloader(f TLSFiles, log *slog.Logger, uses ...x509.ExtKeyUsage) (*Reloader, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	b, err := f.read()
	if err != nil {
		return nil, err
	}
	id, err := f.parse(b, uses...)
	if err != nil {
		return nil, err
	}
	r := &Reloader{files: f, uses: uses, log: log, sum: contentSum(b)}
	r.cur.Store(id)
	return r, nil
}

func contentSum(b fileBytes) [sha256.Size]byte {
	h := sha256.New()
	for _, part := range [][]byte{b.cert, b.key, b.ca} {
		fmt.Fprintf(h, "%d:", len(part))
		h.Write(part)
	}
	var sum [sha256.Size]byte
	h.Sum(sum[:0])
	return sum
}

// Check reads the files and takes a changed, valid identity into use. It
// reports whether the identity changed; err is why changed contents
// were refused (the identity in use stays).
func (r *Reloader) Check() (changed bool, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	b, err := r.files.read()
	if err == nil {
		sum := contentSum(b)
		if sum == r.sum {
			return false, nil
		}
		var id *identity
		if id, err = r.files.parse(b, r.uses...); err == nil {
			old := r.cur.Swap(id)
			r.sum = sum
			r.reloads.Add(1)
			r.log.Info("TLS credentials reloaded: new connections use them", "cert", r.files.Cert,
				"subject", certName(id.cert.Leaf), "not_after", id.cert.Leaf.NotAfter.Format(time.RFC3339),
				"previous_not_after", old.cert.Leaf.NotAfter.Format(time.RFC3339), "cas", len(id.cas))
			return true, nil
		}
		if sum == r.badSum {
			return false, err // counted and logged already
		}
		r.badSum = sum
	} else {
		// A file that cannot be read: counted once until the error
		// changes.
		sum := sha256.Sum256([]byte(err.Error()))
		if sum == r.badSum {
			return false, err
		}
		r.badSum = sum
	}
	r.failures.Add(1)
	r.log.Error("TLS credentials not reloaded: the files do not make a valid identity; the previous one stays in use", "error", err)
	return false, err
}

// Watch calls Check every interval until ctx ends.
func (r *Reloader) Watch(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			r.Check()
		}
	}
}

// Failures is how many changed sets of files were refused.
func (r *Reloader) Failures() uint64 { return r.failures.Load() }

// Reloads is how many new identities were taken into use.
func (r *Reloader) Reloads() uint64 { return r.reloads.Load() }

// Certificate is one certificate of the identity in use.
type Certificate struct {
	// Kind is "cert" (the agent's or client's own, --tls-cert) or "ca"
	// (one of the --tls-ca bundle).
	Kind     string
	Subject  string // the common name, else the first SAN
	Serial   string // hexadecimal
	NotAfter time.Time
}

// Certificates are the certificates in use: the leaf, then each CA.
func (r *Reloader) Certificates() []Certificate {
	id := r.cur.Load()
	out := []Certificate{certificate("cert", id.cert.Leaf)}
	for _, c := range id.cas {
		out = append(out, certificate("ca", c))
	}
	return out
}

func certificate(kind string, c *x509.Certificate) Certificate {
	return Certificate{Kind: kind, Subject: certName(c), Serial: c.SerialNumber.Text(16), NotAfter: c.NotAfter}
}

func certName(c *x509.Certificate) string {
	if c.Subject.CommonName != "" {
		return c.Subject.CommonName
	}
	if id := CertIdentity(c); id.String() != "" {
		return id.String()
	}
	return "serial " + c.SerialNumber.Text(16)
}

// ServerConfig is the TLS configuration of an agent's listener (as
// ServerTLS), each handshake with the identity in use.
func (r *Reloader) ServerConfig() *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		NextProtos: []string{"h2"},
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			id := r.cur.Load()
			return &tls.Config{
				MinVersion:   tls.VersionTLS13,
				Certificates: []tls.Certificate{id.cert},
				ClientAuth:   tls.RequireAndVerifyClientCert,
				ClientCAs:    id.pool,
				NextProtos:   []string{"h2"},
			}, nil
		},
	}
}

// clientConfig is ClientTLS's configuration from the identity in use.
func (r *Reloader) clientConfig(serverName string) *tls.Config {
	id := r.cur.Load()
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{id.cert},
		RootCAs:      id.pool,
		ServerName:   serverName,
		NextProtos:   []string{"h2"},
	}
}

// ServerCreds are the gRPC credentials of an agent's listener.
func (r *Reloader) ServerCreds() credentials.TransportCredentials {
	return credentials.NewTLS(r.ServerConfig())
}

// ClientCreds are the gRPC credentials of a client of an agent (the
// source agent dialling destinations, or a control-plane client):
// every handshake presents the certificate in use and verifies the
// server against the CA bundle in use, for the dialled host or
// serverName when that is set.
func (r *Reloader) ClientCreds(serverName string) credentials.TransportCredentials {
	return &reloadingClient{r: r, serverName: serverName}
}

// AgentCreds are an agent's listener's credentials and those it dials its
// peers with, both from r (as AgentTLS).
func (r *Reloader) AgentCreds() (server, client credentials.TransportCredentials) {
	return r.ServerCreds(), r.ClientCreds("")
}

// reloadingClient builds the TLS credentials of each client handshake
// from the identity in use.
type reloadingClient struct {
	r          *Reloader
	serverName string
}

func (c *reloadingClient) ClientHandshake(ctx context.Context, authority string, raw net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return credentials.NewTLS(c.r.clientConfig(c.serverName)).ClientHandshake(ctx, authority, raw)
}

func (c *reloadingClient) ServerHandshake(net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return nil, nil, errors.New("peerauth: client credentials cannot serve")
}

func (c *reloadingClient) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: "tls", SecurityVersion: "1.3", ServerName: c.serverName}
}

func (c *reloadingClient) Clone() credentials.TransportCredentials {
	cc := *c
	return &cc
}

// OverrideServerName is deprecated in gRPC; it sets the name to verify.
func (c *reloadingClient) OverrideServerName(name string) error {
	c.serverName = name
	return nil
}
