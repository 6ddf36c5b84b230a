package e2e

import (
	"context"
	"errors"
	"io"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/services/chunkwire"
	"github.com/vfio-ferry/ferry/services/dest"
	"github.com/vfio-ferry/ferry/services/deviceapi"
	"github.com/vfio-ferry/ferry/services/grpcserver"
	"github.com/vfio-ferry/ferry/services/source"
	"github.com/vfio-ferry/ferry/services/wire"
	"github.com/vfio-ferry/ferry/services/wire/wiretest"
)

// partitionFront serves Transfer in front of a destination agent and
// forwards every call, except that it can lose the answers a partition
// would: Finish's verdict (after the destination reached it), the Abort,
// the Commit.
type partitionFront struct {
	ferryv1.UnimplementedTransferServer
	dest                               ferryv1.TransferClient
	loseVerdict, loseAbort, loseCommit bool
	// beforeCommit runs before the Commit is forwarded: the moment a
	// control plane's call can race it.
	beforeCommit func(context.Context)
}

// partitioned is the error a call lost in a partition ends with.
func partitioned() error { return wire.Errorf(codes.Unavailable, "", "partitioned") }

func (f *partitionFront) Open(ctx context.Context, req *ferryv1.OpenRequest) (*ferryv1.OpenResponse, error) {
	return f.dest.Open(ctx, req)
}

func (f *partitionFront) SwitchoverStart(ctx context.Context, req *ferryv1.SwitchoverStartRequest) (*ferryv1.SwitchoverStartResponse, error) {
	return f.dest.SwitchoverStart(ctx, req)
}

func (f *partitionFront) Finish(ctx context.Context, req *ferryv1.FinishRequest) (*ferryv1.FinishResponse, error) {
	resp, err := f.dest.Finish(ctx, req)
	if f.loseVerdict && err == nil {
		return nil, partitioned()
	}
	return resp, err
}

func (f *partitionFront) Abort(ctx context.Context, req *ferryv1.AbortRequest) (*ferryv1.AbortResponse, error) {
	if f.loseAbort {
		return nil, partitioned()
	}
	return f.dest.Abort(ctx, req)
}

func (f *partitionFront) Commit(ctx context.Context, req *ferryv1.CommitRequest) (*ferryv1.CommitResponse, error) {
	if f.loseCommit {
		return nil, partitioned()
	}
	if f.beforeCommit != nil {
		f.beforeCommit(ctx)
	}
	return f.dest.Commit(ctx, req)
}

// Channel forwards a stream both ways, with the session's headers.
func (f *partitionFront) Channel(st grpc.BidiStreamingServer[ferryv1.ChannelRequest, ferryv1.ChannelResponse]) error {
	in, _ := metadata.FromIncomingContext(st.Context())
	out := metadata.MD{}
	for _, k := range []string{"ferry-session-id", "ferry-channel"} {
		out[k] = in.Get(k)
	}
	up, err := f.dest.Channel(metadata.NewOutgoingContext(st.Context(), out))
	if err != nil {
		return err
	}
	go func() {
		for {
			m, err := st.Recv()
			if err != nil {
				up.CloseSend()
				return
			}
			if up.Send(m) != nil {
				return
			}
		}
	}()
	for {
		m, err := up.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		if err := st.Send(m); err != nil {
			return err
		}
	}
}

// startPartitioned starts both agents, the source reaching the
// destination through f, and a migration of spec; it returns the agents
// and the migration id.
func startPartitioned(t *testing.T, f *partitionFront, id, spec string) *agents {
	t.Helper()
	a := startAgentsOn(t, dest.Config{}, source.Config{ReconnectTimeout: 300 * time.Millisecond, ProgressTimeout: 300 * time.Millisecond}, nil)
	f.dest = a.transfer
	srv := grpcserver.New(grpcserver.Config{Creds: insecure.NewCredentials(), Pool: chunkwire.NewPool()})
	ferryv1.RegisterTransferServer(srv.GRPC, f)
	srv.Ready()
	front := wiretest.Serve(t, srv.GRPC)
	ctx := t.Context()
	prep, err := a.dest.PrepareIncoming(ctx, &ferryv1.PrepareIncomingRequest{MigrationId: id, Devices: []string{spec}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.source.StartMigration(ctx, &ferryv1.StartMigrationRequest{MigrationId: id, DestAddress: front, Token: prep.GetToken(),
		Devices: []*ferryv1.DevicePair{{SourceDevice: spec, DestDevice: spec}}}); err != nil {
		t.Fatal(err)
	}
	return a
}

func (a *agents) incoming(t *testing.T, id string) *ferryv1.Migration {
	t.Helper()
	resp, err := a.dest.GetIncoming(t.Context(), &ferryv1.GetIncomingRequest{MigrationId: id})
	if err != nil {
		t.Fatal(err)
	}
	return resp.GetMigration()
}

func wantOwned(t *testing.T, who string, m *ferryv1.Migration, phase ferryv1.MigrationPhase, owner ferryv1.DeviceOwner) {
	t.Helper()
	if m.GetPhase() != phase || m.GetOwner() != owner {
		t.Errorf("%s: %v owner %v (%v), want %v owner %v", who, m.GetPhase(), m.GetOwner(), m.GetError(), phase, owner)
	}
}

// A partition during Finish: the destination verified, the source never
// heard it. The source rolls back and aborts; the destination, verified
// but not committed, takes the Abort and resets its device. Only the
// source holds a runnable copy.
func TestVerifiedDestinationTakesTheAbort(t *testing.T) {
	const spec = "sim:size=4MiB,seed=71"
	a := startPartitioned(t, &partitionFront{loseVerdict: true}, "lost-verdict", spec)
	src := a.waitSource(t, "lost-verdict")
	wantOwned(t, "source", src, failed, ferryv1.DeviceOwner_DEVICE_OWNER_SOURCE)
	canon, _ := deviceapi.CanonicalSpec(spec)
	if st := deviceState(t, a.sourceReg, canon); st != vfio.StateRunning {
		t.Errorf("source device in %v, want RUNNING", st)
	}
	// No waiting: the source ends only after the Abort was answered.
	d := a.incoming(t, "lost-verdict")
	wantOwned(t, "destination", d, failed, ferryv1.DeviceOwner_DEVICE_OWNER_SOURCE)
	if d.GetError().GetReason() != wire.ReasonAborted {
		t.Errorf("destination error %v, want %s", d.GetError(), wire.ReasonAborted)
	}
	if st := deviceState(t, a.destReg, canon); st != vfio.StateRunning {
		t.Errorf("destination device in %v, want RUNNING (reset)", st)
	}
}

// When the Abort is lost too, the destination stays VERIFIED and says the
// owner is in doubt, never resolving it by itself; the control plane reads
// the source (FAILED, owner SOURCE) and cancels the destination.
func TestPartitionOutlastsTheAbort(t *testing.T) {
	const spec = "sim:size=4MiB,seed=72"
	a := startPartitioned(t, &partitionFront{loseVerdict: true, loseAbort: true}, "lost-abort", spec)
	src := a.waitSource(t, "lost-abort")
	wantOwned(t, "source", src, failed, ferryv1.DeviceOwner_DEVICE_OWNER_SOURCE)
	wantOwned(t, "destination", a.incoming(t, "lost-abort"), ferryv1.MigrationPhase_MIGRATION_PHASE_VERIFIED, ferryv1.DeviceOwner_DEVICE_OWNER_IN_DOUBT)
	resp, err := a.dest.CancelIncoming(t.Context(), &ferryv1.CancelIncomingRequest{MigrationId: "lost-abort"})
	if err != nil {
		t.Fatal(err)
	}
	wantOwned(t, "destination after CancelIncoming", resp.GetMigration(), cancelled, ferryv1.DeviceOwner_DEVICE_OWNER_SOURCE)
	canon, _ := deviceapi.CanonicalSpec(spec)
	if st := deviceState(t, a.destReg, canon); st != vfio.StateRunning {
		t.Errorf("destination device in %v, want RUNNING (reset)", st)
	}
}

// When only the Commit is lost, the source has committed (SUCCEEDED,
// owner DESTINATION) and the destination waits VERIFIED; the control
// plane commits it.
func TestLostCommitIsResolvedByTheControlPlane(t *testing.T) {
	const spec = "sim:size=4MiB,seed=73"
	a := startPartitioned(t, &partitionFront{loseCommit: true}, "lost-commit", spec)
	src := a.waitSource(t, "lost-commit")
	wantOwned(t, "source", src, succeeded, ferryv1.DeviceOwner_DEVICE_OWNER_DESTINATION)
	wantOwned(t, "destination", a.incoming(t, "lost-commit"), ferryv1.MigrationPhase_MIGRATION_PHASE_VERIFIED, ferryv1.DeviceOwner_DEVICE_OWNER_IN_DOUBT)
	resp, err := a.dest.CommitIncoming(t.Context(), &ferryv1.CommitIncomingRequest{MigrationId: "lost-commit"})
	if err != nil {
		t.Fatal(err)
	}
	wantOwned(t, "destination after CommitIncoming", resp.GetMigration(), succeeded, ferryv1.DeviceOwner_DEVICE_OWNER_DESTINATION)
	_, err = a.source.CancelMigration(t.Context(), &ferryv1.CancelMigrationRequest{MigrationId: "lost-commit"})
	if wire.Reason(err) != wire.ReasonCommitted {
		t.Errorf("cancel after the commit: %v, want %s", err, wire.ReasonCommitted)
	}
}

// A CancelIncoming that reaches the VERIFIED destination just before the
// source's Commit wins, and costs no device: the destination resets its
// device and refuses the Commit (MIGRATION_ROLLED_BACK), and the source,
// told so, rolls back too. Before, the source reported SUCCEEDED with its
// device stopped while the destination had reset its own: neither host
// could run the VM.
func TestCancelRacingTheCommitCostsNoDevice(t *testing.T) {
	const spec = "sim:size=4MiB,seed=74"
	f := &partitionFront{}
	var cancelErr error
	var during *ferryv1.Migration
	var a *agents
	f.beforeCommit = func(ctx context.Context) {
		if resp, err := a.source.GetMigration(ctx, &ferryv1.GetMigrationRequest{MigrationId: "commit-race"}); err == nil {
			during = resp.GetMigration()
		}
		_, cancelErr = a.dest.CancelIncoming(ctx, &ferryv1.CancelIncomingRequest{MigrationId: "commit-race"})
	}
	a = startPartitioned(t, f, "commit-race", spec)
	src := a.waitSource(t, "commit-race")
	if cancelErr != nil {
		t.Fatalf("CancelIncoming of the VERIFIED destination: %v", cancelErr)
	}
	if during.GetOwner() != ferryv1.DeviceOwner_DEVICE_OWNER_IN_DOUBT {
		t.Errorf("source while its Commit was in flight: owner %v, want IN_DOUBT", during.GetOwner())
	}
	wantOwned(t, "source", src, failed, ferryv1.DeviceOwner_DEVICE_OWNER_SOURCE)
	if src.GetError().GetReason() != wire.ReasonRolledBack {
		t.Errorf("source error %v, want %s", src.GetError(), wire.ReasonRolledBack)
	}
	wantOwned(t, "destination", a.incoming(t, "commit-race"), cancelled, ferryv1.DeviceOwner_DEVICE_OWNER_SOURCE)
	canon, _ := deviceapi.CanonicalSpec(spec)
	if st := deviceState(t, a.sourceReg, canon); st != vfio.StateRunning {
		t.Errorf("source device in %v, want RUNNING: the VM keeps its device", st)
	}
	if st := deviceState(t, a.destReg, canon); st != vfio.StateRunning {
		t.Errorf("destination device in %v, want RUNNING (reset)", st)
	}
	// The commit the source holds no longer refuses a cancel: the
	// migration has ended, rolled back.
	if _, err := a.source.CancelMigration(t.Context(), &ferryv1.CancelMigrationRequest{MigrationId: "commit-race"}); wire.Reason(err) == wire.ReasonCommitted {
		t.Errorf("cancel after the rollback: %v", err)
	}
}
