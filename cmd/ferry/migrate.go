package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
	"github.com/vfio-ferry/ferry/services/wire"
)

func runMigrate(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("migrate", stderr, "--source ADDR --dest ADDR --src-device SPEC --dest-device SPEC [--src-device SPEC --dest-device SPEC ...] [--channels N] [--chunk-size SIZE] (--insecure | --tls-cert FILE --tls-key FILE --tls-ca FILE) [--json]")
	sourceAddr := fs.String("source", "", "the source agent's address (host:port)")
	destAddr := fs.String("dest", "", "the destination agent's address (host:port)")
	transfer := fs.String("dest-transfer", "", "the destination's address as the source agent reaches it (default: --dest)")
	var srcDevs, dstDevs listFlag
	fs.Var(&srcDevs, "src-device", "a source device spec (repeat; pairs with --dest-device in order)")
	fs.Var(&dstDevs, "dest-device", "a destination device spec (repeat)")
	channels := fs.Uint("channels", wire.DefaultChannels, "parallel channels (TCP connections)")
	chunk := sizeFlag(wire.DefaultChunkSize)
	fs.Var(&chunk, "chunk-size", "chunk size")
	id := fs.String("id", "", "migration id (default: a random one)")
	var sec clientSecurityFlags
	sec.register(fs)
	asJSON := fs.Bool("json", false, "print the result as one JSON object")
	if err := parse(fs, args); err != nil {
		return err
	}
	switch {
	case *sourceAddr == "" || *destAddr == "":
		fs.Usage()
		return &exitError{code: 2, err: fmt.Errorf("--source and --dest are required")}
	case len(srcDevs) == 0 || len(srcDevs) != len(dstDevs):
		fs.Usage()
		return &exitError{code: 2, err: fmt.Errorf("give one --dest-device per --src-device (got %d and %d)", len(srcDevs), len(dstDevs))}
	case *channels == 0 || *channels > wire.MaxChannels:
		return &exitError{code: 2, err: fmt.Errorf("--channels must be 1 to %d", wire.MaxChannels)}
	case chunk < wire.MinChunkSize || chunk > wire.MaxChunkSize:
		return &exitError{code: 2, err: fmt.Errorf("--chunk-size must be 4KiB to 16MiB")}
	}
	creds, err := sec.creds()
	if err != nil {
		return &exitError{code: 2, err: err}
	}
	p := plan{
		id: *id, sourceAddr: *sourceAddr, destAddr: *destAddr, transfer: *transfer,
		channels: uint32(*channels), chunkSize: uint32(chunk), creds: creds,
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
