package e2e

import (
	"net"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/internal/loopback"
	"github.com/vfio-ferry/ferry/services/peerauth"
	"github.com/vfio-ferry/ferry/services/peerauth/peerauthtest"
	"github.com/vfio-ferry/ferry/services/source"
	"github.com/vfio-ferry/ferry/services/wire"
)

// A destination whose certificate names its node, not the address the
// source dials: the migration fails verification unless the request names
// the node (dest_tls_server_name), on the Transfer and the direct data
// connections alike.
func TestDestTLSServerName(t *testing.T) {
	ca := peerauthtest.NewCA(t, "ferry e2e CA")
	dcreds, _, err := peerauth.AgentTLS(ca.Issue(t, "node-b.ferry.test", idDestAgent))
	if err != nil {
		t.Fatal(err)
	}
	screds, speer, err := peerauth.AgentTLS(ca.Issue(t, "localhost", "127.0.0.1", idSourceAgent))
	if err != nil {
		t.Fatal(err)
	}
	control := []string{ferryv1.SourceAgent_ServiceDesc.ServiceName, ferryv1.DestAgent_ServiceDesc.ServiceName}
	dataLis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	a := startLoopback(t, loopback.Config{
		// The unverifiable destination is given up on soon (and so is
		// telling it so: the abort is bounded by the progress timeout).
		Source:       source.Config{ReconnectTimeout: time.Second, ProgressTimeout: time.Second},
		DataListener: dataLis,
		TLS: &loopback.TLS{
			DestCreds: dcreds, SourceCreds: screds, SourcePeerCreds: speer,
			DestAccess: []peerauth.AccessRule{
				{Services: control, Allow: []string{idControlPlane}, Flag: "--allow-client"},
				{Services: []string{ferryv1.Transfer_ServiceDesc.ServiceName}, Allow: []string{idSourceAgent}, Flag: "--allow-peer"},
			},
			SourceAccess: []peerauth.AccessRule{{Services: control, Allow: []string{idControlPlane}, Flag: "--allow-client"}},
		},
	})
	p := &securePair{agents: a, ca: ca}
	a.dest = ferryv1.NewDestAgentClient(p.dialNamed(t, a.destAddr, "node-b.ferry.test", idControlPlane))
	a.source = ferryv1.NewSourceAgentClient(p.dial(t, a.sourceAddr, idControlPlane))

	ctx := t.Context()
	start := func(id, dev, serverName string) *ferryv1.Migration {
		t.Helper()
		prep, err := a.dest.PrepareIncoming(ctx, &ferryv1.PrepareIncomingRequest{MigrationId: id, Devices: []string{dev}})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := a.source.StartMigration(ctx, &ferryv1.StartMigrationRequest{MigrationId: id, DestAddress: a.destAddr, Token: prep.GetToken(),
			DestTlsServerName: serverName, Devices: []*ferryv1.DevicePair{{SourceDevice: dev, DestDevice: dev}}}); err != nil {
			t.Fatal(err)
		}
		return a.waitSource(t, id)
	}
	if m := start("named", "sim:size=4MiB,seed=71", "node-b.ferry.test"); m.GetPhase() != succeeded || !m.GetDirectData() {
		t.Fatalf("with dest_tls_server_name: %v (direct data %v): %v", m.GetPhase(), m.GetDirectData(), m.GetError())
	}
	if m := start("unnamed", "sim:size=4MiB,seed=72", ""); m.GetPhase() == succeeded || m.GetError().GetReason() != wire.ReasonPeerUnavailable {
		t.Fatalf("a destination whose certificate does not name the address: %v %v", m.GetPhase(), m.GetError())
	}
	if _, err := a.source.StartMigration(ctx, &ferryv1.StartMigrationRequest{MigrationId: "bad", DestAddress: a.destAddr, Token: "t",
		DestTlsServerName: "node b/x", Devices: []*ferryv1.DevicePair{{SourceDevice: "sim:size=4MiB,seed=1", DestDevice: "sim:size=4MiB,seed=1"}}}); wire.Code(err) != codes.InvalidArgument {
		t.Errorf("a bad dest_tls_server_name: %v", err)
	}
}
