package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"

	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc/credentials/insecure"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/pkg/size"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/services/dest"
	"github.com/vfio-ferry/ferry/services/source"
	"github.com/vfio-ferry/ferry/services/wire"
)

func runDemo(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("demo", stderr, "[--size SIZE] [--channels N] [--devices K] [--json]")
	devSize := sizeFlag(1 << 30)
	fs.Var(&devSize, "size", "state size of each simulated device")
	channels := fs.Uint("channels", wire.DefaultChannels, "parallel channels (TCP connections)")
	devices := fs.Uint("devices", 1, "number of simulated devices")
	chunk := sizeFlag(wire.DefaultChunkSize)
	fs.Var(&chunk, "chunk-size", "chunk size")
	maxBuffers := fs.Uint("max-buffers", dest.DefaultMaxChunks, "destination window per device, in chunks")
	maxBufferBytes := sizeFlag(dest.DefaultMaxBytes)
	fs.Var(&maxBufferBytes, "max-buffer-bytes", "destination window per device, in bytes")
	asJSON := fs.Bool("json", false, "print the result as one JSON object")
	var lf logFlags
	lf.register(fs)
	if err := parse(fs, args); err != nil {
		return err
	}
	switch {
	case devSize == 0 || devSize > 1<<40:
		return &exitError{code: 2, err: fmt.Errorf("--size must be 1B to 1TiB")}
	case *channels == 0 || *channels > wire.MaxChannels:
		return &exitError{code: 2, err: fmt.Errorf("--channels must be 1 to %d", wire.MaxChannels)}
	case *devices == 0 || *devices > wire.MaxDevices:
		return &exitError{code: 2, err: fmt.Errorf("--devices must be 1 to %d", wire.MaxDevices)}
	case chunk < wire.MinChunkSize || chunk > wire.MaxChunkSize:
		return &exitError{code: 2, err: fmt.Errorf("--chunk-size must be 4KiB to 16MiB")}
	}
	log := slog.New(slog.DiscardHandler)
	if lf.level == "debug" {
		l, err := lf.logger(stderr)
		if err != nil {
			return &exitError{code: 2, err: err}
		}
		log = l
	}

	env, err := startDemoAgents(ctx, log, uint32(*maxBuffers), uint64(maxBufferBytes))
	if err != nil {
		return err
	}
	defer env.stop()

	p := plan{
		id: newMigrationID(), sourceAddr: env.sourceAddr, destAddr: env.destAddr, transfer: env.destAddr,
		channels: uint32(*channels), chunkSize: uint32(chunk), creds: insecure.NewCredentials(),
	}
	for i := range int(*devices) {
		spec := fmt.Sprintf("sim:size=%s,seed=%d", size.Format(uint64(devSize)), i+1)
		p.pairs = append(p.pairs, &ferryv1.DevicePair{SourceDevice: spec, DestDevice: spec})
	}
	if !*asJSON {
		fmt.Fprintf(stdout, "ferry demo: destination %s, source %s (loopback, chunks on direct data connections); migrating %d simulated device(s) of %s over %d channel(s)\n",
			env.destAddr, env.sourceAddr, *devices, size.Format(uint64(devSize)), *channels)
	}
	view := newProgressView(stderr)
	r, err := migrate(ctx, p, view.update)
	if err != nil {
		return err
	}
	if err := report(stdout, r, *asJSON); err != nil {
		return err
	}
	if !r.Verified {
		return &exitError{code: 1}
	}
	return nil
}

// demoEnv is a destination and a source agent serving on loopback TCP in
// this process.
type demoEnv struct {
	destAddr, sourceAddr string
	stop                 func()
}

func startDemoAgents(ctx context.Context, log *slog.Logger, maxChunks uint32, maxBytes uint64) (*demoEnv, error) {
	creds := insecure.NewCredentials()
	// The destination's gRPC port and its direct data port (as `ferry dest
	// --data-listen` serves it), and the source's gRPC port.
	var lis [3]net.Listener
	closeAll := func() {
		for _, l := range lis {
			if l != nil {
				l.Close()
			}
		}
	}
	for i := range lis {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			closeAll()
			return nil, err
		}
		lis[i] = l
	}
	dlis, datalis, slis := lis[0], lis[1], lis[2]
	dreg := vfio.NewRegistry(vfio.RegistryOptions{AllowSim: true})
	sreg := vfio.NewRegistry(vfio.RegistryOptions{AllowSim: true})
	dpool, spool := wire.NewPool(), wire.NewPool()
	dagent, err := dest.New(dest.Config{Registry: dreg, Pool: dpool, Logger: log, MaxChunks: maxChunks, MaxBytes: maxBytes})
	if err != nil {
		closeAll()
		return nil, &exitError{code: 2, err: err}
	}
	sagent, err := source.New(source.Config{Registry: sreg, Pool: spool, Logger: log, PeerCreds: creds})
	if err != nil {
		closeAll()
		return nil, err
	}
	dsrv := wire.NewServer(wire.ServerConfig{Creds: creds, Logger: log, Pool: dpool})
	dagent.Register(dsrv.GRPC)
	dsrv.Ready()
	ssrv := wire.NewServer(wire.ServerConfig{Creds: creds, Logger: log, Pool: spool})
	sagent.Register(ssrv.GRPC)
	ssrv.Ready()
	var g errgroup.Group
	g.Go(func() error { return dsrv.GRPC.Serve(dlis) })
	g.Go(func() error { return ssrv.GRPC.Serve(slis) })
	g.Go(func() error { return dagent.ServeData(datalis, creds) })
	return &demoEnv{
		destAddr:   dlis.Addr().String(),
		sourceAddr: slis.Addr().String(),
		stop: func() {
			sagent.Close()
			dagent.Close()
			ssrv.Stop(ctx)
			dsrv.Stop(ctx)
			g.Wait()
			sreg.Close()
			dreg.Close()
		},
	}, nil
}
