package source

import (
	"context"
	"net"
	"strconv"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/services/chunkwire"
	"github.com/vfio-ferry/ferry/services/wire"
)

// A destination that answers every new stream and loses it again, never
// acknowledging a chunk, cannot keep a migration alive: the reconnect
// timeout counts from the last acknowledged progress, not from the last
// stream that answered once.
func TestFlappingDestinationRunsOutTheReconnectTimeout(t *testing.T) {
	f := &fakeDest{windows: openWindow}
	f.channel = func(_ int, st grpc.BidiStreamingServer[ferryv1.ChannelRequest, ferryv1.ChannelResponse]) error {
		if err := st.Send(&ferryv1.ChannelResponse{}); err != nil {
			return err
		}
		if _, err := st.Recv(); err != nil {
			return err
		}
		return wire.Errorf(codes.Unavailable, "", "flap")
	}
	a, reg := sourceAgent(t, Config{ReconnectTimeout: 300 * time.Millisecond})
	start(t, a, "flap", serveFake(t, f), verdictSpec, 1<<20, time.Hour)
	m := waitEnd(t, a, "flap")
	if m.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_FAILED || m.GetError().GetReason() != wire.ReasonPeerUnavailable {
		t.Errorf("ended %v %v, want FAILED %s", m.GetPhase(), m.GetError(), wire.ReasonPeerUnavailable)
	}
	if st := deviceState(t, reg, verdictSpec); st != vfio.StateRunning {
		t.Errorf("device in %v, want RUNNING", st)
	}
}

// dataFake is a fakeDest that offers a direct data port nobody listens
// on, and checks at SwitchoverStart that every channel already tried it.
type dataFake struct {
	*fakeDest
	port     uint32
	check    func() error
	switched chan error
}

func (f *dataFake) Open(ctx context.Context, req *ferryv1.OpenRequest) (*ferryv1.OpenResponse, error) {
	resp, err := f.fakeDest.Open(ctx, req)
	if resp != nil {
		resp.DataPort = f.port
	}
	return resp, err
}

func (f *dataFake) SwitchoverStart(ctx context.Context, req *ferryv1.SwitchoverStartRequest) (*ferryv1.SwitchoverStartResponse, error) {
	select {
	case f.switched <- f.check():
	default:
	}
	return f.fakeDest.SwitchoverStart(ctx, req)
}

// Every data connection is dialled, and fallen back from when the port is
// closed, before SwitchoverStart: no dial happens inside the downtime.
func TestDataConnectionsAreDialledBeforeSwitchover(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := lis.Addr().(*net.TCPAddr).Port
	lis.Close() // nothing listens there now
	base := &fakeDest{windows: openWindow}
	base.channel = func(_ int, st grpc.BidiStreamingServer[ferryv1.ChannelRequest, ferryv1.ChannelResponse]) error {
		key := make([]byte, chunkwire.DataKeyLen)
		if err := st.Send(&ferryv1.ChannelResponse{DataKey: key}); err != nil {
			return err
		}
		return serveVerdict(0, st)
	}
	a, _ := sourceAgent(t, Config{})
	f := &dataFake{fakeDest: base, port: uint32(port), switched: make(chan error, 1)}
	const channels = 3
	f.check = func() error {
		m, err := a.lookup("dial-first")
		if err != nil {
			return err
		}
		if n := m.fallbacks.Load(); n != channels {
			return wire.Errorf(codes.FailedPrecondition, "", "%d of %d channels had tried their data connection at SwitchoverStart", n, channels)
		}
		return nil
	}
	f.aborted = make(chan struct{})
	addr := serveTransfer(t, f)
	_, err = a.StartMigration(t.Context(), &ferryv1.StartMigrationRequest{
		MigrationId: "dial-first", DestAddress: addr, Token: "token", Channels: channels,
		Devices: []*ferryv1.DevicePair{{SourceDevice: verdictSpec, DestDevice: verdictSpec}},
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := <-f.switched; err != nil {
		t.Error(err)
	}
	if m := waitEnd(t, a, "dial-first"); m.GetPhase() != ferryv1.MigrationPhase_MIGRATION_PHASE_SUCCEEDED || m.GetDirectData() {
		t.Errorf("ended %v direct %v (%v), want SUCCEEDED in gRPC messages", m.GetPhase(), m.GetDirectData(), m.GetError())
	}
}

// The agent forgets the oldest finished migrations beyond maxHistory, and
// never one still running.
func TestFinishedMigrationsAreForgotten(t *testing.T) {
	a, _ := sourceAgent(t, Config{})
	ended := make(chan struct{})
	close(ended)
	base := time.Now()
	a.mu.Lock()
	running := &migration{id: "running", createTime: base.Add(-time.Hour), done: make(chan struct{})}
	a.migrations[running.id] = running
	for i := range maxHistory + 10 {
		id := "m" + strconv.Itoa(i)
		a.migrations[id] = &migration{id: id, createTime: base.Add(time.Duration(i) * time.Second), done: ended}
	}
	a.forgetOldLocked()
	n := len(a.migrations)
	_, keptRunning := a.migrations["running"]
	_, keptOldest := a.migrations["m0"]
	_, keptNewest := a.migrations["m"+strconv.Itoa(maxHistory+9)]
	a.mu.Unlock()
	if n != maxHistory || !keptRunning || keptOldest || !keptNewest {
		t.Errorf("%d remembered (running kept %v, oldest kept %v, newest kept %v); want %d, the running one and the newest", n, keptRunning, keptOldest, keptNewest, maxHistory)
	}
}
