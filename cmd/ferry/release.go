package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"google.golang.org/protobuf/encoding/protojson"

	ferryv1 "github.com/vfio-ferry/ferry/api/proto/ferry/v1"
)

// releaseHelp is what `ferry help release` says beyond the flags.
const releaseHelp = `
After a verified migration the source device rests in STOP (and a device
whose rollback failed may rest in ERROR): the VM it served runs on the
destination now. Release gives such a device back for a new VM on the
source host: the source agent moves it to RUNNING, or resets it with
--reset (also when the move to RUNNING fails). A device a migration
still holds is refused (FAILED_PRECONDITION, DEVICE_BUSY).
`

func runRelease(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("release", stderr, "--source ADDR DEVICE [--reset] (--insecure | --tls-cert FILE --tls-key FILE --tls-ca FILE) [--json]")
	usage := fs.Usage
	fs.Usage = func() {
		usage()
		fmt.Fprint(fs.Output(), releaseHelp)
	}
	addr := fs.String("source", "", "the source agent's address (host:port)")
	reset := fs.Bool("reset", false, "reset the device instead of moving it to RUNNING")
	var sec clientSecurityFlags
	sec.register(fs)
	asJSON := fs.Bool("json", false, "print the device as JSON")
	rest, err := parseArgs(fs, args)
	if err != nil {
		return err
	}
	switch {
	case *addr == "":
		return usageError(errors.New("--source is required"))
	case len(rest) != 1:
		return usageError(fmt.Errorf("give one DEVICE, the spec of the source device (got %d arguments)", len(rest)))
	}
	device := rest[0]
	conn, creds, err := sec.dial(*addr)
	if err != nil {
		return err
	}
	defer conn.Close()
	// A reset may take a while on real hardware; the agent bounds it with
	// its device timeout.
	cctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	resp, err := ferryv1.NewSourceAgentClient(conn).ReleaseDevice(cctx, &ferryv1.ReleaseDeviceRequest{Device: device, Reset_: *reset})
	if err != nil {
		return newCallError("release "+device+" at "+*addr, err, creds)
	}
	if *asJSON {
		b, err := protojson.MarshalOptions{Multiline: true, EmitUnpopulated: true}.Marshal(resp)
		if err != nil {
			return err
		}
		_, err = fmt.Fprintf(stdout, "%s\n", b)
		return err
	}
	d := resp.GetDevice()
	how := "moved to RUNNING"
	if *reset {
		how = "reset"
	}
	fmt.Fprintf(stdout, "%s: %s, now %s", d.GetSpec(), how, stateName(d.GetState()))
	if d.GetError() != "" {
		fmt.Fprintf(stdout, " (%s)", d.GetError())
	}
	fmt.Fprintln(stdout)
	return nil
}
