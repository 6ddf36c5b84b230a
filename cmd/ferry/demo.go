package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"

	"google.golang.org/grpc/credentials/insecure"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/internal/loopback"
	"github.com/vfio-ferry/ferry/internal/tracing"
	"github.com/vfio-ferry/ferry/pkg/size"
	"github.com/vfio-ferry/ferry/pkg/vfio"
	"github.com/vfio-ferry/ferry/services/dest"
	"github.com/vfio-ferry/ferry/services/wire"
)

func runDemo(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("demo", stderr, "[--size SIZE] [--channels N] [--devices K] [--mode stopcopy|precopy [--precopy SIZE] [--dirty RATE] [--downtime-limit D] [--precopy-timeout D] [--on-timeout fail|switchover]] [--json]")
	devSize := sizeFlag(1 << 30)
	fs.Var(&devSize, "size", "state size of each simulated device")
	mode := fs.String("mode", "stopcopy", "stopcopy: stop the devices at once and stream their state; precopy: simulated devices with PRE_COPY stream their initial data while the VM runs, then switch over (at --downtime-limit, or once READY without it)")
	initial := sizeFlag(0)
	fs.Var(&initial, "precopy", "pre-copy: each device's initial data, streamed while the VM runs (default: 3/4 of --size)")
	dirty := rateFlag(8e6)
	fs.Var(&dirty, "dirty", "pre-copy: the rate at which each device dirties its state while the VM runs (0: never)")
	var pre precopyFlags
	pre.register(fs)
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
	case *mode != "stopcopy" && *mode != "precopy":
		return usageError(fmt.Errorf("--mode %q: want stopcopy or precopy", *mode))
	case initial > devSize:
		return usageError(fmt.Errorf("--precopy %s is above --size %s", size.Format(uint64(initial)), size.Format(uint64(devSize))))
	}
	set := flagsSet(fs)
	for _, name := range []string{"precopy", "dirty"} {
		if set[name] && *mode != "precopy" {
			return usageError(fmt.Errorf("--%s needs --mode precopy", name))
		}
	}
	if !set["precopy"] {
		initial = devSize / 4 * 3
	}
	var p plan
	if err := pre.apply(*mode, &p); err != nil {
		return usageError(err)
	}
	log := slog.New(slog.DiscardHandler)
	if lf.level == "debug" {
		l, err := lf.logger(stderr)
		if err != nil {
			return &exitError{code: 2, err: err}
		}
		log = l
	}

	// One process, one provider: the demo's trace holds the control
	// plane's calls and both agents' spans.
	tr, err := tracing.FromEnv(ctx, "ferry-demo")
	if err != nil {
		return usageError(err)
	}
	defer shutdownTracing(tr, stderr)
	env, err := startDemoAgents(ctx, log, tr, uint32(*maxBuffers), uint64(maxBufferBytes))
	if err != nil {
		return err
	}
	defer env.stop()

	p.id, p.sourceAddr, p.destAddr, p.transfer = newMigrationID(), env.sourceAddr, env.destAddr, env.destAddr
	p.channels, p.chunkSize, p.creds = uint32(*channels), uint32(chunk), insecure.NewCredentials()
	// Without a downtime limit the source waits for a Switchover: the
	// demo asks for it once the destination has loaded the initial data.
	p.switchoverWhenReady = p.precopy && p.downtimeLimit == 0
	for i := range int(*devices) {
		spec := fmt.Sprintf("sim:size=%s,seed=%d", size.Format(uint64(devSize)), i+1)
		if p.precopy {
			spec += ",flags=stopcopy|p2p|precopy"
			if initial > 0 {
				spec += fmt.Sprintf(",precopy=%d", uint64(initial))
			}
			if dirty > 0 {
				spec += fmt.Sprintf(",dirty=%dB/s", uint64(dirty))
			}
		}
		p.pairs = append(p.pairs, &ferryv1.DevicePair{SourceDevice: spec, DestDevice: spec})
	}
	if !*asJSON {
		// How the chunks travelled is the result's to say (the
		// summary's channels line): the source falls back to gRPC
		// messages when it cannot use the direct data connections.
		fmt.Fprintf(stdout, "ferry demo: destination %s (direct data connections on %s), source %s, on loopback; migrating %d simulated device(s) of %s over %d channel(s)%s\n",
			env.destAddr, env.dataAddr, env.sourceAddr, *devices, size.Format(uint64(devSize)), *channels, demoPrecopyText(p, uint64(initial), uint64(dirty)))
	}
	view := newProgressView(stderr)
	p.tracing = tr
	p.traceID = func(id string) { view.note("ferry demo: trace " + id) }
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
	destAddr, sourceAddr, dataAddr string
	stop                           func()
}

// startDemoAgents starts the agents with the destination's window limits;
// the destination serves direct data connections, as `ferry dest
// --data-listen` does.
func startDemoAgents(ctx context.Context, log *slog.Logger, tr *tracing.Tracing, maxChunks uint32, maxBytes uint64) (*demoEnv, error) {
	datalis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	a, err := loopback.Start(loopback.Config{
		Dest:          dest.Config{MaxChunks: maxChunks, MaxBytes: maxBytes},
		DestDevices:   vfio.RegistryOptions{AllowSim: true},
		SourceDevices: vfio.RegistryOptions{AllowSim: true},
		Logger:        log,
		DataListener:  datalis,
		Tracing:       tr,
	})
	if err != nil {
		return nil, &exitError{code: 2, err: err}
	}
	return &demoEnv{
		destAddr:   a.DestAddr,
		sourceAddr: a.SourceAddr,
		dataAddr:   datalis.Addr().String(),
		stop:       func() { a.Close(ctx) },
	}, nil
}

// demoPrecopyText is what the demo's banner says of its pre-copy: the
// devices' initial data and dirty rate, and what will switch it over.
func demoPrecopyText(p plan, initial, dirty uint64) string {
	if !p.precopy {
		return ""
	}
	when := "once the destination is READY (the demo asks for the switchover)"
	if p.downtimeLimit > 0 {
		when = "by itself once READY with a predicted downtime of at most " + p.downtimeLimit.String()
	}
	return fmt.Sprintf(", pre-copy: %s of initial data each, dirtied at %s, switching over %s",
		size.Format(initial), size.FormatRate(float64(dirty)), when)
}
