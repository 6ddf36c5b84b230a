package e2e

import (
	"crypto/tls"
	"crypto/x509"
	"net"
	"os"
	"testing"

	"google.golang.org/grpc"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/internal/loopback"
	"github.com/vfio-ferry/ferry/services/grpcserver"
	"github.com/vfio-ferry/ferry/services/peerauth"
	"github.com/vfio-ferry/ferry/services/peerauth/peerauthtest"
	"github.com/vfio-ferry/ferry/services/wire"
)

// rotatingParty is an agent's or the control plane's TLS identity in a
// Kubernetes Secret-style volume, read through a Reloader.
type rotatingParty struct {
	vol  *peerauthtest.SecretVolume
	r    *peerauth.Reloader
	sans []string
	cur  peerauth.TLSFiles
}

func newRotatingParty(t *testing.T, ca *peerauthtest.CA, uses []x509.ExtKeyUsage, sans ...string) *rotatingParty {
	t.Helper()
	p := &rotatingParty{vol: peerauthtest.NewSecretVolume(t), sans: sans}
	p.cur = ca.Issue(t, sans...)
	p.vol.Project(t, p.cur, ca.File)
	r, err := peerauth.NewReloader(p.vol.Files(), nil, uses...)
	if err != nil {
		t.Fatal(err)
	}
	p.r = r
	return p
}

// rotate issues a new certificate from ca and projects it with the CA
// bundle cas; the reloader takes it at once.
func (p *rotatingParty) rotate(t *testing.T, ca *peerauthtest.CA, cas ...string) {
	t.Helper()
	p.cur = ca.Issue(t, p.sans...)
	p.vol.Project(t, p.cur, cas...)
	if changed, err := p.r.Check(); !changed || err != nil {
		t.Fatalf("reload after the rotation: changed %v, %v", changed, err)
	}
}

// bundle projects the current certificate with another CA bundle.
func (p *rotatingParty) bundle(t *testing.T, cas ...string) {
	t.Helper()
	p.vol.Project(t, p.cur, cas...)
	if changed, err := p.r.Check(); !changed || err != nil {
		t.Fatalf("reload of the bundle: changed %v, %v", changed, err)
	}
}

// presented is the serial of the certificate an agent presents to a new
// TLS connection from a client of files.
func presented(t *testing.T, addr string, client peerauth.TLSFiles) string {
	t.Helper()
	cfg, err := peerauth.ClientTLS(client, "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	conn, err := tls.Dial("tcp", addr, cfg)
	if err != nil {
		t.Fatalf("TLS to %s: %v", addr, err)
	}
	defer conn.Close()
	return conn.ConnectionState().PeerCertificates[0].SerialNumber.String()
}

func serial(t *testing.T, f peerauth.TLSFiles) string {
	t.Helper()
	c, err := tls.LoadX509KeyPair(f.Cert, f.Key)
	if err != nil {
		t.Fatal(err)
	}
	l, err := x509.ParseCertificate(c.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	return l.SerialNumber.String()
}

// TestCertificateRotation rotates the CA and both agents' certificates
// (and the control plane's) while a rate-capped migration runs: the
// migration verifies, new connections present the new certificates, the
// next migration handshakes with them alone (the old CA is gone from
// every bundle), and a corrupt certificate file leaves the identity in
// use.
func TestCertificateRotation(t *testing.T) {
	ca1, ca2 := peerauthtest.NewCA(t, "ferry e2e CA 1"), peerauthtest.NewCA(t, "ferry e2e CA 2")
	agent := []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}
	dst := newRotatingParty(t, ca1, agent, "localhost", "127.0.0.1", idDestAgent)
	src := newRotatingParty(t, ca1, agent, "localhost", "127.0.0.1", idSourceAgent)
	cp := newRotatingParty(t, ca1, []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, idControlPlane)

	control := []string{ferryv1.SourceAgent_ServiceDesc.ServiceName, ferryv1.DestAgent_ServiceDesc.ServiceName}
	transfer := []string{ferryv1.Transfer_ServiceDesc.ServiceName}
	dataLis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	a := startLoopback(t, loopback.Config{
		DataListener: dataLis,
		TLS: &loopback.TLS{
			DestCreds: dst.r.ServerCreds(), SourceCreds: src.r.ServerCreds(), SourcePeerCreds: src.r.ClientCreds(""),
			DestAccess: []peerauth.AccessRule{
				{Services: control, Allow: []string{idControlPlane}, Flag: "--allow-client"},
				{Services: transfer, Allow: []string{idSourceAgent}, Flag: "--allow-peer"},
			},
			SourceAccess: []peerauth.AccessRule{{Services: control, Allow: []string{idControlPlane}, Flag: "--allow-client"}},
		},
	})
	cpDial := func(addr string) *grpc.ClientConn {
		conn, err := grpc.NewClient(addr, grpcserver.DialOptions(cp.r.ClientCreds(""), nil)...)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		return conn
	}
	dconn := cpDial(a.destAddr)
	a.dest, a.transfer = ferryv1.NewDestAgentClient(dconn), ferryv1.NewTransferClient(dconn)
	a.source = ferryv1.NewSourceAgentClient(cpDial(a.sourceAddr))

	// 64 MiB read at 16 MB/s: the migration runs for seconds.
	slow := migration{id: "rot-1", src: []string{"sim:size=64MiB,seed=61,rate=16MB/s"}, dst: []string{"sim:size=64MiB,seed=61"}, channels: 2}
	ctx := t.Context()
	prep, err := a.dest.PrepareIncoming(ctx, &ferryv1.PrepareIncomingRequest{MigrationId: slow.id, Devices: slow.dst})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.source.StartMigration(ctx, &ferryv1.StartMigrationRequest{MigrationId: slow.id, DestAddress: a.destAddr, Token: prep.GetToken(),
		Channels: slow.channels, Devices: []*ferryv1.DevicePair{{SourceDevice: slow.src[0], DestDevice: slow.dst[0]}}}); err != nil {
		t.Fatal(err)
	}
	a.sourceUntil(t, slow.id, moving)

	// The rotation: new certificates from the new CA, the bundles trust
	// both CAs while the fleet moves.
	for _, p := range []*rotatingParty{dst, src, cp} {
		p.rotate(t, ca2, ca2.File, ca1.File)
	}
	if m, err := a.source.GetMigration(ctx, &ferryv1.GetMigrationRequest{MigrationId: slow.id}); err != nil || wire.Final(m.GetMigration().GetPhase()) {
		t.Fatalf("the migration was not running across the rotation: %v %v", m.GetMigration().GetPhase(), err)
	}
	probe := ca2.Issue(t, "spiffe://ferry.test/probe")
	if got, want := presented(t, a.destAddr, probe), serial(t, dst.cur); got != want {
		t.Errorf("the destination presents serial %s to a new connection, want the rotated %s", got, want)
	}
	if got, want := presented(t, a.sourceAddr, probe), serial(t, src.cur); got != want {
		t.Errorf("the source presents serial %s to a new connection, want the rotated %s", got, want)
	}
	s, d := a.waitSource(t, slow.id), a.waitDest(t, slow.id)
	if s.GetPhase() != succeeded || d.GetPhase() != succeeded || !d.GetDevices()[0].GetVerified() {
		t.Fatalf("the migration across the rotation: source %v, destination %v: %v", s.GetPhase(), d.GetPhase(), s.GetError())
	}

	// The old CA leaves every bundle: the next migration can only
	// handshake with the new certificates.
	for _, p := range []*rotatingParty{dst, src, cp} {
		p.bundle(t, ca2.File)
	}
	// A client that trusts the new CA but presents a certificate of the
	// old one is refused.
	old := ca1.Issue(t, idControlPlane)
	old.CA = ca2.File
	oldClient, err := peerauth.ClientTLS(old, "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	if conn, err := tls.Dial("tcp", a.destAddr, oldClient); err == nil {
		// TLS 1.3: the server's verdict on the client certificate comes
		// with the first read.
		_, err = conn.Read(make([]byte, 1))
		conn.Close()
		if err == nil {
			t.Error("a certificate of the old CA was accepted after the old CA left the bundle")
		}
	}
	next := migration{id: "rot-2", src: []string{"sim:size=8MiB,seed=62"}, dst: []string{"sim:size=8MiB,seed=62"}, channels: 2}
	if s, d := a.run(t, next); s.GetPhase() != succeeded || d.GetPhase() != succeeded {
		t.Fatalf("the migration after the rotation: source %v, destination %v: %v", s.GetPhase(), d.GetPhase(), s.GetError())
	}

	// A corrupt certificate file: refused, counted, the identity stays.
	dst.vol.ProjectBytes(t, []byte("-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n"), readFile(t, dst.cur.Key), readFile(t, ca2.File))
	if changed, err := dst.r.Check(); changed || err == nil {
		t.Fatalf("a corrupt certificate: changed %v, %v", changed, err)
	}
	if dst.r.Failures() != 1 {
		t.Errorf("%d reload failures counted, want 1", dst.r.Failures())
	}
	if got, want := presented(t, a.destAddr, probe), serial(t, dst.cur); got != want {
		t.Errorf("after a corrupt update the destination presents serial %s, want %s", got, want)
	}
	last := migration{id: "rot-3", src: []string{"sim:size=8MiB,seed=63"}, dst: []string{"sim:size=8MiB,seed=63"}, channels: 2}
	if s, d := a.run(t, last); s.GetPhase() != succeeded || d.GetPhase() != succeeded {
		t.Fatalf("the migration after a corrupt update: source %v, destination %v: %v", s.GetPhase(), d.GetPhase(), s.GetError())
	}
}

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
