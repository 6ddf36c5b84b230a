package e2e

import (
	"context"
	"sync"
	"testing"

	"google.golang.org/grpc/credentials/insecure"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/services/chunkwire"
	"github.com/vfio-ferry/ferry/services/dest"
	"github.com/vfio-ferry/ferry/services/deviceapi"
	"github.com/vfio-ferry/ferry/services/grpcserver"
	"github.com/vfio-ferry/ferry/services/wire"
	"github.com/vfio-ferry/ferry/services/wire/wiretest"
)

// lostOpenFront serves Transfer in front of a destination agent and loses
// Open's answer: it forwards the Open, which the destination serves, then
// holds the answer until the source gives up the call. Abort is
// forwarded; nothing else is needed before the session would start.
type lostOpenFront struct {
	ferryv1.UnimplementedTransferServer
	dest   ferryv1.TransferClient
	once   sync.Once
	served chan struct{} // closed once the destination served an Open
}

func (f *lostOpenFront) Open(ctx context.Context, req *ferryv1.OpenRequest) (*ferryv1.OpenResponse, error) {
	if _, err := f.dest.Open(context.WithoutCancel(ctx), req); err != nil {
		return nil, err
	}
	f.once.Do(func() { close(f.served) })
	<-ctx.Done()
	return nil, ctx.Err()
}

func (f *lostOpenFront) Abort(ctx context.Context, req *ferryv1.AbortRequest) (*ferryv1.AbortResponse, error) {
	return f.dest.Abort(ctx, req)
}

// TestOpenAnswerLost: the source gives up a migration whose Open the
// destination served but whose answer never came back (cancelled here; a
// timeout, a lost connection or an agent shutting down are the same to
// the source). The source cannot name a session it never heard of, so it
// aborts the incoming migration by id and token: by the time the source
// reports the migration ended, the destination has ended it too and reset
// its device, instead of holding it until its source timeout.
func TestOpenAnswerLost(t *testing.T) {
	a := startAgents(t, dest.Config{})
	ctx := t.Context()
	front := &lostOpenFront{dest: a.transfer, served: make(chan struct{})}
	srv := grpcserver.New(grpcserver.Config{Creds: insecure.NewCredentials(), Pool: chunkwire.NewPool()})
	ferryv1.RegisterTransferServer(srv.GRPC, front)
	srv.Ready()
	frontAddr := wiretest.Serve(t, srv.GRPC)

	spec := "sim:size=4MiB,seed=61"
	prep, err := a.dest.PrepareIncoming(ctx, &ferryv1.PrepareIncomingRequest{MigrationId: "lost-open", Devices: []string{spec}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.source.StartMigration(ctx, &ferryv1.StartMigrationRequest{MigrationId: "lost-open", DestAddress: frontAddr, Token: prep.GetToken(),
		Devices: []*ferryv1.DevicePair{{SourceDevice: spec, DestDevice: spec}}}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-front.served:
	case <-ctx.Done():
		t.Fatal("the destination was never asked to Open")
	}
	resp, err := a.source.CancelMigration(ctx, &ferryv1.CancelMigrationRequest{MigrationId: "lost-open"})
	if err != nil {
		t.Fatal(err)
	}
	if m := resp.GetMigration(); m.GetPhase() != cancelled {
		t.Fatalf("source: %v %v, want CANCELLED", m.GetPhase(), m.GetError())
	}
	canon, _ := deviceapi.CanonicalSpec(spec)
	if st := deviceState(t, a.sourceReg, canon); st != vfio.StateRunning {
		t.Errorf("source device in %v, want RUNNING", st)
	}
	// No waiting: the source reports its end only after the abort.
	inc, err := a.dest.GetIncoming(ctx, &ferryv1.GetIncomingRequest{MigrationId: "lost-open"})
	if err != nil {
		t.Fatal(err)
	}
	if m := inc.GetMigration(); m.GetPhase() != failed || m.GetError().GetReason() != wire.ReasonAborted {
		t.Fatalf("destination: %v %v, want FAILED %s as the source ended", m.GetPhase(), m.GetError(), wire.ReasonAborted)
	}
	if st := deviceState(t, a.destReg, canon); st != vfio.StateRunning {
		t.Errorf("destination device in %v, want RUNNING (reset)", st)
	}
}
