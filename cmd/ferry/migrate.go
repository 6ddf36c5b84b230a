package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sync"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/internal/tracing"
	"github.com/vfio-ferry/ferry/pkg/size"
	"github.com/vfio-ferry/ferry/services/peerauth"
	"github.com/vfio-ferry/ferry/services/source"
	"github.com/vfio-ferry/ferry/services/wire"
)

func runMigrate(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("migrate", stderr, "--source ADDR --dest ADDR --src-device SPEC --dest-device SPEC [--src-device SPEC --dest-device SPEC ...] [--channels N] [--chunk-size SIZE] [--mode stopcopy|precopy [--downtime-limit D] [--precopy-timeout D] [--on-timeout fail|switchover]] [--switchover-deadline D] [--timeout D] [--compress none|zstd] [--max-bandwidth RATE] [--preflight] (--insecure | --tls-cert FILE --tls-key FILE --tls-ca FILE) [--json]")
	var pf pairFlags
	pf.register(fs)
	transfer := fs.String("dest-transfer", "", "the destination's address as the source agent reaches it (default: --dest)")
	destServerName := fs.String("dest-tls-server-name", "", "the name the source agent verifies the destination's certificate for, instead of the host of --dest-transfer (a certificate that names the node, not the address)")
	channels := fs.Uint("channels", wire.DefaultChannels, "parallel channels (TCP connections)")
	chunk := sizeFlag(wire.DefaultChunkSize)
	fs.Var(&chunk, "chunk-size", "chunk size")
	id := fs.String("id", "", "migration id (default: a random one)")
	mode := fs.String("mode", "stopcopy", "stopcopy: stop the devices at once and stream their state; precopy: stream what devices with PRE_COPY offer while the VM runs, until 'ferry switchover' or --downtime-limit (devices without PRE_COPY stream at the switchover)")
	var pre precopyFlags
	pre.register(fs)
	switchover := fs.Duration("switchover-deadline", 0, "the longest the source devices may stay stopped without a verdict; past it the source rolls back (0: the source agent's default, 60s)")
	timeout := fs.Duration("timeout", 0, "cancel the migration (and roll it back) if it has not ended after this long (0: wait until it ends or ferry migrate is interrupted)")
	compress := fs.String("compress", "none", "none, or zstd: compress chunks where the destination takes them (a chunk that does not shrink travels as it is; chunks of zero pages travel as headers either way). Off by default: on a fast link the CPU costs more than it saves")
	preflight := fs.Bool("preflight", false, "require the destination's device compatibility check before any device stops: a destination that cannot check (Ferry 0.1.0) is refused (see 'ferry preflight')")
	var maxBandwidth rateFlag
	fs.Var(&maxBandwidth, "max-bandwidth", "the most the migration may put on the wire over all its channels together, e.g. 2Gbit/s or 250MB/s (default: no limit of its own; change it while it runs with 'ferry bandwidth')")
	var sec clientSecurityFlags
	sec.register(fs)
	asJSON := fs.Bool("json", false, "print the result as one JSON object")
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := pf.check(); err != nil {
		return err
	}
	sourceAddr, destAddr, srcDevs, dstDevs := pf.source, pf.dest, pf.src, pf.dst
	switch {
	case *channels == 0 || *channels > wire.MaxChannels:
		return usageError(fmt.Errorf("--channels must be 1 to %d", wire.MaxChannels))
	case chunk < wire.MinChunkSize || chunk > wire.MaxChunkSize:
		return usageError(errors.New("--chunk-size must be 4KiB to 16MiB"))
	case *mode != "stopcopy" && *mode != "precopy":
		return usageError(fmt.Errorf("--mode %q: want stopcopy or precopy", *mode))
	case *switchover < 0:
		return usageError(errors.New("--switchover-deadline must not be negative"))
	case *timeout < 0:
		return usageError(errors.New("--timeout must not be negative"))
	case *compress != "none" && *compress != "zstd":
		return usageError(fmt.Errorf("--compress %q: want none or zstd", *compress))
	case maxBandwidth != 0 && maxBandwidth < source.MinBandwidth:
		return usageError(fmt.Errorf("--max-bandwidth must be at least %s", size.FormatRate(source.MinBandwidth)))
	}
	view := newProgressView(stderr)
	p := plan{
		id: *id, sourceAddr: *sourceAddr, destAddr: *destAddr, transfer: *transfer,
		channels: uint32(*channels), chunkSize: uint32(chunk), switchoverDeadline: *switchover, preflight: *preflight, destServerName: *destServerName, compress: *compress == "zstd",
		maxBandwidth: uint64(maxBandwidth),
		lost: func(err error) {
			view.note(fmt.Sprintf("ferry migrate: the watch broke (%s); watching again, the migration goes on", describe(err, sec.insecure)))
		},
	}
	if err := pre.apply(*mode, &p); err != nil {
		return usageError(err)
	}
	creds, reloader, err := sec.reloadingCreds(nil)
	if err != nil {
		return usageError(err)
	}
	p.creds = creds
	if reloader != nil {
		// A rotated client certificate is used for the next connection
		// (a broken watch is dialled again).
		wctx, stop := context.WithCancel(ctx)
		var wg sync.WaitGroup
		wg.Go(func() { reloader.Watch(wctx, peerauth.DefaultReloadInterval) })
		defer func() {
			stop()
			wg.Wait()
		}()
	}
	if p.id == "" {
		p.id = newMigrationID()
	}
	if p.transfer == "" {
		p.transfer = p.destAddr
	}
	for i := range srcDevs {
		p.pairs = append(p.pairs, &ferryv1.DevicePair{SourceDevice: srcDevs[i], DestDevice: dstDevs[i]})
	}
	tr, err := tracing.FromEnv(ctx, "ferry-migrate")
	if err != nil {
		return usageError(err)
	}
	defer shutdownTracing(tr, stderr)
	p.tracing = tr
	p.traceID = func(id string) { view.note("ferry migrate: trace " + id) }
	if *timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, *timeout)
		defer cancel()
	}
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

// report prints r as JSON or as a summary.
func report(w io.Writer, r *result, asJSON bool) error {
	if asJSON {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(r)
	}
	printSummary(w, r)
	return nil
}
