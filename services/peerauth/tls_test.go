package peerauth_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"log/slog"
	"net"
	"net/url"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/services/grpcserver"
	"github.com/vfio-ferry/ferry/services/peerauth"
	"github.com/vfio-ferry/ferry/services/peerauth/peerauthtest"
	"github.com/vfio-ferry/ferry/services/wire"
	"github.com/vfio-ferry/ferry/services/wire/wiretest"
)

const (
	controlPlane = "spiffe://ferry.test/control-plane"
	agentID      = "spiffe://ferry.test/agent"
)

// serve starts a server with every Ferry service registered unimplemented:
// a call the authorization admits ends UNIMPLEMENTED, one it refuses
// PERMISSION_DENIED or UNAUTHENTICATED.
func serve(t *testing.T, cfg grpcserver.Config) string {
	t.Helper()
	srv := grpcserver.New(cfg)
	ferryv1.RegisterSourceAgentServer(srv.GRPC, ferryv1.UnimplementedSourceAgentServer{})
	ferryv1.RegisterDestAgentServer(srv.GRPC, ferryv1.UnimplementedDestAgentServer{})
	ferryv1.RegisterTransferServer(srv.GRPC, ferryv1.UnimplementedTransferServer{})
	srv.Ready()
	return wiretest.Serve(t, srv.GRPC)
}

func dialWith(t *testing.T, addr string, creds credentials.TransportCredentials) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpcserver.DialOptions(creds, nil)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func clientCreds(t *testing.T, f peerauth.TLSFiles) credentials.TransportCredentials {
	t.Helper()
	c, err := peerauth.ClientTLS(f, "")
	if err != nil {
		t.Fatal(err)
	}
	return credentials.NewTLS(c)
}

// rules is the policy of a destination agent: the control plane may call
// DestAgent, the agents may call Transfer. SourceAgent has no rule.
func rules() []peerauth.AccessRule {
	return []peerauth.AccessRule{
		{Services: []string{ferryv1.DestAgent_ServiceDesc.ServiceName}, Allow: []string{controlPlane, "ops.ferry.test"}, Flag: "--allow-client"},
		{Services: []string{ferryv1.Transfer_ServiceDesc.ServiceName}, Allow: []string{agentID}, Flag: "--allow-peer"},
	}
}

func TestMutualTLSAuthorization(t *testing.T) {
	ca := peerauthtest.NewCA(t, "ferry test CA")
	server := ca.Issue(t, "localhost", "127.0.0.1", agentID)
	screds, _, err := peerauth.AgentTLS(server)
	if err != nil {
		t.Fatal(err)
	}
	addr := serve(t, grpcserver.Config{Creds: screds, Access: rules()})

	cpConn := dialWith(t, addr, clientCreds(t, ca.Issue(t, controlPlane)))
	cp := ferryv1.NewDestAgentClient(cpConn)
	ops := ferryv1.NewDestAgentClient(dialWith(t, addr, clientCreds(t, ca.Issue(t, "OPS.ferry.test"))))
	agentConn := dialWith(t, addr, clientCreds(t, ca.Issue(t, "node-2.ferry.test", agentID)))
	intruder := dialWith(t, addr, clientCreds(t, ca.Issue(t, "spiffe://ferry.test/intruder", "intruder.ferry.test")))

	check := func(name string, err error, code codes.Code, reason string) {
		t.Helper()
		if wire.Code(err) != code || wire.Reason(err) != reason {
			t.Errorf("%s: %v (reason %q), want %v %q", name, err, wire.Reason(err), code, reason)
		}
	}
	ctx := t.Context()
	_, err = cp.ListDevices(ctx, &ferryv1.ListDevicesRequest{})
	check("control plane -> DestAgent", err, codes.Unimplemented, "")
	_, err = ops.ListDevices(ctx, &ferryv1.ListDevicesRequest{})
	check("DNS SAN in another case -> DestAgent", err, codes.Unimplemented, "")
	_, err = ferryv1.NewDestAgentClient(agentConn).ListDevices(ctx, &ferryv1.ListDevicesRequest{})
	check("agent -> DestAgent", err, codes.PermissionDenied, wire.ReasonClientNotAllowed)
	_, err = ferryv1.NewTransferClient(agentConn).Open(ctx, &ferryv1.OpenRequest{})
	check("agent -> Transfer.Open", err, codes.Unimplemented, "")
	_, err = ferryv1.NewTransferClient(intruder).Open(ctx, &ferryv1.OpenRequest{})
	check("intruder -> Transfer.Open", err, codes.PermissionDenied, wire.ReasonClientNotAllowed)
	// Streams are authorized when they open.
	st, err := ferryv1.NewTransferClient(intruder).Channel(ctx)
	if err == nil {
		_, err = st.Recv()
	}
	check("intruder -> Transfer.Channel", err, codes.PermissionDenied, wire.ReasonClientNotAllowed)
	st, err = ferryv1.NewTransferClient(agentConn).Channel(ctx)
	if err == nil {
		_, err = st.Recv()
	}
	check("agent -> Transfer.Channel", err, codes.Unimplemented, "")
	// A service no rule names is closed to everyone, the control plane too.
	_, err = ferryv1.NewSourceAgentClient(cpConn).ListDevices(ctx, &ferryv1.ListDevicesRequest{})
	check("control plane -> SourceAgent (no rule)", err, codes.PermissionDenied, wire.ReasonClientNotAllowed)
	// Health stays open to anyone the transport admits.
	if _, err := healthpb.NewHealthClient(intruder).Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
		t.Errorf("health: %v", err)
	}
	if t.Failed() {
		return
	}

	// The transport refuses what it cannot verify, before any RPC.
	otherCA := peerauthtest.NewCA(t, "another CA")
	// It trusts the server; the server does not trust it. (A client sends
	// only a certificate the server's CAs signed unless forced.)
	foreign := keyPair(t, otherCA.Issue(t, controlPlane))
	refused := []struct {
		name  string
		creds credentials.TransportCredentials
		want  string // in the error, when the client learns it reliably
	}{
		{"plaintext", insecure.NewCredentials(), ""},
		{"no client certificate", credentials.NewTLS(&tls.Config{RootCAs: pool(t, ca), MinVersion: tls.VersionTLS13}), ""},
		{"certificate of another CA", credentials.NewTLS(&tls.Config{RootCAs: pool(t, ca), MinVersion: tls.VersionTLS13,
			GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &foreign, nil }}), ""},
		{"TLS 1.2", credentials.NewTLS(&tls.Config{RootCAs: pool(t, ca), MaxVersion: tls.VersionTLS12,
			Certificates: []tls.Certificate{keyPair(t, ca.Issue(t, controlPlane))}}), "protocol version"},
		{"expired certificate", credentials.NewTLS(&tls.Config{RootCAs: pool(t, ca), MinVersion: tls.VersionTLS13,
			Certificates: []tls.Certificate{keyPair(t, ca.IssueWith(t, peerauthtest.Options{NotBefore: time.Now().Add(-48 * time.Hour), NotAfter: time.Now().Add(-24 * time.Hour)}, controlPlane))}}), ""},
	}
	// (The server refuses a client certificate after the client has
	// finished its side of the handshake: the client may see the alert or
	// a broken pipe.)
	for _, tc := range refused {
		_, err := ferryv1.NewDestAgentClient(dialWith(t, addr, tc.creds)).ListDevices(ctx, &ferryv1.ListDevicesRequest{})
		if wire.Code(err) != codes.Unavailable || !strings.Contains(wire.Message(err), tc.want) {
			t.Errorf("%s: %v, want UNAVAILABLE (handshake refused: %q)", tc.name, err, tc.want)
		}
	}
	// A client verifies the server: a server certificate of another CA is
	// refused too.
	rogue := serveTLS(t, otherCA.Issue(t, "localhost", "127.0.0.1"))
	_, err = ferryv1.NewDestAgentClient(dialWith(t, rogue, clientCreds(t, ca.Issue(t, controlPlane)))).ListDevices(ctx, &ferryv1.ListDevicesRequest{})
	if wire.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "certificate") {
		t.Errorf("rogue server: %v, want UNAVAILABLE naming the certificate", err)
	}
}

func serveTLS(t *testing.T, f peerauth.TLSFiles) string {
	t.Helper()
	s, err := peerauth.ServerTLS(f)
	if err != nil {
		t.Fatal(err)
	}
	return serve(t, grpcserver.Config{Creds: credentials.NewTLS(s), Access: rules()})
}

func pool(t *testing.T, ca *peerauthtest.CA) *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(ca.Cert)
	return p
}

func keyPair(t *testing.T, f peerauth.TLSFiles) tls.Certificate {
	t.Helper()
	c, err := tls.LoadX509KeyPair(f.Cert, f.Key)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestAuthorizationWithoutCertificateIsUnauthenticated(t *testing.T) {
	// A server configured with rules but plaintext transport (the agents
	// refuse this combination; the interceptor must still fail closed).
	addr := serve(t, grpcserver.Config{Creds: insecure.NewCredentials(), Access: rules()})
	conn := dialWith(t, addr, insecure.NewCredentials())
	_, err := ferryv1.NewTransferClient(conn).Open(t.Context(), &ferryv1.OpenRequest{})
	if wire.Code(err) != codes.Unauthenticated || wire.Reason(err) != wire.ReasonUnauthenticated {
		t.Fatalf("got %v, want UNAUTHENTICATED %s", err, wire.ReasonUnauthenticated)
	}
	_, err = ferryv1.NewSourceAgentClient(conn).ListDevices(t.Context(), &ferryv1.ListDevicesRequest{})
	if wire.Code(err) != codes.PermissionDenied {
		t.Fatalf("unlisted service: %v, want PERMISSION_DENIED", err)
	}
	if _, err := healthpb.NewHealthClient(conn).Check(t.Context(), &healthpb.HealthCheckRequest{}); err != nil {
		t.Fatalf("health: %v", err)
	}
	// Without rules, no authorization at all.
	open := dialWith(t, serve(t, grpcserver.Config{Creds: insecure.NewCredentials()}), insecure.NewCredentials())
	if _, err := ferryv1.NewTransferClient(open).Open(t.Context(), &ferryv1.OpenRequest{}); wire.Code(err) != codes.Unimplemented {
		t.Fatalf("no rules: %v, want UNIMPLEMENTED", err)
	}
}

func TestStarAdmitsAnyVerifiedClient(t *testing.T) {
	ca := peerauthtest.NewCA(t, "ferry test CA")
	screds, _, err := peerauth.AgentTLS(ca.Issue(t, "localhost", "127.0.0.1"))
	if err != nil {
		t.Fatal(err)
	}
	addr := serve(t, grpcserver.Config{Creds: screds, Access: []peerauth.AccessRule{
		{Services: []string{ferryv1.Transfer_ServiceDesc.ServiceName}, Allow: []string{"*"}},
	}})
	conn := dialWith(t, addr, clientCreds(t, ca.Issue(t, "anyone.ferry.test")))
	if _, err := ferryv1.NewTransferClient(conn).Open(t.Context(), &ferryv1.OpenRequest{}); wire.Code(err) != codes.Unimplemented {
		t.Fatalf("got %v, want the call admitted (UNIMPLEMENTED)", err)
	}
}

func TestReflectionCanBeOff(t *testing.T) {
	srv := grpcserver.New(grpcserver.Config{Creds: insecure.NewCredentials(), NoReflection: true})
	for name := range srv.GRPC.GetServiceInfo() {
		if strings.Contains(name, "reflection") {
			t.Fatalf("%s registered with NoReflection", name)
		}
	}
	srv = grpcserver.New(grpcserver.Config{Creds: insecure.NewCredentials()})
	if _, ok := srv.GRPC.GetServiceInfo()["grpc.reflection.v1.ServerReflection"]; !ok {
		t.Fatal("reflection not registered by default")
	}
}

func TestTLSFilesAreChecked(t *testing.T) {
	ca := peerauthtest.NewCA(t, "ferry test CA")
	good := ca.Issue(t, agentID)
	clientOnly := ca.IssueWith(t, peerauthtest.Options{Usages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}, controlPlane)
	noSAN := ca.Issue(t)
	expired := ca.IssueWith(t, peerauthtest.Options{NotBefore: time.Now().Add(-48 * time.Hour), NotAfter: time.Now().Add(-time.Hour)}, agentID)
	cases := []struct {
		name  string
		f     peerauth.TLSFiles
		agent bool
		want  string
	}{
		{"no CA", peerauth.TLSFiles{Cert: good.Cert, Key: good.Key}, true, "--tls-ca"},
		{"missing cert file", peerauth.TLSFiles{Cert: good.Cert + ".missing", Key: good.Key, CA: good.CA}, true, "--tls-cert"},
		{"key of another cert", peerauth.TLSFiles{Cert: good.Cert, Key: clientOnly.Key, CA: good.CA}, true, "--tls-key"},
		{"CA file without certificates", peerauth.TLSFiles{Cert: good.Cert, Key: good.Key, CA: good.Key}, true, "no PEM certificate"},
		{"agent certificate without serverAuth", clientOnly, true, "serverAuth"},
		{"certificate without SAN", noSAN, true, "subject alternative name"},
		{"expired certificate", expired, true, "expired"},
	}
	for _, tc := range cases {
		_, _, err := peerauth.AgentTLS(tc.f)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error naming %q", tc.name, err, tc.want)
		}
	}
	if _, _, err := peerauth.AgentTLS(good); err != nil {
		t.Fatal(err)
	}
	// A control-plane client needs clientAuth only.
	if _, err := peerauth.ClientTLS(clientOnly, ""); err != nil {
		t.Fatal(err)
	}
	s, _ := peerauth.ServerTLS(good)
	if s.MinVersion != tls.VersionTLS13 || s.ClientAuth != tls.RequireAndVerifyClientCert {
		t.Fatalf("server TLS: min version %x, client auth %v", s.MinVersion, s.ClientAuth)
	}
}

func TestIdentityMatches(t *testing.T) {
	ca := peerauthtest.NewCA(t, "ferry test CA")
	f := ca.Issue(t, "spiffe://ferry.test/ns/ferry/sa/Agent", "Node-1.Ferry.Test", "10.0.0.7", "fd00::7")
	c := keyPair(t, f)
	leaf, err := x509.ParseCertificate(c.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	id := peerauth.CertIdentity(leaf)
	// A certificate whose DNS SANs are spelled like an IP address and
	// like a URI, and whose URI SAN is spelled like a host name: a CA
	// that signs what it is asked may issue one.
	spoofURI, err := url.Parse("node-1.ferry.test")
	if err != nil {
		t.Fatal(err)
	}
	spoof := peerauth.CertIdentity(&x509.Certificate{
		DNSNames: []string{"10.0.0.7", "::ffff:10.0.0.8", "spiffe://ferry.test/ns/ferry/sa/agent"},
		URIs:     []*url.URL{spoofURI},
	})
	mapped := peerauth.CertIdentity(&x509.Certificate{IPAddresses: []net.IP{net.ParseIP("10.0.0.9")}}) // 16-byte form
	for _, tc := range []struct {
		id   peerauth.Identity
		name string
		want bool
	}{
		{id, "spiffe://ferry.test/ns/ferry/sa/Agent", true},
		{id, "spiffe://ferry.test/ns/ferry/sa/agent", false}, // URI paths are case-sensitive
		{id, "node-1.ferry.test", true},
		{id, "NODE-1.FERRY.TEST", true},
		{id, "10.0.0.7", true},
		{id, "::ffff:10.0.0.7", true}, // the same address
		{id, "fd00::7", true},
		{id, "FD00:0::7", true},
		{id, "10.0.0.8", false},
		{id, "node-2.ferry.test", false},
		{id, "*", true},
		{id, "", false},
		// Each kind matches only its own SANs.
		{spoof, "10.0.0.7", false},
		{spoof, "10.0.0.8", false},
		{spoof, "::ffff:10.0.0.8", false},
		{spoof, "spiffe://ferry.test/ns/ferry/sa/agent", false},
		{spoof, "node-1.ferry.test", false},
		{spoof, "*", true},
		{mapped, "10.0.0.9", true},
		{mapped, "::ffff:10.0.0.9", true},
	} {
		if got := tc.id.Matches(tc.name); got != tc.want {
			t.Errorf("%s: Matches(%q) = %v, want %v", tc.id, tc.name, got, tc.want)
		}
	}
	if (peerauth.Identity{}).Matches("*") {
		t.Error("an unauthenticated caller matches *")
	}
	if got := id.String(); got != "spiffe://ferry.test/ns/ferry/sa/Agent,node-1.ferry.test,10.0.0.7,fd00::7" {
		t.Errorf("String() = %q", got)
	}
	for _, bad := range [][]string{{""}, {"a b"}, {"a,b"}, {"spiffe://ferry.test/*"}} {
		if err := peerauth.ValidateAllowed("--allow-client", bad); err == nil {
			t.Errorf("ValidateAllowed(%q) accepted", bad)
		}
	}
	if err := peerauth.ValidateAllowed("--allow-client", []string{"*", controlPlane, "ops.ferry.test"}); err != nil {
		t.Error(err)
	}
}

// records is a slog handler that hands each record to a channel.
type records chan slog.Record

func (r records) Enabled(context.Context, slog.Level) bool { return true }
func (r records) Handle(_ context.Context, rec slog.Record) error {
	select {
	case r <- rec:
	default: // never block the server
	}
	return nil
}
func (r records) WithAttrs([]slog.Attr) slog.Handler { return r }
func (r records) WithGroup(string) slog.Handler      { return r }

func TestRefusedHandshakesAreLogged(t *testing.T) {
	ca := peerauthtest.NewCA(t, "ferry test CA")
	screds, _, err := peerauth.AgentTLS(ca.Issue(t, "localhost", "127.0.0.1"))
	if err != nil {
		t.Fatal(err)
	}
	logs := make(records, 16)
	addr := serve(t, grpcserver.Config{Creds: screds, Access: rules(), Logger: slog.New(logs)})
	next := func() slog.Record {
		t.Helper()
		select {
		case r := <-logs:
			return r
		case <-t.Context().Done():
			t.Fatal("no log record")
		}
		panic("unreachable")
	}

	// A connection closed without a word: a probe, at debug level.
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if r := next(); r.Level != slog.LevelDebug {
		t.Errorf("closed connection: %v %q, want a debug record", r.Level, r.Message)
	}

	// A plaintext gRPC client: one warning that names TLS.
	_, err = ferryv1.NewDestAgentClient(dialWith(t, addr, insecure.NewCredentials())).ListDevices(t.Context(), &ferryv1.ListDevicesRequest{}, grpc.WaitForReady(false))
	if wire.Code(err) != codes.Unavailable {
		t.Fatalf("plaintext client: %v, want UNAVAILABLE", err)
	}
	if r := next(); r.Level != slog.LevelWarn || !strings.Contains(r.Message, "expects TLS") {
		t.Errorf("plaintext client: %v %q, want a warning that the agent expects TLS", r.Level, r.Message)
	}

	// A client certificate of another CA: a warning.
	other := peerauthtest.NewCA(t, "another CA")
	foreign := keyPair(t, other.Issue(t, controlPlane))
	creds := credentials.NewTLS(&tls.Config{RootCAs: pool(t, ca), MinVersion: tls.VersionTLS13,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &foreign, nil }})
	ferryv1.NewDestAgentClient(dialWith(t, addr, creds)).ListDevices(t.Context(), &ferryv1.ListDevicesRequest{})
	for {
		// (The plaintext client may have tried again meanwhile.)
		r := next()
		if strings.Contains(r.Message, "expects TLS") {
			continue
		}
		if r.Level != slog.LevelWarn || !strings.Contains(r.Message, "refused a TLS handshake") {
			t.Errorf("foreign certificate: %v %q, want a warning", r.Level, r.Message)
		}
		break
	}
}
