package e2e

import (
	"bytes"
	"encoding/json"
	"net"
	"os/exec"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/internal/loopback"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/services/grpcserver"
	"github.com/vfio-ferry/ferry/services/peerauth"
	"github.com/vfio-ferry/ferry/services/peerauth/peerauthtest"
	"github.com/vfio-ferry/ferry/services/wire"
)

// The tests in this file run the agents as they run in production: mutual
// TLS with certificates of a CA made for the test, control-plane and peer
// authorization by certificate SAN, and device allowlists.

const (
	idControlPlane = "spiffe://ferry.test/control-plane"
	idSourceAgent  = "spiffe://ferry.test/agent/source"
	idDestAgent    = "spiffe://ferry.test/agent/dest"
	idIntruder     = "spiffe://ferry.test/intruder"
)

// secureSetup configures startSecureAgents.
type secureSetup struct {
	// sourceIdentity is the SAN in the source agent's certificate.
	sourceIdentity string
	// allowPeers is the destination's --allow-peer.
	allowPeers []string
	// sourceDevices is the source's --devices.
	sourceDevices []string
}

// securePair is a destination and a source agent serving mutual TLS on
// loopback, as `ferry dest` and `ferry source` wire it, and a control
// plane with its own certificate.
type securePair struct {
	*agents
	ca *peerauthtest.CA
}

func startSecureAgents(t *testing.T, s secureSetup) *securePair {
	t.Helper()
	if s.sourceIdentity == "" {
		s.sourceIdentity = idSourceAgent
	}
	if s.allowPeers == nil {
		s.allowPeers = []string{idSourceAgent}
	}
	ca := peerauthtest.NewCA(t, "ferry e2e CA")
	dcreds, _, err := peerauth.AgentTLS(ca.Issue(t, "localhost", "127.0.0.1", idDestAgent))
	if err != nil {
		t.Fatal(err)
	}
	screds, speer, err := peerauth.AgentTLS(ca.Issue(t, "localhost", "127.0.0.1", s.sourceIdentity))
	if err != nil {
		t.Fatal(err)
	}
	control := []string{ferryv1.SourceAgent_ServiceDesc.ServiceName, ferryv1.DestAgent_ServiceDesc.ServiceName}
	transfer := []string{ferryv1.Transfer_ServiceDesc.ServiceName}
	dataLis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	a := startLoopback(t, loopback.Config{
		SourceDevices: vfio.RegistryOptions{Devices: s.sourceDevices},
		DataListener:  dataLis,
		TLS: &loopback.TLS{
			DestCreds: dcreds, SourceCreds: screds, SourcePeerCreds: speer,
			DestAccess: []peerauth.AccessRule{
				{Services: control, Allow: []string{idControlPlane}, Flag: "--allow-client"},
				{Services: transfer, Allow: s.allowPeers, Flag: "--allow-peer"},
			},
			SourceAccess: []peerauth.AccessRule{
				{Services: control, Allow: []string{idControlPlane}, Flag: "--allow-client"},
				{Services: transfer, Flag: "--allow-peer"},
			},
		},
	})
	p := &securePair{agents: a, ca: ca}
	dconn := p.dial(t, a.destAddr, idControlPlane)
	a.dest = ferryv1.NewDestAgentClient(dconn)
	a.transfer = ferryv1.NewTransferClient(dconn)
	a.source = ferryv1.NewSourceAgentClient(p.dial(t, a.sourceAddr, idControlPlane))
	return p
}

// dial connects to addr with a client certificate naming sans.
func (p *securePair) dial(t *testing.T, addr string, sans ...string) *grpc.ClientConn {
	t.Helper()
	return p.dialNamed(t, addr, "", sans...)
}

// dialNamed is dial verifying the server for serverName instead of the
// host in addr.
func (p *securePair) dialNamed(t *testing.T, addr, serverName string, sans ...string) *grpc.ClientConn {
	t.Helper()
	c, err := peerauth.ClientTLS(p.ca.Issue(t, sans...), serverName)
	if err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient(addr, grpcserver.DialOptions(credentials.NewTLS(c), nil)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func TestMigrationOverMutualTLS(t *testing.T) {
	p := startSecureAgents(t, secureSetup{})
	src := []string{"sim:size=24MiB,seed=51", "sim:size=3000001,seed=52"}
	s, d := p.run(t, migration{id: "mtls", src: src, dst: src, channels: 4, chunkSize: 256 << 10})
	if s.GetPhase() != succeeded || d.GetPhase() != succeeded {
		t.Fatalf("source %v, destination %v: %v", s.GetPhase(), d.GetPhase(), s.GetError())
	}
	if !s.GetDirectData() || !d.GetDirectData() {
		t.Errorf("direct data connections not used over mutual TLS: source %v, destination %v", s.GetDirectData(), d.GetDirectData())
	}
	for i, dev := range d.GetDevices() {
		if !dev.GetVerified() {
			t.Errorf("device %d not verified", i)
		}
	}
}

func TestSourceNotInAllowPeerIsRefused(t *testing.T) {
	// The destination admits only another agent as a peer: the source's
	// Open is refused, it rolls back, and the destination keeps its
	// prepared migration for the right source.
	p := startSecureAgents(t, secureSetup{sourceIdentity: idIntruder})
	spec := "sim:size=4MiB,seed=53"
	s, _ := func() (*ferryv1.Migration, error) {
		prep, err := p.dest.PrepareIncoming(t.Context(), &ferryv1.PrepareIncomingRequest{MigrationId: "refused", Devices: []string{spec}})
		if err != nil {
			t.Fatal(err)
		}
		_, err = p.source.StartMigration(t.Context(), &ferryv1.StartMigrationRequest{MigrationId: "refused", DestAddress: p.destAddr, Token: prep.GetToken(),
			Devices: []*ferryv1.DevicePair{{SourceDevice: spec, DestDevice: spec}}})
		if err != nil {
			t.Fatal(err)
		}
		return p.waitSource(t, "refused"), nil
	}()
	if e := s.GetError(); s.GetPhase() != failed || codes.Code(e.GetCode()) != codes.PermissionDenied || e.GetReason() != wire.ReasonClientNotAllowed {
		t.Fatalf("source %v: %v, want FAILED with PERMISSION_DENIED %s", s.GetPhase(), e, wire.ReasonClientNotAllowed)
	}
	if !strings.Contains(s.GetError().GetMessage(), "--allow-peer") {
		t.Errorf("the refusal does not name the flag: %q", s.GetError().GetMessage())
	}
	if st := deviceState(t, p.sourceReg, spec); st != vfio.StateRunning {
		t.Errorf("source device in %v, want RUNNING", st)
	}
	inc, err := p.dest.GetIncoming(t.Context(), &ferryv1.GetIncomingRequest{MigrationId: "refused"})
	if err != nil || inc.GetMigration().GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_WAITING {
		t.Fatalf("the destination's migration: %v %v, want still WAITING for its source", inc.GetMigration().GetPhase(), err)
	}
}

func TestControlPlaneAuthorization(t *testing.T) {
	p := startSecureAgents(t, secureSetup{})
	// An agent certificate is not a control-plane certificate: a
	// compromised node cannot start migrations elsewhere.
	for name, conn := range map[string]*grpc.ClientConn{
		"source agent's identity": p.dial(t, p.sourceAddr, idSourceAgent),
		"another identity":        p.dial(t, p.sourceAddr, idIntruder, "intruder.ferry.test"),
	} {
		_, err := ferryv1.NewSourceAgentClient(conn).StartMigration(t.Context(), &ferryv1.StartMigrationRequest{MigrationId: "x"})
		if wire.Code(err) != codes.PermissionDenied || wire.Reason(err) != wire.ReasonClientNotAllowed {
			t.Errorf("%s -> SourceAgent: %v", name, err)
		}
	}
	_, err := ferryv1.NewDestAgentClient(p.dial(t, p.destAddr, idSourceAgent)).PrepareIncoming(t.Context(), &ferryv1.PrepareIncomingRequest{MigrationId: "x"})
	if wire.Code(err) != codes.PermissionDenied || wire.Reason(err) != wire.ReasonClientNotAllowed {
		t.Errorf("source agent -> DestAgent: %v", err)
	}
	// The control plane may not speak Transfer.
	_, err = p.transfer.Open(t.Context(), &ferryv1.OpenRequest{MigrationId: "x"})
	if wire.Code(err) != codes.PermissionDenied || wire.Reason(err) != wire.ReasonClientNotAllowed {
		t.Errorf("control plane -> Transfer: %v", err)
	}
}

func TestHostileStartMigration(t *testing.T) {
	p := startSecureAgents(t, secureSetup{sourceDevices: []string{"pci:0000:3b:*", "mdev:c0ffee00-*"}})
	spec := "sim:size=1MiB,seed=54"
	ok := func() *ferryv1.StartMigrationRequest {
		return &ferryv1.StartMigrationRequest{MigrationId: "hostile", DestAddress: p.destAddr, Token: "t",
			Devices: []*ferryv1.DevicePair{{SourceDevice: spec, DestDevice: spec}}}
	}
	long := func(n int) string { return strings.Repeat("a", n) }
	cases := []struct {
		name   string
		mutate func(*ferryv1.StartMigrationRequest)
		code   codes.Code
		reason string
	}{
		{"allowlisted device that does not exist", func(r *ferryv1.StartMigrationRequest) { r.Devices[0].SourceDevice = "pci:0000:3b:1f.7" }, codes.NotFound, wire.ReasonDeviceNotFound},
		{"allowlisted mdev that does not exist", func(r *ferryv1.StartMigrationRequest) {
			r.Devices[0].SourceDevice = "mdev:c0ffee00-0000-4000-8000-000000000001"
		}, codes.NotFound, wire.ReasonDeviceNotFound},
		{"device outside --devices", func(r *ferryv1.StartMigrationRequest) { r.Devices[0].SourceDevice = "pci:0000:3c:00.2" }, codes.PermissionDenied, wire.ReasonDeviceNotAllowed},
		{"mdev outside --devices", func(r *ferryv1.StartMigrationRequest) {
			r.Devices[0].SourceDevice = "mdev:deadbeef-0000-4000-8000-000000000001"
		}, codes.PermissionDenied, wire.ReasonDeviceNotAllowed},
		{"second device outside --devices", func(r *ferryv1.StartMigrationRequest) {
			r.Devices = append(r.Devices, &ferryv1.DevicePair{SourceDevice: "pci:0001:3b:00.0", DestDevice: spec})
		}, codes.PermissionDenied, wire.ReasonDeviceNotAllowed},
		{"a path instead of a spec", func(r *ferryv1.StartMigrationRequest) { r.Devices[0].SourceDevice = "/dev/vfio/12" }, codes.InvalidArgument, wire.ReasonInvalidArgument},
		{"a spec of 513 bytes", func(r *ferryv1.StartMigrationRequest) { r.Devices[0].SourceDevice = "sim:size=1," + long(502) }, codes.InvalidArgument, wire.ReasonInvalidArgument},
		{"a malformed destination spec", func(r *ferryv1.StartMigrationRequest) { r.Devices[0].DestDevice = "pci:0000:3b:00" }, codes.InvalidArgument, wire.ReasonInvalidArgument},
		{"65 devices", func(r *ferryv1.StartMigrationRequest) {
			for range wire.MaxDevices {
				r.Devices = append(r.Devices, r.Devices[0])
			}
		}, codes.InvalidArgument, wire.ReasonInvalidArgument},
		{"a token of 129 bytes", func(r *ferryv1.StartMigrationRequest) { r.Token = long(wire.MaxTokenLength + 1) }, codes.InvalidArgument, wire.ReasonInvalidArgument},
		{"no token", func(r *ferryv1.StartMigrationRequest) { r.Token = "" }, codes.InvalidArgument, wire.ReasonInvalidArgument},
		{"an id of 129 bytes", func(r *ferryv1.StartMigrationRequest) { r.MigrationId = long(wire.MaxIDLength + 1) }, codes.InvalidArgument, wire.ReasonInvalidArgument},
		{"an id with a newline", func(r *ferryv1.StartMigrationRequest) { r.MigrationId = "a\nb" }, codes.InvalidArgument, wire.ReasonInvalidArgument},
		{"a destination address of 257 bytes", func(r *ferryv1.StartMigrationRequest) { r.DestAddress = long(250) + ":7100" + "00" }, codes.InvalidArgument, wire.ReasonInvalidArgument},
		{"65 channels", func(r *ferryv1.StartMigrationRequest) { r.Channels = wire.MaxChannels + 1 }, codes.InvalidArgument, wire.ReasonInvalidArgument},
		{"2^32-1 channels", func(r *ferryv1.StartMigrationRequest) { r.Channels = 1<<32 - 1 }, codes.InvalidArgument, wire.ReasonInvalidArgument},
		{"chunks of 16 MiB + 1", func(r *ferryv1.StartMigrationRequest) { r.ChunkSize = wire.MaxChunkSize + 1 }, codes.InvalidArgument, wire.ReasonInvalidArgument},
		{"chunks of 4095 bytes", func(r *ferryv1.StartMigrationRequest) { r.ChunkSize = wire.MinChunkSize - 1 }, codes.InvalidArgument, wire.ReasonInvalidArgument},
		{"an unknown mode", func(r *ferryv1.StartMigrationRequest) { r.Mode = 77 }, codes.InvalidArgument, wire.ReasonInvalidArgument},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := ok()
			tc.mutate(r)
			_, err := p.source.StartMigration(t.Context(), r)
			if wire.Code(err) != tc.code || wire.Reason(err) != tc.reason {
				t.Fatalf("got %v (reason %q), want %v %s", err, wire.Reason(err), tc.code, tc.reason)
			}
		})
	}
	// Nothing was left behind: the source device is free and RUNNING, no
	// migration was registered, and the agent serves an honest request.
	list, err := p.source.ListMigrations(t.Context(), &ferryv1.ListMigrationsRequest{})
	if err != nil || len(list.GetMigrations()) != 0 {
		t.Fatalf("migrations after the refusals: %v, %v", list.GetMigrations(), err)
	}
	// The same id with a different request is a conflict, not a second
	// migration.
	s, d := p.run(t, migration{id: "hostile", src: []string{spec}, dst: []string{spec}})
	if s.GetPhase() != succeeded || d.GetPhase() != succeeded {
		t.Fatalf("the honest migration: %v %v: %v", s.GetPhase(), d.GetPhase(), s.GetError())
	}
	again := ok()
	again.Channels = 2
	if _, err := p.source.StartMigration(t.Context(), again); wire.Code(err) != codes.AlreadyExists || wire.Reason(err) != wire.ReasonSpecMismatch {
		t.Fatalf("a conflicting start: %v, want ALREADY_EXISTS %s", err, wire.ReasonSpecMismatch)
	}
	// The destination refuses devices outside its allowlist too (it has
	// none: no host device at all).
	_, err = p.dest.PrepareIncoming(t.Context(), &ferryv1.PrepareIncomingRequest{MigrationId: "host", Devices: []string{"pci:0000:3b:00.2"}})
	if wire.Code(err) != codes.PermissionDenied || wire.Reason(err) != wire.ReasonDeviceNotAllowed {
		t.Fatalf("prepare of a host device outside --devices: %v", err)
	}
}

func TestProcessesWithMutualTLS(t *testing.T) {
	ca := peerauthtest.NewCA(t, "ferry e2e CA")
	flags := func(f peerauth.TLSFiles) []string {
		return []string{"--tls-cert", f.Cert, "--tls-key", f.Key, "--tls-ca", f.CA}
	}
	dest := flags(ca.Issue(t, "localhost", "127.0.0.1", idDestAgent))
	src := flags(ca.Issue(t, "localhost", "127.0.0.1", idSourceAgent))
	operator := flags(ca.Issue(t, idControlPlane))
	stranger := flags(ca.Issue(t, idIntruder))

	t.Run("no transport security: refuses to start", func(t *testing.T) {
		for _, args := range [][]string{
			{"dest", "--allow-sim"},
			{"source", "--tls-cert", "x.pem"},
			{"dest", "--insecure", "--tls-ca", "ca.pem"},
			{"dest", "--insecure", "--allow-client", idControlPlane},
			append([]string{"dest"}, dest...),                                           // no --allow-client
			append(append([]string{"dest"}, dest...), "--allow-client", idControlPlane), // no --allow-peer
			append(append([]string{"source"}, src...), "--allow-client", idControlPlane, "--devices", "sim:*"),
		} {
			var errOut bytes.Buffer
			cmd := exec.Command(ferry(t), append(args, "--listen", "127.0.0.1:0")...)
			cmd.Stderr = &errOut
			err := cmd.Run()
			ee, ok := err.(*exec.ExitError)
			if !ok || ee.ExitCode() != 2 || !strings.Contains(errOut.String(), "--") {
				t.Errorf("ferry %v: %v, exit %v, stderr %q; want exit 2 with a message naming the flags", args, err, ee, errOut.String())
			}
		}
	})

	dstAddr := runAgent(t, "dest", append(dest, "--allow-client", idControlPlane, "--allow-peer", idSourceAgent, "--allow-sim", "--data-listen", "127.0.0.1:0")...).Addr()
	srcAddr := runAgent(t, "source", append(src, "--allow-client", idControlPlane, "--allow-sim", "--devices", "pci:0000:3b:*")...).Addr()

	migrate := func(client []string, srcDev string) (migrateResult, int, string) {
		t.Helper()
		args := append([]string{"migrate", "--source", srcAddr, "--dest", dstAddr, "--src-device", srcDev, "--dest-device", srcDev,
			"--channels", "4", "--json"}, client...)
		cmd := exec.Command(ferry(t), args...)
		var out, errOut bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errOut
		err := cmd.Run()
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		var r migrateResult
		json.Unmarshal(out.Bytes(), &r)
		return r, code, errOut.String()
	}
	t.Run("the operator migrates", func(t *testing.T) {
		r, code, stderr := migrate(operator, "sim:size=64MiB,seed=55")
		if code != 0 || !r.Verified || r.Bytes != 64<<20 || !r.DirectData {
			t.Fatalf("exit %d, result %+v\n%s", code, r, stderr)
		}
		out, err := exec.Command(ferry(t), append([]string{"devices", "--agent", srcAddr, "--json"}, operator...)...).CombinedOutput()
		if err != nil || !strings.Contains(string(out), "sim:size=64MiB,seed=55") {
			t.Fatalf("ferry devices over mTLS: %v\n%s", err, out)
		}
	})
	t.Run("a stranger is refused", func(t *testing.T) {
		_, code, stderr := migrate(stranger, "sim:size=1MiB,seed=56")
		if code == 0 || !strings.Contains(stderr, "PERMISSION_DENIED") || !strings.Contains(stderr, wire.ReasonClientNotAllowed) {
			t.Fatalf("exit %d, stderr %q; want PERMISSION_DENIED %s", code, stderr, wire.ReasonClientNotAllowed)
		}
	})
	t.Run("plaintext is refused", func(t *testing.T) {
		_, code, stderr := migrate([]string{"--insecure"}, "sim:size=1MiB,seed=57")
		if code == 0 || !strings.Contains(stderr, "UNAVAILABLE") {
			t.Fatalf("exit %d, stderr %q; want UNAVAILABLE", code, stderr)
		}
	})
	t.Run("a device outside --devices is refused", func(t *testing.T) {
		_, code, stderr := migrate(operator, "pci:0000:3c:00.2")
		if code == 0 || !strings.Contains(stderr, wire.ReasonDeviceNotAllowed) {
			t.Fatalf("exit %d, stderr %q; want %s", code, stderr, wire.ReasonDeviceNotAllowed)
		}
	})
}
